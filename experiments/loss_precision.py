"""fp32 accuracy of the contrastive losses against float64, beside open_clip's fp32 losses on the same inputs.

    python experiments/loss_precision.py            # prints a markdown table
    python experiments/loss_precision.py --out experiments/results/loss_precision.md

Inputs: B=64, d=32 unit embeddings; text = image + noise * N(0, I) (noise 1.0: positive cosines ~0.73, a trained
model's batch; 1.5: ~0.59; none: independent texts), at t in {1, 10, 100}. Each cell is the relative error
max |fp32 - float64| / max |float64| of the loss value or of a gradient (dx, dy, dlog_t; for sigmoid also dbias),
the worst over the value and all gradients. Rows: clip_jax's ring loss (8 simulated devices, default tile), its
all-gather baseline, and open_clip 3.3's ClipLoss / SigLipLoss in fp32 torch. The float64 reference is the
literal formula with hand-written gradients (tests/test_loss_precision.py checks it equals open_clip's loss in
float64 to 1e-12). Needs torch and open-clip-torch (`make test` installs both).
"""

import argparse
import math
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax
import jax.numpy as jnp
import torch
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from reference_libs import open_clip_module
from test_loss_precision import bias_for, embeddings, float64_reference, rel_err

from clip_jax import losses

AXES = ("data", "fsdp")
ALIGNMENTS = (("trained (noise 1.0)", 1.0), ("trained (noise 1.5)", 1.5), ("random", None))
TEMPERATURES = (1.0, 10.0, 100.0)


def ours(kind, impl):
    mesh = jax.make_mesh((8, 1), AXES, axis_types=(AxisType.Auto,) * 2)
    shard = NamedSharding(mesh, P(AXES, None))
    loss = lambda x, y, lt, b: losses.contrastive_loss(x, y, lt, b, kind=kind, mesh=mesh, impl=impl)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    def run(x, y, t):
        v, g = fn(jax.device_put(x, shard), jax.device_put(y, shard), jnp.float32(math.log(t)), bias_for(t))
        return (v, *g)

    return run


def open_clip_fp32(kind):
    loss_mod = open_clip_module("loss")

    def run(x, y, t):
        xt, yt = (torch.tensor(a, requires_grad=True) for a in (x, y))
        log_t = torch.tensor(math.log(t), dtype=torch.float32, requires_grad=True)
        bias = torch.tensor(bias_for(t), dtype=torch.float32, requires_grad=True)
        if kind == "softmax":
            value = loss_mod.ClipLoss()(xt, yt, log_t.exp())
        else:
            value = loss_mod.SigLipLoss()(xt, yt, log_t.exp(), bias)
        value.backward()
        dbias = bias.grad.item() if bias.grad is not None else 0.0  # ClipLoss has no bias
        return value.item(), xt.grad.numpy(), yt.grad.numpy(), log_t.grad.item(), dbias

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="also write the table to this file")
    args = p.parse_args()
    header = "| loss | implementation | " + " | ".join(f"{a}, t={t:g}" for a, _ in ALIGNMENTS for t in TEMPERATURES)
    lines = [header + " |", "|---|---|" + "---|" * (len(ALIGNMENTS) * len(TEMPERATURES))]
    for kind in ("softmax", "sigmoid"):
        values = []
        for _, noise in ALIGNMENTS:
            x, y = embeddings(noise)
            values += [f"{float64_reference(kind, x, y, t, bias_for(t))[0]:.2g}" for t in TEMPERATURES]
        lines.append(f"| {kind} | (float64 loss value) | " + " | ".join(values) + " |")
        runs = {"clip_jax ring": ours(kind, "ring"), "clip_jax all-gather": ours(kind, "allgather")}
        runs["open_clip fp32"] = open_clip_fp32(kind)
        for name, run in runs.items():
            cells = []
            for _, noise in ALIGNMENTS:
                x, y = embeddings(noise)
                for t in TEMPERATURES:
                    ref = float64_reference(kind, x, y, t, bias_for(t))
                    got = run(x, y, t)
                    n = 5 if kind == "sigmoid" else 4
                    cells.append(f"{max(rel_err(a, r) for a, r in zip(got[:n], ref[:n])):.1e}")
            lines.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{__doc__.split(chr(10))[0]}\n\n{table}\n")


if __name__ == "__main__":
    main()
