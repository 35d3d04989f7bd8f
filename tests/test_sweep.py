"""The batch-size sweep driver (experiments/batch_size_sweep.py): plan arithmetic, emitted commands, trend fit,
and a micro sweep that must be resumable (finished points skipped, an interrupted point resumed)."""

import csv
import math
import os
import shlex
import sys

import numpy as np
import pytest

from clip_jax import cli_checks, config_checks, train
from clip_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import batch_size_sweep as sweep
import sweep_results


def test_lr_rules():
    assert sweep.scaled_lr(128, "sqrt", 128, 1e-3) == pytest.approx(1e-3)
    assert sweep.scaled_lr(512, "sqrt", 128, 1e-3) == pytest.approx(2e-3)
    assert sweep.scaled_lr(32, "sqrt", 128, 1e-3) == pytest.approx(5e-4)
    assert sweep.scaled_lr(512, "linear", 128, 1e-3) == pytest.approx(4e-3)
    assert sweep.scaled_lr(32, "linear", 128, 1e-3) == pytest.approx(2.5e-4)
    assert sweep.scaled_lr(4096, "constant", 128, 1e-3) == 1e-3


def test_plan_keeps_examples_seen_and_skips_what_cannot_run():
    batches = [4, 32, 64, 128, 4096, 16384]
    points = sweep.plan(
        batches, ["softmax", "sigmoid"], 4096 * 3, rule="sqrt", base_batch=128, base_lr=1e-3, warmup_frac=0.05,
        num_devices=8,
    )  # fmt: skip
    assert [(p.batch_size, p.loss) for p in points] == [(b, x) for b in batches for x in ("softmax", "sigmoid")]
    by = {(p.batch_size, p.loss): p for p in points}
    for b in (32, 64, 128, 4096):
        p = by[(b, "sigmoid")]
        assert not p.skip
        assert p.steps == 4096 * 3 // b and p.examples_seen == 4096 * 3
        assert p.warmup_steps == round(0.05 * p.steps)
        assert p.lr == pytest.approx(1e-3 * math.sqrt(b / 128))
    assert "does not divide over the 8 devices" in by[(4, "softmax")].skip
    assert "more than the 12288 examples" in by[(16384, "softmax")].skip
    # Not a divisor: whole batches, as close to the target as possible.
    assert sweep.steps_for(1000, 300) == 3


def test_emitted_commands_parse_back_into_the_point_configs():
    extra = sweep.parse_set(["data.data_dir=/data/tfds", "model.remat=full"])
    points = sweep.plan(
        [16384, 65536, 100], ["softmax", "sigmoid"], 10**9, rule="linear", base_batch=32768, base_lr=1e-3,
        warmup_frac=0.02, num_devices=64,
    )  # fmt: skip
    lines = sweep.emit_commands("configs/siglip_b16.py", points, "/ckpt/sweep", extra)
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 4 and sum("skipped" in line for line in lines) == 2
    for line, point in zip(commands, [p for p in points if not p.skip]):
        argv = shlex.split(line)
        assert argv[:4] == ["python", "-m", "clip_jax.main", "train"]
        flags = argv[4:]
        cli_checks.check_override_keys(flags)  # every key exists and every value parses as its type
        cli_checks.check_config_file(flags)
        assert f"--workdir=/ckpt/sweep/{point.name}" in flags
        # Apply the overrides the way the CLI would (text -> the key's type) and compare with the plan.
        cfg = sweep.load_config("configs/siglip_b16.py")
        for flag in flags:
            if flag.startswith("--config."):
                key, _, text = flag[len("--config.") :].partition("=")
                sweep.set_key(cfg, key, text)
        assert cfg.batch_size == point.batch_size and cfg.total_steps == point.steps
        assert cfg.optim.lr == point.lr  # exact: the printed float round-trips
        assert cfg.optim.warmup_steps == point.warmup_steps and cfg.loss.kind == point.loss
        assert cfg.model.log_t_init == sweep.LOSS_INIT[point.loss][0]
        assert cfg.model.bias_init == sweep.LOSS_INIT[point.loss][1]
        assert cfg.data.data_dir == "/data/tfds" and cfg.model.remat == "full"
        config_checks.validate(cfg, 64)


def test_bad_set_override_is_one_clear_error():
    with pytest.raises(config_lib.ConfigError, match="did you mean 'model.image.depth'"):
        sweep.parse_set(["model.image.depht=1"])
    with pytest.raises(config_lib.ConfigError, match="KEY=VALUE"):
        sweep.parse_set(["model.image.depth"])


def test_trend_fit_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    batches = [32, 64, 128, 256, 512, 1024, 4096]
    values = list(50 + 3 * np.log2(batches) + rng.normal(0, 2, len(batches)))
    slope, intercept = sweep_results.fit_trend(batches, values)
    ref_slope, ref_intercept = np.polyfit(np.log2(batches), values, 1)
    assert slope == pytest.approx(ref_slope, rel=1e-9)
    assert intercept == pytest.approx(ref_intercept, rel=1e-9)
    with pytest.raises(ValueError):
        sweep_results.fit_trend([64, 64], [1.0, 2.0])


def test_flat_metrics_and_plot_columns(tmp_path):
    # The shape of a train report: metrics, history, a flat 'eval' dict and per-evaluator sections.
    report = {
        "step": 10,
        "loss": np.float32(1.5),
        "history": [{"loss": 3.0}],
        "skipped_steps": [],
        "preempted": None,
        "eval": {"zeroshot/top1": 40.0, "retrieval/i2t_r1": 12.5, "retrieval/t2i_r1": 11.0},
        "sections": {"zeroshot": {"top1": 40.0}, "retrieval": {"i2t_r1": 12.5, "t2i_r1": 11.0}},
        "zero_shot": {"top1": 40.0},  # the key older reports had
        "retrieval": {"i2t_r1": 12.5, "t2i_r1": 11.0, "t2i_r5": 30.0},
    }
    flat = sweep_results.flat_metrics(report)
    assert flat == {
        "step": 10,
        "loss": 1.5,
        "eval/zeroshot/top1": 40.0,
        "eval/retrieval/i2t_r1": 12.5,
        "eval/retrieval/t2i_r1": 11.0,
        "zero_shot/top1": 40.0,
        "retrieval/i2t_r1": 12.5,
        "retrieval/t2i_r1": 11.0,
        "retrieval/t2i_r5": 30.0,
    }
    # Each metric once, top-1 first; the 'eval/' copies only when no section carries them.
    assert sweep_results.plot_columns(flat) == ["zero_shot/top1", "retrieval/i2t_r1", "retrieval/t2i_r1"]
    assert sweep_results.plot_columns({"eval/zeroshot/top1", "eval/retrieval/i2t_r1"}) == [
        "eval/zeroshot/top1",
        "eval/retrieval/i2t_r1",
    ]
    rows = [{**flat, "loss": x, "batch_size": b} for x in ("softmax", "sigmoid") for b in (32, 64, 128)]
    lines = sweep_results.plot(rows, str(tmp_path / "p.png"), "title")
    assert len(lines) == 6 and (tmp_path / "p.png").stat().st_size > 0  # 3 panels x 2 losses


def _micro_args(workdir, data_dir, examples=64):
    """Two points (batch 16 and 32, SigLIP's loss) of a 1-layer model on the small shapes set: 4 and 2 steps."""
    sets = [
        "data.name=clip_shapes/small", "evals.zeroshot.dataset=clip_shapes/small", f"data.data_dir={data_dir}",
        "model.image.depth=1", "model.text.depth=1", "evals.zeroshot.batch_size=64", "evals.zeroshot.max_examples=64",
    ]  # fmt: skip
    argv = ["--batch-sizes", "16,32", "--losses", "sigmoid", "--examples-seen", str(examples)]
    argv += ["--workdir", str(workdir), "--base-batch", "16", "--base-lr", "1e-4", "--lr-rule", "linear"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_micro_sweep_is_resumable(tmp_path, monkeypatch, capsys):
    workdir, data_dir = tmp_path / "sweep", tmp_path / "tfds"
    real_run = train.run
    calls = []

    def first_point_preempted(cfg, wd, stop_after=None):
        calls.append(cfg.batch_size)
        # The first call stops after 1 step with a checkpoint, exactly as a SIGTERM would.
        return real_run(cfg, wd, stop_after=1 if len(calls) == 1 else stop_after)

    monkeypatch.setattr(train, "run", first_point_preempted)
    assert sweep.main(_micro_args(workdir, data_dir)) == 0
    assert "interrupted in sigmoid_b16" in capsys.readouterr().out
    assert sweep.checkpoint_steps(str(workdir / "sigmoid_b16")) == [1]
    assert not (workdir / "sigmoid_b16" / "result.json").exists()

    # Re-run: the interrupted point resumes from step 1, then the second point trains.
    assert sweep.main(_micro_args(workdir, data_dir)) == 0
    out = capsys.readouterr().out
    assert calls == [16, 16, 32]
    rows = _rows(workdir / "sweep.csv")
    assert [(r["loss"], int(r["batch_size"]), int(r["steps"])) for r in rows] == [
        ("sigmoid", 16, 4),
        ("sigmoid", 32, 2),
    ]
    for r in rows:
        assert int(r["examples_seen"]) == 64 and r["lr_rule"] == "linear"
        assert float(r["lr"]) == pytest.approx(1e-4 * int(r["batch_size"]) / 16)
        assert float(r["wall_s"]) > 0 and 0 <= float(r["eval/zeroshot/top1"]) <= 100
        assert float(r["bias"]) == pytest.approx(-10, abs=0.1)  # SigLIP's init, barely moved by a tiny lr
        assert float(r["temperature"]) == pytest.approx(10, rel=0.05)
    assert (workdir / "sweep.png").stat().st_size > 0
    assert "trend eval/zeroshot/top1 sigmoid" in out

    # A third run finds both points finished and trains nothing.
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished point was trained again"))
    assert sweep.main(_micro_args(workdir, data_dir)) == 0
    assert _rows(workdir / "sweep.csv") == rows
    # The same workdir with other settings is refused rather than mixed in.
    assert sweep.main(_micro_args(workdir, data_dir, examples=128)) == 2
    assert "holds a point of a different sweep" in capsys.readouterr().err
