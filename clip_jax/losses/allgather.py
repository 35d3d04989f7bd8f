"""The simple sharded baseline: all-gather inside shard_map, n_local x B logits per device, plain autodiff.

This is open_clip's "local loss" (each device scores its own rows against every gathered column) and the obvious
SigLIP equivalent. Memory per device grows with the global batch B; it is kept as the baseline the ring losses
are benchmarked against and as a second, independent implementation for the tests.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from clip_jax.losses import _ring
from clip_jax.losses._ring import RingSpec


def _own_columns(n, axes):
    """Global column index of each local row's positive pair (the device's offset in the gathered batch)."""
    return lax.axis_index(axes) * n + jnp.arange(n)


def _softmax_local(x, y, log_t, bias, *, spec: RingSpec):
    """Each direction's term LSE_j s_ij - s_ii as softplus(LSE over negatives of s_ij - s_ii): see softmax.py for
    why (no difference of two numbers of size ~t in fp32); autodiff then gives P_ii - 1 as -sigmoid, exactly."""
    del bias
    t = jnp.exp(log_t)
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    xs = lax.all_gather(x32, spec.axes, tiled=True)  # [B, d]
    ys = lax.all_gather(y32, spec.axes, tiled=True)
    positive = jnp.arange(spec.batch)[None, :] == _own_columns(x.shape[0], spec.axes)[:, None]  # [n, B]
    dots = jnp.sum(x32 * y32, axis=1)  # x_i . y_i, the positive of row i in both directions
    total = 0.0
    for mine, theirs in ((x32, ys), (y32, xs)):  # image->text rows, then text->image rows
        relative = t * (mine @ theirs.T) - t * dots[:, None]  # [n, B]: s_ij - s_ii
        negatives = jax.nn.logsumexp(jnp.where(positive, -jnp.inf, relative), axis=1)
        total = total + jnp.sum(jax.nn.softplus(negatives))
    return lax.psum(total, spec.axes) / (2 * spec.batch)


def _sigmoid_local(x, y, log_t, bias, *, spec: RingSpec):
    t = jnp.exp(log_t)
    ys = lax.all_gather(y.astype(jnp.float32), spec.axes, tiled=True)
    logits = t * x.astype(jnp.float32) @ ys.T + bias  # [n, B]
    cols = _own_columns(x.shape[0], spec.axes)
    z = jnp.where(jnp.arange(spec.batch)[None, :] == cols[:, None], 1.0, -1.0)
    return -lax.psum(jnp.sum(jax.nn.log_sigmoid(z * logits)), spec.axes) / spec.batch


def allgather_loss(img, txt, log_t, bias, *, kind: str, spec: RingSpec):
    local = {"softmax": _softmax_local, "sigmoid": _sigmoid_local}[kind]
    rows2 = _ring.row_spec(spec, 2)
    fn = _ring.sharded(partial(local, spec=spec), spec, in_specs=(rows2, rows2, P(), P()), out_specs=P())
    return fn(img, txt, log_t, bias)
