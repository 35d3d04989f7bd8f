"""Evaluators. `run` runs every configured one (the trainer calls it); `evaluate_checkpoint` runs them standalone
on a checkpoint and writes the results as JSON and TensorBoard summaries.

Metric names are flat, '<evaluator>/<metric>': 'zeroshot/top1', 'zeroshot/mean_per_class', 'retrieval/i2t_r1',
'retrieval/t2i_r5', 'probe/top1', ... Every process runs every evaluator (they use all devices) and gets the same numbers.
"""

import json
import logging
import os

log = logging.getLogger(__name__)
# Evaluator name -> the config key that switches it on ('' = off). The order is the order they run in.
EVALUATORS = {"zeroshot": "dataset", "retrieval": "retrieval_dataset", "probe": "probe_dataset"}


def enabled(cfg) -> list[str]:
    """Names of the evaluators the config switches on (captioning: caption.dataset, for models that caption)."""
    names = [name for name, key in EVALUATORS.items() if cfg.eval[key]]
    return names + (["captioning"] if cfg.caption.dataset and cfg.model.family == "coca" else [])


def run(cfg, params, graphdef, mesh, encoders=None) -> dict:
    """Every configured evaluator on the model in `params` -> {'zeroshot/top1': ..., 'retrieval/i2t_r1': ...}.

    encoders: (encode_image, encode_text) to use instead of the model's (tests pass hand-built ones).
    """
    from clip_jax.evaluate import captioning, linear_probe, retrieval, zero_shot

    functions = {"zeroshot": zero_shot.evaluate, "retrieval": retrieval.evaluate, "probe": linear_probe.evaluate}
    out = {}
    for name in enabled(cfg):
        if name == "captioning":  # perplexity and CIDEr-D of generated captions: 'captioning/cider', ...
            for key, value in captioning.evaluate(cfg, params, graphdef, mesh).items():
                out[f"captioning/{key.removeprefix('caption_')}"] = value
            continue
        for key, value in functions[name](cfg, params, graphdef, mesh, encoders=encoders).items():
            out[f"{name}/{key}"] = value
    return out


def check_sources(cfg) -> None:
    """Open the dataset of every evaluator the config switches on and resolve the zero-shot class names and
    prompts, so that a bad dataset name, split, feature key, class-name list or template set fails in one line
    before training starts, not at the first evaluation. Raises pipeline.DataError or config.ConfigError."""
    from clip_jax.evaluate import templates
    from clip_jax.input import eval_data, pipeline, preflight

    e, data_dir = cfg.eval, cfg.data.data_dir
    names = enabled(cfg)
    if "zeroshot" in names:  # also checks that eval.label_key is a ClassLabel feature
        try:
            label_names = eval_data.class_names(cfg)
        except pipeline.DataError as err:
            raise pipeline.DataError(f"eval.dataset: {err}") from None
        templates.class_prompts(e.templates, templates.class_names(e.class_names, e.dataset, label_names))
    needs = []  # (config key of the dataset, dataset, split, (config key of a feature, feature) pairs)
    if "zeroshot" in names:
        needs.append(("eval.dataset", e.dataset, e.split, (("data.image_key", cfg.data.image_key),)))
    if "retrieval" in names:
        features = (("eval.retrieval_image_key", e.retrieval_image_key), ("eval.retrieval_text_key",
                    e.retrieval_text_key))  # fmt: skip
        needs.append(("eval.retrieval_dataset", e.retrieval_dataset, e.retrieval_split, features))
    if "probe" in names:
        for split in (e.probe_train_split, e.probe_test_split):
            features = (("data.image_key", cfg.data.image_key), ("eval.probe_label_key", e.probe_label_key))
            needs.append(("eval.probe_dataset", e.probe_dataset, split, features))
    if "captioning" in names:
        features = (("data.image_key", cfg.data.image_key), ("data.text_key", cfg.data.text_key))
        needs.append(("caption.dataset", cfg.caption.dataset, cfg.caption.split, features))
    for key, dataset, split, features in needs:
        try:
            source = pipeline.open_source(dataset, split, data_dir)
        except pipeline.DataError as err:
            raise pipeline.DataError(f"{key}: {err}") from None
        preflight.check_features(source, f"{key}={dataset!r} (split '{split}')", features)


def section(metrics: dict, name: str) -> dict:
    """The metrics of one evaluator, without its prefix: section(m, 'zeroshot')['top1']."""
    prefix = name + "/"
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def resolve_checkpoint(path: str) -> tuple[str, int | None]:
    """--checkpoint accepts a workdir, its checkpoints/ folder or one step folder in it -> (workdir, step)."""
    path = os.path.abspath(os.path.expanduser(path)).rstrip("/")
    name, parent = os.path.basename(path), os.path.dirname(path)
    if name.isdigit() and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), int(name)
    if name == "checkpoints":
        return parent, None
    return path, None


def evaluate_checkpoint(cfg, workdir: str, *, checkpoint: str = "") -> dict:
    """Run the configured evaluators on a checkpoint (the latest in workdir, or the one `checkpoint` names).

    Writes <workdir>/eval/step_<N>.json and TensorBoard summaries in <workdir>/eval (process 0 only);
    returns {'step', 'checkpoint', 'metrics', 'json', and per evaluator its section, e.g. 'zero_shot'}.
    """
    import jax

    from clip_jax import checkpoint as checkpoint_lib
    from clip_jax import optim, sharding
    from clip_jax import state as run_state

    source, step = resolve_checkpoint(checkpoint) if checkpoint else (workdir, None)
    workdir = workdir or source
    if not enabled(cfg):
        raise run_state.TrainingError(
            "no evaluator configured: set eval.dataset, eval.retrieval_dataset and/or eval.probe_dataset"
        )
    check_sources(cfg)
    mesh = sharding.make_mesh(cfg)
    graphdef, abstract, shardings = run_state.state_shardings(cfg, mesh, optim.make(cfg))
    ckpt = checkpoint_lib.Checkpointer(source, cfg)
    if step is not None and step not in ckpt.manager.all_steps():
        ckpt.close()
        raise run_state.TrainingError(
            f"no checkpoint at step {step} in {ckpt.directory}; it has {ckpt.manager.all_steps()}"
        )
    restored = ckpt.restore(abstract, shardings, cfg, step=step)
    ckpt.close()
    if restored is None:
        raise run_state.TrainingError(f"no checkpoint in {ckpt.directory}; train first or point --workdir at a run")
    step, state, _ = restored
    metrics = run(cfg, state["params"], graphdef, mesh)
    out_dir = os.path.join(workdir if "://" in workdir else os.path.abspath(workdir), "eval")
    path = os.path.join(out_dir, f"step_{step}.json")
    if jax.process_index() == 0:
        _write(out_dir, path, step, ckpt.directory, cfg, metrics)
    result = {
        "step": step,
        "checkpoint": os.path.join(ckpt.directory, str(step)),
        "metrics": metrics,
        "json": path,
    }
    result["zero_shot"] = section(metrics, "zeroshot")
    result["retrieval"] = section(metrics, "retrieval")
    result["probe"] = section(metrics, "probe")
    return result


def _write(out_dir, path, step, ckpt_dir, cfg, metrics):
    from clu import metric_writers  # imports tensorflow: only here

    os.makedirs(out_dir, exist_ok=True)
    record = {
        "step": step,
        "checkpoint": os.path.join(ckpt_dir, str(step)),
        "eval_config": cfg.eval.to_dict(),
        "metrics": metrics,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # a reader never sees half a file
    writer = metric_writers.create_default_writer(out_dir)
    writer.write_scalars(step, metrics)
    writer.flush()
    writer.close()
    log.info("evaluation of step %d written to %s", step, path)
