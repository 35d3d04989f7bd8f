"""Sharded contrastive losses vs the dense reference: values, all four gradients, memory shape, errors.

Ground truth is clip_jax.losses.reference (dense B x B, fp32, HIGHEST precision). Error metric for arrays:
max |ours - ref| / max |ref| (relative to the array's scale, so entries that cancel to ~0 do not divide by ~0).
Both sides differentiate COTANGENT * loss so a backward that ignores its incoming cotangent is caught.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import losses
from clip_jax.losses import reference

AXES = ("data", "fsdp")
RTOL = 1e-5
COTANGENT = 1.7


def make_mesh(shape):
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2)


def embeddings(seed, batch, dim, dtype=jnp.float32):
    """L2-normalised random rows, as the model hands them to the loss."""
    v = np.random.default_rng(seed).standard_normal((batch, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(dtype)


def reference_value_and_grads(kind, img, txt, log_t, bias):
    img, txt = (jnp.asarray(a, jnp.float32) for a in (img, txt))
    ref = (lambda x, y, lt, b: reference.softmax_loss(x, y, lt)) if kind == "softmax" else reference.sigmoid_loss
    scaled = lambda *a: COTANGENT * ref(*a)
    return jax.jit(jax.value_and_grad(scaled, argnums=(0, 1, 2, 3)))(img, txt, log_t, bias)


def sharded_value_and_grads(kind, img, txt, log_t, bias, mesh, **kw):
    shard = NamedSharding(mesh, P(AXES, None))
    img, txt = jax.device_put(img, shard), jax.device_put(txt, shard)

    def loss(x, y, lt, b):
        return COTANGENT * losses.contrastive_loss(x, y, lt, b, kind=kind, mesh=mesh, **kw)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(img, txt, log_t, bias)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def assert_close(ours, ref, tol, what):
    (v, grads), (rv, rgrads) = ours, ref
    assert rel_err(v, rv) <= tol, f"loss {float(v)} vs reference {float(rv)}"
    for name, g, rg in zip(("img", "txt", "log_t", "bias"), grads, rgrads):
        if name == "bias" and what == "softmax":
            assert float(g) == 0.0 and float(rg) == 0.0
            continue
        assert rel_err(g, rg) <= tol, f"d{name}: rel err {rel_err(g, rg):.2e} > {tol}"


# mesh, kind, n_local, tile, log_t: n_local not a power of two, tiles from 1 to n_local, and temperatures from
# t = 1 (smooth) to t = 100 and 1000 (logits of +-100..1000: saturated softmax / sigmoid, exp underflows).
CASES = [
    ((1, 1), "softmax", 12, None, math.log(10.0)),
    ((1, 1), "sigmoid", 10, 5, math.log(10.0)),
    ((2, 1), "softmax", 12, 4, 0.0),
    ((2, 1), "sigmoid", 12, 3, math.log(100.0)),
    ((8, 1), "softmax", 6, 2, math.log(100.0)),
    ((8, 1), "sigmoid", 6, 6, 0.0),
    ((2, 4), "softmax", 10, 5, math.log(1000.0)),
    ((2, 4), "sigmoid", 10, 1, math.log(10.0)),
    ((4, 2), "softmax", 3, 1, math.log(10.0)),
    ((4, 2), "sigmoid", 6, 2, math.log(1000.0)),
]


@pytest.mark.parametrize("shape,kind,n_local,tile,log_t", CASES)
def test_ring_matches_reference(shape, kind, n_local, tile, log_t):
    mesh = make_mesh(shape)
    batch = n_local * math.prod(shape)
    img, txt = embeddings(0, batch, 16), embeddings(1, batch, 16)
    args = (jnp.float32(log_t), jnp.float32(-5.0 if kind == "sigmoid" else 0.3))
    ours = sharded_value_and_grads(kind, img, txt, *args, mesh, tile=tile)
    assert_close(ours, reference_value_and_grads(kind, img, txt, *args), RTOL, kind)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_allgather_matches_reference(kind):
    mesh = make_mesh((2, 4))
    img, txt = embeddings(2, 80, 16), embeddings(3, 80, 16)
    args = (jnp.float32(math.log(20.0)), jnp.float32(-4.0))
    ours = sharded_value_and_grads(kind, img, txt, *args, mesh, impl="allgather")
    assert_close(ours, reference_value_and_grads(kind, img, txt, *args), RTOL, kind)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_forward_only_matches_reference(kind):
    """Without differentiation the primal runs (for sigmoid a different, loss-only ring than under grad)."""
    mesh = make_mesh((2, 4))
    img, txt = embeddings(8, 56, 16), embeddings(9, 56, 16)
    shard = NamedSharding(mesh, P(AXES, None))
    loss = jax.jit(lambda x, y: losses.contrastive_loss(x, y, 2.0, -3.0, kind=kind, mesh=mesh, tile=7))
    ours = loss(jax.device_put(img, shard), jax.device_put(txt, shard))
    if kind == "softmax":
        ref = reference.softmax_loss(img, txt, 2.0)
    else:
        ref = reference.sigmoid_loss(img, txt, 2.0, -3.0)
    assert ours.dtype == jnp.float32 and rel_err(ours, ref) <= RTOL


# bf16 inputs: logits are exact fp32 sums of bf16 products, so the value matches the fp32 reference taken at the
# same (bf16-rounded) embeddings to fp32 accuracy; gradients round the softmax/sigmoid weights to bf16 before the
# two gradient matmuls (as flash attention does), which costs ~2^-8 relative: the stated tolerance is 1e-2.
BF16_GRAD_TOL = 1e-2


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bf16_inputs(kind):
    mesh = make_mesh((4, 2))
    img, txt = embeddings(6, 96, 32, jnp.bfloat16), embeddings(7, 96, 32, jnp.bfloat16)
    args = (jnp.float32(math.log(30.0)), jnp.float32(-6.0))
    value, grads = sharded_value_and_grads(kind, img, txt, *args, mesh, tile=4)
    ref_value, ref_grads = reference_value_and_grads(kind, img, txt, *args)
    assert value.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
    assert rel_err(value, ref_value) <= 1e-5
    for g, rg in zip(grads[:3], ref_grads[:3]):
        assert rel_err(g, rg) <= BF16_GRAD_TOL


# ----------------------------------------------------------------------------------------- memory: no n x B buffer


def compiled_step(kind, impl, shape, n_local, dim=24, tile=4):
    mesh = make_mesh(shape)
    batch = n_local * math.prod(shape)
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P(AXES, None)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(x, y, lt, b):
        return losses.contrastive_loss(x, y, lt, b, kind=kind, mesh=mesh, tile=tile, impl=impl)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile()


def largest_buffer(compiled):
    """Element count of the largest array shape anywhere in the per-device compiled HLO."""
    shapes = re.findall(r"(?:f32|bf16|f16|s32|pred|u32)\[([\d,]+)\]", compiled.as_text())
    return max(math.prod(int(s) for s in dims.split(",")) for dims in shapes)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_no_batch_sized_logits(kind):
    """Per device the ring holds O(n*d + tile*n) values; an n x B block (all-gather) must trip the check."""
    n, dim, tile, shape = 40, 24, 4, (8, 1)
    limit = n * dim  # the [n, d] embeddings are the largest arrays allowed; n x B = 320 * 40 is 13x that
    ring = compiled_step(kind, "ring", shape, n, dim, tile)
    allgather = compiled_step(kind, "allgather", shape, n, dim, tile)
    assert largest_buffer(ring) <= limit
    assert largest_buffer(allgather) >= n * n * math.prod(shape)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_temp_memory_flat_in_device_count(kind):
    """At fixed n_local the compiled temp bytes must not grow with D (all-gather's grow ~linearly)."""

    def temp(impl, shape):
        return compiled_step(kind, impl, shape, 256, dim=64, tile=16).memory_analysis().temp_size_in_bytes

    # D = 1 and 2 compile to shorter loops with fewer live buffers, so compare two ring sizes from 4 up.
    assert temp("ring", (4, 2)) <= 1.1 * temp("ring", (2, 2))
    assert temp("allgather", (4, 2)) >= 1.5 * temp("allgather", (2, 2))


# ------------------------------------------------------------------------------------------------------ errors


def test_tile_must_divide_local_batch():
    mesh = make_mesh((8, 1))
    x = jnp.zeros((800, 8))
    with pytest.raises(ValueError, match=r"tile=48 does not divide the per-device batch 100 .*B=800 over 8.* 50"):
        losses.contrastive_loss(x, x, 0.0, 0.0, kind="softmax", mesh=mesh, tile=48)
    with pytest.raises(ValueError, match=r"tile=0 does not divide"):
        losses.contrastive_loss(x, x, 0.0, 0.0, kind="sigmoid", mesh=mesh, tile=0)


def test_batch_must_divide_over_devices():
    mesh = make_mesh((2, 4))
    x = jnp.zeros((100, 8))
    with pytest.raises(ValueError, match=r"B=100 does not divide over the 8 devices.*multiple of 8"):
        losses.contrastive_loss(x, x, 0.0, 0.0, kind="softmax", mesh=mesh)


def test_scalars_must_be_scalars():
    with pytest.raises(ValueError, match=r"log_t and bias must be scalars; got shapes \(1,\) and \(\)"):
        losses.contrastive_loss(
            jnp.zeros((16, 8)), jnp.zeros((16, 8)), jnp.zeros((1,)), 0.0, kind="softmax", mesh=make_mesh((2, 4))
        )


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"kind": "clip"}, r"kind='clip'.*softmax.*sigmoid"),
        ({"impl": "dense"}, r"impl='dense'.*ring.*allgather"),
        ({"batch_axes": ("data", "model")}, r"\['model'\] are not axes"),
    ],
)
def test_bad_arguments(bad, match):
    kw = {"kind": "softmax", "mesh": make_mesh((2, 4)), "impl": "ring"} | bad
    with pytest.raises(ValueError, match=match):
        losses.contrastive_loss(jnp.zeros((16, 8)), jnp.zeros((16, 8)), 0.0, 0.0, **kw)


@pytest.mark.parametrize(
    "n_local,dim,expected",
    [
        (1, 512, 1),
        (12, 512, 12),
        (1000, 512, 500),
        (4096, 512, 512),
        (8192, 768, 512),
        (131072, 512, 256),
        (32768, 768, 512),
        (1031, 512, 1),
        (12, 8, 6),
    ],
)
def test_default_tile(n_local, dim, expected):
    """Largest divisor of n_local with tile <= d and tile * n_local <= 2**25 (a prime n_local gets 1)."""
    assert losses.default_tile(n_local, dim) == expected


def test_default_tile_warns_when_tiny():
    mesh = make_mesh((1, 1))
    x = jnp.zeros((1031, 512))  # prime per-device batch: only tile 1 divides it
    with pytest.warns(UserWarning, match=r"per-device batch 1031 has no divisor between 64 and 512"):
        losses._ring.validate(x, x, kind="softmax", impl="ring", mesh=mesh, batch_axes=AXES, tile=None)
