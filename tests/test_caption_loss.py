"""The chunked captioning cross-entropy equals the dense reference (values and gradients) and never holds the
[B, T, V] logits: checked in the compiled HLO and the compiled memory figures, against the dense version that does."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.losses import captioning


def _inputs(b=3, t=10, w=8, v=37, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k1, (b, t, w), jnp.float32)
    head = jax.random.normal(k2, (v, w), jnp.float32)
    targets = jax.random.randint(k3, (b, t), 0, v)
    weights = jax.random.uniform(k4, (b, t)) > 0.3
    return hidden, head, targets, weights


def _numpy_nll(hidden, head, targets, weights):
    """Independent of JAX: float64 log-softmax in numpy."""
    logits = np.einsum("btw,vw->btv", np.float64(hidden), np.float64(head))
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    return float((nll * np.asarray(weights)).sum()), float(np.asarray(weights).sum())


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])  # 3 and 4 do not divide T=10: padded tail
def test_chunked_equals_dense_values_and_grads(chunk):
    hidden, head, targets, weights = _inputs()
    nll, count = captioning.caption_nll(hidden, head, targets, weights, chunk=chunk)
    ref_nll, ref_count = _numpy_nll(hidden, head, targets, weights)
    np.testing.assert_allclose(float(nll), ref_nll, rtol=1e-5)
    assert float(count) == ref_count

    def loss(fn, h, e):
        s, c = fn(h, e, targets, weights)
        return s / c

    chunked = jax.grad(lambda h, e: loss(lambda *a: captioning.caption_nll(*a, chunk=chunk), h, e), (0, 1))
    dense = jax.grad(lambda h, e: loss(captioning.caption_nll_dense, h, e), (0, 1))
    for got, want in zip(chunked(hidden, head), dense(hidden, head)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_padding_weight_zero_positions_do_not_count():
    hidden, head, targets, _ = _inputs()
    weights = jnp.zeros(targets.shape, bool).at[:, :4].set(True)
    nll, count = captioning.caption_nll(hidden, head, targets, weights, chunk=4)
    # Whatever the ignored positions hold, the sum and its gradient are those of the first 4 positions alone.
    other = targets.at[:, 4:].set(0)
    nll2, _ = captioning.caption_nll(hidden.at[:, 4:].set(7.0), head, other, weights, chunk=4)
    sub, _ = captioning.caption_nll_dense(hidden[:, :4], head, targets[:, :4], weights[:, :4])
    np.testing.assert_allclose([float(nll), float(nll2)], [float(sub)] * 2, rtol=1e-5)
    assert float(count) == 4 * targets.shape[0]
    g = jax.grad(lambda h: captioning.caption_nll(h, head, targets, weights, chunk=4)[0])(hidden)
    assert float(jnp.abs(g[:, 4:]).max()) == 0.0


def _largest_f32_buffer(fn, *args):
    """(largest f32 array in the compiled HLO, in elements; temp bytes) of jit(fn)."""
    compiled = jax.jit(fn).lower(*args).compile()
    sizes = [
        int(np.prod([int(d) for d in dims.split(",") if d]))
        for dims in re.findall(r"f32\[([\d,]*)\]", compiled.as_text())
    ]
    return max(sizes), compiled.memory_analysis().temp_size_in_bytes


def test_no_full_logits_buffer_forward_or_backward():
    b, t, w, v, chunk = 4, 64, 16, 2048, 8
    hidden, head, targets, weights = _inputs(b, t, w, v)
    full = b * t * v

    def value_and_grads(fn):
        return jax.value_and_grad(lambda h, e: fn(h, e)[0], (0, 1))

    chunked = value_and_grads(lambda h, e: captioning.caption_nll(h, e, targets, weights, chunk=chunk))
    dense = value_and_grads(lambda h, e: captioning.caption_nll_dense(h, e, targets, weights))
    big_chunked, temp_chunked = _largest_f32_buffer(chunked, hidden, head)
    big_dense, temp_dense = _largest_f32_buffer(dense, hidden, head)
    # The check can fail: the dense version does hold [B, T, V] logits.
    assert big_dense >= full and temp_dense >= 4 * full
    # Ours: nothing larger than one chunk's logits (B * chunk * V), and well under one [B, T, V] buffer in total.
    assert big_chunked <= b * chunk * v, big_chunked
    assert temp_chunked < 4 * full / 2, (temp_chunked, 4 * full)
