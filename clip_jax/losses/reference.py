"""Dense single-device contrastive losses: the ground truth every sharded variant is tested against.

They materialise the full B x B logits in fp32 (HIGHEST matmul precision, so TF32 on GPUs cannot blur the
reference) and follow DESIGN.md §4 literally. Use them for tests and tiny batches only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _logits(img, txt, log_t):
    dots = jnp.matmul(img.astype(jnp.float32), txt.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    return jnp.exp(log_t) * dots


def softmax_loss(img, txt, log_t):
    """CLIP: 1/(2B) * sum_i [LSE_j s_ij - s_ii] + [LSE_j s_ji - s_ii]."""
    s = _logits(img, txt, log_t)
    positives = jnp.diagonal(s)
    image_to_text = jax.nn.logsumexp(s, axis=1) - positives
    text_to_image = jax.nn.logsumexp(s, axis=0) - positives
    return (jnp.sum(image_to_text) + jnp.sum(text_to_image)) / (2 * s.shape[0])


def sigmoid_loss(img, txt, log_t, bias):
    """SigLIP: -1/B * sum_ij log sigmoid(z_ij (s_ij + b)), z = +1 on the diagonal, -1 elsewhere."""
    s = _logits(img, txt, log_t) + bias
    z = 2.0 * jnp.eye(s.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * s)) / s.shape[0]
