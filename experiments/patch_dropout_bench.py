"""FLIP patch dropout's train-step speed-up: examples/s of the same train step with model.image.patch_dropout =
0, 0.5, 0.75 (or --ps), measured in one run, with the ratio to p = 0.

    python experiments/patch_dropout_bench.py --out experiments/results/patch_dropout_cpu.md

Models (--models): 'tiny128' is configs/tiny_cpu.py (two layers, width 96, 8-pixel patches) at 128 px: 256 patches
where the shipped 32 px config has 16; 's16' is a ViT-S/16 image tower at 224 px (196 patches) beside the same tiny
text tower, so the image tower dominates the step as in real CLIP training.

The p values are timed in turns (round-robin, --rounds rounds of --steps steps each), so load from other processes
on a shared machine falls on all of them alike; a row reports the median examples/s and the median of the per-round
ratios to p = 0. 'ideal' is the model-flop ratio (experiments/train_step_bench.py's count with the image tower at
keep + cls tokens): the speed-up if time followed flops. Run it without XLA_FLAGS (one CPU device, all cores).
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

import jax  # noqa: E402
import numpy as np  # noqa: E402

import train_step_bench  # noqa: E402
from clip_jax import optim, sharding, train  # noqa: E402
from clip_jax.models import layers  # noqa: E402

# Overrides of configs/tiny_cpu.py's model.image; -1 takes the size from the variant.
MODELS = {
    "tiny128": dict(image_size=128),
    "s16": dict(image_size=224, variant="S/16", width=-1, depth=-1, mlp_dim=-1, num_heads=-1),
}


def config(model: str, p: float, batch: int):
    cfg = train_step_bench.load_config("configs/tiny_cpu.py")
    cfg.batch_size, cfg.model.image.patch_dropout = batch, p
    for key, value in MODELS[model].items():
        cfg.model.image[key] = value
    return cfg


def model_flops(cfg) -> float:
    """Forward + backward model flops of one step with the image tower at keep (+ cls) tokens."""
    img = layers.tower_dims(cfg.model.image, with_patch=True)
    n = (cfg.model.image.image_size // img["patch_size"]) ** 2
    keep = max(1, int(n * (1 - cfg.model.image.patch_dropout)))
    txt = layers.tower_dims(cfg.model.text, with_patch=False)
    fwd = train_step_bench.tower_flops(img, keep + (cfg.model.image.pool == "cls"), cfg.model.embed_dim, True)
    fwd += 2 * n * img["patch_size"] ** 2 * 3 * img["width"]  # every patch is embedded before the drop
    fwd += train_step_bench.tower_flops(txt, cfg.model.text.max_len, cfg.model.embed_dim, True)
    return 3 * fwd * cfg.batch_size


def compiled_step(cfg):
    """(compiled step, state, batch) on random data; every p starts from the same parameters (same seed)."""
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, state, shardings = train.init_state(cfg, mesh, opt)
    s, b, rng = cfg.model.image.image_size, cfg.batch_size, np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),  # as the train pipeline sends it
        "tokens": rng.integers(3, cfg.model.text.vocab_size, (b, cfg.model.text.max_len)).astype(np.int32),
    }
    batch = sharding.put_batch(batch, mesh)
    step = train.compile_step(cfg, mesh, opt, graphdef, shardings).lower(state, batch).compile()
    state, m = step(state, batch)  # warm-up
    jax.block_until_ready(m)
    return step, state, batch


def bench(model: str, ps, batch: int, rounds: int, steps: int) -> list[dict]:
    runs = {p: list(compiled_step(config(model, p, batch))) for p in ps}
    rates = {p: [] for p in ps}
    for _ in range(rounds):
        for p in ps:
            step, state, b = runs[p]
            t = time.perf_counter()
            for _ in range(steps):
                state, m = step(state, b)
            jax.block_until_ready(m)
            rates[p].append(batch * steps / (time.perf_counter() - t))
            runs[p][1] = state
    flops0 = model_flops(config(model, ps[0], batch))
    return [
        {
            "model": model,
            "p": p,
            "examples_per_s": statistics.median(rates[p]),
            "ratio": statistics.median(r / r0 for r, r0 in zip(rates[p], rates[ps[0]])),
            "ideal": flops0 / model_flops(config(model, p, batch)),
            "spread": (min(rates[p]), max(rates[p])),
        }
        for p in ps
    ]


def cpu_seconds() -> dict:
    """pid -> (name, user + system CPU seconds) of every process (Linux /proc)."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    devices = f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    return f"{name}, {os.cpu_count()} cores; JAX {jax.__version__} on {devices}"


def others(before: dict, after: dict, wall: float) -> str:
    """The busiest other processes over the run, as % of one core."""
    me = os.getpid()
    used = [(after[p][1] - before[p][1], after[p][0], p) for p in after if p in before and p != me]
    top = sorted(used, reverse=True)[:4]
    return ", ".join(f"{name} (pid {pid}) {100 * s / wall:.0f}%" for s, name, pid in top)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny128,s16")
    ap.add_argument("--ps", default="0,0.5,0.75")
    ap.add_argument("--batch", default="64,16", help="global batch per model, in --models order")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    ps = [float(p) for p in args.ps.split(",")]
    t0, before, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()
    rows = []
    for model, batch in zip(args.models.split(","), map(int, args.batch.split(","))):
        rows += bench(model, ps, batch, args.rounds, args.steps)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()
    lines = [
        "# FLIP patch dropout: train-step examples/s on CPU",
        "",
        f"Machine: {machine()}. Load average (1 / 5 / 15 min) {'/'.join(f'{x:.2f}' for x in load0)} at the start, "
        f"{'/'.join(f'{x:.2f}' for x in load1)} at the end; busiest other processes over the {wall:.0f} s run "
        f"(% of one core): {others(before, cpu_seconds(), wall)} (processes of other containers are not visible "
        "here; the load average counts them).",
        f"Command: `python experiments/patch_dropout_bench.py {' '.join(sys.argv[1:])}`",
        "",
        "| model | batch | patch_dropout | examples/s (median) | min..max | speed-up vs p=0 | ideal (flops) |",
        "|---|---|---|---|---|---|---|",
    ]
    batches = dict(zip(args.models.split(","), map(int, args.batch.split(","))))
    for r in rows:
        lo, hi = r["spread"]
        lines.append(
            f"| {r['model']} | {batches[r['model']]} | {r['p']} | {r['examples_per_s']:.1f} | {lo:.1f}..{hi:.1f} "
            f"| {r['ratio']:.2f} | {r['ideal']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
