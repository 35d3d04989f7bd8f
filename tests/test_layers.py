"""Transformer layers: attention and patch embedding against independent references, the layer scan, sin-cos
position embeddings, remat."""

import functools

import flax

flax.config.update("flax_always_shard_variable", False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from model_utils import image_tower, images, text_tower, tokens_with_eos  # noqa: E402

from clip_jax.models import attend, layers  # noqa: E402


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


def _attention_and_numpy_reference():
    attn = layers.Attention(32, 2, dtype=jnp.float32, rngs=nnx.Rngs(params=3))
    for name in ("query_bias", "key_bias", "value_bias", "out_bias"):  # non-zero biases exercise them too
        var = getattr(attn, name)
        var[...] = np.random.default_rng(len(name)).normal(size=var.shape).astype(np.float32)
    p = {k: np.asarray(v[...], np.float64) for k, v in vars(attn).items() if isinstance(v, nnx.Param)}

    def reference(xq, xkv, mask):
        ref = np.zeros(xq.shape)
        for b in range(xq.shape[0]):
            for h in range(2):
                q = xq[b] @ p["query_kernel"][:, h] + p["query_bias"][h]
                k = xkv[b] @ p["key_kernel"][:, h] + p["key_bias"][h]
                v = xkv[b] @ p["value_kernel"][:, h] + p["value_bias"][h]
                s = q @ k.T / np.sqrt(16) + np.where(mask[b, 0], 0, -1e30)
                w = np.exp(s - s.max(-1, keepdims=True))
                ref[b] += (w / w.sum(-1, keepdims=True)) @ v @ p["out_kernel"][h]
        return ref + p["out_bias"]

    return attn, reference


def test_attention_matches_numpy_reference():
    # Same shapes as the text tower's attention above, so eager mode reuses its compiled ops.
    attn, reference = _attention_and_numpy_reference()
    rng = np.random.default_rng(0)
    xq, xkv = rng.normal(size=(2, 12, 32)).astype(np.float32), rng.normal(size=(2, 12, 32)).astype(np.float32)
    mask = np.ones((2, 1, 12, 12), bool)
    mask[1, :, :, 7:] = False
    np.testing.assert_allclose(attn(xq, xkv, mask), reference(xq, xkv, mask), rtol=1e-4, atol=1e-4)
    # Self-attention (the same array twice) projects q, k and v in one interleaved product: same values.
    np.testing.assert_allclose(attn(xq, xq, mask), reference(xq, xq, mask), rtol=1e-4, atol=1e-4)


def test_fused_self_attention_projection_has_the_separate_projections_gradients():
    attn, _ = _attention_and_numpy_reference()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, 32)), jnp.float32)
    graphdef, params = nnx.split(attn)

    def loss(params, x, same):
        y = nnx.merge(graphdef, params)(x, x if same else x * 1.0)  # x * 1.0: a distinct array, the unfused path
        return jnp.sum(jnp.sin(y))

    fused = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, x, True)
    separate = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, x, False)
    for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(separate), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch,chunks", [(6, 2), (6, 3), (5, 2), (4, 8)])
def test_attention_in_batch_chunks_has_the_plain_values_and_gradients(batch, chunks):
    """CPU's chunked attention (models/attend.py) against one plain attend, with a per-example padding mask and a
    shared causal one. (5, 2) falls back to one chunk (2 does not divide 5); (4, 8) to 4 chunks of one example."""
    rng = np.random.default_rng(batch * 10 + chunks)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, 7, 2, 8)), jnp.float32) for _ in range(3))
    padding = jnp.asarray(np.arange(7)[None, None, None, :] < rng.integers(1, 8, (batch, 1, 1, 1)))
    causal = jnp.tril(jnp.ones((7, 7), bool))[None, None]
    weights = jnp.asarray(rng.normal(size=(batch, 7, 2, 8)), jnp.float32)  # a loss that sees each output's place
    for mask in (padding, causal, None):

        def loss(q, k, v, fn, mask=mask):
            return jnp.sum(jnp.sin(fn(q, k, v, mask)) * weights)

        chunked = functools.partial(attend.attend_in_batch_chunks, chunks=chunks)
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, chunked)
        want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, attend.attend)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_attention_batch_chunks_below_one_are_refused():
    q = jnp.zeros((4, 3, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="chunks = 0"):
        attend.attend_in_batch_chunks(q, q, q, chunks=0)
    with pytest.raises(ValueError, match="chunks = -1"), attend.batch_chunks(-1):
        pass
    assert attend.attend_in_batch_chunks(q[:0], q[:0], q[:0], chunks=2).shape == (0, 3, 2, 8)  # empty batch


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


def test_remat_policies_and_unrolled_layers_change_memory_not_values():
    """Every remat policy, and the unrolled layer loop, computes the same values and gradients as the plain scan;
    the jaxpr shows a checkpoint exactly when a policy asks for one, and the unrolled loop has no scan."""
    toks = tokens_with_eos([3, 5], 12)
    results = {}
    for name, overrides in {
        "none": {},
        "dots": {"remat": "dots"},
        "full": {"text.remat": "full"},  # the per-tower key overrides model.remat
        "unrolled": {"scan_layers": False, "text.depth": 3},
        "scan3": {"text.depth": 3},
    }.items():
        graphdef, params = nnx.split(text_tower(**overrides).module, nnx.Param)
        loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p).features(toks)))  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (name in ("dots", "full")), name
        assert ("scan" in jaxpr) == (name != "unrolled"), name
        results[name] = jax.jit(jax.value_and_grad(loss))(params)
    for a, b in (("none", "dots"), ("none", "full"), ("scan3", "unrolled")):
        (v0, g0), (v1, g1) = results[a], results[b]
        np.testing.assert_allclose(v0, v1, rtol=1e-6)
        for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_unknown_remat_policy_is_rejected():
    with pytest.raises(ValueError, match="remat policy 'some'"):
        layers.Encoder(8, 1, 16, 2, dtype=jnp.float32, remat="some", rngs=layers.KeyStream(jax.random.key(0)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("d_in,d_out", [(7, 4), (4, 7)])  # d_in > d_out: CPU computes dw transposed
def test_rows_matmul_values_and_gradients_match_float64_numpy(d_in, d_out, dtype):
    """layers.rows_matmul (Dense's product, one 2-D matmul of the flattened rows) against float64 numpy: the output
    and both gradients of sum(y * dy), i.e. dx = dy @ w.T and dw = sum over rows of x^T dy, in the inputs' dtype."""
    rng = np.random.default_rng(0)
    x, w, dy = rng.normal(size=(3, 5, d_in)), rng.normal(size=(d_in, d_out)), rng.normal(size=(3, 5, d_out))
    cast = lambda a: jnp.asarray(a, dtype)
    x, w, dy = (np.asarray(cast(a), np.float64) for a in (x, w, dy))  # the reference sees the rounded inputs
    y, vjp = jax.jit(lambda x, w: jax.vjp(layers.rows_matmul, x, w))(cast(x), cast(w))
    dx, dw = vjp(cast(dy))
    assert y.shape == (3, 5, d_out) and y.dtype == dx.dtype == dw.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), x @ w, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float64), dy @ w.T, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum("bli,blo->io", x, dy), rtol=tol, atol=tol)
