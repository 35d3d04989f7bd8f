"""The plan of a steps-to-target sweep (experiments/steps_to_target.py): its runs, their config keys, and which run
comes next given the runs finished so far (lr early stops, the grid's extension, the control and the noise run).
Pure: no training, no jax; the rules are stated in steps_to_target.py's docstring."""

import dataclasses
import json
import math
import os

import batch_size_sweep as fixed  # experiments/ is on sys.path when a script here runs

REPORT = "train_report.json"  # = clip_jax.train.REPORT (train.py is not imported by --emit-commands)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep: kind 'lr' (an lr candidate), 'control' (sigmoid at b = -10) or 'noise'."""

    kind: str
    loss: str
    init: str  # clip | prior | paper
    batch_size: int
    lr_factor: float
    lr: float
    budget_steps: int
    eval_every: int
    warmup_steps: int
    log_t: float
    bias: float

    @property
    def name(self) -> str:
        head = "noise_" if self.kind == "noise" else ""
        return f"{head}{self.loss}_{self.init}_b{self.batch_size}_lr{self.lr_factor:g}x"


def prior_bias(batch: int) -> float:
    """b with sigmoid(b) = 1/B: the log-odds of a positive pair in a B x B batch (B >= 2)."""
    return -math.log(batch - 1)


INITS = {  # init name -> (log t, bias as a function of B)
    "clip": (math.log(1 / 0.07), lambda b: 0.0),
    "prior": (math.log(10.0), prior_bias),
    "paper": (math.log(10.0), lambda b: -10.0),
}
MAIN_INIT = {"softmax": "clip", "sigmoid": "prior"}
EXTEND = 2  # lr factors added past the grid's edge at most, per (loss, B)


def make_run(kind, loss, init, batch, factor, s) -> Run:
    """A run of `s` (the sweep's settings: Settings) at batch B with lr = the rule's lr * factor."""
    log_t, bias = INITS[init]
    lr = fixed.scaled_lr(batch, s.lr_rule, s.base_batch, s.base_lr) * factor
    return Run(kind, loss, init, batch, factor, lr, max(1, s.budget_examples // batch),
               max(1, round(s.check_examples / batch)), s.warmup_steps, log_t, bias(batch))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Settings:
    config: str
    batches: tuple
    losses: tuple
    factors: tuple
    target_metric: str
    target_value: float
    budget_examples: int
    check_examples: int
    lr_rule: str
    base_batch: int
    base_lr: float
    warmup_steps: int
    control: bool
    noise_batch: int
    noise_accum: int
    extra: tuple


def run_overrides(run: Run, s: Settings, sections) -> dict:
    """The config keys a run sets (one source for in-process runs and --emit-commands). Evaluators other than the
    target's are switched off: only the target's metric is needed, every check_examples examples."""
    keys = {
        "batch_size": run.batch_size, "total_steps": run.budget_steps, "optim.lr": run.lr,
        "optim.warmup_steps": min(run.warmup_steps, run.budget_steps), "optim.end_lr_frac": 1.0,
        "loss.kind": run.loss, "model.log_t_init": run.log_t, "model.bias_init": run.bias,
        "target.metric": s.target_metric, "target.value": s.target_value, "eval_every": run.eval_every,
        "log_every": max(1, run.eval_every // 4), "ckpt_every": max(run.eval_every, run.budget_steps // 4),
    }  # fmt: skip
    for name in sections:
        if name != s.target_metric.partition("/")[0]:
            keys[f"evals.{name}.dataset"] = ""
    if run.kind == "noise":
        keys.update({"accum_steps": s.noise_accum, "noise_scale": True, "noise_scale_decay": 0.95})
    return keys


def spec_of(run: Run, s: Settings) -> dict:
    """What identifies a run (its point.json): a folder holding another spec is refused, never resumed."""
    return {**dataclasses.asdict(run), "config": s.config, "target_metric": s.target_metric,
            "target_value": s.target_value, "overrides": [f"{k}={v}" for k, v in s.extra]}  # fmt: skip


def _read(path):
    with open(path) as f:
        return json.load(f)


def finished_report(workdir: str, run: Run):
    path = os.path.join(workdir, run.name, REPORT)
    return _read(path) if os.path.exists(path) else None


def reached_steps(report) -> int | None:
    """The first evaluated step at the target, or None (not reached or not run): a later lr factor's budget."""
    target = (report or {}).get("target") or {}
    return target.get("step") if target.get("reached") else None


def crossing_steps(report) -> float | None:
    """The interpolated crossing (target.py), or None: what ranks the runs, here and in target_analysis.py."""
    target = (report or {}).get("target") or {}
    return target.get("crossing_step") if target.get("reached") else None


def point_runs(loss: str, batch: int, s: Settings, workdir: str, *, emit: bool) -> list[Run]:
    """The lr candidates of (loss, B), each capped at the best steps found so far (not when emitting). When the
    best is at the grid's edge the grid grows by one factor of 2 past it, at most EXTEND times (not when emitting:
    that needs the results)."""
    runs, best, factors = [], None, list(s.factors)
    while True:
        for factor in factors[len(runs) :]:
            run = make_run("lr", loss, MAIN_INIT[loss], batch, factor, s)
            if best is not None and not emit:
                run = dataclasses.replace(run, budget_steps=min(run.budget_steps, best))
            runs.append(run)
            steps = reached_steps(finished_report(workdir, run))
            if steps is not None and (best is None or steps < best):
                best = steps
        top = best_run(runs, workdir)
        pending = any(finished_report(workdir, r) is None for r in runs)
        if emit or pending or top is None or len(factors) >= len(s.factors) + EXTEND or min(factors) < top[0] < max(factors):
            return runs
        factors.append(top[0] / 2 if top[0] == min(factors) else top[0] * 2)


def best_run(runs: list[Run], workdir: str) -> tuple[float, int] | None:
    """(lr factor, first evaluated step at the target) of the run with the fewest steps to it (the interpolated
    crossing, as the analysis ranks them; the earlier run on a tie)."""
    reports = [finished_report(workdir, r) for r in runs]
    done = [(crossing_steps(rep), i) for i, rep in enumerate(reports) if crossing_steps(rep) is not None]
    if not done:
        return None
    i = min(done)[1]
    return runs[i].lr_factor, reached_steps(reports[i])


def follow_up_runs(loss: str, batch: int, factor: float, s: Settings, cap: int | None = None) -> list[Run]:
    """The sigmoid control (b = -10; its budget capped at `cap`, the steps the prior init needed: like a later lr
    factor, it stops where it can no longer win) and the noise run (full budget) at (loss, B), lr factor `factor`."""
    out = []
    if s.control and loss == "sigmoid":
        control = make_run("control", loss, "paper", batch, factor, s)
        out.append(dataclasses.replace(control, budget_steps=min(control.budget_steps, cap or control.budget_steps)))
    if batch == s.noise_batch:
        out.append(make_run("noise", loss, MAIN_INIT[loss], batch, factor, s))
    return out


def all_runs(s: Settings, workdir: str, *, emit: bool) -> list[Run]:
    """Every run in order (smallest batch first, both losses, so a partial sweep already compares them). Without
    emit, a later lr factor's budget and the follow-ups' lr come from the runs finished so far; with emit, the
    control runs at every factor and the noise run at the first."""
    out = []
    for batch in s.batches:
        for loss in s.losses:
            runs = point_runs(loss, batch, s, workdir, emit=emit)
            out += runs
            if not emit:
                factor, cap = best_run(runs, workdir) or (s.factors[0], None)
                out += follow_up_runs(loss, batch, factor, s, cap)
                continue
            for factor in s.factors:
                out += [r for r in follow_up_runs(loss, batch, factor, s) if r.kind == "control" or factor == s.factors[0]]
    return out
