"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, and no weight decay on vectors.

Weight decay applies to matrices only (kernels and embedding tables, ndim >= 2): biases, LayerNorm scales, the
log-temperature and the SigLIP bias are vectors or scalars, and decaying them hurts (as in CLIP and open_clip).
"""

import jax
import optax


def schedule(cfg) -> optax.Schedule:
    o = cfg.optim
    warmup = min(o.warmup_steps, cfg.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=o.lr * o.end_lr_frac,
    )


def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(cfg) -> optax.GradientTransformation:
    o = cfg.optim
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(
        optax.adamw(schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts)
