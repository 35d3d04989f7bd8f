"""Contrastive losses for CLIP (softmax) and SigLIP (sigmoid) over a batch sharded on a device mesh.

`contrastive_loss` is the one entry point the trainer calls, inside its jitted step:

    loss = contrastive_loss(img, txt, log_t, bias, kind="softmax", mesh=mesh)

impl="ring" (default): memory-flat ring + tiles + custom backward (softmax.py, sigmoid.py); per-device memory is
O(n_local * d + tile * n_local), independent of the global batch. impl="allgather": the n_local x B baseline.
reference.py holds the dense single-device versions used as ground truth in the tests.
"""

from __future__ import annotations

import jax.numpy as jnp

from clip_jax.losses import reference
from clip_jax.losses._ring import IMPLS, KINDS, default_tile, validate
from clip_jax.losses.allgather import allgather_loss
from clip_jax.losses.sigmoid import ring_sigmoid_loss
from clip_jax.losses.softmax import ring_softmax_loss

__all__ = ["IMPLS", "KINDS", "contrastive_loss", "default_tile", "reference"]

_RING = {"softmax": ring_softmax_loss, "sigmoid": ring_sigmoid_loss}


def contrastive_loss(img, txt, log_t, bias, *, kind, mesh, batch_axes=("data", "fsdp"), tile=None, impl="ring"):
    """Mean contrastive loss of the global batch (fp32 scalar), differentiable w.r.t. all four inputs.

    img, txt: [B, d] L2-normalised embeddings (fp32 or bf16) sharded over `batch_axes` of `mesh`.
    log_t: log temperature (logits are exp(log_t) * img @ txt.T); bias: SigLIP bias (unused, zero grad for
    softmax). kind: "softmax" | "sigmoid". tile: rows of the local image block per tile, live logits are
    tile x B/D; must divide B / D; None picks `default_tile(B / D, d)` (largest divisor <= min(d, 2**25 / (B/D))).
    B must be a multiple of D (the product of the batch_axes sizes). Call it inside jit: eagerly it re-traces.
    """
    spec = validate(img, txt, kind=kind, impl=impl, mesh=mesh, batch_axes=batch_axes, tile=tile)
    log_t = jnp.asarray(log_t, jnp.float32)
    bias = jnp.asarray(bias, jnp.float32)
    if log_t.shape or bias.shape:
        raise ValueError(
            f"log_t and bias must be scalars; got shapes {log_t.shape} and {bias.shape} "
            f"(use .reshape(()) on a [1] parameter)"
        )
    if impl == "allgather":
        return allgather_loss(img, txt, log_t, bias, kind=kind, spec=spec)
    return _RING[kind](img, txt, log_t, bias, spec)
