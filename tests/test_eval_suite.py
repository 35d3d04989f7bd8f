"""The evaluation suite: evaluators built once from evals.<name> sections, a second evaluation that compiles
nothing, per-section cadence, and the zero-shot benchmark command writing its CSV and markdown table."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from jax._src import dispatch, monitoring

from clip_jax import checkpoint, optim, sharding
from clip_jax import config as config_lib
from clip_jax import state as run_state
from clip_jax.evaluate import benchmark, suite
from clip_jax.input import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny_cpu  # noqa: E402

# Tracing a function and lowering it to MLIR happen for every new compilation, even when the persistent
# compilation cache then supplies the binary; a warm jit cache skips both.
COMPILE_EVENTS = (dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT)


def tiny_config(data_dir):
    cfg = tiny_cpu.get_config()
    cfg.data.data_dir, cfg.data.name = str(data_dir), "clip_shapes/small"
    cfg.batch_size, cfg.model.embed_dim = 16, 32
    for tower in (cfg.model.image, cfg.model.text):
        tower.depth, tower.width, tower.mlp_dim = 1, 32, 64
    cfg.evals.zeroshot = config_lib.evaluator("zeroshot", dataset="clip_shapes/small", batch_size=64, max_examples=96)
    return cfg


@pytest.fixture(scope="module")
def model(shapes_data_dir):
    cfg = tiny_config(shapes_data_dir)
    mesh = sharding.make_mesh(cfg)
    graphdef, state, _ = run_state.init_state(cfg, mesh, optim.make(cfg))
    return cfg, mesh, graphdef, state


class CompileCounter:
    def __init__(self):
        self.events = []

    def __call__(self, event, duration, **kwargs):
        if event in COMPILE_EVENTS:
            self.events.append(event)

    def __enter__(self):
        monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self)


def test_a_second_evaluation_compiles_nothing(model):
    cfg, mesh, graphdef, state = model
    cfg = config_lib.from_dict(cfg.to_dict())
    cfg.evals.retrieval = config_lib.evaluator(
        "retrieval", dataset="clip_shapes_captions/small", batch_size=64, max_examples=40, tile=40
    )
    cfg.evals.probe = config_lib.evaluator("probe", dataset="clip_shapes/small", batch_size=64, max_examples=64)
    evals = suite.Suite(cfg, mesh)
    with CompileCounter() as first:
        metrics = evals.run(state["params"], graphdef)
    assert first.events, "the counter must see the first evaluation compile"
    with CompileCounter() as second:
        again = evals.run(state["params"], graphdef)
    assert second.events == [], f"{len(second.events)} compilations in the second evaluation"
    assert again == metrics
    # A new Suite of the same run (e.g. `eval` after `train` in one process) reuses the compiled encoders too.
    with CompileCounter() as rebuilt:
        suite.Suite(cfg, mesh).run(state["params"], graphdef)
    assert rebuilt.events == []
    assert {k.split("/")[0] for k in metrics} == {"zeroshot", "retrieval", "probe"}


def test_sections_run_at_their_own_cadence(shapes_data_dir):
    cfg = tiny_config(shapes_data_dir)
    cfg.total_steps, cfg.eval_every = 12, 4
    cfg.evals.often = config_lib.evaluator("zeroshot", dataset="clip_shapes/small", every=3, batch_size=64)
    cfg.evals.final = config_lib.evaluator("zeroshot", dataset="clip_shapes/small", every=0, batch_size=64)
    cfg.evals.off = config_lib.evaluator("zeroshot", dataset="", every=1)
    evals = suite.Suite(cfg, sharding.make_mesh(cfg))
    assert set(evals.evaluators) == {"often", "final", "zeroshot"}
    due = {step: sorted(evals.due(step)) for step in range(1, 13)}
    assert due[3] == due[9] == ["often"] and due[4] == due[8] == ["zeroshot"]
    assert due[12] == [], "the last step runs every evaluator once, after training (train.run)"
    assert all("final" not in names for names in due.values())


@pytest.fixture(scope="module")
def saved_run(model, tmp_path_factory):
    """The tiny model saved at step 7, as a trained run would be."""
    cfg, _, _, state = model
    workdir = str(tmp_path_factory.mktemp("run"))
    ckpt = checkpoint.Checkpointer(workdir, cfg)
    ckpt.save(7, state, {}, cfg, force=True)
    ckpt.close()
    return workdir


def test_benchmark_command_writes_the_table(model, saved_run):
    """Two zero-shot sets, one command: the CSV and markdown name each set with its class and example counts,
    and the accuracies are those of the same evaluator run on the same parameters."""
    cfg, mesh, graphdef, state = model
    workdir = saved_run
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "clip_jax.main", "benchmark", f"--checkpoint={workdir}",
           "--datasets=clip_shapes/small,clip_digits@test"]  # fmt: skip (clip_digits is built on first use)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "zeroshot_step7.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["split"], r["classes"], r["examples"]) for r in rows] == [
        ("clip_shapes/small", "test", "40", "400"),
        ("clip_digits", "test", "10", "359"),
    ]
    with open(os.path.join(workdir, "eval", "zeroshot_step7.md")) as f:
        table = f.read()
    assert table in proc.stdout and "| mean of 2 |" in table
    # The same numbers as the zeroshot evaluator on these parameters, built here in-process.
    one = config_lib.from_dict(cfg.to_dict())
    one.evals.zeroshot = config_lib.evaluator("zeroshot", dataset="clip_shapes/small", batch_size=256)
    want = suite.Suite(one, mesh).run(state["params"], graphdef)
    for key in ("top1", "top5", "mean_per_class"):
        assert float(rows[0][key]) == pytest.approx(want[f"zeroshot/{key}"], abs=1e-4)


def test_bad_benchmark_datasets_are_named_as_the_user_wrote_them(saved_run):
    with pytest.raises(pipeline.DataError, match=r"^--datasets no_such_set@test: cannot find tfds dataset 'no_such"):
        benchmark.run(saved_run, [("clip_shapes/small", "test"), ("no_such_set", "test")])
    with pytest.raises(pipeline.DataError, match=r"^--datasets clip_shapes/small@dev: cannot read 'clip_shapes/small' "):
        benchmark.run(saved_run, [("clip_shapes/small", "dev")])


def test_a_missing_checkpoint_is_one_error_and_creates_nothing(model, saved_run, tmp_path):
    cfg = model[0]
    with pytest.raises(run_state.TrainingError, match=r"^no checkpoint in .*/nothing_here/checkpoints; train first$"):
        run_state.restore_params(cfg, str(tmp_path / "nothing_here"))
    assert not (tmp_path / "nothing_here").exists()  # orbax would have created it (and raced its threads at exit)
    with pytest.raises(run_state.TrainingError, match=r"no checkpoint at step 3 in .*; it has steps \[7\]$"):
        run_state.restore_params(cfg, saved_run, step=3)
    with pytest.raises(run_state.TrainingError, match=r"no checkpoint at step 3 in .*; it has steps \[7\]$"):
        run_state.load_config(f"{saved_run}/checkpoints/3")


def test_benchmark_dataset_list():
    assert benchmark.parse_datasets("a,b@validation") == [("a", "test"), ("b", "validation")]
    with pytest.raises(config_lib.ConfigError, match="empty name"):
        benchmark.parse_datasets("a,,b")
    with pytest.raises(config_lib.ConfigError, match="lists a@test twice"):
        benchmark.parse_datasets("a,b,a@test")
    rows = [{"dataset": d, "split": "test", "classes": 2, "examples": 4, "top1": t, "top5": 100.0,
             "mean_per_class": t} for d, t in (("a", 50.0), ("b", 25.0))]  # fmt: skip
    assert "| mean of 2 |  |  |  | 37.50 | 100.00 | 37.50 |" in benchmark.markdown(rows, "x")


def test_unknown_evaluator_type_and_key_are_config_errors():
    with pytest.raises(config_lib.ConfigError, match="unknown evaluator type 'zero-shot'; choose one of zeroshot"):
        config_lib.evaluator("zero-shot")
    with pytest.raises(config_lib.ConfigError, match="has no key 'label'; did you mean 'label_key'"):
        config_lib.evaluator("zeroshot", label="x")
    assert np.isclose(config_lib.evaluator("probe").c, 1.0)
