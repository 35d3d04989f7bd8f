"""Training until a metric reaches a target (clip_jax/target.py, config `target`): the config check, the
crossing arithmetic, and tiny runs that stop at the target with a checkpoint, or train the whole budget."""

import json
import os
import sys

import pytest

from clip_jax import config_checks, main, target, train
from clip_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny_cpu
from run_configs import TINIEST, set_keys


def _cfg(**overrides):
    return set_keys(tiny_cpu.get_config(), overrides)


@pytest.mark.parametrize(
    ("metric", "every", "message"),
    [
        ("imagenet/top1", 500, "for a section that is on (zeroshot)"),
        ("zeroshot/top2", 500, "a zeroshot evaluator reports mean_per_class, mean_per_class_seen"),
        ("zeroshot/top1", 0, "runs only at the end"),
        ("perplexity", 500, "'<evals section>/<metric>'"),
    ],
)
def test_bad_target_metric_is_one_line_before_training(metric, every, message):
    cfg = _cfg(**{"target.metric": metric, "eval_every": every})
    with pytest.raises(ConfigError) as e:
        config_checks.validate(cfg, 8)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_goal_follows_the_metric():
    assert target.goal_of(_cfg()) == ""
    assert target.goal_of(_cfg(**{"target.metric": "zeroshot/top1_unseen"})) == "max"
    assert target.goal_of(_cfg(**{"target.metric": "loss"})) == "min"


def test_crossing_is_interpolated_between_the_two_evaluations_around_it():
    t = target.Target(_cfg(**{"target.metric": "zeroshot/top1", "target.value": 25.0, "batch_size": 64}))
    assert not t.check(100, {"zeroshot/top1": 10.0})
    assert not t.check(150, {"retrieval/i2t_r1": 90.0})  # another evaluator's run: not a check
    assert not t.check(200, {"zeroshot/top1": 20.0})
    assert t.check(300, {"zeroshot/top1": 40.0})
    report = t.report()
    assert report["step"] == 300 and report["examples"] == 300 * 64
    assert report["crossing_step"] == pytest.approx(200 + 100 * (25 - 20) / (40 - 20))
    assert report["crossing_examples"] == pytest.approx(report["crossing_step"] * 64)
    assert not t.check(400, {"zeroshot/top1": 50.0})  # reached once: later checks change nothing
    assert t.report()["step"] == 300


def test_a_loss_target_is_reached_going_down_and_a_missing_metric_is_named():
    t = target.Target(_cfg(**{"target.metric": "loss", "target.value": 2.0}))
    assert not t.check(10, {"loss": 3.0}) and t.check(20, {"loss": 1.0})
    assert t.report()["crossing_step"] == pytest.approx(15.0)
    t = target.Target(_cfg(**{"target.metric": "zeroshot/top1_unseen"}))
    with pytest.raises(KeyError, match="top1_unseen.*zeroshot/top1"):
        t.check(10, {"zeroshot/top1": 3.0})
    off = target.Target(_cfg())
    assert not off and off.report() is None and not off.check(1, {"loss": -1.0})


def _run_cfg(data_dir, **overrides):
    keys = {**TINIEST, "data.data_dir": data_dir, "total_steps": 8, "eval_every": 2, "log_every": 2}
    keys.update({"ckpt_every": 0, "evals.zeroshot.batch_size": 64, "evals.zeroshot.dataset": "clip_shapes/small"})
    return _cfg(**{**keys, **overrides})


def _checkpoints(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_run_stops_at_the_target_with_a_checkpoint(shapes_data_dir, tmp_path):
    cfg = _run_cfg(shapes_data_dir, **{"target.metric": "zeroshot/top1", "target.value": 0.0})
    report = train.run(cfg, str(tmp_path / "reached"))
    assert report["step"] == 2 and report["target"]["reached"] and report["target"]["step"] == 2
    assert report["target"]["examples"] == 2 * cfg.batch_size
    assert _checkpoints(tmp_path / "reached") == [2]  # the state at the target is kept
    assert report["eval"] == report["eval_history"][-1]["metrics"] and "top1" in report["sections"]["zeroshot"]
    assert report["history"][-1]["step"] == 2
    with open(tmp_path / "reached" / train.REPORT) as f:  # the finished run's report, for a sweep to collect
        assert json.load(f)["target"] == report["target"]
    again = train.run(cfg, str(tmp_path / "reached"))  # the same command again: already there, nothing trained
    assert again["step"] == 2 and again["target"] == report["target"] and _checkpoints(tmp_path / "reached") == [2]


def test_run_that_misses_the_target_trains_the_budget(shapes_data_dir, tmp_path):
    cfg = _run_cfg(shapes_data_dir, **{"target.metric": "zeroshot/top1", "target.value": 100.5})
    report = train.run(cfg, str(tmp_path / "missed"))
    assert report["step"] == 8 and not report["target"]["reached"]
    assert [e["step"] for e in report["eval_history"]] == [2, 4, 6, 8]  # 8: the final one, report['eval']
    assert report["target"]["metric_value"] == report["eval_history"][-1]["metrics"]["zeroshot/top1"]
    with open(tmp_path / "missed" / train.REPORT) as f:
        saved = json.load(f)
    train.run(cfg, str(tmp_path / "missed"))  # the finished command again: no error, its report kept whole
    with open(tmp_path / "missed" / train.REPORT) as f:
        assert json.load(f) == saved and len(saved["history"]) == 4
    assert "target zeroshot/top1 >= 100.5 not reached within total_steps" in main.report(report, cfg)
    loss = _run_cfg(shapes_data_dir, **{"target.metric": "loss", "target.value": 1e9})
    report = train.run(loss, str(tmp_path / "loss"))
    assert report["step"] == 2 and report["target"]["reached"] and _checkpoints(tmp_path / "loss") == [2]
    assert "top1" in report["sections"]["zeroshot"]  # stopped before any periodic evaluation: evaluated at the stop
    assert "target loss <= 1e+09 reached at step 2" in main.report(report, loss)


def test_a_resumed_run_keeps_the_evaluations_before_the_stop(shapes_data_dir, tmp_path):
    cfg = _run_cfg(shapes_data_dir, **{"target.metric": "zeroshot/top1", "target.value": 100.5, "ckpt_every": 1})
    train.run(cfg, str(tmp_path), stop_after=5)  # as a preemption after step 5: evaluations at 2 and 4 done
    report = train.run(cfg, str(tmp_path))
    assert [e["step"] for e in report["eval_history"]] == [2, 4, 6, 8]
