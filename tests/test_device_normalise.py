"""uint8 on the wire: the train step normalises a uint8 image batch on the devices, before GradCache splits it,
and takes the same step as on the batch normalised on the host in float32 (ops.to_float, float64 numpy as the
reference for the constants)."""

import jax
import numpy as np
import pytest
from test_grad_cache import _batch
from test_train import small_config

from clip_jax import optim, sharding, train
from clip_jax.input import ops

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def test_device_normalisation_is_the_float64_formula():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    cfg = small_config("/unused")
    cfg.data.image_mean, cfg.data.image_std = OPENAI_MEAN, OPENAI_STD
    got = jax.jit(lambda b: train.normalise_images(b, cfg))({"image": pixels})["image"]
    want = (pixels / 255.0 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)
    floats = {"image": want.astype(np.float32)}
    assert train.normalise_images(floats, cfg)["image"] is floats["image"]  # normalised already: untouched


def _step(cfg, batch):
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, state, shardings = train.init_state(cfg, mesh, opt)
    new, metrics = train.compile_step(cfg, mesh, opt, graphdef, shardings)(state, sharding.put_batch(batch, mesh))
    return jax.device_get(metrics), jax.device_get(new["params"])


# accum_steps 2: normalised once, then GradCache splits the float batch; 1 is the same line: it runs with -m slow.
@pytest.mark.parametrize("accum_steps", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_a_uint8_batch_takes_the_step_of_the_host_normalised_batch(tmp_path, accum_steps):
    cfg = small_config(tmp_path, accum_steps=accum_steps)
    cfg.data.image_mean, cfg.data.image_std = OPENAI_MEAN, OPENAI_STD
    batch = _batch(cfg)
    pixels = np.random.default_rng(0).integers(0, 256, batch["image"].shape, dtype=np.uint8)
    host = {**batch, "image": ops.to_float(pixels, OPENAI_MEAN, OPENAI_STD)}
    (m8, p8), (mf, pf) = _step(cfg, {**batch, "image": pixels}), _step(cfg, host)
    for key in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(m8[key], mf[key], rtol=1e-6, err_msg=key)
    for path, a in jax.tree_util.tree_leaves_with_path(p8):
        b = pf
        for k in path:
            b = b[k.key]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
