"""Captioning cross-entropy over a vocabulary head, computed in sequence chunks so [B, L, V] logits never exist.

A caption batch of B x L positions over a V-word vocabulary has B*L*V logits: for CoCa B/16 at 77 tokens and
49k words that is 3.8 M floats per example, more than the whole rest of the step holds. Here the positions are
cut into chunks of `chunk`; a lax.scan computes each chunk's logits, its log-sum-exp and target logit, adds the
chunk's weighted NLL to a running sum and drops the logits. The scan body is rematerialised (jax.checkpoint),
so the backward pass recomputes one chunk's logits at a time instead of keeping every chunk's softmax as a scan
residual: live logits are B * chunk * V forward and backward.

Returns a SUM of token NLLs and the number of scored tokens (not a mean), so gradient accumulation and the
trainer can divide once over everything they combine.
"""

import jax
import jax.numpy as jnp


def _chunk_nll(hidden, head, targets, weights):
    """Weighted NLL sum of one chunk: hidden [B,c,W], head [V,W], targets [B,c] int, weights [B,c] float32."""
    # One 2-D product over the flattened rows, as models/layers.rows_matmul does (XLA:CPU differentiates it without
    # transposed copies of the [B*c, V] logits' gradient).
    b, c, w = hidden.shape
    logits = jnp.dot(hidden.reshape(b * c, w), head.astype(hidden.dtype).T, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, c, -1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - target_logit) * weights)


def caption_nll(hidden, head, targets, weights, *, chunk: int):
    """(sum of -log p(target) over positions with weight, sum of weights), both float32 scalars.

    hidden [B,T,W] decoder outputs (any float dtype; logits are accumulated in float32), head [V,W] the
    vocabulary matrix (logits = hidden @ head.T), targets [B,T] int ids, weights [B,T] (bool or 0/1: which
    positions are scored). T need not divide by chunk: the tail is padded with weight 0.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    b, t, w = hidden.shape
    weights = weights.astype(jnp.float32)
    chunk = min(chunk, t)
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    # [n, B, chunk, ...]: the scan walks over chunks of positions, each holding every row of the batch.
    xs = (
        hidden.reshape(b, n, chunk, w).swapaxes(0, 1),
        targets.reshape(b, n, chunk).swapaxes(0, 1),
        weights.reshape(b, n, chunk).swapaxes(0, 1),
    )

    @jax.checkpoint
    def body(total, x):
        return total + _chunk_nll(x[0], head, x[1], x[2]), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(weights)


def caption_nll_dense(hidden, head, targets, weights):
    """The reference: full [B,T,V] logits at once, float32. Same contract as caption_nll."""
    logits = jnp.einsum("btw,vw->btv", hidden.astype(jnp.float32), head.astype(jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)
