"""Multi-host preemption (issue 15): SIGTERM to ONE of 2 processes (2 real processes x 4 CPU devices) stops both
after the same step, with one checkpoint of that step holding both processes' data positions, and both exit 0.
Re-running the same command resumes, and the run ends bit-identical to an uninterrupted 2-process run, every host
having trained on the same examples in the same order (recorded by tests/multihost_driver.py).
"""

import os
import re
import signal
import sys
import time

import jax
import numpy as np
import pytest
from test_reliability import TINY, tiny_config

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import optim, sharding, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_driver as md

# Enough steps after the signal's earliest step (3) that the stop lands before the end even on a fast machine.
STEPS, EVERY = 12, 4
FLAT = {**TINY, "total_steps": STEPS, "ckpt_every": EVERY, "keep_ckpts": 10}


def _launch(data_dir, workdir):
    args = [md.DRIVER, "train", f"--workdir={workdir}", "--config=configs/tiny_cpu.py"]
    args += [f"--config.{k}={v}" for k, v in {**FLAT, "data.data_dir": data_dir}.items()]
    return md.flag_launch(args, md.base_env(RECORD_DIR=str(workdir / "record")))


def _final_state(cfg, workdir):
    mesh = sharding.make_mesh(cfg)
    _, abstract, shardings = train.state_shardings(cfg, mesh, optim.make(cfg))
    ckpt = checkpoint_lib.Checkpointer(str(workdir), cfg)
    try:
        step, state, _ = ckpt.restore(abstract, shardings, cfg)
    finally:
        ckpt.close()
    return step, jax.device_get(state)


def _sigterm_process_1(data_dir, workdir) -> list[str]:
    """Start a run, SIGTERM process 1 alone once both train past step 2, wait for both; their logs."""
    procs = md.start(_launch(data_dir, workdir), workdir)
    try:
        deadline = time.monotonic() + md.TIMEOUT
        while min(md.last_step(workdir / "record", i) for i in range(2)) < 3:
            assert all(p.poll() is None for p in procs), "a process ended before training got going"
            assert time.monotonic() < deadline, "training never got going"
            time.sleep(0.02)
        os.kill(procs[1].pid, signal.SIGTERM)  # the python process only, not its group or process 0
    except BaseException:
        md.kill(procs)
        raise
    md.finish(procs, workdir)
    return [md.log_text(workdir, i) for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(shapes_data_dir, tmp_path):
    data_dir, straight, stopped = shapes_data_dir, tmp_path / "straight", tmp_path / "stopped"
    for workdir in (straight, stopped):
        (workdir / "record").mkdir(parents=True)
    md.run(_launch(data_dir, straight), straight)

    logs = _sigterm_process_1(data_dir, stopped)  # both exited 0 (md.finish checks)
    found = re.search(
        r"preempted \((.+?)\) at step (\d+); checkpoint saved in .*; re-run the same command", logs[0]
    )
    assert found, logs[0][-3000:]
    assert found.group(1) == "SIGTERM to process 1", found.group(1)  # process 0 says which process got it
    saved = int(found.group(2))
    assert 3 <= saved < STEPS
    assert "received SIGTERM" in logs[1] and "received SIGTERM" not in logs[0]
    # One checkpoint at that step, complete, with both processes' data positions; nothing after it.
    assert md.checkpoint_steps(stopped)[-1] == saved, md.checkpoint_steps(stopped)
    assert md.host_data_files(stopped, saved) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert not [n for n in os.listdir(stopped / "checkpoints") if not n.isdigit()]  # no half-written save
    for i in range(2):  # both trained exactly steps 1..saved, then stopped
        assert [r["step"] for r in md.recorded_lines(stopped / "record", i)] == list(range(1, saved + 1))

    md.run(_launch(data_dir, stopped), stopped)  # the same command again: a resume from `saved`
    for i in range(2):  # each host trained steps saved+1.. on exactly the uninterrupted run's examples
        lines = md.recorded_lines(stopped / "record", i)
        assert lines == md.recorded_lines(straight / "record", i), f"host {i}'s examples (tokens and image bytes)"
    assert md.recorded_lines(straight / "record", 0) != md.recorded_lines(straight / "record", 1)  # own slices
    assert md.host_states(stopped, STEPS) == md.host_states(straight, STEPS)

    cfg = tiny_config(data_dir, **FLAT)
    (step_a, a), (step_b, b) = _final_state(cfg, straight), _final_state(cfg, stopped)
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-identical (parameters, optimizer state, rng, step)
