"""Start a new run from another run's parameters (config `init.*`): LiT's pretrained image tower, a converted HF
checkpoint, or any subset of parameters selected by a regex over their paths.

Used only when the workdir has no checkpoint of its own; once the run has saved, resuming ignores init.*.
"""

import logging
import math
import re

import jax
import numpy as np

from clip_jax import config as config_lib
from clip_jax import optim
from clip_jax import state as run_state
from clip_jax.models import vit

log = logging.getLogger(__name__)
POS_EMBEDDING = "image/pos_embedding"  # the ViT's learned position table: [extra tokens + grid^2, width]


def _resampled(table, rows: int, cfg):
    """The source's learned image position table resampled to this model's patch grid (vit.resample_pos_embedding,
    open_clip's resize_pos_embed), announced in one line."""
    grid = math.isqrt(rows)
    extra = rows - grid * grid  # the cls token's row, when the model has one
    old = math.isqrt(table.shape[0] - extra)
    log.warning(
        "%s resampled from %dx%d to %dx%d patches (bicubic, as open_clip's resize_pos_embed) for "
        "model.image.image_size=%d", POS_EMBEDDING, old, old, grid, grid, cfg.model.image.image_size,
    )  # fmt: skip
    if not table.is_fully_addressable:  # FSDP-sharded across hosts: every process needs the whole table
        from jax.experimental import multihost_utils

        table = multihost_utils.process_allgather(table, tiled=True)
    try:
        return vit.resample_pos_embedding(np.asarray(table), extra, grid)
    except ValueError as e:
        raise config_lib.ConfigError(f"cannot resample {POS_EMBEDDING} of init.workdir: {e}") from None


def copy_params(cfg, params, shardings, mesh):
    """`params` with the leaves selected by cfg.init.params replaced by the source run's latest values."""
    src = cfg.init.workdir
    try:
        src_cfg, step = run_state.load_config(src)  # its saved values over today's defaults
    except run_state.TrainingError as e:
        raise config_lib.ConfigError(f"init.workdir={src!r} holds no checkpoint to start from ({e})") from None
    src_cfg.mesh.data, src_cfg.mesh.fsdp = cfg.mesh.data, cfg.mesh.fsdp  # restore onto this run's devices
    _, src_params, _, _ = run_state.restore_params(src_cfg, src, step=step, mesh=mesh)
    source = dict(zip(optim.param_paths(src_params), jax.tree.leaves(src_params)))

    pattern = re.compile(cfg.init.params or ".")
    paths, leaves = optim.param_paths(params), jax.tree.leaves(params)
    out, copied, problems = [], 0, []
    for path, leaf, sh in zip(paths, leaves, jax.tree.leaves(shardings)):
        if not pattern.search(path):
            out.append(leaf)
        elif path not in source:
            problems.append(f"{path} is not in the source")
            out.append(leaf)
        elif source[path].shape != leaf.shape and path == POS_EMBEDDING and source[path].shape[1:] == leaf.shape[1:]:
            out.append(jax.device_put(_resampled(source[path], leaf.shape[0], cfg), sh))  # another image size
            copied += 1
        elif source[path].shape != leaf.shape:
            problems.append(f"{path}: source {source[path].shape} vs model {leaf.shape}")
            out.append(leaf)
        else:
            out.append(jax.device_put(source[path], sh))
            copied += 1
    if problems or not copied:
        detail = "; ".join(problems[:4]) or f"init.params={cfg.init.params!r} selects no parameter"
        raise config_lib.ConfigError(
            f"cannot initialise from {src}: {detail}. Make init.params select parameters the two models share"
        )
    return jax.tree.unflatten(jax.tree.structure(params), out), copied
