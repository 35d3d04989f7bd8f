"""Start a new run from another run's parameters (config `init.*`): LiT's pretrained image tower, a converted HF
checkpoint, or any subset of parameters selected by a regex over their paths.

Used only when the workdir has no checkpoint of its own; once the run has saved, resuming ignores init.*.
"""

import re

import jax

from clip_jax import config as config_lib
from clip_jax import optim
from clip_jax import state as run_state


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
