"""Start a new run from another run's parameters (config `init.*`): LiT's pretrained image tower, a converted HF
checkpoint, or any subset of parameters selected by a regex over their paths.

Used only when the workdir has no checkpoint of its own; once the run has saved, resuming ignores init.*.
"""

import os
import re

import jax
import ml_collections
import orbax.checkpoint as ocp

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import config as config_lib
from clip_jax import optim
from clip_jax import state as run_state


def _source_config(directory: str, step: int) -> ml_collections.ConfigDict:
    """The source run's config: its saved values over today's defaults (older runs may lack newer keys)."""
    manager = ocp.CheckpointManager(directory, item_names=("config",))
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    cfg = config_lib.base()
    known = config_lib._flatten(cfg)
    for key, value in config_lib._flatten(ml_collections.ConfigDict(saved)).items():
        if key in known:
            node = cfg
            *path, last = key.split(".")
            for part in path:
                node = node[part]
            node[last] = value
    return cfg


def copy_params(cfg, params, shardings, mesh):
    """`params` with the leaves selected by cfg.init.params replaced by the source run's latest values."""
    src = cfg.init.workdir
    directory = (
        src if os.path.basename(os.path.normpath(src)) == "checkpoints" else os.path.join(src, "checkpoints")
    )
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        raise config_lib.ConfigError(f"init.workdir={src!r} holds no checkpoint (looked in {directory})")
    src_cfg = _source_config(directory, steps[-1])
    src_cfg.mesh.data, src_cfg.mesh.fsdp = cfg.mesh.data, cfg.mesh.fsdp  # restore onto this run's devices
    opt = optim.make(src_cfg)
    _, abstract, src_shardings = run_state.state_shardings(src_cfg, mesh, opt)
    restored = checkpoint_lib.Checkpointer(os.path.dirname(directory), src_cfg).restore(
        abstract, src_shardings, src_cfg, step=steps[-1]
    )
    source = dict(zip(optim.param_paths(restored[1]["params"]), jax.tree.leaves(restored[1]["params"])))

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
