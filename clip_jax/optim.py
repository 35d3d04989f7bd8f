"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, decay on matrices only.

Weight decay applies to kernels and embedding tables; biases, LayerNorm parameters, the cls token, the MAP probe,
the log-temperature and the SigLIP bias are not decayed (as in CLIP and open_clip). The model decides which is
which by parameter name (`two_tower.weight_decay_mask`), since stacked layers make ndim an unreliable guide.
"""

import optax

from clip_jax.models import two_tower


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


def make(cfg) -> optax.GradientTransformation:
    o = cfg.optim
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(
        optax.adamw(
            schedule(cfg),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=two_tower.weight_decay_mask,
        )
    )
    return optax.chain(*parts)
