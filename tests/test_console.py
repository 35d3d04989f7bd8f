"""The console (issue 14): the CLI's output is short and readable by default, --verbose restores the libraries'
INFO logs, and a failing command prints one `error:` line. The figures on the console are checked against what
TensorBoard's own event reader finds in the run's event file (the writer the console must leave untouched)."""

import io
import os
import re
import subprocess
import sys

import jax
import pytest

from clip_jax import console

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_configs import TINIEST  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, LOG_EVERY, EVAL_EVERY = 8, 2, 4
SMALL = {  # the tiniest model, a log line every 2 steps and a zero-shot evaluation at step 4 (and at the end)
    **TINIEST,
    # the zero-shot evaluator (with issue 14's evals.<name> sections: evals.zeroshot.dataset / .max_examples)
    "evals.zeroshot.dataset": "clip_shapes/small",
    "evals.zeroshot.max_examples": 64,
    "total_steps": TOTAL,
    "log_every": LOG_EVERY,
    "eval_every": EVAL_EVERY,
    "ckpt_every": 4,
}
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  loss ([0-9.]+)  temperature ([0-9.]+)  ([0-9,]+) examples/s  ETA \S+$")
INFO_LINE = re.compile(r"^I\d{4} ")  # absl's INFO prefix (I + month and day), as orbax, tfds, clu and jax log
TIMEOUT = 240


def _cli(workdir, data_dir, *extra, env=None):
    overrides = [f"--config.{k}={v}" for k, v in {**SMALL, "data.data_dir": data_dir}.items()]
    cmd = [sys.executable, "-m", "clip_jax.main", "train", "--config=configs/tiny_cpu.py", f"--workdir={workdir}"]
    base = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    base.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: the CLI itself must quiet TensorFlow's C++
    base.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    env = {k: v for k, v in {**base, **(env or {})}.items() if v is not None}  # None: unset it
    return subprocess.run(
        cmd + overrides + list(extra), cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def _scalars(workdir):
    """{tag: {step: value}} from the run's TensorBoard event file, read by TensorBoard's own event reader."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    return {t: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(t)} for t in tags}


@pytest.fixture(scope="module")
def quiet_run(shapes_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("console")
    proc = _cli(workdir, shapes_data_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return workdir, proc


def test_train_output_is_short_with_metric_lines_and_the_report(quiet_run):
    workdir, proc = quiet_run
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 80, "\n".join(lines)
    assert not [line for line in lines if INFO_LINE.match(line)], "\n".join(lines)
    for noise in ("orbax", "dataset_builder", "Closing _NonBlocking", "absl::InitializeLog", "oneDNN", "OpenCV"):
        assert noise not in proc.stdout + proc.stderr, noise
    assert proc.stderr == "", proc.stderr  # nothing went wrong, so no warning either
    steps = [STEP_LINE.match(line) for line in proc.stdout.splitlines()]
    steps = [m for m in steps if m]
    assert [int(m.group(1)) for m in steps] == list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY))
    assert all(int(m.group(2)) == TOTAL for m in steps)
    assert "clip_jax report" in proc.stdout and "top-1" in proc.stdout
    # The report's final loss is the last interval's, as the last metrics line shows it.
    final = re.search(r"final train loss ([0-9.]+) \(temperature ([0-9.]+)\)", proc.stdout)
    assert final and final.group(1) == steps[-1].group(3) and final.group(2) == steps[-1].group(4)
    # The console shows what TensorBoard got (the writer is unchanged; the console only formats).
    tb = _scalars(workdir)
    for m in steps:
        step = int(m.group(1))
        assert float(m.group(3)) == pytest.approx(tb["loss"][step], abs=5.1e-5)  # shown to 4 decimals
        assert float(m.group(4)) == pytest.approx(tb["temperature"][step], abs=5.1e-3)  # shown to 2 decimals
        assert step in tb["steps_per_sec"] and step in tb["uptime"]  # ReportProgress's scalars, kept


def test_periodic_evaluation_is_one_line(quiet_run):
    workdir, proc = quiet_run
    evals = [line for line in proc.stdout.splitlines() if line.startswith("eval at step")]
    assert len(evals) == 1 and evals[0].startswith(f"eval at step {EVAL_EVERY}: zeroshot top1 "), proc.stdout
    top1 = float(re.search(r"top1 ([0-9.]+)%", evals[0]).group(1))
    assert top1 == pytest.approx(_scalars(workdir)["zeroshot/top1"][EVAL_EVERY], abs=0.051)  # shown to 1 decimal


BAD = ["--config.data.name=no_such_set"]  # fails after jax has started its backends, before training


def test_failing_command_prints_one_error_line(shapes_data_dir, tmp_path):
    # Without JAX_PLATFORMS jax probes its backends and logs "Unable to initialize backend 'tpu'" at INFO.
    proc = _cli(tmp_path / "w", shapes_data_dir, *BAD, env={"JAX_PLATFORMS": None})
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot find tfds dataset 'no_such_set'"), proc.stderr
    assert proc.stdout == ""


def test_verbose_brings_back_the_library_info_logs(shapes_data_dir, tmp_path):
    proc = _cli(tmp_path / "w", shapes_data_dir, *BAD, "--verbose", env={"JAX_PLATFORMS": None})
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("error: cannot find tfds dataset 'no_such_set'"), proc.stderr[-3000:]
    assert any(INFO_LINE.match(line) for line in lines), proc.stderr[-3000:]  # the libraries' INFO is back


def test_plain_progress_line_and_eta(monkeypatch, capsys):
    clock = iter([100.0, 110.0])  # the constructor's time, then the log's: 100 steps in 10 s
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    written = []

    class Writer:
        def write_scalars(self, step, scalars):
            written.append((step, scalars))

    progress = console.Progress(2000, 0, writer=Writer(), interactive=False)
    progress.step(100)
    progress.log(100, {"loss": 1.23456, "temperature": 14.2857, "examples_per_sec": 1280.4})
    out = capsys.readouterr().out.splitlines()
    # 1900 steps left at 10 steps/s: 190 s = 3 min 10 s.
    line = "step 100/2000  loss 1.2346  temperature 14.29  1,280 examples/s  ETA 03:10"
    assert out == ["training: starting, 2000 steps in all", line]
    assert written == [(100, {"steps_per_sec": 10.0, "uptime": 10.0})]


def test_other_processes_print_nothing(capsys):
    progress = console.Progress(10, 0, enabled=False, interactive=False)
    progress.log(5, {"loss": 1.0, "temperature": 1.0, "examples_per_sec": 1.0})
    progress.evaluated(5, {"zeroshot/top1": 50.0})
    assert capsys.readouterr().out == ""


def test_bar_on_a_terminal_shows_loss_and_examples_per_second(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress = console.Progress(2000, 500, interactive=True)
    progress.step(600)
    progress.log(600, {"loss": 0.5, "temperature": 20.0, "examples_per_sec": 900.0})
    console.close_all()
    text = err.getvalue()
    assert "600/2000" in text and "loss=0.5000" in text and "examples/s=900" in text
    assert progress._bar is None  # closed by close_all


def test_eval_line_shows_headline_metrics_by_section():
    metrics = {"zeroshot/top1": 41.9, "zeroshot/chance_top1": 2.5, "zeroshot/top5": 80.0, "retrieval/i2t_r1": 12.5}
    line = console.format_eval(500, {**metrics, "captioning/cider": 0.12345, "captioning/examples": 64})
    expected = "zeroshot top1 41.9%, top5 80.0% | retrieval i2t_r1 12.5% | captioning cider 0.1235"
    assert line == "eval at step 500: " + expected
