"""The pure train step and the training loop (one trainer for every model family). The train state, its
shardings and its initialisation are clip_jax/state.py's; the model object is rebuilt inside the step from a
graphdef that was split off once.
"""

import functools
import json
import logging
import time

import jax
import jax.numpy as jnp
import optax

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import config as config_lib
from clip_jax import config_checks, console, grad_cache, losses, nan_policy, optim, sharding, step_log, step_options
from clip_jax import warm_start
from clip_jax import noise_scale as noise_lib
from clip_jax import target as target_lib
from clip_jax.evaluate import suite as eval_suite
from clip_jax.input import ops, pipeline, preflight
from clip_jax.models.families import FAMILIES
from clip_jax.preemption import Preemption
from clip_jax.state import TrainingError, build_model, init_state, state_shardings  # noqa: F401  (train's API)
from clip_jax.step_log import MetricAverager, metric_writer

# Errors caused by the user's config, data or workdir: the CLI prints their one-line message, not a traceback.
USER_ERRORS = (
    config_lib.ConfigError,
    pipeline.DataError,
    checkpoint_lib.CheckpointMismatch,
    checkpoint_lib.CheckpointWriteError,
    TrainingError,
)

REPORT = "train_report.json"  # a finished run's report in its workdir (run() writes it)


def temperature_cap(cfg) -> float | None:
    """model.max_log_t, or None when the cap is disabled (<= 0 or inf)."""
    cap = float(cfg.model.max_log_t)
    return cap if 0 < cap < float("inf") else None


def capped_log_t(log_t, cfg):
    """log t as the loss sees it: min(log_t, model.max_log_t) (CLIP's clip of t at 100). Below and at the cap the
    gradient passes unchanged (so training can push t down from the cap); above it the gradient is zero."""
    cap = temperature_cap(cfg)
    return log_t if cap is None else jnp.where(log_t > cap, jnp.asarray(cap, log_t.dtype), log_t)


def clamp_temperature(params, cfg):
    """params with a top-level 'log_t' (every model family's) clamped to model.max_log_t, as open_clip clamps its
    logit scale after each optimizer step; other leaves untouched."""
    if temperature_cap(cfg) is None or "log_t" not in params:
        return params
    return {**params, "log_t": capped_log_t(params["log_t"], cfg)}


@jax.named_scope("loss")  # names its ops in profiles (experiments/step_profile.py)
def total_loss(out, cfg, mesh):
    """The model's outputs (see TwoTower.__call__) -> (loss, aux): weighted contrastive loss over the whole global
    batch (the sharded ring loss), plus the captioning cross-entropy per scored token for families that caption.
    The temperature is capped at model.max_log_t here, so every path to the loss (GradCache too) sees the cap."""
    tile = None if cfg.loss.tile <= 0 else cfg.loss.tile
    log_t = capped_log_t(out["log_t"], cfg)
    contrastive = losses.contrastive_loss(
        out["img"],
        out["txt"],
        log_t,
        out["bias"],
        kind=cfg.loss.kind,
        mesh=mesh,
        batch_axes=sharding.BATCH_AXES,
        tile=tile,
        impl=cfg.loss.impl,
    )
    loss = cfg.loss.contrastive_weight * contrastive
    aux = {"temperature": jnp.exp(log_t), "bias": out["bias"], "contrastive_loss": contrastive}
    if FAMILIES[cfg.model.family].captions:
        caption = out["caption_nll"] / jnp.maximum(out["caption_tokens"], 1)
        loss = loss + cfg.loss.caption_weight * caption
        aux["caption_loss"] = caption
    return loss, aux


def normalise_images(batch, cfg):
    """batch with 'image' as the towers take it: uint8 pixels [B, H, W, 3] (the train pipeline's) -> float32
    (x/255 - mean) / std with data.image_mean / data.image_std (ops.to_float's constants, so the same numbers as
    a host-normalised batch to float32 rounding); a floating-point image is taken as normalised already."""
    if batch["image"].dtype != jnp.uint8:
        return batch
    return {**batch, "image": ops.to_float(batch["image"], cfg.data.image_mean, cfg.data.image_std)}


def train_step(state, batch, *, graphdef, opt, cfg, mesh):
    """One optimizer step. Pure: (state, batch) -> (new state, metrics). A non-finite loss leaves state unchanged.
    batch: 'image' uint8 [B, H, W, 3] normalised here, on the devices, once for the whole batch (before GradCache
    splits it), or float32 normalised already; 'tokens' int32 [B, L]. FLIP patch dropout's keys come from the
    state's rng (replaced every step), so a resumed run drops the same patches."""
    batch = grad_cache.with_patch_keys(normalise_images(batch, cfg), state["rng"], cfg, mesh)
    # Frozen parameters (optim.freeze) ride along as constants: no gradient is computed for them.
    trainable, frozen = optim.split(state["params"], optim.frozen_paths(cfg, state["params"]))
    # With cfg.accum_steps > 1 the gradient is GradCache's: still the loss of the whole batch (grad_cache.py).
    grad_fn = grad_cache.make(cfg, mesh, graphdef, functools.partial(total_loss, cfg=cfg, mesh=mesh))
    (loss, aux), grads = grad_fn(trainable, frozen, batch)
    aux, noise = noise_lib.step_metrics(aux, grads, cfg)  # cfg.noise_scale: its per-step estimates; else {}
    with jax.named_scope("optimizer"):
        updates, opt_state = opt.update(grads, state["opt_state"], trainable)
        # The stored temperature never exceeds the cap (a frozen one is left as it is: the loss caps it anyway).
        params = optim.merge(clamp_temperature(optax.apply_updates(trainable, updates), cfg), frozen)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Keep the last good state on NaN/Inf so the loop can stop without losing (or checkpointing) a poisoned
        # state.
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
        **noise,
    }
    return new_state, metrics


def compile_step(cfg, mesh, opt, graphdef, shardings):
    """The train step jitted once, with explicit shardings, the old state's buffers donated to the new one and the
    backend's compile choices (step_options.jit: on a one-device CPU step, batch-chunked attention)."""
    batch_sh = {"image": sharding.batch_sharding(mesh), "tokens": sharding.batch_sharding(mesh)}
    step = functools.partial(train_step, graphdef=graphdef, opt=opt, cfg=cfg, mesh=mesh)
    return step_options.jit(
        step,
        cfg,
        mesh,
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def abstract_batch(cfg):
    s = cfg.model.image.image_size
    return {
        "image": jax.ShapeDtypeStruct((cfg.batch_size, s, s, 3), jnp.uint8),  # as the train pipeline sends it
        "tokens": jax.ShapeDtypeStruct((cfg.batch_size, cfg.model.text.max_len), jnp.int32),
    }


def _restore_or_init(cfg, mesh, opt, ckpt, data_it):
    """The latest checkpoint's state (and data position) if the workdir has one, else a fresh sharded init."""
    graphdef, abstract, shardings = state_shardings(cfg, mesh, opt)
    restored = ckpt.restore(abstract, shardings, cfg)
    if restored is None:
        _, state, _ = init_state(cfg, mesh, opt)
        logging.info("initialised a new model")
        if cfg.init.workdir:
            params, n = warm_start.copy_params(cfg, state["params"], shardings["params"], mesh)
            state = {**state, "params": params}
            logging.info(
                "copied %d parameter arrays from %s (init.params=%r)", n, cfg.init.workdir, cfg.init.params
            )
    else:
        step, state, data_state = restored
        if data_state is None:  # written by another number of processes
            _restart_data(cfg, ckpt, step, data_it)
        else:
            _resume_data(cfg, ckpt, step, data_it, data_state)
        logging.info("resumed from the checkpoint at step %d", step)
    return graphdef, shardings, state


def _resume_data(cfg, ckpt, step: int, data_it, data_state) -> None:
    """This process's own saved position (each host skips its own bad records). Saved over other training data
    (another record count): refused in one line, or with data.resume_reshuffle started at batch `step`."""
    try:
        data_it.set_state(data_state)
    except pipeline.DataChanged as e:
        if not cfg.data.resume_reshuffle:
            raise checkpoint_lib.CheckpointMismatch(
                f"cannot resume the data of the checkpoint at step {step} in {ckpt.directory}: {e}. Train on the "
                "same data, or set --config.data.resume_reshuffle=True to continue at that step in the new data's order"
            ) from None
        pipeline.start_at(data_it, step)
        logging.warning("data.resume_reshuffle: %s; starting at batch %d of the new data's order", e, step)


def _restart_data(cfg, ckpt, step: int, data_it) -> None:
    """A checkpoint's data positions are per process: on another process count, refuse (one line), or with
    data.resume_reshuffle start every process's new slice at batch `step` (pipeline.start_at)."""
    saved, now = ckpt.saved_process_count, jax.process_count()
    if not cfg.data.resume_reshuffle:
        raise checkpoint_lib.CheckpointMismatch(
            f"the checkpoint at step {step} in {ckpt.directory} was written by {saved} process(es) and this run "
            f"has {now}: their data positions cannot be resumed exactly. Run on {saved} process(es), or set "
            "--config.data.resume_reshuffle=True to re-slice the data from the step's position"
        )
    pipeline.start_at(data_it, step)
    logging.warning(
        "data.resume_reshuffle: the checkpoint's data states are from %d process(es), this run has %d; each "
        "process starts its new slice at batch %d (examples near the cut may repeat or be skipped)",
        saved,
        now,
        step,
    )


def _check_nonfinite(cfg, averager, ckpt, skipped: list) -> None:
    """Apply cfg.nan_policy to the steps since the last check. Called before every log and every save, so with
    'stop' nothing trained after a bad step is ever written. The bad step's update itself was never applied."""
    bad = averager.nonfinite_steps()
    if bad and cfg.nan_policy == nan_policy.STOP:
        ckpt.wait()
        raise TrainingError(
            f"the loss or gradients became NaN/Inf at step {bad[0]} (nan_policy='stop'); its update was not "
            f"applied and the last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower "
            "optim.lr, raise optim.warmup_steps, keep optim.clip_norm > 0 or set nan_policy='skip', then re-run "
            "the same command to resume"
        )
    for step in bad:
        if step not in skipped:
            skipped.append(step)
            logging.warning("step %d: NaN/Inf loss or gradients; update skipped (nan_policy='skip')", step)


def _log(writer, step, averager, t0, cfg, ckpt, skipped: list) -> dict:
    _check_nonfinite(cfg, averager, ckpt, skipped)
    metrics = averager.pop()
    metrics.update(
        examples_per_sec=averager.examples / (time.perf_counter() - t0),
        examples_seen=step * cfg.batch_size,
        skipped_steps=len(skipped),  # in this process's run; each is also logged as a warning with its step
    )
    averager.examples = 0
    writer.write_scalars(step, metrics)
    return metrics


@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _save(ckpt, step, state, data_it, cfg, averager, skipped, *, force: bool) -> None:
    _check_nonfinite(cfg, averager, ckpt, skipped)
    # The train step never applies a non-finite update; this makes "no NaN checkpoint" hold whatever happens.
    if not bool(_all_finite(state["params"])):
        ckpt.wait()
        raise TrainingError(
            f"the parameters are not finite at step {step}; not saving them. The last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory}"
        )
    ckpt.save(step, state, data_it.get_state(), cfg, force=force)


def run(cfg, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train cfg in workdir (resuming from its latest checkpoint), evaluate, and return the report (also written to
    <workdir>/train_report.json when the run finishes: total_steps trained or the target reached).

    stop_after: stop (with a checkpoint) after this many steps in this call, as a preemption would.
    The report holds the final metrics, 'history' (every logged interval), 'eval' (every evaluator's metrics,
    '<name>/<metric>') and 'sections' (name -> its metrics); after a SIGTERM or SIGINT, 'preempted' (the step saved)
    and 'message'.
    """
    from clu import parameter_overview

    config_checks.validate(cfg, jax.device_count())
    config_checks.check_trainable(cfg)  # NaFlex towers evaluate only
    # Bad datasets, splits and feature keys fail now, before the workdir is touched (the evaluators' not after
    # hours of training).
    preflight.check_train_sources(cfg)
    mesh = sharding.make_mesh(cfg)
    evals = eval_suite.Suite(cfg, mesh)  # built once; its datasets, class names and prompts are checked now
    ckpt = checkpoint_lib.Checkpointer(workdir, cfg)  # an unusable workdir fails before any compiling
    opt, writer = optim.make(cfg), metric_writer(workdir)
    # Batches arrive as global arrays already on the devices, data.device_prefetch steps ahead of the step.
    issues = pipeline.train_iterator(cfg)  # counts what it skipped and converted (pipeline.IssueCounter)
    data_it = pipeline.prefetch_to_device(issues, cfg.data.device_prefetch, mesh)
    graphdef, shardings, state = _restore_or_init(cfg, mesh, opt, ckpt, data_it)
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state["params"])
    start = int(jax.device_get(state["step"]))
    done = target_lib.already_reached(workdir, REPORT, cfg, start)
    if done is not None:  # this command already ran to its target: nothing to train
        logging.info("%s already reached its target at step %d; nothing to train", workdir, start)
        ckpt.close()
        return done
    step_fn = compile_step(cfg, mesh, opt, graphdef, shardings)
    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, start + stop_after)
    # Signals before this point find nothing new to save and act as usual; from here on they stop the run cleanly.
    with Preemption() as preemption:
        loop = (cfg, state, step_fn, start, end, writer, ckpt, data_it, graphdef, preemption, evals, workdir)
        state, result, target = _loop(*loop)
        ckpt.wait()  # the last checkpoint is complete before we report (or exit on a preemption)
    result["data_issues"] = issues.counts  # this process's records since it started (or resumed)
    if result.get("preempted"):
        result["message"] = (
            f"preempted ({preemption.received}) at step {result['step']}; checkpoint saved in {ckpt.directory}; "
            "re-run the same command to resume"
        )
        logging.info("%s", result["message"])  # the CLI prints it; Preemption logged the signal
    elif target.reached and result["step"] < cfg.total_steps:  # stopped at the target: its evaluation is final
        history = result["eval_history"]
        if evals and not (history and history[-1]["step"] == result["step"]):  # a loss target: evaluate now
            history.append({"step": result["step"], "examples_seen": result["examples_seen"],
                            "metrics": evals.run(state["params"], graphdef)})  # fmt: skip
        result["eval"] = history[-1]["metrics"] if history and history[-1]["step"] == result["step"] else {}
        result["sections"] = {name: eval_suite.section(result["eval"], name) for name in evals.evaluators}
        logging.info("target reached at step %d: %s", result["step"], target.report())
    elif evals and result["step"] == cfg.total_steps:
        result["eval"] = evals.run(state["params"], graphdef)
        result["sections"] = {name: eval_suite.section(result["eval"], name) for name in evals.evaluators}
        writer.write_scalars(result["step"], result["eval"])
        result["eval_history"].append({"step": result["step"], "examples_seen": result["examples_seen"],
                                       "metrics": result["eval"]})  # fmt: skip
        target.check(result["step"], result["eval"])  # the budget's last step counts too
        step_log.write_evals(workdir, result["eval_history"])
    if target:
        result["target"] = target.report()
    writer.flush()
    ckpt.close()
    finished = result["step"] == cfg.total_steps or target.reached
    trained = result["step"] > start or not (epath_exists(workdir, REPORT))  # a no-op re-run keeps the report
    if finished and trained and jax.process_index() == 0:
        _write_report(workdir, result)
    return result


def _write_report(workdir: str, result: dict) -> None:
    """<workdir>/train_report.json: the finished run's report (written whole, then renamed: never half-written)."""
    from etils import epath

    path = epath.Path(workdir) / REPORT
    tmp = path.with_name(REPORT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True, default=float))
    tmp.replace(path)


def epath_exists(workdir: str, name: str) -> bool:
    from etils import epath

    return (epath.Path(workdir) / name).exists()


def _stop_at_target(cfg, step, state, data_it, writer, ckpt, averager, skipped, history, t0) -> None:
    """The target is met after step `step`: log that step (if its interval was not logged) and checkpoint it."""
    if not history or history[-1]["step"] != step:
        history.append({"step": step, **_log(writer, step, averager, t0, cfg, ckpt, skipped)})
    if ckpt.latest_step() != step:
        _save(ckpt, step, state, data_it, cfg, averager, skipped, force=True)


def _loop(cfg, state, step_fn, start, end, writer, ckpt, data_it, graphdef, preemption, evals, workdir):
    """Steps start+1..end (or until a preemption), with logging, checkpoints and the periodic evaluations (kept in
    <workdir>/eval_history.jsonl, so a resumed run's report and target crossing include those before the stop)."""
    progress = console.Progress(cfg.total_steps, start, writer=writer, enabled=jax.process_index() == 0)
    averager, history, skipped, t0 = MetricAverager(noise_lib.moving_average(cfg)), [], [], time.perf_counter()
    target, eval_history, reached = target_lib.Target(cfg), step_log.read_evals(workdir, start), False
    for entry in eval_history:  # the evaluations before a resume: the crossing interpolates from the last one
        target.check(entry["step"], entry["metrics"])
    on_cpu, step, preempted = jax.default_backend() == "cpu", start, False
    for step in range(start + 1, end + 1):
        batch = next(data_it)
        if step == cfg.debug.poison_step:  # test only (config.debug): a batch whose loss is NaN
            batch = {**batch, "image": batch["image"] * jnp.nan}
        state, metrics = step_fn(state, batch)
        averager.add(metrics, cfg.batch_size, step)
        if on_cpu:  # XLA:CPU can stall on hundreds of queued collective steps; accelerators run ahead freely
            jax.block_until_ready(metrics["loss"])
        progress.step(step)
        preempted = preemption.requested() and step < end
        if step % cfg.log_every == 0 or step == end or preempted:
            history.append({"step": step, **_log(writer, step, averager, t0, cfg, ckpt, skipped)})
            progress.log(step, history[-1])
            t0 = time.perf_counter()
            reached = target.metric == target_lib.LOSS and target.check(step, history[-1])
        if step == end or preempted or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            _save(ckpt, step, state, data_it, cfg, averager, skipped, force=step == end or preempted)
        if preempted:
            break
        due = evals.due(step) if not reached else []
        if due:
            metrics = evals.run(state["params"], graphdef, due)
            writer.write_scalars(step, progress.evaluated(step, metrics))
            eval_history.append({"step": step, "examples_seen": step * cfg.batch_size, "metrics": metrics})
            step_log.write_evals(workdir, eval_history)
            reached = target.check(step, metrics)
        if reached and step < end:
            _stop_at_target(cfg, step, state, data_it, writer, ckpt, averager, skipped, history, t0)
            break
    progress.close()
    result = {"step": step, "examples_seen": step * cfg.batch_size, "history": history, "eval_history": eval_history}
    result.update(history[-1] if history else {})
    result.update(skipped_steps=skipped, preempted=step if preempted else None)
    return state, result, target
