"""model.max_log_t: CLIP's cap of the temperature at t = 100 (open_clip clamps its logit scale after every step).

The loss never sees a larger t (checked against the float64 loss of the model's own embeddings at t = 100) and the
stored log t is clamped after each update, for both loss kinds, both model families and GradCache accumulation.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from test_coca_train import small_config as coca_config
from test_grad_cache import _batch
from test_loss_precision import float64_reference
from test_train import small_config

from clip_jax import config as config_lib
from clip_jax import config_checks, optim, sharding, train

CAP = math.log(100.0)
START = math.log(110.0)  # above the cap, as a warm start or an imported checkpoint can be


def _config(tmp_path, family, kind, accum_steps, max_log_t=CAP):
    # The training tests' own configs (same step HLO: the persistent compilation cache serves them from there).
    if family == "coca":
        cfg = coca_config(tmp_path, steps=60)
    else:
        cfg = small_config(tmp_path, total_steps=120)
    cfg.accum_steps = accum_steps
    cfg.loss.kind = kind
    cfg.model.log_t_init, cfg.model.max_log_t = START, max_log_t
    if kind == "sigmoid":
        cfg.model.bias_init = -10.0
    return cfg


def _one_step(cfg):
    """(float64 losses of the initial model's embeddings at t = 100 and t = 110, step metrics, log t after 2 steps)."""
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, state, shardings = train.init_state(cfg, mesh, opt)
    batch = _batch(cfg)
    out = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["image"], b["tokens"]))(state["params"], batch)
    x, y, bias = np.asarray(out["img"]), np.asarray(out["txt"]), float(out["bias"])
    refs = {t: float64_reference(cfg.loss.kind, x, y, t, bias)[0] for t in (100.0, 110.0)}
    step = train.compile_step(cfg, mesh, opt, graphdef, shardings)
    state, metrics = step(state, sharding.put_batch(batch, mesh))
    metrics = jax.device_get(metrics)
    state, _ = step(state, sharding.put_batch(_batch(cfg, seed=1), mesh))
    return refs, metrics, float(state["params"]["log_t"])


@pytest.mark.parametrize(
    "family,kind,accum_steps", [("two_tower", "softmax", 1), ("two_tower", "sigmoid", 2), ("coca", "softmax", 1)]
)
def test_loss_sees_and_state_keeps_at_most_the_cap(tmp_path, family, kind, accum_steps):
    refs, metrics, log_t = _one_step(_config(tmp_path, family, kind, accum_steps))
    np.testing.assert_allclose(metrics["temperature"], 100.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["contrastive_loss"], refs[100.0], rtol=1e-5)
    assert abs(refs[110.0] - refs[100.0]) > 1e-3 * abs(refs[100.0])  # the two temperatures are distinguishable
    assert log_t <= np.float32(CAP), f"stored log t {log_t} exceeds the cap {CAP} after the update"


def test_cap_disabled(tmp_path):
    refs, metrics, log_t = _one_step(_config(tmp_path, "two_tower", "softmax", 1, max_log_t=float("inf")))
    np.testing.assert_allclose(metrics["temperature"], 110.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrastive_loss"], refs[110.0], rtol=1e-5)
    assert log_t > CAP
    cfg = config_lib.base()
    for off in (0.0, -1.0, float("inf")):  # the documented ways to switch it off
        cfg.model.max_log_t = off
        assert train.temperature_cap(cfg) is None and train.capped_log_t(np.float32(START), cfg) == np.float32(START)


def test_gradient_passes_at_the_cap():
    """At exactly the cap the loss can still lower t (open_clip's clamp-after-step behaves the same way)."""
    cfg = config_lib.base()
    grad_at_cap = jax.grad(lambda lt: train.capped_log_t(lt, cfg) * 3.0)(np.float32(CAP))
    grad_above = jax.grad(lambda lt: train.capped_log_t(lt, cfg) * 3.0)(np.float32(START))
    assert float(grad_at_cap) == 3.0 and float(grad_above) == 0.0


def test_nan_cap_and_an_init_above_the_cap_are_config_errors():
    cfg = config_lib.base()
    cfg.model.max_log_t = float("nan")
    with pytest.raises(config_lib.ConfigError, match="model.max_log_t"):
        config_checks.validate(cfg, 8, tokenizer=False)
    cfg.model.max_log_t, cfg.model.log_t_init = CAP, START
    with pytest.raises(config_lib.ConfigError, match="'model.log_t_init' is .* above model.max_log_t"):
        config_checks.validate(cfg, 8, tokenizer=False)
    cfg.model.max_log_t = float("inf")  # no cap: any init
    config_checks.validate(cfg, 8, tokenizer=False)
