"""GradCache accumulation: k micro-batches give the loss and the gradients of the whole batch, not of k small ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import small_config

from clip_jax import config as config_lib
from clip_jax import config_checks, grad_cache, optim, sharding, train


def _grads(cfg, batch, accum_steps):
    cfg = config_lib_copy(cfg, accum_steps=accum_steps)
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, state, _ = train.init_state(cfg, mesh, opt)
    fn = grad_cache.make(cfg, mesh, graphdef, functools.partial(train.total_loss, cfg=cfg, mesh=mesh))
    (loss, aux), grads = jax.jit(fn)(state["params"], {}, sharding.put_batch(batch, mesh))
    return float(loss), jax.device_get(grads), state, mesh, graphdef


def config_lib_copy(cfg, **overrides):
    cfg = cfg.copy_and_resolve_references()
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    s, n, L = cfg.model.image.image_size, cfg.batch_size, cfg.model.text.max_len
    tokens = rng.integers(1, cfg.model.text.vocab_size, size=(n, L)).astype(np.int32)
    tokens[:, -3:] = 0  # some padding, as real captions have
    return {"image": rng.uniform(-1, 1, size=(n, s, s, 3)).astype(np.float32), "tokens": tokens}


@pytest.mark.parametrize("mesh,kind", [((8, 1), "softmax"), ((2, 4), "sigmoid")])
def test_accumulated_step_equals_full_batch_step(tmp_path, mesh, kind):
    cfg = small_config(tmp_path, batch_size=64)
    cfg.mesh.data, cfg.mesh.fsdp = mesh
    cfg.loss.kind = kind
    if kind == "sigmoid":
        cfg.model.log_t_init, cfg.model.bias_init = float(np.log(10.0)), -10.0
    batch = _batch(cfg)
    loss1, g1, *_ = _grads(cfg, batch, 1)
    loss4, g4, *_ = _grads(cfg, batch, 4)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6, atol=1e-6)
    flat1, flat4 = jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g4)
    scale = max(float(np.abs(g).max()) for _, g in flat1)
    for (path, a), b in zip(flat1, flat4):
        np.testing.assert_allclose(
            b, a, atol=1e-5 * max(scale, 1.0), rtol=1e-4, err_msg=jax.tree_util.keystr(path)
        )
    # Every parameter really receives gradient (the softmax loss does not read the SigLIP bias).
    unused = {"['bias']"} if kind == "softmax" else set()
    assert all(float(np.abs(g).max()) > 0 for p, g in flat1 if jax.tree_util.keystr(p) not in unused)


def test_accumulated_loss_is_not_the_mean_of_micro_losses(tmp_path):
    """The property GradCache exists for: 4 micro-batches of 16 see 63 negatives each, not 15."""
    cfg = small_config(tmp_path, batch_size=64)
    batch = _batch(cfg, seed=1)
    loss4, _, state, mesh, graphdef = _grads(cfg, batch, 4)
    from flax import nnx

    model = nnx.merge(graphdef, state["params"])
    out = jax.jit(lambda im, tok: model(im, tok))(batch["image"], batch["tokens"])
    img, txt = np.asarray(out["img"], np.float64), np.asarray(out["txt"], np.float64)
    t = float(np.exp(out["log_t"]))

    def clip_loss(i, x):
        logits = t * i @ x.T
        lse_r = np.log(np.exp(logits).sum(1))
        lse_c = np.log(np.exp(logits).sum(0))
        return float(np.mean(lse_r + lse_c - 2 * np.diag(logits)) / 2)

    np.testing.assert_allclose(loss4, clip_loss(img, txt), rtol=1e-5)
    micro = np.mean([clip_loss(img[i::4], txt[i::4]) for i in range(4)])
    assert abs(micro - loss4) > 0.1, (micro, loss4)


def test_split_and_merge_are_inverse_and_keep_rows_on_their_device():
    x = jnp.arange(64 * 3).reshape(64, 3)
    parts = grad_cache._split(x, 4, 8)
    assert parts.shape == (4, 16, 3)
    np.testing.assert_array_equal(grad_cache._merge(parts, 4, 8), x)
    # Micro-batch i holds rows i*2, i*2+1 of each device's 8-row slice: every device contributes to every micro.
    np.testing.assert_array_equal(parts[1, :, 0] // 3, [r for d in range(8) for r in (8 * d + 2, 8 * d + 3)])


def test_batch_that_does_not_split_into_micro_batches_is_a_config_error(tmp_path):
    cfg = small_config(tmp_path, batch_size=64, accum_steps=16)
    with pytest.raises(config_lib.ConfigError, match="accum_steps=16"):
        config_checks.validate(cfg, 8)


def test_accumulation_with_a_captioning_model(tmp_path):
    """CoCa: the caption term (a per-token mean over the whole batch) passes through GradCache exactly too."""
    import importlib

    cfg = importlib.import_module("configs.coca_tiny").get_config()
    cfg.data.data_dir, cfg.batch_size = str(tmp_path), 32
    cfg.model.image.depth = cfg.model.text.depth = cfg.model.coca.decoder_depth = 1
    batch = _batch(cfg, seed=2)
    loss1, g1, *_ = _grads(cfg, batch, 1)
    loss2, g2, *_ = _grads(cfg, batch, 2)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    flat1, flat2 = jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)
    scale = max(float(np.abs(g).max()) for _, g in flat1)
    for (path, a), b in zip(flat1, flat2):
        np.testing.assert_allclose(
            b, a, atol=1e-5 * max(scale, 1.0), rtol=1e-4, err_msg=jax.tree_util.keystr(path)
        )
    decoder = [g for p, g in flat1 if "decoder" in jax.tree_util.keystr(p)]
    assert decoder and all(float(np.abs(g).max()) > 0 for g in decoder)  # the caption loss reaches the decoder
