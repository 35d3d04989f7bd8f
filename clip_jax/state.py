"""A run's state as a library: build the model a config describes, its abstract and sharded train state, and a
freshly initialised one, for the trainer, the evaluators, warm starts and the converters alike (none of them
imports train.py for it).

The state is a plain pytree {step, params, opt_state, rng} with params a pure dict (no module objects), so it
jits, shards, donates and checkpoints as ordinary arrays; the model object is rebuilt from a graphdef split off
once.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clip_jax import config as config_lib
from clip_jax import optim, sharding
from clip_jax.models.families import MODELS  # model.family -> constructor


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what happened and what was kept."""



def build_model(cfg, seed: int):
    """The model cfg.model describes. Its constructor's own checks (ValueError) become one-line ConfigErrors."""
    if cfg.model.family not in MODELS:
        raise config_lib.ConfigError(
            f"model.family={cfg.model.family!r} is not built; choose one of {list(MODELS)}"
        )
    try:
        return MODELS[cfg.model.family](cfg.model, rngs=nnx.Rngs(params=seed))
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
    graphdef, abstract, shardings = state_shardings(cfg, mesh, opt)
    init = jax.jit(functools.partial(_init_fn, cfg, opt), out_shardings=shardings)
    return graphdef, init(jax.random.PRNGKey(cfg.seed)), shardings
