"""The steps-to-target sweep (experiments/steps_to_target.py) and its analysis (target_analysis.py): the sigmoid
bias rule, the lr candidates' early stops, emitted commands, the analysis of a synthetic sweep generated from the
steps/examples hyperbola, and a micro sweep that resumes after an interruption."""

import csv
import json
import math
import os
import shlex
import sys

import numpy as np
import pytest

from clip_jax import cli_checks, config_checks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import steps_to_target as stt
import target_analysis


def _settings(workdir="", argv=()):
    args = stt.parse_args(["--workdir", str(workdir), *argv])
    return stt.settings(args)[0]


def test_prior_bias_matches_one_positive_per_row():
    for batch in (2, 32, 1024, 32768):
        assert 1 / (1 + math.exp(-stt.prior_bias(batch))) == pytest.approx(1 / batch, rel=1e-12)
    assert stt.prior_bias(32768) == pytest.approx(-10.4, abs=0.01)  # SigLIP's b = -10 at its batch size


def _finish(workdir, run, step, reached=True):
    os.makedirs(os.path.join(workdir, run.name), exist_ok=True)
    with open(os.path.join(workdir, run.name, stt.REPORT), "w") as f:
        json.dump({"step": step, "target": {"reached": reached, "step": step, "crossing_step": step - 0.5}}, f)


def test_later_lr_factors_stop_at_the_best_steps_so_far(tmp_path):
    s = _settings(tmp_path)
    assert s.factors == (1.0, 2.0, 0.5) and s.batches == (32, 64, 128, 256, 512, 1024)
    first = stt.point_runs("sigmoid", 64, s, str(tmp_path), emit=False)
    assert [r.budget_steps for r in first] == [s.budget_examples // 64] * 3
    assert first[0].lr == pytest.approx(s.base_lr * math.sqrt(64 / s.base_batch))
    assert first[1].lr == pytest.approx(2 * first[0].lr) and first[0].bias == stt.prior_bias(64)
    assert first[0].eval_every == s.check_examples // 64
    _finish(tmp_path, first[0], 300)
    runs = stt.point_runs("sigmoid", 64, s, str(tmp_path), emit=False)
    assert [r.budget_steps for r in runs] == [s.budget_examples // 64, 300, 300]
    _finish(tmp_path, runs[1], 200)
    runs = stt.point_runs("sigmoid", 64, s, str(tmp_path), emit=False)
    assert [r.budget_steps for r in runs] == [s.budget_examples // 64, 300, 200]
    assert stt.best_run(runs, str(tmp_path)) == (2.0, 200)
    _finish(tmp_path, runs[2], 200)  # a tie keeps the earlier factor
    assert stt.best_run(runs, str(tmp_path)) == (2.0, 200)
    runs = stt.point_runs("sigmoid", 64, s, str(tmp_path), emit=False)  # best at the upper edge: 4x is tried
    assert [(r.lr_factor, r.budget_steps) for r in runs[2:]] == [(0.5, 200), (4.0, 200)]
    _finish(tmp_path, runs[3], 200, reached=False)  # 2x is now inside the grid: nothing more
    assert len(stt.point_runs("sigmoid", 64, s, str(tmp_path), emit=False)) == 4
    lower = stt.point_runs("sigmoid", 128, s, str(tmp_path), emit=False)  # another point, best at the lower edge
    for run, steps in zip(lower, (300, None, 150)):
        _finish(tmp_path, run, steps or run.budget_steps, reached=steps is not None)
    lower = stt.point_runs("sigmoid", 128, s, str(tmp_path), emit=False)
    assert [(r.lr_factor, r.budget_steps) for r in lower[3:]] == [(0.25, 150)]
    _finish(tmp_path, lower[3], 100)
    lower = stt.point_runs("sigmoid", 128, s, str(tmp_path), emit=False)
    assert [(r.lr_factor, r.budget_steps) for r in lower[3:]] == [(0.25, 150), (0.125, 100)]
    _finish(tmp_path, lower[4], 90)
    assert len(stt.point_runs("sigmoid", 128, s, str(tmp_path), emit=False)) == 5  # two past the edge at most
    emitted = stt.point_runs("sigmoid", 64, s, str(tmp_path), emit=True)  # a cluster runs them all in parallel
    assert [r.budget_steps for r in emitted] == [s.budget_examples // 64] * 3
    # The control and the noise run follow at the best factor.
    follow = [r for r in stt.all_runs(s, str(tmp_path), emit=False) if r.batch_size == 64 and r.kind != "lr"]
    assert [(r.kind, r.init, r.lr_factor, r.budget_steps) for r in follow] == [("control", "paper", 2.0, 200)]
    noise = [r for r in stt.all_runs(s, str(tmp_path), emit=False) if r.kind == "noise"]
    assert [(r.loss, r.batch_size, r.bias) for r in noise] == [("softmax", 256, 0.0), ("sigmoid", 256, stt.prior_bias(256))]


def test_emitted_commands_parse_back_into_the_run_configs(tmp_path):
    argv = ["--config", "configs/siglip_b16.py", "--batch-sizes", "4096,16384", "--budget-examples", "10000000",
            "--noise-batch", "4096", "--set", "data.data_dir=/data/tfds", "--target-metric", "zeroshot/top1",
            "--target-value", "40"]  # fmt: skip
    s, base = stt.settings(stt.parse_args(["--workdir", str(tmp_path), *argv]))
    lines = stt.emit(s, str(tmp_path), base)
    runs = stt.all_runs(s, str(tmp_path), emit=True)
    assert len(lines) == len(runs) == 2 * 2 * 3 + 2 * 3 + 2  # lr factors; controls at every factor; noise runs
    for line, run in zip(lines, runs):
        flags = shlex.split(line)[4:]
        cli_checks.check_override_keys(flags)
        cfg = stt.fixed.load_config("configs/siglip_b16.py")
        for flag in flags:
            if flag.startswith("--config."):
                key, _, text = flag[len("--config.") :].partition("=")
                stt.fixed.set_key(cfg, key, text)
        assert cfg.batch_size == run.batch_size and cfg.optim.lr == run.lr and cfg.model.bias_init == run.bias
        assert cfg.target.metric == "zeroshot/top1" and cfg.target.value == 40 and cfg.optim.end_lr_frac == 1
        assert cfg.total_steps == 10_000_000 // run.batch_size and cfg.data.data_dir == "/data/tfds"
        assert (cfg.accum_steps, cfg.noise_scale) == ((4, True) if run.kind == "noise" else (1, False))
        config_checks.validate(cfg, 256, tokenizer=False)
        with open(tmp_path / run.name / "point.json") as f:
            assert json.load(f)["lr"] == run.lr


def _synthetic_sweep(workdir, s_min, b_crit, rng):
    """runs.csv of a sweep whose best lr per B follows S = S_min (1 + B_crit / B) with 5% noise; the other lr
    factors are slower (or do not reach), as an lr grid's are."""
    rows = []
    for b in (32, 64, 128, 256, 512, 1024, 2048):
        best = s_min * (1 + b_crit / b) * math.exp(rng.normal(0, 0.05))
        for factor, slower in ((1.0, 1.3), (2.0, 1.0), (0.5, None)):
            steps = best * slower if slower else ""
            rows.append({"name": f"softmax_clip_b{b}_lr{factor:g}x", "kind": "lr", "loss": "softmax", "init": "clip",
                         "batch_size": b, "lr_factor": factor, "reached": int(bool(slower)),
                         "crossing_steps": steps, "crossing_examples": steps and steps * b,
                         "final_step": math.ceil(steps) if slower else 999, "final_metric": 30.0 if slower else 12.0})  # fmt: skip
    with open(os.path.join(workdir, "runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_analysis_picks_the_best_lr_and_recovers_the_hyperbola(tmp_path):
    _synthetic_sweep(tmp_path, s_min=200.0, b_crit=300.0, rng=np.random.default_rng(0))
    lines = target_analysis.analyse(str(tmp_path), "synthetic", 30.0)
    best = target_analysis.best_points(target_analysis.read_csv(str(tmp_path / "runs.csv")))
    assert {p["lr_factor"] for p in best[("softmax", "clip")].values()} == {2.0}
    fit = target_analysis.fits(best)[("softmax", "clip")]
    assert fit.intervals["b_crit"][0] < 300 < fit.intervals["b_crit"][1] and fit.b_crit == pytest.approx(300, rel=0.3)
    assert fit.intervals["s_min"][0] < 200 < fit.intervals["s_min"][1]
    assert any(line.startswith("- softmax (clip): s_min = ") for line in lines)
    summary = (tmp_path / "summary.md").read_text()
    assert "| 2,048 | 2*, " in summary and (tmp_path / "tradeoff.png").stat().st_size > 0
    (tmp_path / "runs.csv").write_text((tmp_path / "runs.csv").read_text()[:300])  # cut mid-row
    assert target_analysis.main(["--workdir", str(tmp_path)]) == 2  # one line, not a traceback


def _micro_argv(workdir, data_dir):
    sets = ["data.name=clip_shapes/small", "evals.zeroshot.dataset=clip_shapes/small", f"data.data_dir={data_dir}",
            "model.image.depth=1", "model.text.depth=1", "evals.zeroshot.batch_size=64",
            "evals.zeroshot.max_examples=64"]  # fmt: skip
    argv = ["--workdir", str(workdir), "--batch-sizes", "16", "--losses", "softmax", "--lr-factors", "1,2",
            "--budget-examples", "64", "--check-examples", "32", "--target-metric", "zeroshot/top1",
            "--target-value", "0", "--noise-batch", "16",
            "--noise-accum", "2", "--warmup-steps", "1"]  # fmt: skip
    return argv + [x for item in sets for x in ("--set", item)]


def test_micro_sweep_resumes_and_skips_finished_runs(tmp_path, monkeypatch, capsys, shapes_data_dir):
    workdir, real_run, calls = tmp_path / "sweep", train.run, []

    def first_run_preempted(cfg, wd, stop_after=None):
        calls.append((os.path.basename(wd), int(cfg.total_steps)))
        return real_run(cfg, wd, stop_after=1 if len(calls) == 1 else stop_after)  # as a SIGTERM after step 1

    monkeypatch.setattr(train, "run", first_run_preempted)
    argv = _micro_argv(workdir, shapes_data_dir)
    assert stt.main(argv) == 0
    assert "interrupted in softmax_clip_b16_lr1x" in capsys.readouterr().out
    assert stt.main(argv) == 0
    # Target 0%: reached at the first check (step 2 at B=16), so the 2x run's budget is 2 steps.
    # A tie keeps the earlier factor, 1x: at the grid's lower edge, so 0.5x is tried too.
    assert calls == [("softmax_clip_b16_lr1x", 4), ("softmax_clip_b16_lr1x", 4), ("softmax_clip_b16_lr2x", 2),
                     ("softmax_clip_b16_lr0.5x", 2), ("noise_softmax_clip_b16_lr1x", 4)]  # fmt: skip
    runs = target_analysis.read_csv(str(workdir / "runs.csv"))
    assert [(r["name"], r["reached"], r["steps"]) for r in runs] == [
        ("noise_softmax_clip_b16_lr1x", 1, 2.0), ("softmax_clip_b16_lr0.5x", 1, 2.0), ("softmax_clip_b16_lr1x", 1, 2.0),
        ("softmax_clip_b16_lr2x", 1, 2.0)]
    noise = target_analysis.read_csv(str(workdir / "noise.csv"))
    assert noise and all(r["name"] == "noise_softmax_clip_b16_lr1x" for r in noise)
    assert (workdir / "summary.md").exists() and (workdir / "curves.png").stat().st_size > 0
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert stt.main(argv) == 0
    assert stt.main([*argv, "--target-value", "5"]) == 2  # other settings in the same workdir: refused
    assert "holds a run with other settings" in capsys.readouterr().err
    assert stt.main([*argv, "--target-value", "5", "--dry-run"]) == 2  # the plan of other settings: refused too
    assert stt.main([*argv, "--target-value", "5", "--collect"]) == 0  # collects only runs of its own settings
    assert "left out 4 run folder(s) of other settings" in capsys.readouterr().out
    for bad, message in ((["--noise-batch", "64"], "is not one of --batch-sizes"),
                         (["--lr-factors", "1,nan"], "must be finite"),
                         (["--target-metric", "zeroshot/top9"], "a zeroshot evaluator reports")):  # fmt: skip
        assert stt.main([*argv, *bad, "--dry-run"]) == 2 and message in capsys.readouterr().err
