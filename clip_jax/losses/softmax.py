"""CLIP softmax (InfoNCE) loss over a device ring, tiled, with a hand-written backward pass.

L = 1/(2B) * sum_i [LSE_j s_ij - s_ii] + sum_j [LSE_i s_ij - s_jj],   s_ij = t * x_i . y_j   (DESIGN.md §4)

Forward: image rows stay on their device; text blocks travel the ring. Each tile of logits updates the row LSE of
the local images (online, kept at home) and the column LSE of the visiting text block, which travels with the
block and comes home after the last hop, so one ring serves both directions.

Backward: dL/ds_ij = (g / 2B) * (exp(s_ij - row_i) + exp(s_ij - col_j) - 2 [i == j]). The ring runs again with
(y, col LSE, dy) travelling: each tile's logits are recomputed, dx accumulates at home and dy accumulates on the
travelling block, arriving home one hop after the last step. Saved between passes: x, y, both LSE vectors, log_t.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from clip_jax.losses import _ring
from clip_jax.losses._ring import RingSpec


def _forward_local(x, y, log_t, *, spec: RingSpec):
    """Per device: (mean loss, row LSE of local images, column LSE of local texts)."""
    n, tile, t = x.shape[0], spec.tile, jnp.exp(log_t)
    neg_inf = _ring.varying(jnp.full((n,), -jnp.inf, jnp.float32), spec.axes)

    def step(row_lse, block, diagonal):
        y_blk, col_lse = block

        def tile_fn(start, carry):
            row_lse, col_lse = carry
            logits = _ring.tile_logits(_ring.rows(x, start, tile), y_blk, t)
            row_new = jnp.logaddexp(_ring.rows(row_lse, start, tile), jax.nn.logsumexp(logits, axis=1))
            col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0))
            return _ring.put_rows(row_lse, row_new, start), col_lse

        row_lse, col_lse = _ring.over_tiles(tile_fn, (row_lse, col_lse), n, tile)
        return row_lse, (y_blk, col_lse)

    row_lse, (_, col_lse) = _ring.run_ring(step, neg_inf, (y, neg_inf), spec)
    if spec.size > 1:
        col_lse = _ring.shift(col_lse, spec)  # the column LSE of our own texts comes home
    positives = t * jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
    total = jnp.sum(row_lse) + jnp.sum(col_lse) - 2.0 * positives
    return lax.psum(total, spec.axes) / (2 * spec.batch), row_lse, col_lse


def _backward_local(x, y, log_t, row_lse, col_lse, g, *, spec: RingSpec):
    """Per device: (dx, dy, dlog_t) for cotangent g of the mean loss."""
    n, d, tile, t = x.shape[0], x.shape[1], spec.tile, jnp.exp(log_t)
    zeros_nd = _ring.varying(jnp.zeros((n, d), jnp.float32), spec.axes)
    zero = _ring.varying(jnp.zeros((), jnp.float32), spec.axes)

    def step(local, block, diagonal):
        y_blk, col_blk, dy_blk = block

        def tile_fn(start, carry):
            dx, dlog_t, dy_blk = carry
            x_tile = _ring.rows(x, start, tile)
            logits = _ring.tile_logits(x_tile, y_blk, t)
            # Row softmax + column softmax; their sum is d(sum of both LSE terms)/d logits.
            p = jnp.exp(logits - _ring.rows(row_lse, start, tile)[:, None]) + jnp.exp(logits - col_blk[None, :])
            if diagonal:  # the -s_ii terms of both directions
                p = p - 2.0 * _ring.diagonal_mask(start, tile, n)
            dx_tile, dy_part = _ring.grad_products(p, x_tile, y_blk)
            dx = _ring.put_rows(dx, _ring.rows(dx, start, tile) + dx_tile, start)
            return dx, dlog_t + jnp.sum(p * logits), dy_blk + dy_part

        dx, dlog_t = local
        dx, dlog_t, dy_blk = _ring.over_tiles(tile_fn, (dx, dlog_t, dy_blk), n, tile)
        return (dx, dlog_t), (y_blk, col_blk, dy_blk)

    (dx, dlog_t), (_, _, dy) = _ring.run_ring(step, (zeros_nd, zero), (y, col_lse, zeros_nd), spec)
    if spec.size > 1:
        dy = _ring.shift(dy, spec)  # the gradient of our own texts comes home
    scale = g / (2 * spec.batch)
    # ds/dx = t * y and ds/dlog_t = s: t is applied once here rather than on every tile.
    return (
        (scale * t * dx).astype(x.dtype),
        (scale * t * dy).astype(y.dtype),
        lax.psum(dlog_t, spec.axes) * scale,
    )


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def ring_softmax_loss(img, txt, log_t, bias, spec: RingSpec):
    """Mean CLIP loss of global [B, d] img/txt sharded over spec.axes; bias is unused (zero gradient)."""
    return _ring_fwd(img, txt, log_t, bias, spec)[0]


def _ring_fwd(img, txt, log_t, bias, spec: RingSpec):
    rows2, rows1 = _ring.row_spec(spec, 2), _ring.row_spec(spec, 1)
    fwd = _ring.sharded(
        partial(_forward_local, spec=spec), spec, in_specs=(rows2, rows2, P()), out_specs=(P(), rows1, rows1)
    )
    loss, row_lse, col_lse = fwd(img, txt, log_t)
    return loss, (img, txt, log_t, bias, row_lse, col_lse)


def _ring_bwd(spec: RingSpec, residuals, g):
    img, txt, log_t, bias, row_lse, col_lse = residuals
    rows2, rows1 = _ring.row_spec(spec, 2), _ring.row_spec(spec, 1)
    bwd = _ring.sharded(
        partial(_backward_local, spec=spec),
        spec,
        in_specs=(rows2, rows2, P(), rows1, rows1, P()),
        out_specs=(rows2, rows2, P()),
    )
    dx, dy, dlog_t = bwd(img, txt, log_t, row_lse, col_lse, g)
    return dx, dy, dlog_t.astype(log_t.dtype), jnp.zeros_like(bias)


ring_softmax_loss.defvjp(_ring_fwd, _ring_bwd)
