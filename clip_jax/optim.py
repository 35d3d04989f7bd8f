"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, decay on matrices only.

Weight decay applies to kernels and embedding tables; biases, LayerNorm parameters, the cls token, the MAP probe,
the log-temperature and the SigLIP bias are not decayed (as in CLIP and open_clip). The model decides which is
which by parameter name (`two_tower.weight_decay_mask`), since stacked layers make ndim an unreliable guide.
"""

import re

import jax
import optax

from clip_jax import config as config_lib
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


# --- Locked (frozen) parameters: LiT and partial freezing -------------------------------------------------------
# optim.freeze is a regex searched in each parameter's path ('image/encoder/blocks/mlp/fc1_kernel'). Frozen
# parameters are split off the parameter dict before differentiation, so they get no gradient computation, no
# optimizer state and no weight decay, and the checkpoint writes them once (checkpoint.py) instead of every save.


def param_paths(tree) -> list[str]:
    """'image/encoder/...' for every leaf (dict keys; tuple indices and attribute names inside optimizer states)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return ["/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def frozen_paths(cfg, params) -> set[str]:
    """The parameter paths optim.freeze selects (empty when it is ''). A pattern that selects nothing is an error:
    a typo would otherwise silently train everything."""
    if not cfg.optim.freeze:
        return set()
    try:
        pattern = re.compile(cfg.optim.freeze)
    except re.error as e:
        raise config_lib.ConfigError(f"optim.freeze={cfg.optim.freeze!r} is not a valid regex: {e}") from None
    paths = param_paths(params)
    frozen = {p for p in paths if pattern.search(p)}
    if not frozen:
        raise config_lib.ConfigError(
            f"optim.freeze={cfg.optim.freeze!r} matches no parameter; paths look like {paths[0]!r} "
            f"(e.g. '^image/' locks the image tower)"
        )
    if len(frozen) == len(paths):
        raise config_lib.ConfigError(
            f"optim.freeze={cfg.optim.freeze!r} freezes every parameter; nothing to train"
        )
    return frozen


def split(tree, frozen: set[str], prefix: str = ""):
    """A nested dict -> (trainable, frozen) nested dicts holding the leaves whose path is not / is in `frozen`."""
    if not isinstance(tree, dict):
        return (None, tree) if prefix.rstrip("/") in frozen else (tree, None)
    train, lock = {}, {}
    for key, value in tree.items():
        a, b = split(value, frozen, f"{prefix}{key}/")
        if a is not None and not (isinstance(a, dict) and not a):  # drop empty branches
            train[key] = a
        if b is not None and not (isinstance(b, dict) and not b):
            lock[key] = b
    return train, lock


def merge(a, b):
    """Inverse of split: the union of two nested dicts with disjoint leaves."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return b if a is None else a
    return {k: merge(a.get(k), b.get(k)) for k in {**a, **b}}
