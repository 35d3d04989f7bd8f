"""Every evaluator a config asks for, built once per run, and their results on a checkpoint.

Metric names are flat, '<section name>/<metric>': 'zeroshot/top1', 'zeroshot/mean_per_class', 'retrieval/i2t_r1',
'probe/top1', 'captioning/cider', ... Every process runs every evaluator (they use all devices) and gets the same
numbers.
"""

import json
import logging
import os

import jax

from clip_jax import state as run_state
from clip_jax.evaluate import captioning, common, linear_probe, retrieval, zero_shot
from clip_jax.input import pipeline

log = logging.getLogger(__name__)
# Evaluator type (an evals.<name>.type) -> the class that implements it (sections.TYPES: each type's keys).
TYPES = {
    "zeroshot": zero_shot.ZeroShot,
    "retrieval": retrieval.Retrieval,
    "probe": linear_probe.LinearProbe,
    "captioning": captioning.Captioning,
}


def active(cfg) -> dict:
    """name -> section of every evals.<name> section that is on (its dataset is not ''), in config order."""
    return {name: section for name, section in cfg.evals.items() if section.dataset}


class Suite:
    """The configured evaluators, built once (their datasets, features, class names and prompts are checked now:
    pipeline.DataError / config.ConfigError name the section's key); run() evaluates a set of parameters.

    encoders: a ModelEncoders-like object ((params, batch) -> embeddings) to use instead of the model's (tests
    pass hand-built ones).
    """

    def __init__(self, cfg, mesh, encoders=None):
        self.cfg, self.mesh, self._encoders = cfg, mesh, encoders
        self.evaluators = {}
        for name, section in active(cfg).items():
            try:
                self.evaluators[name] = TYPES[section.type](name, section, cfg, mesh)
            except pipeline.DataError as e:  # name the section, once
                text = str(e) if str(e).startswith(f"evals.{name}") else f"evals.{name}: {e}"
                raise pipeline.DataError(text) from None

    def __bool__(self) -> bool:
        return bool(self.evaluators)

    def due(self, step: int) -> list[str]:
        """Names of the evaluators to run after training step `step` (not the final step: run() all of them then).
        A section's `every` (-1: the run's eval_every; 0: only at the end) sets its period."""
        out = []
        for name, evaluator in self.evaluators.items():
            every = evaluator.section.every if evaluator.section.every >= 0 else self.cfg.eval_every
            if every > 0 and step % every == 0 and step != self.cfg.total_steps:
                out.append(name)
        return out

    def run(self, params, graphdef, names=None) -> dict:
        """Evaluate `params` (the model that `graphdef` describes) -> {'<name>/<metric>': value}, with every
        evaluator or the ones `names` lists."""
        encoders = self._encoders or common.ModelEncoders(graphdef)
        out = {}
        for name in self.evaluators if names is None else names:
            for key, value in self.evaluators[name].run(params, encoders, graphdef).items():
                out[f"{name}/{key}"] = value
        return out


def section(metrics: dict, name: str) -> dict:
    """The metrics of one evaluator, without its prefix: section(m, 'zeroshot')['top1']."""
    prefix = name + "/"
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def evaluate_checkpoint(cfg, workdir: str, *, checkpoint: str = "") -> dict:
    """Run the configured evaluators on a checkpoint (the latest in workdir, or the one `checkpoint` names: a
    workdir, its checkpoints/ or a step folder).

    Writes <workdir>/eval/step_<N>.json and TensorBoard summaries in <workdir>/eval (process 0 only); returns
    {'step', 'checkpoint', 'metrics', 'json', 'sections': {name: its metrics}}. Raises TrainingError when no
    evaluator is configured or there is no such checkpoint.
    """
    if not active(cfg):
        raise run_state.TrainingError(
            "no evaluator configured: give an evals.<name> section a dataset, e.g. "
            "--config.evals.zeroshot.dataset=clip_shapes"
        )
    from clip_jax import sharding

    mesh = sharding.make_mesh(cfg)
    suite = Suite(cfg, mesh)  # checks every dataset before the checkpoint is read
    step, params, graphdef, _ = run_state.restore_params(cfg, checkpoint or workdir, mesh=mesh)
    metrics = suite.run(params, graphdef)
    source, _ = run_state.resolve_checkpoint(checkpoint or workdir)
    workdir = workdir or source
    out_dir = os.path.join(workdir if "://" in workdir else os.path.abspath(workdir), "eval")
    path = os.path.join(out_dir, f"step_{step}.json")
    ckpt_path = os.path.join(source, "checkpoints", str(step))
    if jax.process_index() == 0:
        _write(out_dir, path, step, ckpt_path, cfg, metrics)
    return {
        "step": step,
        "checkpoint": ckpt_path,
        "metrics": metrics,
        "json": path,
        "sections": {name: section(metrics, name) for name in suite.evaluators},
    }


def _write(out_dir, path, step, ckpt_path, cfg, metrics):
    from clu import metric_writers  # imports tensorflow: only here

    os.makedirs(out_dir, exist_ok=True)
    record = {"step": step, "checkpoint": ckpt_path, "evals": cfg.evals.to_dict(), "metrics": metrics}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # a reader never sees half a file
    writer = metric_writers.create_default_writer(out_dir)
    writer.write_scalars(step, metrics)
    writer.flush()
    writer.close()
    log.info("evaluation of step %d written to %s", step, path)
