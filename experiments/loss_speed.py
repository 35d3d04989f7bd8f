"""Wall time of the ring losses vs the all-gather baseline and vs a plain-matmul floor.

    python experiments/loss_speed.py --json            # 8 simulated CPU devices -> results/loss_speed.{md,json}
    python experiments/loss_speed.py --tiles 64,256,1024 --batches 8192
    python3 experiments/loss_speed.py --platform gpu --dtype bfloat16 --batches 8192,16384,32768,65536 \
        --tiles 1024,4096 --reps 5 --json --out loss_speed_h100_bf16     # on the real accelerators present

For each (kind, batch) it times one jitted value-and-grad step (best of --reps interleaved runs after a warm-up) of
  ours      impl="ring" with the default tile, and with every --tiles that divides n_local
  allgather impl="allgather" (n_local x B logits, plain autodiff)
  matmul    the same flops as the ring's minimum, 8 * B^2 * d / D per device, done as plain [n, d] x [d, n]
            matmuls (D steps x 4 products: forward logits, recomputed logits, dx, dy), with the text block
            hopping the ring between steps (so XLA cannot hoist the matmuls) and no elementwise work.
All three run in the same process on the same mesh, so the ratios are like for like. The sigmoid ring computes
its gradients in its one pass (6 * B^2 * d / D flops, see clip_jax/losses/sigmoid.py), so it can beat the 8x floor.
On CPU the D simulated devices share this machine's cores: only the ratios mean anything beyond this machine.
"""

import argparse
import os
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (--platform cpu only)")
    p.add_argument(
        "--platform",
        default="cpu",
        choices=("cpu", "gpu"),
        help="gpu: use the real accelerators present (D = their count) instead of simulated CPUs",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batches", default="1024,2048,4096")
    p.add_argument("--kinds", default="softmax,sigmoid")
    p.add_argument("--tiles", default="", help="comma list of tiles to time for ours besides the default tile")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="also write experiments/results/<--out>.{md,json}")
    p.add_argument("--out", default="loss_speed", help="results file stem")
    return p.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.platform == "cpu":  # the device count must be fixed before jax is imported
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clip_jax import losses

AXES = ("data", "fsdp")
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def best_times(fns, reps):
    """{name: fastest of `reps` timed calls}, calls interleaved round-robin after one warm-up call each.

    The machine is shared (other jobs come and go), so the minimum over interleaved rounds is the figure least
    disturbed by them, and a slow spell hits every method alike instead of whichever ran during it.
    """
    failed = {}
    for name, (fn, args) in fns.items():
        try:
            jax.block_until_ready(fn(*args))  # compile + warm-up
        except jax.errors.JaxRuntimeError as e:  # out of memory: the baseline cannot run at this size
            failed[name] = None
            print(f"# {name}: {str(e).splitlines()[0][:160]}", flush=True)
    best = {name: float("inf") for name in fns if name not in failed}
    for _ in range(reps):
        for name, (fn, args) in fns.items():
            if name in failed:
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best | failed


def loss_step(kind, mesh, impl, tile):
    def loss(x, y, lt, b):
        return losses.contrastive_loss(x, y, lt, b, kind=kind, mesh=mesh, impl=impl, tile=tile)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def matmul_floor(mesh, devices):
    """Per device: D ring steps x 4 [n,d]x[d,n] matmuls = 8 * n * B * d flops, and nothing else.

    The text block hops the ring between steps as in ours: without a value that changes per step XLA hoists the
    loop-invariant matmuls out of the loop and the "floor" would do 1/D of the work.
    """
    perm = [(i, (i + 1) % devices) for i in range(devices)]

    def mm(a, b):  # a @ b.T with fp32 accumulation, operands in the embedding dtype, as the loss does
        return lax.dot_general(a.astype(b.dtype), b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def local(x, y):
        def body(_, carry):
            y_blk, acc = carry
            logits, again = mm(x, y_blk), mm(y_blk, x)
            dx, dy = mm(logits, y_blk.T), mm(again, x.T)
            acc = acc + jnp.sum(logits) + jnp.sum(again) + jnp.sum(dx) + jnp.sum(dy)
            return lax.ppermute(y_blk, AXES, perm), acc

        zero = lax.pcast(jnp.zeros((), jnp.float32), AXES, to="varying")
        return lax.psum(lax.fori_loop(0, devices, body, (y, zero))[1], AXES)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXES, None),) * 2, out_specs=P()))


def bench(kind, batch, args, mesh):
    rng = np.random.default_rng(0)
    shard = NamedSharding(mesh, P(AXES, None))
    emb = [rng.standard_normal((batch, args.dim)).astype(np.float32) for _ in range(2)]
    x, y = (jax.device_put((e / np.linalg.norm(e, axis=1, keepdims=True)).astype(args.dtype), shard) for e in emb)
    scalars = (jnp.float32(np.log(10.0)), jnp.float32(-10.0))
    devices = mesh.devices.size
    n = batch // devices
    asked = {int(t) for t in args.tiles.split(",") if t and n % int(t) == 0}
    tiles = sorted({losses.default_tile(n, args.dim)} | asked)
    row = {
        "kind": kind,
        "batch": batch,
        "n_local": n,
        "dim": args.dim,
        "devices": devices,
        "dtype": args.dtype,
        "device_kind": jax.devices()[0].device_kind,
    }
    fns = {
        "allgather": (loss_step(kind, mesh, "allgather", None), (x, y, *scalars)),
        "matmul": (matmul_floor(mesh, devices), (x, y)),
    }
    fns |= {tile: (loss_step(kind, mesh, "ring", tile), (x, y, *scalars)) for tile in tiles}
    times = best_times(fns, args.reps)
    row["allgather_s"], row["matmul_s"] = times.pop("allgather"), times.pop("matmul")
    row["ours_s"] = times
    ok = {t: v for t, v in row["ours_s"].items() if v is not None}
    best = min(ok, key=ok.get) if ok else None
    row["default_tile"], row["best_tile"] = losses.default_tile(n, args.dim), best
    row["flops_per_device"] = 8 * batch * batch * args.dim / devices
    return row


def markdown(rows, args):
    where = (
        f"XLA:CPU, {len(jax.devices())} simulated devices on {os.cpu_count()} {platform.machine()} cores"
        if args.platform == "cpu"
        else f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
    )
    lines = [
        (
            f"Machine: {where}, jax {jax.__version__}, d={args.dim}, {args.dtype} embeddings, value-and-grad "
            f"step, best of {args.reps} interleaved runs."
        ),
        "",
        "| kind | B | n_local | tile | ours s | allgather s | matmul s | ours/allgather | ours/matmul |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def secs(v):
        return "OOM" if v is None else f"{v:.4f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    for r in rows:
        for tile, s in r["ours_s"].items():
            mark = " (default)" if tile == r["default_tile"] else ""
            lines.append(
                f"| {r['kind']} | {r['batch']} | {r['n_local']} | {tile}{mark} | {secs(s)} | "
                f"{secs(r['allgather_s'])} | {secs(r['matmul_s'])} | {ratio(s, r['allgather_s'])} | "
                f"{ratio(s, r['matmul_s'])} |"
            )
    return "\n".join(lines) + "\n"


def main(args):
    devices = args.devices if args.platform == "cpu" else jax.device_count()
    mesh = jax.make_mesh((devices, 1), AXES, axis_types=(AxisType.Auto,) * 2)
    rows = []
    for kind in args.kinds.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(bench(kind, batch, args, mesh))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, args)
    print(table)
    if args.json:
        os.makedirs(RESULTS, exist_ok=True)
        command = "python experiments/loss_speed.py " + " ".join(sys.argv[1:])
        with open(os.path.join(RESULTS, args.out + ".md"), "w") as f:
            f.write(f"# Loss speed: ring vs all-gather vs matmul floor\n\n`{command}`\n\n{table}")
        with open(os.path.join(RESULTS, args.out + ".json"), "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(ARGS)
