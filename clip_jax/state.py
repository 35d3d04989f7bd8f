"""A run's state as a library: build the model a config describes, its abstract and sharded train state, and a
freshly initialised one, for the trainer, the evaluators, warm starts and the converters alike (none of them
imports train.py for it).

The state is a plain pytree {step, params, opt_state, rng} with params a pure dict (no module objects), so it
jits, shards, donates and checkpoints as ordinary arrays; the model object is rebuilt from a graphdef split off
once.
"""

import functools
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clip_jax import config as config_lib
from clip_jax import optim, sharding
from clip_jax.models.families import FAMILIES  # model.family -> constructor and capabilities


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what happened and what was kept."""



def build_model(cfg, seed: int):
    """The model cfg.model describes. Its constructor's own checks (ValueError) become one-line ConfigErrors."""
    if cfg.model.family not in FAMILIES:
        raise config_lib.ConfigError(
            f"model.family={cfg.model.family!r} is not built; choose one of {list(FAMILIES)}"
        )
    try:
        return FAMILIES[cfg.model.family].build(cfg.model, rngs=nnx.Rngs(params=seed))
    except ValueError as e:
        raise config_lib.ConfigError(f"cannot build model.family={cfg.model.family!r}: {e}") from None


def _init_fn(cfg, opt, rng):
    init_rng, train_rng = jax.random.split(rng)
    _, state = nnx.split(build_model(cfg, init_rng))
    params = nnx.to_pure_dict(state)
    trainable, _ = optim.split(params, optim.frozen_paths(cfg, params))  # frozen parameters get no moments
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(trainable), "rng": train_rng}


def state_shardings(cfg, mesh, opt):
    """(graphdef, abstract state, NamedSharding pytree) without allocating a single parameter."""
    abstract_model = nnx.eval_shape(lambda: build_model(cfg, 0))
    graphdef, abstract_vars = nnx.split(abstract_model)
    abstract = jax.eval_shape(functools.partial(_init_fn, cfg, opt), jax.random.PRNGKey(0))
    p_shard = sharding.param_shardings(abstract["params"], sharding.logical_specs(abstract_vars), cfg, mesh)
    rep = sharding.replicated(mesh)
    # Optimizer moments follow their parameter; counters and other non-parameter leaves are replicated.
    trainable_shard, _ = optim.split(p_shard, optim.frozen_paths(cfg, abstract["params"]))
    o_shard = optax.tree_map_params(
        opt, lambda _, s: s, abstract["opt_state"], trainable_shard, transform_non_params=lambda _: rep
    )
    shardings = {"step": rep, "params": p_shard, "opt_state": o_shard, "rng": rep}
    return graphdef, abstract, shardings


def init_state(cfg, mesh, opt):
    """Create the state directly in its sharded layout: no device ever holds a full replica of FSDP weights."""
    graphdef, _, shardings = state_shardings(cfg, mesh, opt)
    init = jax.jit(functools.partial(_init_fn, cfg, opt), out_shardings=shardings)
    return graphdef, init(jax.random.PRNGKey(cfg.seed)), shardings


def resolve_checkpoint(path: str) -> tuple[str, int | None]:
    """A checkpoint as users name it -> (workdir, step or None for the latest): a workdir, its checkpoints/
    folder, or one step folder in it (WORKDIR/checkpoints/1000)."""
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    path = path.rstrip("/")
    name, parent = os.path.basename(path), os.path.dirname(path)
    if name.isdigit() and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), int(name)
    if name == "checkpoints":
        return parent, None
    return path, None


def _steps(directory: str) -> list[int]:
    from etils import epath  # reads gs:// and local paths alike

    path = epath.Path(directory)
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def load_config(checkpoint: str, *, strict: bool = False):
    """(config saved with a checkpoint, its step): `checkpoint` as resolve_checkpoint reads it (latest step if it
    names none). Keys the saved run lacks take today's defaults; with strict, a saved key today's base() lacks
    raises ConfigError. Raises TrainingError when there is no checkpoint."""
    import orbax.checkpoint as ocp

    workdir, step = resolve_checkpoint(checkpoint)
    directory = os.path.join(workdir, "checkpoints")
    steps = _steps(directory)
    if not steps or (step is not None and step not in steps):
        what = f"no checkpoint at step {step}" if steps else "no checkpoint"
        raise TrainingError(f"{what} in {directory}" + (f"; it has steps {steps}" if steps else ""))
    step = steps[-1] if step is None else step
    with ocp.CheckpointManager(directory, item_names=("config",)) as manager:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return config_lib.from_dict(saved, strict=strict), step


def restore_params(cfg, checkpoint: str, *, step: int | None = None, mesh=None):
    """Parameters of a saved run, sharded for cfg's model on `mesh` (default: cfg's mesh on all devices).

    checkpoint: a workdir, its checkpoints/ folder or a step folder (resolve_checkpoint); `step`, else the step it
    names, else the latest. cfg must describe the saved model (checkpoint.check_compatible says which keys differ otherwise).
    Returns (step, params, graphdef, mesh). Raises TrainingError when there is no such checkpoint, and
    checkpoint.CheckpointMismatch when it holds another model.
    """
    from clip_jax import checkpoint as checkpoint_lib

    workdir, named = resolve_checkpoint(checkpoint)
    step = named if step is None else step
    directory = os.path.join(workdir, "checkpoints")
    steps = _steps(directory)  # before the Checkpointer, which would create the folder
    if not steps or (step is not None and step not in steps):
        what = f"no checkpoint at step {step}" if steps else "no checkpoint"
        raise TrainingError(f"{what} in {directory}" + (f"; it has steps {steps}" if steps else "; train first"))
    mesh = sharding.make_mesh(cfg) if mesh is None else mesh
    graphdef, abstract, shardings = state_shardings(cfg, mesh, optim.make(cfg))
    ckpt = checkpoint_lib.Checkpointer(workdir, cfg)
    try:
        step, state, _ = ckpt.restore(abstract, shardings, cfg, step=step)
    finally:
        ckpt.close()
    return step, state["params"], graphdef, mesh
