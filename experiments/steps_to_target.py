r"""Steps-to-target batch-size sweep: how many steps S and examples E each batch size B needs to reach a target, for
each loss at its best learning rate, the critical batch B_crit fitted from them, and the gradient noise scale.

    python experiments/steps_to_target.py --workdir workdirs/target              # the default sweep (DEFAULTS)
    python experiments/steps_to_target.py --workdir workdirs/target --dry-run    # the plan and each run's state
    python experiments/steps_to_target.py --config configs/siglip_b16.py --batch-sizes 4096,16384,65536 \
        --target-value 40 --budget-examples 2000000000 --devices 256 --emit-commands --workdir gs://bucket/t
    python experiments/steps_to_target.py --workdir ./t --collect ...   # CSVs + analysis of the finished runs

Every run trains the config until `--target-metric` (an evaluator's metric, checked every ~--check-examples
examples) reaches `--target-value`, or until `--budget-examples` (config keys target.*, total_steps; train.run
stops at the target with a checkpoint). The learning rate is constant after `--warmup-steps` of linear warmup, so
a run's trajectory does not depend on its budget. Per (loss, B):

- learning rates: the --lr-rule's lr (sqrt: Adam's lr ~ sqrt(B), from the config's batch and lr) times each of
  --lr-factors, run in that order. Each later factor's budget is the fewest steps an earlier factor needed (a run
  that cannot beat it stops there: with a constant lr that is exactly the longer run's prefix). A best at the
  grid's edge adds the next factor of 2 past it (twice at most). The best (fewest steps) is the point's; every
  run is recorded.
- inits: softmax starts at CLIP's (t = 1/0.07); sigmoid at t = 10 and the prior-matching bias b = -log(B - 1), so
  that sigmoid(b) = 1/B, the fraction of positive pairs in a B x B batch (it gives -10.4 at SigLIP's B = 32,768);
  SigLIP's own b = -10 is run as a control at the lr the prior init found best, stopped like a later lr factor
  at the prior's steps (--control).
- noise scale: at --noise-batch, one more run per loss at its best lr with GradCache (--noise-accum micro-batches)
  and config noise_scale on, logging B_simple every few steps (clip_jax/noise_scale.py says what it measures).

Runs live in <workdir>/<name>/ (point.json: its settings; train_report.json: its report once finished); re-running
the same command skips finished runs and resumes an interrupted one from its checkpoint. The CSVs (runs.csv,
curves.csv, noise.csv) and the analysis (target_analysis.py: fit, summary.md, PNGs) are rewritten after every run.
--emit-commands prints one resumable `python -m clip_jax.main train` line per run instead (every lr factor and the
control at every factor, all at the full budget: the early stops need earlier results) and writes each point.json;
--collect then builds the CSVs and analysis from whatever runs have finished, in a local folder (copy a bucket's
run folders first, e.g. `gsutil -m cp -r gs://bucket/t .`; point.json files are written through etils.epath).
"""

import argparse
import json
import math
import os
import shlex
import sys
import time

import batch_size_sweep as fixed  # experiments/ is on sys.path when this file runs as a script
import sweep_results
import target_analysis
from etils import epath
from target_plan import (  # noqa: F401  (the plan's names are part of this script's API: tests use them)
    INITS,
    MAIN_INIT,
    REPORT,
    Run,
    Settings,
    _read,
    all_runs,
    best_run,
    crossing_steps,
    finished_report,
    follow_up_runs,
    make_run,
    point_runs,
    prior_bias,
    reached_steps,
    run_overrides,
    spec_of,
)  # fmt: skip

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULTS = {  # sized to finish within 60 minutes on an idle 2-core CPU (README: steps-to-target sweep)
    "config": "configs/tiny_cpu.py:sweep",
    "batch_sizes": "32,64,128,256,512,1024",
    "losses": "softmax,sigmoid",
    "target_metric": "retrieval/t2i_r10",  # caption -> image R@10 on clip_shapes_captions: rises smoothly
    "target_value": 15.0,
    "budget_examples": 98_304,
    "check_examples": 0,  # 0: max(4096, budget / 64)
    "lr_factors": "1,2,0.5",
    "warmup_steps": 20,
    "noise_batch": 256,
    "noise_accum": 4,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--config", default=d["config"], help="config file, path[:arg]")
    p.add_argument("--batch-sizes", default=d["batch_sizes"], help="comma list of global batch sizes")
    p.add_argument("--losses", default=d["losses"], help="comma list of softmax, sigmoid")
    p.add_argument("--target-metric", default=d["target_metric"], help="'<evals section>/<metric>' (target.py)")
    p.add_argument("--target-value", type=float, default=d["target_value"], help="in the metric's units")
    p.add_argument("--budget-examples", type=int, default=d["budget_examples"], help="most examples per run")
    p.add_argument("--check-examples", type=int, default=d["check_examples"],
                   help="examples between target checks (0: max(4096, budget / 64))")  # fmt: skip
    p.add_argument("--lr-rule", default="sqrt", choices=fixed.LR_RULES, help="lr = base_lr * (B/base_batch)^p")
    p.add_argument("--lr-factors", default=d["lr_factors"], help="comma list: the rule's lr times each")
    p.add_argument("--base-batch", type=int, default=0, help="batch at which lr = base lr (0: the config's)")
    p.add_argument("--base-lr", type=float, default=0.0, help="peak lr at the base batch (0: the config's)")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="linear warmup, then constant lr")
    p.add_argument("--control", default=True, action=argparse.BooleanOptionalAction, help="sigmoid at b = -10")
    p.add_argument("--noise-batch", type=int, default=d["noise_batch"], help="batch of the noise runs (0: none)")
    p.add_argument("--noise-accum", type=int, default=d["noise_accum"], help="GradCache micro-batches (>= 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable)")  # fmt: skip
    p.add_argument("--devices", type=int, default=0, help="as batch_size_sweep.py's --devices")
    p.add_argument("--workdir", required=True, help="one folder per run, plus the CSVs, summary.md and PNGs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and each run's state; train nothing")
    mode.add_argument("--emit-commands", action="store_true", help="print one train command per run")
    mode.add_argument("--collect", action="store_true", help="CSVs and analysis of the finished runs only")
    return p.parse_args(argv)


def check_spec(run: Run, s: Settings, workdir: str) -> None:
    """SweepError (one line) when the run's folder holds a run with other settings: never resumed or reported."""
    spec, path = spec_of(run, s), os.path.join(workdir, run.name, "point.json")
    if os.path.exists(path) and _read(path) != spec:
        raise fixed.SweepError(f"{os.path.dirname(path)} holds a run with other settings "
                               f"({fixed._spec_diff(_read(path), spec)}); use another --workdir or delete that folder")


def train_run(run: Run, s: Settings, workdir: str, base_cfg) -> dict | None:
    """Train (or resume) one run in-process; its report, or None when it was preempted (re-run to resume)."""
    from clip_jax import train

    run_dir = os.path.join(workdir, run.name)
    check_spec(run, s, workdir)
    os.makedirs(run_dir, exist_ok=True)
    fixed._write_json(os.path.join(run_dir, "point.json"), spec_of(run, s))
    cfg = base_cfg.copy_and_resolve_references()
    for key, value in run_overrides(run, s, [n for n, x in cfg.evals.items() if x.dataset]).items():
        fixed.set_key(cfg, key, value)
    wall_path = os.path.join(run_dir, "wall_partial.json")
    earlier = _read(wall_path)["wall_s"] if os.path.exists(wall_path) else 0.0
    start = time.perf_counter()
    report = train.run(cfg, run_dir)
    wall = earlier + time.perf_counter() - start
    if not (report["step"] == run.budget_steps or (report.get("target") or {}).get("reached")):  # preempted
        fixed._write_json(wall_path, {"wall_s": wall})
        return None
    report["wall_s"] = round(wall, 1)
    fixed._write_json(os.path.join(run_dir, REPORT), report)  # train.run wrote it; now with the wall time
    return report


def emit(s: Settings, workdir: str, base_cfg) -> list[str]:
    """One CLI train line per run (full budgets), writing each run's point.json so --collect can read them."""
    sections = [n for n, x in base_cfg.evals.items() if x.dataset]
    lines = []
    for run in all_runs(s, workdir, emit=True):
        flags = [f"--config={s.config}"] + [f"--config.{k}={v}" for k, v in s.extra]
        flags += [f"--config.{k}={fixed.format_value(v)}" for k, v in run_overrides(run, s, sections).items()]
        flags.append(f"--workdir={os.path.join(workdir, run.name)}")
        lines.append(" ".join(["python", "-m", "clip_jax.main", "train", *map(shlex.quote, flags)]))
        folder = epath.Path(workdir) / run.name  # local or a bucket (etils' file systems)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "point.json").write_text(json.dumps(spec_of(run, s), indent=1, sort_keys=True))
    return lines


def write_outputs(workdir: str, s: Settings, notes: bool = False) -> list[str]:
    """Rewrite runs.csv, curves.csv, noise.csv and the analysis from the finished runs of this sweep's settings
    (target, config, overrides; folders of other settings are left out, and named when `notes`); the analysis's
    lines."""
    same = ("config", "target_metric", "target_value", "overrides")
    mine = {k: v for k, v in spec_of(make_run("lr", s.losses[0], MAIN_INIT[s.losses[0]], s.batches[0], 1.0, s), s).items()
            if k in same}  # fmt: skip
    tables, other = target_analysis.collect(workdir, REPORT, lambda spec: {k: spec.get(k) for k in same} == mine)
    if notes and other:
        print(f"left out {len(other)} run folder(s) of other settings: {', '.join(other[:5])}")
    for table, rows in tables.items():
        sweep_results.write_csv(os.path.join(workdir, f"{table}.csv"), rows, target_analysis.COLUMNS[table])
    return target_analysis.analyse(workdir, describe(s), s.target_value) if tables["runs"] else []


def settings(args) -> tuple[Settings, object]:
    """(Settings, the base config with --set applied) from the arguments; SweepError / ConfigError / ValueError
    (one line) for bad ones."""
    batches = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    losses = tuple(x.strip() for x in args.losses.split(",") if x.strip())
    factors = tuple(float(f) for f in args.lr_factors.split(",") if f.strip())
    if not losses or set(losses) - set(MAIN_INIT) or not batches or min(batches) < 2:
        raise fixed.SweepError("--losses must name softmax and/or sigmoid, --batch-sizes integers >= 2")
    if not factors or min(factors) <= 0 or len(set(factors)) != len(factors):
        raise fixed.SweepError(f"--lr-factors must be distinct positive numbers, got {args.lr_factors!r}")
    if not all(math.isfinite(f) for f in factors) or not math.isfinite(args.target_value):
        raise fixed.SweepError("--lr-factors and --target-value must be finite numbers")
    if args.budget_examples < max(batches) or args.check_examples < 0 or args.warmup_steps < 0:
        raise fixed.SweepError("--budget-examples must be at least the largest batch, --check-examples >= 0")
    if args.noise_batch and (args.noise_accum < 2 or args.noise_batch % args.noise_accum):
        raise fixed.SweepError("--noise-accum must be >= 2 and divide --noise-batch (GradCache micro-batches)")
    if args.noise_batch and args.noise_batch not in batches:
        raise fixed.SweepError(f"--noise-batch {args.noise_batch} is not one of --batch-sizes; use one, or 0 for none")
    extra = fixed.parse_set(args.overrides)
    cfg = fixed.load_config(args.config)
    for key, text in extra:
        fixed.set_key(cfg, key, text)
    from clip_jax import target as target_lib

    probe = cfg.copy_and_resolve_references()  # the target as the runs will set it: unknown metrics fail now
    probe.target.metric, probe.target.value, probe.eval_every = args.target_metric, args.target_value, 1
    target_lib.goal_of(probe)
    s = Settings(
        args.config, batches, losses, factors, args.target_metric, args.target_value, args.budget_examples,
        args.check_examples or max(4096, args.budget_examples // 64), args.lr_rule, args.base_batch or cfg.batch_size, args.base_lr or cfg.optim.lr,
        args.warmup_steps, args.control, args.noise_batch, args.noise_accum,
        tuple(extra),
    )  # fmt: skip
    return s, cfg


def describe(s: Settings) -> str:
    power = {"sqrt": "^0.5", "linear": "", "constant": "^0"}[s.lr_rule]
    return (f"{s.config}: until {s.target_metric} >= {s.target_value:g} or {s.budget_examples:,} examples; lr = "
            f"{s.base_lr:g} * (B/{s.base_batch}){power} x {{{', '.join(f'{f:g}' for f in s.factors)}}}, constant "
            f"after {s.warmup_steps} warmup steps")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.devices and not args.emit_commands and "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={args.devices}"  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    from clip_jax import config as config_lib

    try:
        s, cfg = settings(args)
        if not (args.emit_commands or args.collect):
            from clip_jax import config_checks

            config_checks.validate(cfg, args.devices or __import__("jax").device_count())
    except (fixed.SweepError, config_lib.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {describe(s)}")
    if args.emit_commands:
        print("\n".join(emit(s, args.workdir, cfg)))
        return 0
    if args.collect:
        for line in write_outputs(args.workdir, s, notes=True):
            print(line)
        return 0
    if args.dry_run:
        try:
            for run in all_runs(s, args.workdir, emit=False):
                check_spec(run, s, args.workdir)
        except fixed.SweepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for run in all_runs(s, args.workdir, emit=False):
            report = finished_report(args.workdir, run)
            state = "to train" if report is None else f"done: reached at step {reached_steps(report)}"
            state = "done: not reached" if report is not None and reached_steps(report) is None else state
            print(f"{run.name:>32}: lr {run.lr:.3g}, budget {run.budget_steps} steps, {state}")
        return 0
    return sweep(s, args.workdir, cfg)


def sweep(s: Settings, workdir: str, cfg) -> int:
    """Train every run not finished yet, in order, rewriting the CSVs and analysis after each."""
    os.makedirs(workdir, exist_ok=True)
    while True:
        try:
            runs = all_runs(s, workdir, emit=False)
            for run in runs:  # a finished run of other settings would otherwise be counted as this sweep's
                check_spec(run, s, workdir)
            todo = [r for r in runs if finished_report(workdir, r) is None]
            if not todo:
                break
            run = todo[0]
            print(f"[{len(todo)} to go] {run.name}: lr {run.lr:.3g}, budget {run.budget_steps} steps", flush=True)
            report = train_run(run, s, workdir, cfg)
        except fixed.SweepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"interrupted in {run.name} before it trained a step; re-run the same command to resume")
            return 130
        if report is None:
            print(f"interrupted in {run.name}; its checkpoint is saved: re-run the same command to resume")
            return 0
        target = report.get("target") or {}
        print(f"    {'reached at step ' + str(target['step']) if target.get('reached') else 'not reached'}; "
              f"{report['wall_s']:.0f} s", flush=True)  # fmt: skip
        write_outputs(workdir, s)
    for line in write_outputs(workdir, s):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
