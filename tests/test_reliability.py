"""Fault tolerance (issue 8): preemption, kill -9, kill during a save, NaN policies and an unwritable checkpoint
directory (bad configs: tests/test_bad_configs.py).

The process tests run the real CLI (`python -m clip_jax.main train`) on the tiniest model in subprocesses, kill
them from outside, restart the same command and compare the final parameters bit for bit with an uninterrupted
run. Every subprocess is killed in a `finally`, and every wait has a timeout.
"""

import ctypes
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import optim, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny_cpu
from run_configs import TINIEST

TOTAL, EVERY = 8, 2  # steps of every subprocess run, and its checkpoint interval
TINY = {  # the smallest model the code supports: each run is mostly import + compile time
    **TINIEST,
    "evals.zeroshot.dataset": "",
    "total_steps": TOTAL,
    "ckpt_every": EVERY,
    "log_every": 1,  # a log line per step: the tests see which step a run has reached
}
STEP_LINE = re.compile(r"^step (\d+)/\d+  loss ", re.MULTILINE)  # the console's metrics line (clip_jax/console.py)
TIMEOUT = 240  # seconds for any one subprocess run (a normal one takes ~20 s on 2 busy cores)


@pytest.fixture(scope="module")
def data_dir(shapes_data_dir):
    """The small shapes set (conftest prepares it once per session)."""
    return shapes_data_dir


def tiny_config(data_dir, **overrides):
    cfg = tiny_cpu.get_config()
    for key, value in {**TINY, "data.data_dir": data_dir, **overrides}.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def _cli_args(data_dir, workdir, **overrides):
    flat = {**TINY, "data.data_dir": data_dir, **overrides}
    return [
        sys.executable,
        "-m",
        "clip_jax.main",
        "train",
        f"--workdir={workdir}",
        "--config=configs/tiny_cpu.py",
    ] + [f"--config.{k}={v}" for k, v in flat.items()]


def _env():
    return dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        # The same persistent cache as conftest, for every compile (orbax's small per-array ones too).
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=ROOT,  # drivers written to a tmp folder import this checkout's clip_jax, not the installed one
    )


class Run:
    """One CLI training process; its stdout+stderr go to a file the test polls."""

    def __init__(self, args, log_path, env=None, **popen):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115  (closed by kill(), which every test calls)
        env = {**_env(), **(env or {})}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, **popen)

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def steps(self) -> list[int]:
        return [int(m) for m in STEP_LINE.findall(self.text())]

    def wait_until(self, predicate, what: str, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"process ended (rc {self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.02)

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run did not finish in {timeout} s:\n{self.tail()}") from None

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def run_to_end(data_dir, workdir, log_path, **overrides) -> Run:
    run = Run(_cli_args(data_dir, workdir, **overrides), log_path)
    try:
        rc = run.finish()
        assert rc == 0, run.tail()
    finally:
        run.kill()
    return run


def final_state(cfg, workdir):
    """(step, state as numpy, data state) of the latest checkpoint in workdir, restored with the train code's own
    shardings (8 devices here as in the subprocesses)."""
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    _, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    ckpt = checkpoint_lib.Checkpointer(str(workdir), cfg)
    try:
        step, state, data_state = ckpt.restore(abstract, shardings, cfg)
    finally:
        ckpt.close()
    return step, jax.tree.map(np.asarray, jax.device_get(state)), data_state


def assert_same_state(a, b):
    assert a[0] == b[0] and a[2] == b[2], (a[0], b[0], a[2], b[2])  # same step, same data position
    leaves_a, leaves_b = jax.tree.leaves(a[1]), jax.tree.leaves(b[1])
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)  # bit-identical on CPU


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run of the subprocess config: what every interrupted-and-resumed run must end at."""
    workdir = tmp_path_factory.mktemp("reference")
    run_to_end(data_dir, workdir, workdir / "log.txt")
    return final_state(tiny_config(data_dir), workdir)


def _checkpoint_steps(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _kill9_then_resume(data_dir, reference, workdir, seed):
    """kill -9 at a random (seeded) step after the first checkpoint, plus a random delay that often lands inside
    a later save; the restart resumes from the latest complete checkpoint and ends bit-identical to the
    uninterrupted run (parameters, optimizer state, rng, step and data position)."""
    rng = random.Random(seed)
    kill_step, delay = rng.randint(EVERY + 1, TOTAL - 1), rng.uniform(0.0, 0.4)
    run = Run(_cli_args(data_dir, workdir), workdir / "killed.txt")
    try:
        # Waiting for a complete checkpoint too makes the restart a real resume, not a fresh start.
        reached = lambda: max(run.steps(), default=0) >= kill_step and _checkpoint_steps(workdir)
        run.wait_until(reached, f"step {kill_step} and a complete checkpoint")
        time.sleep(delay)
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        run.kill()
    saved = _checkpoint_steps(workdir)
    assert saved and saved[-1] < TOTAL, saved
    resumed = run_to_end(data_dir, workdir, workdir / "resumed.txt")
    assert resumed.steps()[0] == saved[-1] + 1, (kill_step, saved, resumed.tail())
    assert_same_state(final_state(tiny_config(data_dir), workdir), reference)


def test_kill9_at_a_random_step_resumes_exactly(data_dir, reference, tmp_path):
    _kill9_then_resume(data_dir, reference, tmp_path, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_kill9_more_random_steps(data_dir, reference, tmp_path, seed):
    _kill9_then_resume(data_dir, reference, tmp_path, seed)


def test_sigterm_saves_the_current_step_exits_0_and_resumes(data_dir, reference, tmp_path):
    run = Run(_cli_args(data_dir, tmp_path), tmp_path / "term.txt")
    try:
        run.wait_until(lambda: 3 in run.steps(), "step 3")  # between the checkpoints at 2 and 4
        run.proc.send_signal(signal.SIGTERM)
        rc = run.finish()
    finally:
        run.kill()
    text = run.text()
    assert rc == 0, run.tail()
    found = re.search(
        r"preempted \(SIGTERM\) at step (\d+); checkpoint saved in .*; re-run the same command", text
    )
    assert found, run.tail()
    stopped = int(found.group(1))
    assert 3 <= stopped < TOTAL and max(run.steps()) == stopped  # finished the step it was in, then stopped
    assert _checkpoint_steps(tmp_path)[-1] == stopped  # a checkpoint at exactly that step, complete
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
    resumed = run_to_end(data_dir, tmp_path, tmp_path / "resumed.txt")
    assert resumed.steps()[0] == stopped + 1
    assert_same_state(final_state(tiny_config(data_dir), tmp_path), reference)


# Runs the CLI with orbax's final rename of step KILL_STEP's folder replaced by kill -9: the process dies with
# that checkpoint completely written to its temporary folder but not yet made visible.
_KILL_IN_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity

_finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *args, **kwargs):
    if os.path.basename(str(self._final_path)) == os.environ["KILL_STEP"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return await _finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
from absl import app
from clip_jax import main
app.run(main.main)
"""


@pytest.mark.parametrize("restart", ["in_process", pytest.param("cli", marks=pytest.mark.slow)])
def test_kill9_during_a_checkpoint_save_restarts_from_the_previous_one(data_dir, reference, tmp_path, restart):
    driver = tmp_path / "driver.py"
    driver.write_text(_KILL_IN_SAVE)
    args = _cli_args(data_dir, tmp_path)
    args[1:3] = [str(driver)]  # the driver instead of `-m clip_jax.main`
    run = Run(args, tmp_path / "killed.txt", env={"KILL_STEP": "4"})
    try:
        rc = run.finish()
    finally:
        run.kill()
    assert rc == -signal.SIGKILL, run.tail()
    names = os.listdir(tmp_path / "checkpoints")
    assert any(n.startswith("4.") and "tmp" in n for n in names), names  # killed mid-save: a half checkpoint
    assert _checkpoint_steps(tmp_path) == [2]
    cfg = tiny_config(data_dir)
    if restart == "in_process":  # what a restart does first: open the workdir's checkpoints, restore the latest
        step, state, _ = final_state(cfg, tmp_path)
        assert step == 2 and int(state["step"]) == 2
        assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]  # the half one is removed
        return
    resumed = run_to_end(data_dir, tmp_path, tmp_path / "resumed.txt")
    assert resumed.steps()[0] == 3, resumed.tail()  # the previous complete checkpoint, not the half one
    assert_same_state(final_state(cfg, tmp_path), reference)


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: after fork() the child should only call it


def _respect_permissions():
    """preexec_fn for a root test run: drop the capabilities that let root write where permissions say no
    (CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2) from the bounding set, so the exec'd process lacks them."""
    for cap in (1, 2):
        if _PRCTL(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unwritable_checkpoint_dir_between_saves_is_one_line_and_keeps_the_previous(data_dir, tmp_path):
    args = _cli_args(data_dir, tmp_path, total_steps=12, ckpt_every=4)
    preexec = _respect_permissions if os.getuid() == 0 else None
    run = Run(args, tmp_path / "unwritable.txt", preexec_fn=preexec)
    checkpoints = tmp_path / "checkpoints"
    try:
        run.wait_until(lambda: 4 in _checkpoint_steps(tmp_path), "the checkpoint at step 4")
        os.chmod(checkpoints, 0o555)  # the disk goes read-only between two saves
        rc = run.finish()
        text = run.text()
        assert rc == 2, run.tail()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, run.tail()
        assert re.match(
            r"error: cannot write the checkpoint at step 8 to .*checkpoints: .*; the previous "
            r"checkpoint \(step 4\) is intact\. ",
            errors[0],
        ), errors[0]
        # orbax logs its background thread's traceback as it happens; ours is the one line that ends the output
        assert text.strip().splitlines()[-1] == errors[0]
        assert not re.search(r'File "[^"]*/clip_jax/[^"]+\.py"', text)  # no traceback through our code
        os.chmod(checkpoints, 0o755)
        assert _checkpoint_steps(tmp_path) == [4]
        step, state, _ = final_state(tiny_config(data_dir, total_steps=12, ckpt_every=4), tmp_path)
        assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    finally:
        run.kill()
        os.chmod(checkpoints, 0o755)


def test_unusable_workdir_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(checkpoint_lib.CheckpointWriteError, match="cannot use .*afile/w/checkpoints") as e:
        checkpoint_lib.Checkpointer(str(tmp_path / "afile" / "w"), tiny_cpu.get_config())
    assert "\n" not in str(e.value)


def _checkpointed_params(cfg, workdir, step):
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    _, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    ckpt = checkpoint_lib.Checkpointer(str(workdir), cfg)
    try:
        return jax.device_get(ckpt.restore(abstract, shardings, cfg, step=step)[1])
    finally:
        ckpt.close()


def test_nan_policy_skip_drops_the_poisoned_update_and_counts_it(data_dir, tmp_path):
    cfg = tiny_config(data_dir, total_steps=4, ckpt_every=1, keep_ckpts=5, nan_policy="skip", log_every=2)
    cfg.debug.poison_step = 3
    result = train.run(cfg, str(tmp_path))
    assert result["step"] == 4 and result["skipped_steps"] == [3]
    assert [h["nonfinite"] for h in result["history"]] == [0, 1]  # logged in the interval that saw it
    assert result["history"][-1]["skipped_steps"] == 1
    s2, s3, s4 = (_checkpointed_params(cfg, tmp_path, s) for s in (2, 3, 4))
    for a, b in zip(jax.tree.leaves(s2["params"]), jax.tree.leaves(s3["params"])):
        np.testing.assert_array_equal(a, b)  # step 3's update was not applied ...
    for a, b in zip(jax.tree.leaves(s2["opt_state"]), jax.tree.leaves(s3["opt_state"])):
        np.testing.assert_array_equal(a, b)  # ... not even to the optimizer moments
    assert int(s3["step"]) == 3  # but the step (and the data) moved on
    changed = [
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s3["params"]), jax.tree.leaves(s4["params"]))
    ]
    assert any(changed)  # and training went on
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(s4))


def test_nan_policy_stop_names_the_step_and_the_last_good_checkpoint(data_dir, tmp_path):
    # Logging every 5 steps: the bad step 3 is caught by the check before the step-4 checkpoint, not the log.
    cfg = tiny_config(data_dir, total_steps=6, ckpt_every=2, log_every=5, nan_policy="stop")
    cfg.debug.poison_step = 3
    with pytest.raises(train.TrainingError) as e:
        train.run(cfg, str(tmp_path))
    message = str(e.value)
    assert "\n" not in message
    assert re.search(r"NaN/Inf at step 3 \(nan_policy='stop'\).*last good checkpoint is step 2 in ", message), (
        message
    )
    assert _checkpoint_steps(tmp_path) == [2]  # nothing trained after the bad step was written
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_checkpointed_params(cfg, tmp_path, 2)))
