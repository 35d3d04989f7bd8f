"""Model towers: shapes, norms, parameter counts, masking, sharding annotations, precision, gradients."""

import flax

flax.config.update("flax_always_shard_variable", False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from model_utils import (  # noqa: E402  (shared with test_layers.py)
    EOS,
    PAD,
    assert_unit_rows,
    build,
    image_tower,
    images,
    make_cfg,
    text_tower,
    tokens_with_eos,
)

from clip_jax.models import layers, text, two_tower  # noqa: E402


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
    out = model(images(), tokens_with_eos([4, 5], 12))
    assert set(out) == {"img", "txt", "log_t", "bias"}  # the trainer's model interface
    img, txt, log_t, bias = out["img"], out["txt"], out["log_t"], out["bias"]
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
        ({"image.image_size": 3}, "smaller than the patch size"),
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


def test_bfloat16_compute():
    cfg = make_cfg()
    ims, toks = images(), tokens_with_eos([4, 5], 12)
    ref = build(cfg)(ims, toks)
    cfg.dtype = "bfloat16"
    model = build(cfg)
    out = model(ims, toks)
    for r, o in ((ref["img"], out["img"]), (ref["txt"], out["txt"])):
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
        out = nnx.merge(graphdef, params)(ims, toks)
        return jnp.sum(out["img"] * out["txt"]) * jnp.exp(out["log_t"]) + out["bias"]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(grads["bias"][...]) == 1.0  # d(loss)/d(bias) = 1
    np.testing.assert_allclose(grads["log_t"][...], value, rtol=1e-5)  # d/dlog_t = loss - bias, bias = 0
    for tower in ("image", "text"):
        assert np.abs(grads[tower]["encoder"]["blocks"]["attn"]["query_kernel"][...]).max() > 0


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
