"""Train until a metric reaches a target (config section `target`); total_steps is then the budget.

    --config.target.metric=zeroshot/top1 --config.target.value=25 --config.total_steps=20000

`target.metric` is either '<evals section>/<metric>' (e.g. 'zeroshot/top1', 'retrieval/i2t_r1'), checked after
each of that section's periodic evaluations (its `every`, or eval_every), or 'loss', the training loss averaged
over each log interval (log_every steps). The metric reaches the target when it is >= value for metrics where
higher is better and <= value for the others (evaluate/sections.METRICS says which; the loss: lower). The run then
saves a checkpoint and stops; its report's 'target' says at which step and after how many examples. A run that
never gets there trains total_steps as usual, and 'target' records that it did not reach.

Steps-to-target is measured at the evaluation cadence: the step reported is the first evaluated step at or past
the target; 'crossing_step' also interpolates linearly between that evaluation and the one before (the usual
reading of a steps-to-target curve, e.g. Shallue et al. 2018, "Measuring the Effects of Data Parallelism").

For a contrastive loss the training loss depends on the batch size (more negatives: softmax InfoNCE starts at
log B), so a 'loss' target is not comparable across batch sizes; use an evaluation metric for batch-size studies.
"""

import json

from clip_jax.config import ConfigError
from clip_jax.evaluate import sections

LOSS = "loss"


def already_reached(workdir: str, report_name: str, cfg, step: int) -> dict | None:
    """The report of a run in workdir that stopped at this target at `step` (the step it resumes from), so that
    re-running the finished command trains nothing; None otherwise (no such report, another target or step)."""
    from etils import epath

    path = epath.Path(workdir) / report_name
    if not cfg.target.metric or not path.exists():
        return None
    report = json.loads(path.read_text())
    reached = report.get("target") or {}
    same = (reached.get("metric"), reached.get("value")) == (cfg.target.metric, cfg.target.value)
    return report if same and reached.get("reached") and report.get("step") == step else None


def goal_of(cfg) -> str:
    """'max' or 'min' for cfg.target.metric ('' when the target is off). Raises ConfigError (one line) for an
    unknown metric, an evaluator section that is off, or a section that never evaluates during training."""
    metric = cfg.target.metric
    if not metric:
        return ""
    if metric == LOSS:
        return "min"
    name, _, key = metric.partition("/")
    evals = {n: s for n, s in cfg.evals.items() if s.dataset}
    if name not in evals:
        raise ConfigError(
            f"target.metric {metric!r}: write '<evals section>/<metric>' for a section that is on "
            f"({', '.join(sorted(evals)) or 'none is on'}) or 'loss'"
        )
    section = evals[name]
    vocabulary = sections.METRICS[section.type]
    if key not in vocabulary:
        raise ConfigError(
            f"target.metric {metric!r}: a {section.type} evaluator reports {', '.join(sorted(vocabulary))}; "
            f"e.g. --config.target.metric={name}/{next(iter(vocabulary))}"
        )
    every = section.every if section.every >= 0 else cfg.eval_every
    if every <= 0:
        raise ConfigError(
            f"target.metric {metric!r}: evals.{name} runs only at the end (its every / eval_every is 0); set "
            "--config.eval_every to how often the target should be checked"
        )
    return vocabulary[key]


class Target:
    """The run's target (cfg.target): check() each evaluation's or log interval's metrics; when reached, report()
    gives the step, the examples and the interpolated crossing. Off (metric '') it never stops a run."""

    def __init__(self, cfg):
        self.metric, self.value, self.goal = cfg.target.metric, cfg.target.value, goal_of(cfg)
        self.batch_size = cfg.batch_size
        self.last = None  # (step, value) of the previous check
        self.reached = None  # the report once reached

    def __bool__(self) -> bool:
        return bool(self.metric)

    def check(self, step: int, metrics: dict) -> bool:
        """Record `metrics` (a dict that may hold self.metric) at `step`; True the first time the target is met.
        Raises KeyError (one line) when an evaluation that should report the metric does not (a zero-shot set
        without held-out classes has no '_unseen' accuracies)."""
        if not self.metric or self.reached is not None:
            return False
        if self.metric == LOSS:
            value = metrics.get(LOSS)
        else:
            name = self.metric.partition("/")[0]
            if not any(k.startswith(name + "/") for k in metrics):
                return False  # another section's evaluation
            if self.metric not in metrics:
                have = ", ".join(sorted(k for k in metrics if k.startswith(name + "/")))
                raise KeyError(f"target.metric {self.metric!r} is not among this evaluation's metrics ({have})")
            value = metrics[self.metric]
        if value is None:
            return False
        value = float(value)
        met = value >= self.value if self.goal == "max" else value <= self.value
        if met:
            self.reached = self._report(step, value)
        self.last = (step, value)
        return met

    def _report(self, step: int, value: float) -> dict:
        crossing = float(step)
        if self.last is not None and self.last[1] != value:
            (s0, v0) = self.last
            frac = (self.value - v0) / (value - v0)
            crossing = s0 + min(max(frac, 0.0), 1.0) * (step - s0)
        return {
            "metric": self.metric, "value": self.value, "reached": True, "step": step, "metric_value": value,
            "examples": step * self.batch_size, "crossing_step": crossing,
            "crossing_examples": crossing * self.batch_size,
        }  # fmt: skip

    def report(self) -> dict | None:
        """{'metric', 'value', 'reached', ...}: the step and examples when reached (see check), else reached=False
        with the last value seen; None when the target is off."""
        if not self.metric:
            return None
        if self.reached is not None:
            return self.reached
        last = self.last[1] if self.last else None
        return {"metric": self.metric, "value": self.value, "reached": False, "metric_value": last}
