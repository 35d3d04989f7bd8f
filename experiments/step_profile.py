"""Where one clip_jax train step's time goes on this device: per-op times from a jax.profiler trace, grouped.

    python experiments/step_profile.py --model peers          # issue 18's tiny CLIP (step_peers_bench.py), B=256
    python experiments/step_profile.py --model tiny_cpu       # configs/tiny_cpu.py, B=128
    python experiments/step_profile.py --model peers --top 40 --hlo /tmp/hlo.txt
    python experiments/step_profile.py --impl transformers   # the same model's torch step, for comparison

Runs without XLA_FLAGS device forcing (one CPU device). Traces `--steps` steps (after warm-up), reads the
Perfetto JSON the profiler writes, and sums the duration of every XLA op event (on CPU: one event per thunk, i.e.
per fusion / custom call / copy of the optimised HLO) by group. The groups come from the optimised HLO's op names
and fusion kinds (the compiled module's text: a fusion's root and its "kind"), so a fusion that does a matmul
counts as a matmul whatever its name. Page faults and user/kernel CPU time per step come from getrusage around
the untraced steps. The host gap is the step's wall time minus the summed op time (ops on
different threads overlap, so it can be negative). With --hlo the optimised HLO text is written there.

`--impl transformers` / `--impl open_clip` profile the torch peers of step_peers_bench.py on the peers model with
torch.profiler instead: each aten op's self time on the calling thread (torch's intra-op threads work inside
it, so that is its wall time), summed into the nearest of the same groups by op name. torch fuses attention into
one kernel (scaled_dot_product_attention), so its scores, softmax and values share one group; its plain `mul` and
`sum` ops (part of quick_gelu and of the bias gradients) land in "other".
"""

import argparse
import ast
import collections
import functools
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from clip_jax import optim, sharding, train  # noqa: E402


def peers_config(batch):
    import step_peers_bench as peers  # noqa: PLC0415  (imports torch and transformers: only for this model)

    cfg = peers.ours_config(batch or 256)
    images, tokens = peers.data(cfg.batch_size)
    return cfg, {"image": images, "tokens": tokens}


def tiny_config(batch):
    import train_step_bench  # noqa: PLC0415

    cfg = train_step_bench.load_config("configs/tiny_cpu.py")
    cfg.batch_size = batch or 128
    rng, s = np.random.default_rng(0), cfg.model.image.image_size
    images = rng.integers(0, 256, (cfg.batch_size, s, s, 3)).astype(np.uint8)  # as the train pipeline sends
    tokens = rng.integers(3, cfg.model.text.vocab_size, (cfg.batch_size, cfg.model.text.max_len)).astype(np.int32)
    return cfg, {"image": images, "tokens": tokens}


MODELS = {"peers": peers_config, "tiny_cpu": tiny_config}


def hlo_ops(hlo_text):
    """{instruction name: a description} for every instruction of the optimised HLO module: its opcode, and for a
    fusion its kind plus the opcodes inside its computation (so 'fusion' with a dot inside reads as a matmul)."""
    comps, current = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            current = comps.setdefault(m.group(1), [])
            continue
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if m and current is not None:
            current.append((m.group(1), m.group(2), line))
    ops = {}
    for body in comps.values():
        for name, opcode, line in body:
            desc = opcode
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if called and called.group(1) in comps:
                inner = {op for _, op, _ in comps[called.group(1)]}
                desc = opcode + ":" + ",".join(sorted(inner - {"parameter", "constant"}))
            kind = re.search(r"kind=(\w+)", line)
            ops[name] = (desc, kind.group(1) if kind else "", line)
    return ops


# torch op name fragment -> group, first match wins (see the module docstring for what cannot be split).
TORCH_GROUPS = (
    (("scaled_dot_product", "flash_attention"), "attention (fused kernel: scores, softmax, values)"),
    (("layer_norm",), "layernorm"),
    (("::mm", "addmm", "bmm", "convolution", "::linear"), "matmul: weights"),
    (("sigmoid", "gelu"), "mlp activation"),
    (("lerp", "addcdiv", "addcmul", "sqrt", "foreach", "optimizer", "vector_norm", "clamp", "::div"),
     "optimizer update (AdamW, clipping)"),
    (("cross_entropy", "log_softmax", "nll_loss", "normalize"), "loss"),
    (("embedding", "index", "gather", "scatter"), "gather/scatter (embedding, pooling)"),
)
TORCH_MOVES = {
    f"aten::{op}"
    for op in ("copy_", "clone", "contiguous", "cat", "fill_", "zero_", "empty", "empty_like", "permute", "t",
               "transpose", "view", "expand", "as_strided", "reshape", "slice", "select", "unsqueeze", "stack",
               "squeeze")
}


def torch_group(op):
    if op in TORCH_MOVES:
        return "copies, transposes, broadcasts"
    low = op.lower()
    return next((g for keys, g in TORCH_GROUPS if any(k in low for k in keys)), "other elementwise / reduce")


def torch_profile(name, batch, steps, warmup, top):
    """Per-op-group times of one torch peer's train step (step_peers_bench.Torch) with torch.profiler."""
    import step_peers_bench as peers  # noqa: PLC0415
    import torch  # noqa: PLC0415

    impl = peers.build(name, batch or 256, os.cpu_count())
    impl.run(warmup)
    t = time.perf_counter()
    impl.run(steps)
    wall = (time.perf_counter() - t) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        impl.run(steps)
    per_op = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    groups = collections.Counter()
    for op, ms in per_op.items():
        groups[torch_group(op)] += ms
    total = sum(groups.values())
    print(f"{name} B={len(impl.tokens)} threads={torch.get_num_threads()}: step {1e3 * wall:.1f} ms untraced "
          f"({len(impl.tokens) / wall:.1f} examples/s); ops {total:.1f} ms; load {os.getloadavg()[0]:.2f}")
    print("| group | ms / step | share of op time |")
    print("|---|---|---|")
    for g, ms in groups.most_common():
        print(f"| {g} | {ms:.1f} | {ms / total:.1%} |")
    print(f"\ntop {top} ops:")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{ms:7.2f} ms  {torch_group(op)[:24]:24s} {op}")


MOVES = {"bitcast", "copy", "transpose", "slice", "concatenate", "dynamic-slice", "dynamic-update-slice",
         "broadcast", "reshape", "pad"}


def group(name, ops):
    """The breakdown group of one op event, from its fused opcodes and its op_name (JAX's name stack: the model's
    named scopes 'attention', 'mlp/activation', 'layernorm', and train.py's 'loss' and 'optimizer')."""
    desc, _, line = ops.get(name, ("?", "", ""))
    meta = re.search(r'op_name="([^"]*)"', line)
    where = meta.group(1) if meta else ""
    inner = set(desc.partition(":")[2].split(",")) if ":" in desc else {desc}
    if "optimizer" in where:
        return "optimizer update (AdamW, clipping, finite check)"
    if re.search(r"[/(]loss[/)]", where):  # train.total_loss's scope: 'jvp(loss)/...', 'transpose(jvp(loss))/...'
        return "loss"
    if inner & {"dot", "convolution"}:
        if re.search(r"bqhk,bshk|bhqs,bshk", where):
            return "matmul: attention scores and values"
        return "matmul: weights"
    if inner <= MOVES:
        return "copies, transposes, broadcasts"
    if "layernorm" in where:
        return "layernorm"
    if "activation" in where:
        return "mlp activation"
    if "attention" in where:
        return "attention softmax, mask, bias"
    if inner & {"gather", "scatter"}:
        return "gather/scatter (embedding, pooling)"
    return "other elementwise / reduce"


def trace_events(logdir):
    path = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
    path = path or glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not path:
        sys.exit(f"no trace JSON under {logdir}")
    with gzip.open(path[0]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="peers", choices=sorted(MODELS))
    p.add_argument("--impl", default="clip_jax", choices=("clip_jax", "transformers", "open_clip"),
                   help="a torch peer profiles the peers model's torch step instead (needs the [bench] extra)")
    p.add_argument("--batch", type=int, default=0, help="0: the model's default (peers 256, tiny_cpu 128)")
    p.add_argument("--remat", default="none")
    p.add_argument("--set", action="append", default=[], help="a config override, e.g. model.scan_layers=False")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (the heap grows to the step's size)")
    p.add_argument("--top", type=int, default=25, help="also list the N most expensive ops")
    p.add_argument("--hlo", default="", help="write the optimised HLO text here")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 1:
        p.error(f"--steps {args.steps} --warmup {args.warmup}: both must be at least 1")
    if args.impl != "clip_jax":
        if args.model != "peers":
            p.error("--impl transformers/open_clip profiles the peers model only")
        if args.set or args.hlo or args.remat != "none":
            p.error("--set, --hlo and --remat apply to clip_jax only; drop them with --impl " + args.impl)
        return torch_profile(args.impl, args.batch, args.steps, args.warmup, args.top)
    cfg, host_batch = MODELS[args.model](args.batch)
    cfg.model.remat = args.remat
    for item in args.set:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = functools.reduce(lambda c, k: c[k], path, cfg)
        node[last] = ast.literal_eval(value) if not isinstance(node[last], str) else value
    mesh = sharding.make_mesh(cfg)
    opt = optim.make(cfg)
    graphdef, state, shardings = train.init_state(cfg, mesh, opt)
    batch = sharding.put_batch(host_batch, mesh)
    compiled = train.compile_step(cfg, mesh, opt, graphdef, shardings).lower(state, batch).compile()
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    ops = hlo_ops(hlo)
    for _ in range(args.warmup):
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    t, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):  # one step at a time, as train.py runs on CPU (two in flight hold two heaps)
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    wall = (time.perf_counter() - t) / args.steps
    after = resource.getrusage(resource.RUSAGE_SELF)
    per_step = {k: (getattr(after, k) - getattr(usage, k)) / args.steps for k in ("ru_minflt", "ru_utime", "ru_stime")}
    logdir = tempfile.mkdtemp(prefix="step_profile_")
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
    per_op = collections.Counter()
    for e in trace_events(logdir):
        if e.get("ph") == "X" and e.get("name") in ops:
            per_op[e["name"]] += e["dur"] / 1e3 / args.steps  # us -> ms per step
    groups = collections.Counter()
    for name, ms in per_op.items():
        groups[group(name, ops)] += ms
    total = sum(groups.values())
    temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
    print(f"{args.model} B={cfg.batch_size} remat={args.remat}: step {1e3 * wall:.1f} ms untraced "
          f"({cfg.batch_size / wall:.1f} examples/s); ops {total:.1f} ms; load {os.getloadavg()[0]:.2f}")
    print(f"per step: {per_step['ru_minflt']:.0f} page faults, CPU {per_step['ru_utime']:.2f} s user + "
          f"{per_step['ru_stime']:.2f} s kernel; temp buffer {temp_gib:.2f} GiB")
    print("| group | ms / step | share of op time |")
    print("|---|---|---|")
    for g, ms in groups.most_common():
        print(f"| {g} | {ms:.1f} | {ms / total:.1%} |")
    print(f"| host gap (wall - ops) | {1e3 * wall - total:.1f} | |")
    print(f"\ntop {args.top} ops:")
    for name, ms in per_op.most_common(args.top):
        desc, kind, line = ops[name]
        meta = re.search(r'op_name="([^"]*)"', line)
        shape = line.split("=")[1].split(" ")[1] if "=" in line else ""
        where = (meta.group(1) if meta else "")[-70:]
        print(f"{ms:7.2f} ms  {group(name, ops)[:24]:24s} {name:32s} {desc[:44]:44s} {shape[:32]:32s} {where}")


if __name__ == "__main__":
    main()
