"""The train loop's metrics on their way to the host: averaged per log interval and written through CLU."""

import json

import jax
import numpy as np


class MetricAverager:
    """Collects per-step device metrics; they reach the host once per log interval (or before a checkpoint).
    noise: a noise_scale.MovingAverage (cfg.noise_scale), which adds 'noise_scale' to every pop."""

    def __init__(self, noise=None):
        self.items, self.steps, self.examples, self.noise = [], [], 0, noise

    def add(self, metrics, examples: int, step: int = 0):
        self.items.append(metrics)
        self.steps.append(step)
        self.examples += examples

    def nonfinite_steps(self) -> list[int]:
        """Steps since the last pop whose loss or gradients were NaN/Inf (their updates were not applied)."""
        flags = jax.device_get([m["nonfinite"] for m in self.items])
        return [step for step, bad in zip(self.steps, flags) if bad]

    def pop(self) -> dict:
        host = jax.device_get(self.items)
        self.items, self.steps = [], []
        out = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
        out["nonfinite"] = int(sum(m["nonfinite"] for m in host))
        out["lr"] = float(host[-1]["lr"])
        if self.noise is not None:
            out.update(self.noise.log(host))
        return out


def metric_writer(workdir: str):
    """CLU's default writer (TensorBoard summaries + log lines) for workdir; other processes only log."""
    from clu import metric_writers  # imports tensorflow: keep it out of module import time

    return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


EVALS = "eval_history.jsonl"  # the periodic evaluations so far, one JSON line each (a resume continues it)


def read_evals(workdir: str, upto: int) -> list[dict]:
    """The evaluations a run in workdir made at steps <= upto (the step it resumes from); later ones belong to
    steps the checkpoint does not hold and are dropped. [] when there is no such file."""
    from etils import epath

    path = epath.Path(workdir) / EVALS
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["step"] <= upto]


def write_evals(workdir: str, entries: list[dict]) -> None:
    """Rewrite <workdir>/eval_history.jsonl with `entries` (process 0 only; written whole, then renamed)."""
    if jax.process_index() != 0:
        return
    from etils import epath

    path = epath.Path(workdir) / EVALS
    tmp = path.with_name(EVALS + ".tmp")
    tmp.write_text("".join(json.dumps(e, sort_keys=True, default=float) + "\n" for e in entries))
    tmp.replace(path)
