"""Helpers shared by the model tests: small model configs, towers built once per config and run under jit."""

import functools
import json

import flax

flax.config.update("flax_always_shard_variable", False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from run_configs import set_keys  # noqa: E402

from clip_jax.models import layers, text, two_tower, vit  # noqa: E402

VOCAB, EOS, PAD = 100, 99, 0


def make_cfg(**overrides):
    """A small model config with the same keys as config.base().model; overrides use 'image.pool' style keys."""
    c = ml_collections.ConfigDict(
        dict(
            embed_dim=16,
            dtype="float32",
            log_t_init=2.6593,
            bias_init=0.0,
            remat="none",
            scan_layers=True,
            image=dict(
                variant="mu/4",
                width=-1,
                depth=-1,
                mlp_dim=-1,
                num_heads=-1,
                patch_size=-1,
                image_size=16,
                pool="cls",
                posemb="learn",
                proj=True,
                remat="",
            ),
            text=dict(
                variant="mu",
                width=-1,
                depth=-1,
                mlp_dim=-1,
                num_heads=-1,
                vocab_size=VOCAB,
                max_len=12,
                causal=True,
                pool="eos",
                eos_id=EOS,
                pad_id=PAD,
                proj=True,
                remat="",
            ),
        )
    )
    return set_keys(c, overrides)


class Jitted:
    """Runs a module's methods under jax.jit, as the trainer does. Eager calls would recompile the encoder's
    layer scan on every call (its step function is a new closure each time), which dominates a CPU test run."""

    def __init__(self, module):
        graphdef, self.state = nnx.split(module)
        self.module = module
        self._run = jax.jit(
            lambda state, method, *args: getattr(nnx.merge(graphdef, state), method)(*args), static_argnums=1
        )

    def __call__(self, *args):
        return self._run(self.state, "__call__", *args)

    def features(self, *args):
        return self._run(self.state, "features", *args)


# Models are cached per config (tests never mutate them) so each config initialises and compiles once; tests
# that need one tower build only that one.
@functools.cache
def _build(cfg_json, part):
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    if part == "both":
        return Jitted(two_tower.TwoTower(cfg, rngs=nnx.Rngs(params=0)))
    cls, sub = (vit.ViT, cfg.image) if part == "image" else (text.TextTransformer, cfg.text)
    return Jitted(
        cls(
            sub,
            embed_dim=cfg.embed_dim,
            dtype=layers.compute_dtype(cfg.dtype),
            remat=two_tower.tower_remat(cfg, part),
            rngs=nnx.Rngs(params=0),
            scan=cfg.scan_layers,
        )
    )


def build(cfg):
    return _build(cfg.to_json(), "both")


def image_tower(**overrides):
    return _build(make_cfg(**overrides).to_json(), "image")


def text_tower(**overrides):
    return _build(make_cfg(**overrides).to_json(), "text")


def images(n=2, size=16, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def tokens_with_eos(lengths, total_len, seed=2):
    """Rows of random ids in [1, EOS) of the given lengths, then EOS, then PAD up to total_len."""
    rng = np.random.default_rng(seed)
    out = np.full((len(lengths), total_len), PAD, np.int32)
    for row, n in enumerate(lengths):
        out[row, :n] = rng.integers(1, EOS, n)
        out[row, n] = EOS
    return jnp.asarray(out)


def assert_unit_rows(x, d):
    assert x.shape[-1] == d and x.dtype == jnp.float32
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-5)


# Every pool and every posemb; the cls token with both posembs (learned ones cover it, fixed ones do not).
