r"""Batch-size scaling sweep: train one config at several global batch sizes, same examples seen, both losses.

    python experiments/batch_size_sweep.py --workdir workdirs/sweep            # the default grid (see DEFAULTS)
    python experiments/batch_size_sweep.py --workdir workdirs/sweep --dry-run  # the plan and each point's state
    python experiments/batch_size_sweep.py --config configs/siglip_b16.py --batch-sizes 4096,16384,65536 \
        --examples-seen 3000000000 --base-batch 32768 --emit-commands --workdir gs://bucket/sweep

Each point (loss, batch B) trains the config with total_steps = examples_seen / B, the peak learning rate scaled
from (base batch, base lr) by --lr-rule, warmup a fixed fraction of the steps, and the loss's usual init (CLIP:
log t = log(1/0.07), bias 0; SigLIP: log t = log 10, bias -10). Everything else comes from the config.

Points live in <workdir>/<loss>_b<B>/: a point with a result.json is finished and skipped; one without resumes
from its latest checkpoint (train.run does that), so re-running the same command after an interruption (Ctrl-C,
SIGTERM, kill) continues where it stopped. <workdir>/sweep.csv holds one row per finished point (the plan, wall
time and every final numeric metric of the report), <workdir>/sweep.png the final zero-shot top-1 (and retrieval
R@1 when the report has it) against log2 batch, one curve per loss, with a least-squares trend in log2 B.

--emit-commands prints one `python -m clip_jax.main train ...` line per point instead of training, so the same
sweep runs on a cluster (each line is resumable the same way).
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import sweep_results  # experiments/ is on sys.path when this file runs as a script

# This checkout's clip_jax, not whichever one the venv has installed (a script's sys.path starts at experiments/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The default sweep, sized to finish within ~50 minutes on an idle 2-core CPU (estimate and how it was measured:
# the README's sweep section): 8 batches x 2 losses, 131,072 examples each (32 steps at B=4096, 4,096 at B=32) of
# the tiny model with one layer per tower.
DEFAULTS = {
    "config": "configs/tiny_cpu.py:sweep",
    "batch_sizes": "32,64,128,256,512,1024,2048,4096",
    "losses": "softmax,sigmoid",
    "examples_seen": 131072,
}
LR_RULES = ("sqrt", "linear", "constant")
LOSS_INIT = {  # (model.log_t_init, model.bias_init): CLIP's temperature 0.07; SigLIP's t=10, b=-10
    "softmax": (math.log(1 / 0.07), 0.0),
    "sigmoid": (math.log(10.0), -10.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULTS["config"], help="config file, path[:arg]")
    p.add_argument("--batch-sizes", default=DEFAULTS["batch_sizes"], help="comma list of global batch sizes")
    p.add_argument("--losses", default=DEFAULTS["losses"], help="comma list of softmax, sigmoid")
    p.add_argument("--examples-seen", type=int, default=DEFAULTS["examples_seen"], help="per point")
    p.add_argument("--workdir", required=True, help="one subfolder per point, plus sweep.csv and sweep.png")
    p.add_argument("--lr-rule", default="sqrt", choices=LR_RULES, help="peak lr = base_lr * (B/base_batch)^p")
    p.add_argument("--base-batch", type=int, default=0, help="batch at which lr = base lr (0: the config's)")
    p.add_argument("--base-lr", type=float, default=0.0, help="peak lr at the base batch (0: the config's)")
    p.add_argument("--warmup-frac", type=float, default=-1, help="warmup steps / steps (-1: the config's ratio)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every point (repeatable), e.g. --set model.image.depth=1",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=0,
        help="devices the batch is split over. Training on CPU: simulate this many (0: what JAX finds, 1 on "
        "CPU). With --emit-commands: the target's count, to skip batches it cannot split (0: no check)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and each point's state; train nothing")
    p.add_argument("--emit-commands", action="store_true", help="print one train command per point; train nothing")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Point:
    loss: str
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    skip: str = ""  # why this point cannot run ('' = it can)

    @property
    def name(self) -> str:
        return f"{self.loss}_b{self.batch_size}"

    @property
    def examples_seen(self) -> int:
        return self.steps * self.batch_size


def scaled_lr(batch: int, rule: str, base_batch: int, base_lr: float) -> float:
    """Peak lr for `batch`: sqrt (Adam's rule, lr ~ sqrt(B)), linear (SGD's, lr ~ B) or constant."""
    power = {"sqrt": 0.5, "linear": 1.0, "constant": 0.0}[rule]
    return base_lr * (batch / base_batch) ** power


def steps_for(examples_seen: int, batch: int) -> int:
    """Optimizer steps so every point sees (as nearly as whole batches allow) the same number of examples."""
    return max(0, round(examples_seen / batch))


def plan(batch_sizes, losses, examples_seen, *, rule, base_batch, base_lr, warmup_frac, num_devices=0) -> list:
    """The sweep's points in run order: every loss at the smallest batch first, so a partial sweep already compares
    the losses over a range of batches."""
    points = []
    for batch in batch_sizes:
        steps = steps_for(examples_seen, batch)
        lr = scaled_lr(batch, rule, base_batch, base_lr)
        skip = ""
        if num_devices and batch % num_devices:
            skip = f"batch {batch} does not divide over the {num_devices} devices"
        elif batch > examples_seen:
            skip = f"batch {batch} is more than the {examples_seen} examples seen"
        for loss in losses:
            warmup = min(steps, round(warmup_frac * steps))
            points.append(Point(loss, batch, steps, lr, warmup, skip))
    return points


def point_overrides(point: Point) -> dict:
    """The config keys a point changes (the single source for in-process runs and for --emit-commands)."""
    log_t, bias = LOSS_INIT[point.loss]
    return {
        "batch_size": point.batch_size,
        "total_steps": point.steps,
        "optim.lr": point.lr,
        "optim.warmup_steps": point.warmup_steps,
        "loss.kind": point.loss,
        "model.log_t_init": log_t,
        "model.bias_init": bias,
    }


def format_value(value) -> str:
    """A config value as absl's flag parser reads it back exactly (repr keeps every digit of a float)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def parse_set(items) -> list[tuple[str, str]]:
    """--set KEY=VALUE items -> [(key, text)], checked against base()'s keys and types like the CLI does."""
    from clip_jax import cli_checks
    from clip_jax import config as config_lib

    pairs = []
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise config_lib.ConfigError(f"--set {item!r} is not KEY=VALUE")
        cli_checks.check_override_keys([f"--config.{key}={text}"])
        pairs.append((key, text))
    return pairs


def set_key(cfg, key: str, value) -> None:
    """cfg[a][b] = value for key 'a.b'; text is converted to the type of the value it replaces."""
    node = cfg
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    old = node[last]
    if isinstance(value, str) and not isinstance(old, str):
        if isinstance(old, bool):
            value = value.lower() in ("true", "t", "1")
        else:
            value = type(old)(value)
    node[last] = value


def load_config(spec: str):
    """`path[:arg]` -> the config file's get_config(arg), as `--config=` would load it."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SweepError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([arg] if arg else []))


def point_config(base_cfg, point: Point, extra: list):
    """The config one point trains: the base config, the --set overrides, then the point's own keys. Periodic
    evaluation is off (only the final one counts) and checkpoints come about 4 times per point so an interrupted
    point loses little."""
    cfg = base_cfg.copy_and_resolve_references()
    for key, text in extra:
        set_key(cfg, key, text)
    for key, value in point_overrides(point).items():
        set_key(cfg, key, value)
    cfg.eval_every = 0
    cfg.ckpt_every = max(1, point.steps // 4)
    cfg.log_every = max(1, min(cfg.log_every, point.steps // 10))
    return cfg


def emit_commands(config_spec: str, points, workdir: str, extra: list) -> list[str]:
    """One resumable CLI train command per runnable point (checkpoint and eval cadence stay the config's)."""
    import shlex

    lines = []
    for p in points:
        if p.skip:
            lines.append(f"# skipped {p.name}: {p.skip}")
            continue
        flags = [f"--config={config_spec}"]
        flags += [f"--config.{k}={v}" for k, v in extra]
        flags += [f"--config.{k}={format_value(v)}" for k, v in point_overrides(p).items()]
        flags.append(f"--workdir={os.path.join(workdir, p.name)}")
        lines.append(" ".join(["python", "-m", "clip_jax.main", "train"] + [shlex.quote(f) for f in flags]))
    return lines


PLAN_COLUMNS = (
    "loss", "batch_size", "steps", "examples_seen", "lr", "lr_rule", "base_batch", "base_lr", "warmup_steps",
    "wall_s",
)  # fmt: skip


class SweepError(RuntimeError):
    """The sweep cannot go on as asked; the message says why and what to do."""


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written result that would count as finished


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def checkpoint_steps(point_dir: str) -> list[int]:
    ckpts = os.path.join(point_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []


def run_point(base_cfg, point: Point, workdir: str, spec: dict, extra: list) -> dict | None:
    """Train one point (or resume it) and return its CSV row; a finished point's row is read back instead.
    Returns None when training was preempted (SIGTERM/SIGINT): its checkpoint is saved and a re-run resumes it."""
    point_dir = os.path.join(workdir, point.name)
    result_path, spec_path = os.path.join(point_dir, "result.json"), os.path.join(point_dir, "point.json")
    os.makedirs(point_dir, exist_ok=True)
    # A point folder left by a sweep with other settings must not be resumed (or reported) as this one.
    if os.path.exists(spec_path) and _read_json(spec_path) != spec:
        raise SweepError(
            f"{point_dir} holds a point of a different sweep (its point.json differs from this one's: "
            f"{_spec_diff(_read_json(spec_path), spec)}); use another --workdir or delete that folder"
        )
    if os.path.exists(result_path):
        return _read_json(result_path)
    _write_json(spec_path, spec)
    from clip_jax import train

    wall_path = os.path.join(point_dir, "wall_partial.json")
    earlier = _read_json(wall_path)["wall_s"] if os.path.exists(wall_path) else 0.0
    start = time.perf_counter()
    report = train.run(point_config(base_cfg, point, extra), point_dir)
    wall = earlier + time.perf_counter() - start  # an interrupted point's earlier calls count too
    if report.get("preempted") or report["step"] != point.steps:  # stopped early: a checkpoint, not a result
        _write_json(wall_path, {"wall_s": wall})
        return None
    row = {k: spec[k] for k in PLAN_COLUMNS if k in spec}
    # The report's own 'lr' is the schedule's last value; plan columns keep the plan's meaning.
    metrics = sweep_results.flat_metrics(report)
    row.update({(f"final_{k}" if k in PLAN_COLUMNS else k): v for k, v in metrics.items()})
    row.update(wall_s=round(wall, 1))
    _write_json(result_path, row)
    return row


def _spec_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def point_spec(point: Point, args, base_batch: int, base_lr: float, extra: list) -> dict:
    """What identifies a point's run: its plan row plus the sweep settings that shaped it."""
    return {
        "loss": point.loss,
        "batch_size": point.batch_size,
        "steps": point.steps,
        "examples_seen": point.examples_seen,
        "lr": point.lr,
        "lr_rule": args.lr_rule,
        "base_batch": base_batch,
        "base_lr": base_lr,
        "warmup_steps": point.warmup_steps,
        "config": args.config,
        "overrides": [f"{k}={v}" for k, v in extra],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.devices and not args.emit_commands and "jax" not in sys.modules:
        # Simulated CPU devices must be set before jax is imported (on an accelerator host this flag is inert).
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    from clip_jax import config as config_lib

    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        losses = [x.strip() for x in args.losses.split(",") if x.strip()]
        bad = [x for x in losses if x not in LOSS_INIT]
        if bad or not losses or not batches or min(batches) < 1:
            raise SweepError(f"--losses must name {' and/or '.join(LOSS_INIT)} and --batch-sizes positive ints")
        if args.examples_seen < 1:
            raise SweepError("--examples-seen must be positive")
        extra = parse_set(args.overrides)
        base_cfg = load_config(args.config)
        for key, text in extra:
            set_key(base_cfg, key, text)
    except (SweepError, config_lib.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base_batch = args.base_batch or base_cfg.batch_size
    base_lr = args.base_lr or base_cfg.optim.lr
    warmup_frac = args.warmup_frac if args.warmup_frac >= 0 else base_cfg.optim.warmup_steps / base_cfg.total_steps
    if args.emit_commands:
        num_devices = args.devices
    else:
        import jax

        num_devices = jax.device_count()
    points = plan(
        batches, losses, args.examples_seen, rule=args.lr_rule, base_batch=base_batch, base_lr=base_lr,
        warmup_frac=warmup_frac, num_devices=num_devices,
    )  # fmt: skip
    power = {"sqrt": "^0.5", "linear": "", "constant": "^0"}[args.lr_rule]
    rule = (
        f"lr rule '{args.lr_rule}': peak lr = {base_lr:g} * (B / {base_batch}){power}; warmup {warmup_frac:.1%} "
        f"of each point's steps; {args.examples_seen:,} examples seen per point"
    )
    print(f"# {args.config}: {rule}" + (f"; {num_devices} device(s)" if num_devices else ""))
    if args.emit_commands:
        print("\n".join(emit_commands(args.config, points, args.workdir, extra)))
        return 0
    for p in points:
        if p.skip:
            print(f"skipped {p.name}: {p.skip}")
    todo = [p for p in points if not p.skip]
    if args.dry_run:
        for p in todo:
            pdir = os.path.join(args.workdir, p.name)
            ckpts = checkpoint_steps(pdir)
            state = (
                "done" if os.path.exists(os.path.join(pdir, "result.json"))
                else f"resumes at step {ckpts[-1]}" if ckpts else "to train"
            )  # fmt: skip
            print(f"{p.name:>16}: {p.steps:6d} steps, lr {p.lr:.3g}, warmup {p.warmup_steps}, {state}")
        return 0
    return run_sweep(args, base_cfg, todo, extra, base_batch, base_lr, rule)


def run_sweep(args, base_cfg, points, extra, base_batch, base_lr, rule) -> int:
    os.makedirs(args.workdir, exist_ok=True)
    csv_path, rows = os.path.join(args.workdir, "sweep.csv"), []
    for i, p in enumerate(points):
        finished = os.path.exists(os.path.join(args.workdir, p.name, "result.json"))
        print(
            f"[{i + 1}/{len(points)}] {p.name}: {p.steps} steps, lr {p.lr:.3g}" + (" (done)" if finished else "")
        )
        spec = point_spec(p, args, base_batch, base_lr, extra)
        try:
            row = run_point(base_cfg, p, args.workdir, spec, extra)
        except SweepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # before training started (restore, compile): nothing new to save
            print(f"interrupted in {p.name} before it trained a step; re-run the same command to resume")
            return 130
        if row is None:
            sweep_results.write_csv(csv_path, rows, PLAN_COLUMNS)
            print(f"interrupted in {p.name}; its checkpoint is saved: re-run the same command to resume")
            return 0
        rows.append(row)
        # After every point, so a long sweep's partial results are readable.
        sweep_results.write_csv(csv_path, rows, PLAN_COLUMNS)
        if not finished:
            shown = ", ".join(f"{c} {row[c]:.1f}" for c in sweep_results.plot_columns(row))
            print(f"    {shown or 'no evaluation metrics'}; {row['wall_s']:.0f} s")
    print(f"wrote {csv_path} ({len(rows)} points)")
    if rows and sweep_results.plot_columns({k for r in rows for k in r}):
        png = os.path.join(args.workdir, "sweep.png")
        for line in sweep_results.plot(rows, png, f"{args.config}; {rule}"):
            print("trend " + line)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
