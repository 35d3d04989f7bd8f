"""The gradient noise scale (clip_jax/noise_scale.py): the estimator against a closed form, and the train step's
hook (the shares it measures, nothing changed when off, training unchanged when on)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_grad_cache import _batch, config_lib_copy
from test_train import small_config

from clip_jax import config as config_lib
from clip_jax import config_checks, grad_cache, noise_scale, optim, sharding, train


def _least_squares_estimates(u, noise_std, batch, k, n_batches, seed):
    """Per-batch (grad_sq, trace_sigma) of the loss 1/2 (w.x - y)^2 with x ~ N(0, I_d), y = w*.x + eps,
    eps ~ N(0, noise_std^2), at w = w* + u, through the train step's functions (sq_norm of each micro-batch share,
    estimates). Data and per-example gradients in float64 numpy."""
    rng = np.random.default_rng(seed)
    d = u.shape[0]
    x = rng.standard_normal((n_batches, batch, d))
    residual = x @ u - noise_std * rng.standard_normal((n_batches, batch))  # w.x - y
    per_example = residual[..., None] * x  # gradient of 1/2 r^2 w.r.t. w
    shares = per_example.reshape(n_batches, k, batch // k, d).sum(axis=2) / batch  # they sum to the batch mean
    share_sq = jax.vmap(jax.vmap(noise_scale.sq_norm))({"w": jnp.asarray(shares, jnp.float32)})
    full_sq = jax.vmap(noise_scale.sq_norm)({"w": jnp.asarray(shares.sum(axis=1), jnp.float32)})
    est = jax.vmap(noise_scale.estimates, in_axes=(0, 0, None))(share_sq, full_sq, batch)
    return np.asarray(est["grad_sq"], np.float64), np.asarray(est["trace_sigma"], np.float64)


def _ratio_sigma(g2, tr, weights):
    """Standard error of sum(w tr) / sum(w g2) over independent steps (delta method, sample covariances)."""
    ratio = np.sum(weights * tr) / np.sum(weights * g2)
    cov = np.cov(np.stack([g2, tr]))
    spread = cov[1, 1] - 2 * ratio * cov[0, 1] + ratio**2 * cov[0, 0]
    return np.sqrt(np.sum(weights**2) * spread) / np.sum(weights * g2)


@pytest.mark.parametrize("u_sq", [4.0, 0.25])
def test_estimates_match_the_closed_form_of_least_squares(u_sq):
    """Gaussian least squares: the per-example gradient is r x with r = u.x - eps, so G = u and, by Isserlis'
    theorem, Sigma = (|u|^2 + s^2) I + u u^T: B_simple = (d (|u|^2 + s^2) + |u|^2) / |u|^2 exactly (11 and 41
    here). Means over many batches, and the train loop's moving average, within 4 standard errors."""
    d, s, batch, k, n, decay = 8, 1.0, 64, 4, 4000, 0.99
    u = np.zeros(d)
    u[:4] = np.sqrt(u_sq / 4)
    true_g2, true_tr = u_sq, d * (u_sq + s**2) + u_sq
    g2, tr = _least_squares_estimates(u, s, batch, k, n, seed=int(u_sq * 100))
    for name, values, truth in (("grad_sq", g2, true_g2), ("trace_sigma", tr, true_tr)):
        se = values.std(ddof=1) / np.sqrt(n)
        assert abs(values.mean() - truth) < 4 * se, (name, values.mean(), truth, se)
    uniform = np.ones(n)
    b_simple = true_tr / true_g2
    assert abs(tr.mean() / g2.mean() - b_simple) < 4 * _ratio_sigma(g2, tr, uniform)
    ema = noise_scale.MovingAverage(decay)
    logged = ema.log([{"grad_sq": a, "trace_sigma": b} for a, b in zip(g2, tr)])["noise_scale"]
    weights = (1 - decay) * decay ** np.arange(n - 1, -1, -1.0)
    sigma = _ratio_sigma(g2, tr, weights)
    assert abs(logged - b_simple) < 4 * sigma, (logged, b_simple, sigma)
    assert sigma < 0.15 * b_simple  # the check has power: a factor-k error in B_small would fail it


def test_estimates_refuse_a_single_share_and_the_average_skips_bad_steps():
    with pytest.raises(ValueError, match="at least 2 gradient shares"):
        noise_scale.estimates(jnp.ones(1), 1.0, 8)
    ema = noise_scale.MovingAverage(0.5)
    assert np.isnan(ema.value())  # nothing yet
    ema.log([{"grad_sq": 2.0, "trace_sigma": 6.0}, {"grad_sq": float("nan"), "trace_sigma": 1.0}])
    assert ema.value() == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        noise_scale.MovingAverage(1.0)


def test_config_refuses_noise_scale_without_micro_batches(tmp_path):
    cfg = small_config(tmp_path, noise_scale=True, accum_steps=1)
    with pytest.raises(config_lib.ConfigError, match="set accum_steps >= 2"):
        config_checks.validate(cfg, 8, tokenizer=False)
    cfg = small_config(tmp_path, noise_scale=True, accum_steps=2, noise_scale_decay=1.0)
    with pytest.raises(config_lib.ConfigError, match="noise_scale_decay"):
        config_checks.validate(cfg, 8, tokenizer=False)
    config_checks.validate(small_config(tmp_path, noise_scale=True, accum_steps=2), 8, tokenizer=False)


def test_off_adds_nothing_to_the_step(tmp_path):
    """Off: the metrics are those of a step without the feature, and the lowered program does not depend on the
    decay key; on: two more metrics and a different program."""
    lowered, keys = {}, {}
    for name, on, decay in (("off", False, 0.99), ("off2", False, 0.5), ("on", True, 0.99)):
        cfg = small_config(tmp_path, batch_size=32, accum_steps=2, noise_scale=on, noise_scale_decay=decay)
        mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
        graphdef, state, shardings = train.state_shardings(cfg, mesh, opt)  # abstract: nothing is computed
        step = train.compile_step(cfg, mesh, opt, graphdef, shardings)
        batch = train.abstract_batch(cfg)
        keys[name] = set(jax.eval_shape(step, state, batch)[1])
        lowered[name] = step.lower(state, batch).as_text()
    assert keys["on"] - keys["off"] == {"grad_sq", "trace_sigma"} and keys["off"] <= keys["on"]
    assert noise_scale.SHARES not in keys["on"]
    assert lowered["off"] == lowered["off2"] and lowered["on"] != lowered["off"]


def _row_micro_batch(batch_size, devices, k):
    """grad_cache's documented split: micro-batch i is rows i*m..(i+1)*m-1 of every device's slice."""
    per_device = batch_size // devices
    return (np.arange(batch_size) % per_device) // (per_device // k)


def _reference_share_sq(cfg, mesh, graphdef, params, batch, rows):
    """|gradient of the full-batch loss through the embeddings of `rows` only|^2: micro-batch share by autodiff
    of the whole batch at once (no GradCache), the other rows' embeddings held constant."""

    def loss(p):
        out = grad_cache.apply(nnx.merge(graphdef, p), batch)
        keep = jnp.asarray(rows)[:, None]
        for name in ("img", "txt"):
            out[name] = jnp.where(keep, out[name], jax.lax.stop_gradient(out[name]))
        return train.total_loss(out, cfg, mesh)[0]

    return noise_scale.sq_norm(jax.grad(loss)(params))


@pytest.mark.slow  # three compiled programs: ~50 s on 2 busy cores without the compilation cache
def test_step_measures_the_micro_batch_shares_and_leaves_training_unchanged(tmp_path):
    """The step's grad_sq and trace_sigma are the estimates from the micro-batch shares computed independently
    (plain autodiff of the whole batch, one micro-batch's embeddings differentiable at a time); with the metric
    on, the loss and the new parameters are bit-identical to the step with it off."""
    cfg = small_config(tmp_path, batch_size=32, accum_steps=2, noise_scale=True)
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, state, shardings = train.init_state(cfg, mesh, opt)
    off_cfg = config_lib_copy(cfg, noise_scale=False)
    batch = sharding.put_batch(_batch(cfg), mesh)
    params = jax.device_get(state["params"])
    # Reference estimates from the shares computed without GradCache (before the step donates the state).
    micro = _row_micro_batch(cfg.batch_size, mesh.devices.size, cfg.accum_steps)
    ref_fn = jax.jit(lambda p, rows: _reference_share_sq(cfg, mesh, graphdef, p, batch, rows))
    shares = jnp.stack([ref_fn(params, micro == i) for i in range(cfg.accum_steps)])
    ref = noise_scale.estimates(shares, ref_fn(params, np.ones(cfg.batch_size, bool)), cfg.batch_size)

    off_state = jax.tree.map(jnp.copy, state)  # each step donates its state
    on_state, on = train.compile_step(cfg, mesh, opt, graphdef, shardings)(state, batch)
    off_state, off = train.compile_step(off_cfg, mesh, opt, graphdef, shardings)(off_state, batch)
    for name in ("grad_sq", "trace_sigma"):
        np.testing.assert_allclose(float(on[name]), float(ref[name]), rtol=2e-4, err_msg=name)
    assert float(on["loss"]) == float(off["loss"]) and float(on["grad_norm"]) == float(off["grad_norm"])
    for a, b in zip(jax.tree.leaves(on_state["params"]), jax.tree.leaves(off_state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The loop's path: per-step estimates -> MetricAverager -> their moving averages' ratio.
    averager = train.MetricAverager(noise_scale.moving_average(cfg))
    averager.add(on, cfg.batch_size, 1)
    logged = averager.pop()
    expected = float(on["trace_sigma"] / on["grad_sq"]) if on["grad_sq"] > 0 else np.nan  # random data: no signal
    np.testing.assert_allclose(logged["noise_scale"], expected, rtol=1e-6)


@pytest.mark.slow  # ~40 s: a 20-step run with its data pipeline and checkpoint
def test_training_logs_a_finite_positive_noise_scale(tmp_path):
    """The tiny config on the shapes data, GradCache with 2 micro-batches: every logged interval has a positive
    B_simple once the moving averages have a few steps."""
    cfg = small_config(tmp_path, accum_steps=2, noise_scale=True, total_steps=20, noise_scale_decay=0.9)
    cfg.evals.zeroshot.dataset = ""
    history = train.run(cfg, str(tmp_path / "run"))["history"]
    assert [h["step"] for h in history] == [10, 20]
    for h in history:
        assert np.isfinite(h["noise_scale"]) and h["noise_scale"] > 0, h
        assert np.isfinite(h["grad_sq"]) and np.isfinite(h["trace_sigma"]), h
