"""Per-device memory of the compiled loss value-and-grad: ring losses vs all-gather (n x B) vs naive (B x B).

    python experiments/loss_memory.py --devices 8 --dim 512 --batches 4096,16384,65536,262144,1048576 --json
    python experiments/loss_memory.py --devices 32 --dim 768 --batches 65536,262144,1048576,4194304 --json
    python experiments/loss_memory.py --plot    # loss_memory.{png,md,json} from the runs' loss_memory_D*_d*.json

Nothing runs: every step is lowered from jax.ShapeDtypeStruct inputs with their shardings and compiled for D
simulated CPU devices, and XLA's memory analysis of the compiled per-device program is read (temp = everything
the step allocates besides its arguments and outputs; arguments are the local img/txt, outputs their grads).
Methods:
  ours-softmax / ours-sigmoid   impl="ring" with the default tile
  allgather-*                   impl="allgather": n_local x B logits per device (open_clip's local loss)
  naive-*                       the dense reference under jit with sharded inputs: XLA partitions the B x B logits
Compiling needs no memory of the sizes it reports, so by default every method is compiled at every size; with
--max-logits-bytes a method whose logits per device would exceed that is not compiled and is reported as skipped.
"""

import argparse
import os
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batches", default="4096,16384,65536,262144,1048576")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--platform",
        default="cpu",
        choices=("cpu", "gpu"),
        help="gpu: compile for the real accelerators present (--devices must not exceed their count)",
    )
    p.add_argument("--flat-n", type=int, default=32768, help="n_local of the flatness-in-D table")
    p.add_argument("--flat-devices", default="4,8,16,32", help="ring sizes of the flatness-in-D table ('' = skip)")
    p.add_argument(
        "--max-logits-bytes",
        type=float,
        default=float("inf"),
        help="skip (do not compile) methods whose logits per device would exceed this many bytes",
    )
    p.add_argument(
        "--run",
        action="store_true",
        help="also run ours once per size, record the device's peak_bytes_in_use (GPU)",
    )
    p.add_argument("--peak-of", default="", help=argparse.SUPPRESS)  # internal: METHOD:BATCH, see measured_peak
    p.add_argument("--json", action="store_true", help="also write experiments/results/loss_memory_D{D}_d{d}.*")
    p.add_argument(
        "--plot",
        action="store_true",
        help="only gather the CPU runs' JSON into experiments/results/loss_memory.{png,md,json}",
    )
    return p.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.platform == "cpu":  # the device count must be fixed before jax is imported
    flat = [int(d) for d in ARGS.flat_devices.split(",") if d]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max([ARGS.devices, *flat])}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import glob
import json
import re
import subprocess
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clip_jax import losses
from clip_jax.losses import reference

AXES = ("data", "fsdp")
RESULTS = os.path.join(os.path.dirname(__file__), "results")
GIB = 2**30
METHODS = (
    "ours-softmax",
    "ours-sigmoid",
    "allgather-softmax",
    "allgather-sigmoid",
    "naive-softmax",
    "naive-sigmoid",
)


def loss_fn(method, mesh):
    family, kind = method.split("-")
    if family == "naive":
        if kind == "softmax":
            return lambda x, y, lt, b: reference.softmax_loss(x, y, lt)
        return reference.sigmoid_loss
    impl = "ring" if family == "ours" else "allgather"
    return lambda x, y, lt, b: losses.contrastive_loss(x, y, lt, b, kind=kind, mesh=mesh, impl=impl)


def logits_bytes(method, batch, devices, dim):
    """fp32 bytes of the method's largest logits block per device (what decides whether to compile it)."""
    n = batch // devices
    family = method.split("-")[0]
    rows = {"ours": losses.default_tile(n, dim), "allgather": n, "naive": batch}[family]
    return 4.0 * rows * (n if family == "ours" else batch)


def measure(method, batch, devices, dim, dtype, max_logits, run=False):
    row = {
        "method": method,
        "batch": batch,
        "devices": devices,
        "dim": dim,
        "dtype": dtype,
        "n_local": batch // devices,
        "logits_bytes": logits_bytes(method, batch, devices, dim),
    }
    if method.startswith("ours"):
        row["tile"] = losses.default_tile(batch // devices, dim)
    if row["logits_bytes"] > max_logits:
        row["skipped"] = f"logits alone {row['logits_bytes'] / GIB:.0f} GiB per device; not compiled"
        return row
    mesh = jax.make_mesh((devices, 1), AXES, axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:devices])
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.dtype(dtype), sharding=NamedSharding(mesh, P(AXES, None)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    step = jax.jit(jax.value_and_grad(loss_fn(method, mesh), argnums=(0, 1, 2, 3)))
    t0 = time.perf_counter()
    mem = step.lower(emb, emb, scalar, scalar).compile().memory_analysis()
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["temp_bytes"] = mem.temp_size_in_bytes
    row["total_bytes"] = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    if run and method.startswith("ours"):
        row["peak_bytes_in_use"] = measured_peak(method, batch)
    return row


def measured_peak(method, batch):
    """Run one step in a fresh process and return its device's peak_bytes_in_use.

    A fresh process because the peak never resets, and XLA:GPU's autotuner allocates real operands while
    compiling: after compiling the all-gather baseline the peak would be its GEMM's, not ours.
    """
    cmd = [
        sys.executable,
        __file__,
        "--platform",
        ARGS.platform,
        "--devices",
        str(ARGS.devices),
        "--dim",
        str(ARGS.dim),
        "--dtype",
        ARGS.dtype,
        "--peak-of",
        f"{method}:{batch}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes_in_use"]


def run_for_peak(spec, args):
    method, batch = spec.split(":")
    batch = int(batch)
    mesh = jax.make_mesh(
        (args.devices, 1), AXES, axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[: args.devices]
    )
    zeros = jnp.zeros((batch, args.dim), args.dtype, device=NamedSharding(mesh, P(AXES, None)))
    step = jax.jit(jax.value_and_grad(loss_fn(method, mesh), argnums=(0, 1, 2, 3)))
    jax.block_until_ready(step(zeros, zeros, jnp.float32(0.0), jnp.float32(0.0)))
    print(json.dumps({"peak_bytes_in_use": max(d.memory_stats()["peak_bytes_in_use"] for d in mesh.devices.flat)}))


def fmt(nbytes):
    return "-" if nbytes is None else f"{nbytes / GIB:.3f}"


def tables(rows, flat_rows, args):
    batches = sorted({r["batch"] for r in rows})
    by = {(r["method"], r["batch"]): r for r in rows}
    backend = "XLA:CPU" if args.platform == "cpu" else jax.devices()[0].device_kind
    out = [
        (
            f"Per-device temp GiB of the compiled value-and-grad, D={args.devices}, d={args.dim}, {args.dtype} "
            f"({backend} memory analysis; arguments + outputs, the local embeddings and their gradients, are "
            f"{fmt(2 * 2 * (batches[0] // args.devices) * args.dim * jnp.dtype(args.dtype).itemsize)} GiB at "
            f"B={batches[0]} and scale with n_local). 'skip' = not compiled, see the note below."
        ),
        "",
        "| method | " + " | ".join(f"B={b}" for b in batches) + " |",
        "|---" * (len(batches) + 1) + "|",
    ]
    for m in METHODS:
        cells = [("skip" if "skipped" in by[m, b] else fmt(by[m, b].get("temp_bytes"))) for b in batches]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in METHODS[:2]:
        cells = [fmt(by[m, b]["total_bytes"]) for b in batches]
        out.append(f"| {m} temp+args+outputs | " + " | ".join(cells) + " |")
        if args.run:
            cells = [fmt(by[m, b].get("peak_bytes_in_use")) for b in batches]
            out.append(f"| {m} measured device peak | " + " | ".join(cells) + " |")
    tiles = [str(losses.default_tile(b // args.devices, args.dim)) for b in batches]
    out.append("| ours tile | " + " | ".join(tiles) + " |")
    for b in batches:
        for kind in ("softmax", "sigmoid"):
            ours, ag = by[f"ours-{kind}", b], by[f"allgather-{kind}", b]
            if "temp_bytes" in ag:
                out.append(f"\nB={b} {kind}: allgather / ours temp = {ag['temp_bytes'] / ours['temp_bytes']:.1f}x")
    skipped = [f"{r['method']} B={r['batch']}: {r['skipped']}" for r in rows if "skipped" in r]
    if skipped:
        out += ["", "Skipped: " + "; ".join(skipped)]
    if flat_rows:
        out += [
            "",
            f"Flatness in D at fixed n_local={args.flat_n}, d={args.dim} (temp GiB, ours):",
            "",
            "| D | B | softmax | sigmoid |",
            "|---|---|---|---|",
        ]
        for d in sorted({r["devices"] for r in flat_rows}):
            cell = {r["method"]: r for r in flat_rows if r["devices"] == d}
            out.append(
                f"| {d} | {d * args.flat_n} | {fmt(cell['ours-softmax']['temp_bytes'])} | "
                f"{fmt(cell['ours-sigmoid']['temp_bytes'])} |"
            )
        for kind in ("softmax", "sigmoid"):
            temps = [r["temp_bytes"] for r in flat_rows if r["method"] == f"ours-{kind}"]
            out.append(f"\n{kind}: max/min over D = {max(temps) / min(temps):.3f}")
    return "\n".join(out) + "\n"


def plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(
        f
        for f in glob.glob(os.path.join(RESULTS, "loss_memory_D*_d*.json"))
        if re.fullmatch(r"loss_memory_D\d+_d\d+(_bfloat16)?\.json", os.path.basename(f))
    )  # CPU runs
    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 4.5), squeeze=False)
    for ax, path in zip(axes[0], files):
        with open(path) as f:
            data = json.load(f)
        for m in METHODS:
            pts = [
                (r["batch"], r["temp_bytes"] / GIB) for r in data["rows"] if r["method"] == m and "temp_bytes" in r
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="--" if "sigmoid" in m else "-", label=m)
        a = data["args"]
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="global batch B",
            ylabel="per-device temp GiB (value+grad)",
            title=f"D={a['devices']} devices, d={a['dim']}, {a['dtype']}",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "loss_memory.png"), dpi=120)
    # One results page: every per-configuration table, in the order of the plot, then the plot.
    pages = []
    for path in files:
        with open(path[:-5] + ".md") as f:
            pages.append(f.read())
    with open(os.path.join(RESULTS, "loss_memory.md"), "w") as f:
        f.write("# Loss memory: ring vs all-gather vs naive\n\n" + "\n".join(pages) + "\n![](loss_memory.png)\n")
    runs = []
    for path in files:
        with open(path) as f:
            runs.append(json.load(f))
    with open(os.path.join(RESULTS, "loss_memory.json"), "w") as f:
        json.dump(runs, f, indent=1)
    print("wrote loss_memory.png, loss_memory.md, loss_memory.json in", RESULTS)


def main(args):
    if args.plot:
        return plot()
    if args.peak_of:
        return run_for_peak(args.peak_of, args)
    rows, flat_rows = [], []
    for batch in (int(b) for b in args.batches.split(",")):
        for m in METHODS:
            rows.append(measure(m, batch, args.devices, args.dim, args.dtype, args.max_logits_bytes, args.run))
            print(json.dumps(rows[-1]), flush=True)
    for devices in (int(d) for d in args.flat_devices.split(",") if d):
        for m in ("ours-softmax", "ours-sigmoid"):
            batch = devices * args.flat_n
            flat_rows.append(measure(m, batch, devices, args.dim, args.dtype, args.max_logits_bytes))
            print(json.dumps(flat_rows[-1]), flush=True)
    text = tables(rows, flat_rows, args)
    print(text)
    if args.json:
        os.makedirs(RESULTS, exist_ok=True)
        where = "" if args.platform == "cpu" else "_" + jax.devices()[0].device_kind.replace(" ", "_")
        where += "" if args.dtype == "float32" else "_" + args.dtype
        stem = os.path.join(RESULTS, f"loss_memory_D{args.devices}_d{args.dim}{where}")
        command = "python experiments/loss_memory.py " + " ".join(sys.argv[1:])
        with open(stem + ".json", "w") as f:
            json.dump({"command": command, "args": vars(args), "rows": rows, "flat": flat_rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(f"`{command}`\n\n{text}")


if __name__ == "__main__":
    main(ARGS)
