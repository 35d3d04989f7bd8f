"""Model towers: shapes, norms, parameter counts, masking, sharding annotations, precision, remat."""

import functools
import json

import flax

flax.config.update("flax_always_shard_variable", False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

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
            remat=False,
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
            ),
        )
    )
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


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
            remat=cfg.remat,
            rngs=nnx.Rngs(params=0),
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
@pytest.mark.parametrize(
    "pool,posemb", [("cls", "learn"), ("cls", "sincos2d"), ("gap", "learn"), ("map", "sincos2d")]
)
def test_image_pools_and_posembs(pool, posemb):
    out = layers.l2_normalize(image_tower(**{"image.pool": pool, "image.posemb": posemb})(images()))
    assert out.shape == (2, 16)
    assert_unit_rows(out, 16)
    # Different images must give different embeddings (a constant output would also be unit-norm).
    assert np.abs(out[0] - out[1]).max() > 1e-3


# Every pool and both masks (the padding tests below add eos/first/mean with the bidirectional mask).
@pytest.mark.parametrize("pool,causal", [("eos", True), ("last", True), ("first", False), ("mean", False)])
def test_text_pools(pool, causal):
    out = layers.l2_normalize(
        text_tower(**{"text.pool": pool, "text.causal": causal})(tokens_with_eos([3, 6], 12))
    )
    assert out.shape == (2, 16)
    assert_unit_rows(out, 16)
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_call_returns_embeddings_and_scalars():
    cfg = make_cfg(log_t_init=2.3, bias_init=-10.0)
    model = build(cfg)
    img, txt, log_t, bias = model(images(), tokens_with_eos([4, 5], 12))
    model = model.module
    assert img.shape == txt.shape == (2, 16)
    assert isinstance(model.log_t, nnx.Param) and isinstance(model.bias, nnx.Param)
    assert log_t.shape == bias.shape == () and log_t.dtype == bias.dtype == jnp.float32
    assert float(log_t) == pytest.approx(2.3) and float(bias) == -10.0


def _block_params(w, mlp):
    """Closed form: two LayerNorms, q/k/v/out with biases, two-layer MLP with biases."""
    return 2 * 2 * w + 4 * (w * w + w) + (w * mlp + mlp) + (mlp * w + w)


def _vit_formula(w, depth, mlp, patch, size, pool, posemb, proj_dim):
    n = (size // patch) ** 2 + (pool == "cls")
    count = patch * patch * 3 * w + w  # patch embedding with bias
    count += n * w if posemb == "learn" else 0
    count += w if pool == "cls" else 0
    count += depth * _block_params(w, mlp) + 2 * w  # blocks + final LN
    if pool == "map":  # probe + attention + LN + MLP
        count += w + 4 * (w * w + w) + 2 * w + (w * mlp + mlp) + (mlp * w + w)
    return count + w * proj_dim + proj_dim  # projection with bias


def _text_formula(w, depth, mlp, vocab, max_len, proj_dim):
    return vocab * w + max_len * w + depth * _block_params(w, mlp) + 2 * w + w * proj_dim + proj_dim


@pytest.mark.parametrize(
    "variant,image_size,pool,posemb,embed_dim",
    [
        ("Ti/16", 224, "gap", "sincos2d", 192),
        ("S/16", 224, "map", "learn", 384),
        ("B/16", 224, "cls", "learn", 512),
        ("L/14", 224, "cls", "learn", 768),
        ("So400m/14", 224, "map", "learn", 1152),
        ("G/14", 224, "gap", "sincos2d", 1024),
    ],
)
def test_image_param_count_closed_form(variant, image_size, pool, posemb, embed_dim):
    width, depth, mlp, _ = {
        "Ti": (192, 12, 768, 3),
        "S": (384, 12, 1536, 6),
        "B": (768, 12, 3072, 12),
        "L": (1024, 24, 4096, 16),
        "So400m": (1152, 27, 4304, 16),
        "G": (1664, 48, 8192, 16),
    }[variant.split("/")[0]]
    patch = int(variant.split("/")[1])
    cfg = make_cfg(
        embed_dim=embed_dim,
        **{
            "image.variant": variant,
            "image.depth": -1,
            "image.image_size": image_size,
            "image.pool": pool,
            "image.posemb": posemb,
        },
    )
    model = two_tower.abstract(cfg)
    expected = _vit_formula(width, depth, mlp, patch, image_size, pool, posemb, embed_dim)
    assert two_tower.param_counts(model)["image"] == expected


def test_published_param_counts():
    """OpenAI CLIP figures: B/16 image 86.19M, text 63.43M; L/14 image 303.97M.

    Ours differs by a few thousand: a patch-embedding bias and projection biases, but no pre-encoder LayerNorm.
    """
    b16 = make_cfg(
        embed_dim=512,
        **{
            "image.variant": "B/16",
            "image.depth": -1,
            "image.image_size": 224,
            "text.variant": "M",
            "text.depth": -1,
            "text.vocab_size": 49408,
            "text.max_len": 77,
        },
    )
    counts = two_tower.param_counts(two_tower.abstract(b16))
    assert counts["image"] == pytest.approx(86.19e6, rel=2e-3)
    assert counts["text"] == pytest.approx(63.43e6, rel=2e-3)
    assert counts["text"] == _text_formula(512, 12, 2048, 49408, 77, 512)
    assert counts["total"] == counts["image"] + counts["text"] + 2
    l14 = make_cfg(embed_dim=768, **{"image.variant": "L/14", "image.depth": -1, "image.image_size": 224})
    assert two_tower.param_counts(two_tower.abstract(l14))["image"] == pytest.approx(303.97e6, rel=2e-3)


def test_base_config_builds():
    """The lead's defaults (ViT-B/16 CLIP) build with no allocation and give the CLIP B/16 counts."""
    from clip_jax import config

    counts = two_tower.param_counts(two_tower.abstract(config.base().model))
    assert counts["image"] == pytest.approx(86.19e6, rel=2e-3)
    assert counts["text"] == pytest.approx(63.43e6, rel=2e-3)


def test_overrides_and_errors():
    cfg = make_cfg(**{"image.width": 48, "image.num_heads": 3, "image.patch_size": 8})
    dims = layers.tower_dims(cfg.image, with_patch=True)
    assert dims == {"width": 48, "depth": 1, "mlp_dim": 128, "num_heads": 3, "patch_size": 8}
    bad = [
        ({"image.variant": "X/16"}, "So400m"),
        ({"image.pool": "avg"}, "gap"),
        ({"image.posemb": "rope"}, "sincos2d"),
        ({"text.pool": "cls"}, "mean"),
        ({"text.variant": "Q"}, "Ti"),
        ({"text.variant": "B/16"}, "without a patch"),
        ({"dtype": "float16"}, "bfloat16"),
        ({"image.proj": False}, "width == embed_dim"),
        ({"image.image_size": 18}, "multiple"),
        ({"image.variant": "mu"}, "patch_size"),
    ]
    for overrides, needle in bad:
        with pytest.raises(ValueError, match=needle):
            two_tower.abstract(make_cfg(**overrides))
    # Without projections the width must equal embed_dim, and then it works.
    model = two_tower.abstract(make_cfg(embed_dim=32, **{"image.proj": False, "text.proj": False}))
    assert model.image.proj is None and model.text.proj is None
    assert nnx.eval_shape(lambda m: m.encode_image(images(1)), model).shape == (1, 32)


def test_every_param_has_logical_axes():
    for cfg in (
        make_cfg(**{"image.pool": "map"}),
        make_cfg(**{"image.variant": "B/16", "image.pool": "map", "image.image_size": 224}),
    ):
        state = nnx.state(two_tower.abstract(cfg), nnx.Param)
        specs = nnx.get_partition_spec(state)
        leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert len(leaves) == len(spec_leaves) > 20
        for var, spec in zip(leaves, spec_leaves):
            names = var.get_metadata().get("out_sharding")
            assert names is not None, var
            assert len(names) == len(var.value.shape), (var.value.shape, names)
            assert set(names) <= set(layers.AXIS_NAMES), names
            assert tuple(spec) == tuple(names)
            assert var.value.dtype == jnp.float32
        # Spot checks that the names say what the axes are.
        m = two_tower.abstract(cfg)
        assert m.text.token_embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
        # Block parameters are stacked on a leading, unsharded layer axis.
        assert m.image.encoder.blocks.attn.query_kernel.get_metadata()["out_sharding"] == (
            None,
            "embed",
            "heads",
            "kv",
        )
        assert m.log_t.get_metadata()["out_sharding"] == ()


def test_scanned_encoder_matches_a_loop_over_layers():
    enc = layers.Encoder(32, 2, 128, 2, dtype=jnp.float32, remat=False, rngs=layers.KeyStream(jax.random.key(0)))
    graphdef, stacked = nnx.split(enc.blocks)
    kernels = stacked["mlp"]["fc1"]["kernel"][...]
    assert kernels.shape == (2, 32, 128) and np.abs(kernels[0] - kernels[1]).min() > 0  # distinct inits
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 32)), jnp.float32)
    mask = jnp.tril(jnp.ones((12, 12), bool))[None, None]

    @jax.jit
    def both(stacked, x):
        ref = x
        for i in range(2):
            ref = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))(ref, mask)
        return enc(x, mask), enc.ln_final(ref)

    out, ref = both(stacked, x)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_causal_mask():
    model = text_tower(**{"text.causal": True})
    toks = tokens_with_eos([10, 8], 12)
    k = 4
    changed = toks.at[:, k + 1 :].set((toks[:, k + 1 :] + 7) % EOS + 1)
    a, b = model.features(toks), model.features(changed)
    np.testing.assert_allclose(a[:, : k + 1], b[:, : k + 1], atol=1e-6)
    assert np.abs(a[:, k + 1 :] - b[:, k + 1 :]).max() > 1e-3
    # A bidirectional model sees the change everywhere, so this check can tell the two apart.
    bidir = text_tower(**{"text.causal": False})
    assert np.abs(bidir.features(toks)[:, : k + 1] - bidir.features(changed)[:, : k + 1]).max() > 1e-3


def test_eos_pooling():
    model, last = text_tower(**{"text.pool": "eos"}), text_tower(**{"text.pool": "last"})
    toks = tokens_with_eos([3, 7], 12)
    # Overwrite everything after each row's first EOS, including with more EOS ids: the first EOS counts.
    after = np.asarray(toks).copy()
    after[0, 4:] = [5, 6, EOS, 8, 9, 10, 11, 12]
    after[1, 8:] = [EOS, 3, 4, 5]
    out = model(toks)
    np.testing.assert_allclose(out, model(jnp.asarray(after)), atol=1e-6)
    # Reference: the projected feature at the EOS position.
    feats = model.features(toks)
    np.testing.assert_allclose(out, model.module.proj(jnp.stack([feats[0, 3], feats[1, 7]])), atol=1e-6)
    # 'last' pooling does see those tokens (so the check above is not vacuous).
    assert np.abs(last(toks) - last(jnp.asarray(after))).max() > 1e-3
    # No EOS at all (truncated caption): falls back to the last position.
    no_eos = jnp.asarray(np.arange(1, 13, dtype=np.int32)[None])
    np.testing.assert_allclose(model(no_eos), last(no_eos), atol=1e-6)


@pytest.mark.parametrize("pool", ["eos", "first", "mean"])
def test_bidirectional_ignores_padding(pool):
    model = text_tower(**{"text.causal": False, "text.pool": pool})
    short, long = tokens_with_eos([3, 6], 8), tokens_with_eos([3, 6], 12)
    np.testing.assert_array_equal(short, long[:, :8])
    np.testing.assert_allclose(model(short), model(long), atol=1e-5)
    # If padding were not recognised (no end token to find, another pad id) the extra pads would change the result.
    unmasked = text_tower(**{"text.causal": False, "text.pool": pool, "text.pad_id": 98, "text.eos_id": 98})
    assert np.abs(unmasked(short) - unmasked(long)).max() > 1e-3


def test_padding_is_what_follows_the_end_token():
    """A real token that shares the pad id (CLIP BPE: 0 is "!") is kept; positions after the end token are not."""
    tower = text.TextTransformer(
        make_cfg(**{"text.causal": False}).text,
        embed_dim=16,
        dtype=jnp.float32,
        remat=False,
        rngs=nnx.Rngs(params=0),
    )
    tokens = jnp.array([[1, 5, PAD, 7, EOS, PAD, PAD], [1, 5, 6, 7, 8, 9, 10]])  # second row: cut before its end
    valid = np.asarray(tower._valid(tokens))
    np.testing.assert_array_equal(valid[0], [1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(valid[1], [1] * 7)


def test_attention_matches_numpy_reference():
    # Same shapes as the text tower's attention above, so eager mode reuses its compiled ops.
    attn = layers.Attention(32, 2, dtype=jnp.float32, rngs=nnx.Rngs(params=3))
    for name in ("query_bias", "key_bias", "value_bias", "out_bias"):  # non-zero biases exercise them too
        var = getattr(attn, name)
        var[...] = np.random.default_rng(len(name)).normal(size=var.shape).astype(np.float32)
    rng = np.random.default_rng(0)
    xq, xkv = rng.normal(size=(2, 12, 32)).astype(np.float32), rng.normal(size=(2, 12, 32)).astype(np.float32)
    mask = np.ones((2, 1, 12, 12), bool)
    mask[1, :, :, 7:] = False
    p = {k: np.asarray(v[...]) for k, v in vars(attn).items() if isinstance(v, nnx.Param)}
    ref = np.zeros((2, 12, 32))
    for b in range(2):
        for h in range(2):
            q = xq[b] @ p["query_kernel"][:, h] + p["query_bias"][h]
            k = xkv[b] @ p["key_kernel"][:, h] + p["key_bias"][h]
            v = xkv[b] @ p["value_kernel"][:, h] + p["value_bias"][h]
            s = q @ k.T / np.sqrt(16) + np.where(mask[b, 0], 0, -1e30)
            w = np.exp(s - s.max(-1, keepdims=True))
            ref[b] += (w / w.sum(-1, keepdims=True)) @ v @ p["out_kernel"][h]
    ref += p["out_bias"]
    np.testing.assert_allclose(attn(xq, xkv, mask), ref, rtol=1e-4, atol=1e-4)


def test_patch_embedding_is_a_strided_conv():
    tower, x = image_tower().module, images()
    w = tower.patch_embed.kernel[...].reshape(4, 4, 3, -1)  # (row, col, channel) flattening = HWIO kernel
    conv = jax.lax.conv_general_dilated(x, w, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = conv + tower.patch_embed.bias[...]
    np.testing.assert_allclose(tower.patch_embed(tower._patchify(x)), conv.reshape(2, 16, -1), atol=1e-5)


def test_sincos_posemb():
    pe = layers.posemb_sincos_2d(3, 5, 16)
    assert pe.shape == (15, 16)
    np.testing.assert_allclose(pe[0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)  # position (0, 0)
    # Row y=1, column x=2 -> flat index 7; its first channel is sin(x * 1) and its ninth sin(y * 1).
    assert pe[7, 0] == pytest.approx(np.sin(2.0)) and pe[7, 8] == pytest.approx(np.sin(1.0))
    assert len({tuple(np.round(r, 5)) for r in pe}) == 15  # every position distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        layers.posemb_sincos_2d(2, 2, 6)


def test_bfloat16_compute():
    cfg = make_cfg()
    ims, toks = images(), tokens_with_eos([4, 5], 12)
    ref = build(cfg)(ims, toks)
    cfg.dtype = "bfloat16"
    model = build(cfg)
    out = model(ims, toks)
    for r, o in zip(ref[:2], out[:2]):
        assert o.dtype == jnp.float32
        assert_unit_rows(o, 16)
        cos = np.sum(np.asarray(r) * np.asarray(o), axis=-1)
        assert np.all(cos > 0.995), cos
        assert np.abs(r - o).max() > 1e-6  # really computed in bf16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model.module, nnx.Param)))


def test_functional_split_merge_grads():
    """The trainer's pattern: split once, merge inside a jitted pure function, differentiate the params."""
    ims, toks = images(), tokens_with_eos([3, 5], 12)
    graphdef, params = nnx.split(build(make_cfg()).module, nnx.Param)

    def loss(params):
        img, txt, log_t, bias = nnx.merge(graphdef, params)(ims, toks)
        return jnp.sum(img * txt) * jnp.exp(log_t) + bias

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(grads["bias"][...]) == 1.0  # d(loss)/d(bias) = 1
    np.testing.assert_allclose(grads["log_t"][...], value, rtol=1e-5)  # d/dlog_t = loss - bias, bias = 0
    for tower in ("image", "text"):
        assert np.abs(grads[tower]["encoder"]["blocks"]["attn"]["query_kernel"][...]).max() > 0


def test_remat_changes_memory_not_values():
    toks = tokens_with_eos([3, 5], 12)
    results = []
    for remat in (False, True):
        graphdef, params = nnx.split(text_tower(remat=remat).module, nnx.Param)
        loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p).features(toks)))  # noqa: E731
        assert ("remat" in str(jax.make_jaxpr(jax.grad(loss))(params))) == remat
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_weight_decay_mask():
    state = nnx.state(two_tower.abstract(make_cfg(**{"image.pool": "map"})), nnx.Param)
    mask = two_tower.weight_decay_mask(state)
    flat = {
        "/".join(str(k.key) for k in path if hasattr(k, "key")): v
        for path, v in jax.tree_util.tree_leaves_with_path(mask)
    }
    decayed = {k for k, v in flat.items() if v}
    assert decayed == {k for k in flat if k.endswith(("kernel", "token_embedding", "pos_embedding"))}
    for name in (
        "image/encoder/blocks/ln1/scale",
        "image/encoder/blocks/attn/query_bias",
        "log_t",
        "bias",
        "image/map_head/probe",
        "text/proj/bias",
    ):
        assert flat[name] is False, name
    for name in ("image/encoder/blocks/attn/query_kernel", "text/token_embedding", "image/patch_embed/kernel"):
        assert flat[name] is True, name
    # Same answer on a plain dict of arrays (what optax may see).
    assert sum(jax.tree.leaves(two_tower.weight_decay_mask(state.to_pure_dict()))) == len(decayed)
