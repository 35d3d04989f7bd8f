"""Per-device memory of the compiled train step (no allocation, no run): per remat policy, dtype and accum_steps,
and the largest per-device batch that fits a memory budget (16 and 80 GiB) for ViT-B/16 and ViT-L/14 CLIP.

    python experiments/train_step_memory.py --models B/16,L/14 --remat none,dots,full --budgets 16,80
    python experiments/train_step_memory.py --models B/16 --accum 1,2,4,8 --batch-per-device 256

Everything is compiled from abstract shapes (ShapeDtypeStruct with shardings) for the devices present: on this
machine 8 simulated CPU devices, mesh data=1 x fsdp=8 (parameters and moments sharded over all 8, ZeRO-3 style).
Per-device bytes = XLA temp + arguments + outputs - donated aliases (memory_analysis of the compiled step).

Largest batch: memory is affine in the per-device batch (activations and loss buffers grow with it, the state
does not), so two compiles give the line, the budget gives the batch, and a third compile at that batch checks
the prediction. XLA:CPU assigns buffers differently from XLA:GPU/TPU, so treat these as estimates of the step's
needs; the H100 row in train_step_h100.md gives one cross-check.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402

from clip_jax import optim, sharding, train  # noqa: E402
from clip_jax.models import two_tower  # noqa: E402
from configs import clip_b16  # noqa: E402

GIB = 2**30


def model_config(name: str, remat: str, dtype: str, per_device: int, accum: int):
    """CLIP B/16 (configs/clip_b16.py), or L/14 with CLIP's sizes (text width 768 x 12, joint dim 768)."""
    n = jax.device_count()
    cfg = clip_b16.get_config(str(per_device * n))
    if name == "L/14":
        cfg.model.image.variant, cfg.model.text.variant, cfg.model.embed_dim = "L/14", "B", 768
    elif name != "B/16":
        raise SystemExit(f"--models takes B/16 and L/14, got {name!r}")
    cfg.mesh.data, cfg.mesh.fsdp = 1, n
    cfg.model.remat, cfg.model.dtype, cfg.accum_steps = remat, dtype, accum
    return cfg


def step_bytes(cfg) -> dict:
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
        for k, v in train.abstract_batch(cfg).items()
    }
    t = time.perf_counter()
    mem = train.compile_step(cfg, mesh, opt, graphdef, shardings).lower(state, batch).compile().memory_analysis()
    total = (
        mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    )
    return {
        "per_device_gib": total / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "args_gib": mem.argument_size_in_bytes / GIB,
        "params_m": two_tower.param_count(abstract["params"]) / 1e6,
        "compile_s": time.perf_counter() - t,
    }


def largest_batch(name, remat, dtype, budgets, probe=(8, 32)) -> list[dict]:
    a, b = (step_bytes(model_config(name, remat, dtype, p, 1))["per_device_gib"] for p in probe)
    slope = (b - a) / (probe[1] - probe[0])  # GiB per example per device
    fixed = a - slope * probe[0]
    rows = []
    for budget in budgets:
        fit = int((budget - fixed) / slope) // 8 * 8  # a multiple of 8 (tile- and MXU-friendly)
        check = step_bytes(model_config(name, remat, dtype, fit, 1)) if fit > 0 else {"per_device_gib": fixed}
        rows.append(
            dict(model=name, remat=remat, dtype=dtype, budget_gib=budget, batch_per_device=fit,
                 gib_per_example=slope, fixed_gib=fixed, compiled_gib_at_fit=check["per_device_gib"])
        )  # fmt: skip
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="B/16,L/14")
    p.add_argument("--remat", default="none,dots,full")
    p.add_argument("--dtype", default="bfloat16,float32")
    p.add_argument("--accum", default="1")
    p.add_argument("--batch-per-device", type=int, default=64, help="for the table (0 = no table)")
    p.add_argument("--budgets", default="16,80", help="GiB per device for the largest-batch search ('' = skip)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(
        f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}); mesh data=1 x fsdp={jax.device_count()}"
    )
    rows = []
    print("\n| model | params M | dtype | remat | accum | batch/device | per-device GiB | temp GiB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(",") if args.batch_per_device else []:
        for dtype in args.dtype.split(","):
            for remat in args.remat.split(","):
                for accum in map(int, args.accum.split(",")):
                    cfg = model_config(name, remat, dtype, args.batch_per_device, accum)
                    r = step_bytes(cfg)
                    r.update(
                        model=name, dtype=dtype, remat=remat, accum=accum, batch_per_device=args.batch_per_device
                    )
                    rows.append(r)
                    print(
                        f"| {name} | {r['params_m']:.1f} | {dtype} | {remat} | {accum} | {args.batch_per_device} | "
                        f"{r['per_device_gib']:.2f} | {r['temp_gib']:.2f} | {r['compile_s']:.0f} |",
                        flush=True,
                    )
    if args.budgets:
        budgets = [float(b) for b in args.budgets.split(",")]
        print(
            "\n| model | dtype | remat | budget GiB | largest batch/device | GiB/example | fixed GiB | compiled GiB at it |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name in args.models.split(","):
            for dtype in args.dtype.split(","):
                for remat in args.remat.split(","):
                    for r in largest_batch(name, remat, dtype, budgets):
                        rows.append(r)
                        print(
                            f"| {name} | {dtype} | {remat} | {r['budget_gib']:.0f} | {r['batch_per_device']} | "
                            f"{r['gib_per_example']:.4f} | {r['fixed_gib']:.2f} | {r['compiled_gib_at_fit']:.2f} |",
                            flush=True,
                        )
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
