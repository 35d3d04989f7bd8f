"""Shared machinery of the ring losses: argument checks, the default tile, the ring and tile loops.

Everything here runs per device inside `jax.shard_map` except `validate` and `default_tile`, which run at trace
time on static shapes. The two loss modules (softmax.py, sigmoid.py) only supply what happens to one tile of
logits; the order of ring steps, the hops and the tiling live here so both losses share one tested skeleton.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

KINDS = ("softmax", "sigmoid")
IMPLS = ("ring", "allgather")

# The default tile is the largest divisor of n_local with
#   tile <= d                          : a [tile, n] fp32 logits buffer is no bigger than the [n, d] fp32 embedding
#                                        block, so the ring's memory stays a constant multiple of n * d;
#   tile * n_local <= MAX_TILE_LOGITS  : and no bigger than 128 MiB, whatever d.
# Bigger tiles are faster on GPUs (fewer, larger matmuls and passes over the logits: H100 numbers in
# experiments/results/loss_speed_h100_bf16.md), so a trainer with memory to spare can pass a larger tile; on
# XLA:CPU the tile barely matters above ~128 rows (experiments/results/loss_speed.md).
MAX_TILE_LOGITS = 2**25


class RingSpec(NamedTuple):
    """Static description of one ring loss call (hashable: it is a custom_vjp nondiff argument)."""

    mesh: Mesh
    axes: tuple[str, ...]  # mesh axes the batch is sharded over; the ring runs over their product
    size: int  # D, the number of devices on the ring
    tile: int  # rows of the local image block per tile
    batch: int  # B, the global batch


def ring_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def tile_cap(n_local: int, dim: int) -> int:
    return max(1, min(n_local, dim, MAX_TILE_LOGITS // n_local))


def default_tile(n_local: int, dim: int) -> int:
    """Largest divisor of n_local that is <= dim and <= MAX_TILE_LOGITS // n_local (at least 1)."""
    return max(t for t in range(tile_cap(n_local, dim), 0, -1) if n_local % t == 0)


def validate(img, txt, *, kind: str, impl: str, mesh: Mesh, batch_axes, tile) -> RingSpec:
    """Check the call's static arguments; raise ValueError with a one-line fix for each mistake."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a contrastive loss; choose one of {KINDS}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {IMPLS}")
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(
            f"batch_axes {missing} are not axes of the mesh {dict(mesh.shape)}; use some of {tuple(mesh.shape)}"
        )
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"img and txt must both be [B, d]; got {img.shape} and {txt.shape}")
    size = ring_size(mesh, axes)
    batch = img.shape[0]
    if batch % size:
        raise ValueError(
            f"global batch B={batch} does not divide over the {size} devices of batch_axes {axes}; "
            f"use a batch that is a multiple of {size}"
        )
    n = batch // size
    if tile is None:
        tile = default_tile(n, img.shape[1])
        cap = tile_cap(n, img.shape[1])
        if 8 * tile < cap:  # e.g. a prime n_local: correct, but thousands of tiny matmuls
            warnings.warn(
                f"the per-device batch {n} has no divisor between {cap // 8} and {cap}: default "
                f"tile={tile} will be slow; use a batch whose per-device share is a multiple of 64",
                stacklevel=3,
            )
    elif not (isinstance(tile, int) and 0 < tile and n % tile == 0):
        wanted = tile if isinstance(tile, int) and tile > 0 else default_tile(n, img.shape[1])
        nearest = min((t for t in range(1, n + 1) if n % t == 0), key=lambda t: (abs(t - wanted), -t))
        raise ValueError(
            f"tile={tile} does not divide the per-device batch {n} (B={batch} over {size} devices); "
            f"choose a divisor of {n} such as {nearest}"
        )
    return RingSpec(mesh=mesh, axes=axes, size=size, tile=tile, batch=batch)


# ----------------------------------------------------------------------------- per-device helpers (in shard_map)


def varying(x, axes):
    """Mark a value built from constants as device-varying so it can be a loop carry next to varying values."""
    return lax.pcast(x, axes, to="varying")


def shift(tree, spec: RingSpec):
    """One hop of the ring: every device sends `tree` to its successor (linear index over spec.axes)."""
    perm = [(i, (i + 1) % spec.size) for i in range(spec.size)]
    return lax.ppermute(tree, spec.axes, perm)


def run_ring(step: Callable, local, block, spec: RingSpec):
    """Visit all D text blocks: `step(local, block, diagonal) -> (local, block)`.

    Step 0 uses the device's own block (it holds the positive pairs on its diagonal), so it is peeled out of the
    loop with diagonal=True and needs no hop; steps 1..D-1 each first receive the predecessor's block. After the
    loop every device holds the block of its successor, so whatever must go home needs exactly one more `shift`.
    """
    local, block = step(local, block, True)
    if spec.size > 1:

        def body(_, carry):
            loc, blk = carry
            return step(loc, shift(blk, spec), False)

        local, block = lax.fori_loop(1, spec.size, body, (local, block))
    return local, block


def over_tiles(tile_fn: Callable, carry, n: int, tile: int):
    """Fold `tile_fn(row_start, carry) -> carry` over the n // tile row tiles of the local image block."""
    return lax.fori_loop(0, n // tile, lambda i, c: tile_fn(i * tile, c), carry)


def rows(x, start, tile):
    return lax.dynamic_slice_in_dim(x, start, tile, axis=0)


def put_rows(x, update, start):
    return lax.dynamic_update_slice_in_dim(x, update, start, axis=0)


def tile_logits(x_tile, y_block, t):
    """t * x_tile @ y_block.T in fp32 whatever the input dtype (bf16 inputs accumulate in fp32)."""
    dots = lax.dot_general(x_tile, y_block, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return t * dots


def diagonal_mask(start, tile, n):
    """[tile, n] bool: True where the global row start+r meets column start+r of the device's own block."""
    r = lax.broadcasted_iota(jnp.int32, (tile, n), 0)
    c = lax.broadcasted_iota(jnp.int32, (tile, n), 1)
    return c == r + start


def grad_products(p, x_tile, y_block):
    """(p @ y_block, p.T @ x_tile) in fp32, with p cast to the embedding dtype as flash-attention does."""
    p = p.astype(y_block.dtype)
    dx = lax.dot_general(p, y_block, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dy = lax.dot_general(p, x_tile, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx, dy


def sharded(fn, spec: RingSpec, in_specs, out_specs):
    return jax.shard_map(fn, mesh=spec.mesh, in_specs=in_specs, out_specs=out_specs)


def row_spec(spec: RingSpec, ndim: int):
    """PartitionSpec sharding dim 0 over the ring axes (embeddings: ndim 2, per-row vectors: ndim 1)."""
    return P(spec.axes, *([None] * (ndim - 1)))
