"""Train state, sharded init, the pure train step, and the training loop (one trainer for every model family).

The state is a plain pytree {step, params, opt_state, rng} with params a pure dict (no module objects), so it
jits, shards, donates and checkpoints as ordinary arrays. The model object is rebuilt inside the step from a
graphdef that was split off once.
"""

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import config as config_lib
from clip_jax import losses, optim, sharding
from clip_jax.evaluate import zero_shot
from clip_jax.input import pipeline
from clip_jax.models import two_tower

# Model family -> constructor. An explicit table: adding a family is one line here plus its module.
MODELS = {"two_tower": two_tower.TwoTower}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what happened and what was kept."""


# Errors caused by the user's config, data or workdir: the CLI prints their one-line message, not a traceback.
USER_ERRORS = (config_lib.ConfigError, pipeline.DataError, checkpoint_lib.CheckpointMismatch, TrainingError)


def build_model(cfg, seed: int):
    return MODELS["two_tower"](cfg.model, rngs=nnx.Rngs(params=seed))


def _init_fn(cfg, opt, rng):
    init_rng, train_rng = jax.random.split(rng)
    _, state = nnx.split(build_model(cfg, init_rng))
    params = nnx.to_pure_dict(state)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params), "rng": train_rng}


def state_shardings(cfg, mesh, opt):
    """(graphdef, abstract state, NamedSharding pytree) without allocating a single parameter."""
    abstract_model = nnx.eval_shape(lambda: build_model(cfg, 0))
    graphdef, abstract_vars = nnx.split(abstract_model)
    abstract = jax.eval_shape(functools.partial(_init_fn, cfg, opt), jax.random.PRNGKey(0))
    p_shard = sharding.param_shardings(abstract["params"], sharding.logical_specs(abstract_vars), cfg, mesh)
    rep = sharding.replicated(mesh)
    # Optimizer moments follow their parameter; counters and other non-parameter leaves are replicated.
    o_shard = optax.tree_map_params(
        opt, lambda _, s: s, abstract["opt_state"], p_shard, transform_non_params=lambda _: rep
    )
    shardings = {"step": rep, "params": p_shard, "opt_state": o_shard, "rng": rep}
    return graphdef, abstract, shardings


def init_state(cfg, mesh, opt):
    """Create the state directly in its sharded layout: no device ever holds a full replica of FSDP weights."""
    graphdef, abstract, shardings = state_shardings(cfg, mesh, opt)
    init = jax.jit(functools.partial(_init_fn, cfg, opt), out_shardings=shardings)
    return graphdef, init(jax.random.PRNGKey(cfg.seed)), shardings


def loss_fn(params, batch, *, graphdef, cfg, mesh):
    model = nnx.merge(graphdef, params)
    img, txt, log_t, bias = model(batch["image"], batch["tokens"])
    tile = None if cfg.loss.tile <= 0 else cfg.loss.tile
    loss = losses.contrastive_loss(
        img,
        txt,
        log_t,
        bias,
        kind=cfg.loss.kind,
        mesh=mesh,
        batch_axes=sharding.BATCH_AXES,
        tile=tile,
        impl=cfg.loss.impl,
    )
    return loss, {"temperature": jnp.exp(log_t), "bias": bias}


def train_step(state, batch, *, graphdef, opt, cfg, mesh):
    """One optimizer step. Pure: (state, batch) -> (new state, metrics). A non-finite loss leaves state unchanged."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef, cfg=cfg, mesh=mesh), has_aux=True)
    (loss, aux), grads = grad_fn(state["params"], batch)
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Keep the last good state on NaN/Inf so the loop can stop without losing (or checkpointing) a poisoned state.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "rng": jax.random.fold_in(state["rng"], 1),
    }
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(params),
        "lr": optim.schedule(cfg)(state["step"]),
        "nonfinite": 1 - finite.astype(jnp.int32),
        **aux,
    }
    return new_state, metrics


def compile_step(cfg, mesh, opt, graphdef, shardings):
    """The train step jitted once, with explicit shardings and the old state's buffers donated to the new one."""
    batch_sh = {"image": sharding.batch_sharding(mesh), "tokens": sharding.batch_sharding(mesh)}
    step = functools.partial(train_step, graphdef=graphdef, opt=opt, cfg=cfg, mesh=mesh)
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def abstract_batch(cfg):
    s = cfg.model.image.image_size
    return {
        "image": jax.ShapeDtypeStruct((cfg.batch_size, s, s, 3), jnp.float32),
        "tokens": jax.ShapeDtypeStruct((cfg.batch_size, cfg.model.text.max_len), jnp.int32),
    }


class MetricAverager:
    """Collects per-step device metrics; they reach the host once per log interval."""

    def __init__(self):
        self.items, self.examples = [], 0

    def add(self, metrics, examples: int):
        self.items.append(metrics)
        self.examples += examples

    def pop(self) -> dict:
        host = jax.device_get(self.items)
        self.items = []
        out = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
        out["nonfinite"] = int(sum(m["nonfinite"] for m in host))
        out["lr"] = float(host[-1]["lr"])
        return out


def _writer(workdir):
    from clu import metric_writers  # imports tensorflow: keep it out of module import time

    return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def _restore_or_init(cfg, mesh, opt, ckpt, data_it):
    """The latest checkpoint's state (and data position) if the workdir has one, else a fresh sharded init."""
    graphdef, abstract, shardings = state_shardings(cfg, mesh, opt)
    restored = ckpt.restore(abstract, shardings, cfg)
    if restored is None:
        _, state, _ = init_state(cfg, mesh, opt)
        logging.info("initialised a new model")
    else:
        step, state, data_state = restored
        data_it.set_state(checkpoint_lib.from_jsonable(data_state))
        logging.info("resumed from the checkpoint at step %d", step)
    return graphdef, shardings, state


def _log(writer, step, averager, t0, cfg, ckpt) -> dict:
    metrics = averager.pop()
    metrics.update(
        examples_per_sec=averager.examples / (time.perf_counter() - t0), examples_seen=step * cfg.batch_size
    )
    averager.examples = 0
    writer.write_scalars(step, metrics)
    if metrics["nonfinite"]:
        ckpt.wait()
        raise TrainingError(
            f"the loss or gradients became NaN/Inf at or before step {step}; those updates were skipped and the last "
            f"checkpoint (step {ckpt.latest_step()}) is intact. Lower optim.lr, raise optim.warmup_steps or keep "
            "optim.clip_norm > 0, then re-run the same command to resume"
        )
    return metrics


def run(cfg, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train cfg in workdir (resuming from its latest checkpoint), evaluate, and return the report.

    stop_after: stop (with a checkpoint) after this many steps in this call, as a preemption would.
    The report holds the final metrics, 'history' (every logged interval) and 'zero_shot'.
    """
    from clu import parameter_overview, periodic_actions

    config_lib.validate(cfg, jax.device_count())
    mesh, opt, writer = sharding.make_mesh(cfg), optim.make(cfg), _writer(workdir)
    ckpt = checkpoint_lib.Checkpointer(workdir, cfg)
    data_it = pipeline.train_iterator(cfg)
    graphdef, shardings, state = _restore_or_init(cfg, mesh, opt, ckpt, data_it)
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state["params"])
    step_fn = compile_step(cfg, mesh, opt, graphdef, shardings)
    start = int(jax.device_get(state["step"]))
    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, start + stop_after)
    progress = periodic_actions.ReportProgress(num_train_steps=cfg.total_steps, writer=writer)
    averager, history, t0 = MetricAverager(), [], time.perf_counter()
    on_cpu = jax.default_backend() == "cpu"
    for step in range(start + 1, end + 1):
        state, metrics = step_fn(state, sharding.put_batch(next(data_it), mesh))
        averager.add(metrics, cfg.batch_size)
        if on_cpu:  # XLA:CPU can stall on hundreds of queued collective steps; accelerators run ahead freely
            jax.block_until_ready(metrics["loss"])
        progress(step)
        if step % cfg.log_every == 0 or step == end:
            history.append({"step": step, **_log(writer, step, averager, t0, cfg, ckpt)})
            t0 = time.perf_counter()
        if step == end or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            ckpt.save(step, state, data_it.get_state(), cfg, force=step == end)
        if cfg.eval.dataset and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.total_steps:
            writer.write_scalars(step, _prefixed(zero_shot.evaluate(cfg, state["params"], graphdef, mesh)))
    ckpt.wait()
    result = {
        "step": end,
        "examples_seen": end * cfg.batch_size,
        "history": history,
        **(history[-1] if history else {}),
    }
    if cfg.eval.dataset and end == cfg.total_steps:
        result["zero_shot"] = zero_shot.evaluate(cfg, state["params"], graphdef, mesh)
        writer.write_scalars(end, _prefixed(result["zero_shot"]))
    writer.flush()
    ckpt.close()
    return result


def _prefixed(metrics: dict, prefix: str = "zeroshot/") -> dict:
    return {prefix + k: v for k, v in metrics.items()}
