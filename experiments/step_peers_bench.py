"""One CLIP train step in clip_jax against the same model in HF transformers (CLIPModel) and open_clip (CLIP).

    python experiments/step_peers_bench.py                       # issue 18's tiny CLIP, batch 256, 2 torch threads
    python experiments/step_peers_bench.py --rounds 9 --steps 2 --processes 3 \
        --json experiments/results/step_peers.jsonl
    python experiments/step_peers_bench.py --ours scan     # the layer scan (and from a checkout before issue 18)

Run it WITHOUT XLA_FLAGS device forcing: one CPU device using every core, as torch uses its threads.
The model (issue 18): image tower width 192, 4 layers, 3 heads, mlp 768, 64 px images in 8 px patches (64 tokens +
class token); text tower width 128, 4 layers, 2 heads, mlp 512, 32 tokens, vocabulary 49,408; joint dim 128; OpenAI
CLIP's layout in all three (class-token pooling, ln_pre, QuickGELU, causal text pooled at the largest token id,
projections without bias). fp32 everywhere.

Each implementation runs in its own worker process (multiprocessing, spawn), and the parent alternates them: in
one process, clip_jax's temporary buffer and torch's tensors share one malloc heap (the heap then grows again after
each torch round: 200-300k page faults per clip_jax step, measured), and torch's OpenMP threads spin for a while
after each torch op, taking the cores XLA's threads want. Each worker warms up with `--warmup` steps (compile, the
allocator reaching its size, optimizer state) before the first timed round.

Each step: forward of both towers, CLIP's symmetric softmax contrastive loss with a learnable logit scale,
backward, global-norm gradient clipping at 1.0 and AdamW (clip_jax: train.train_step jitted as train.py does, with
the state donated; torch: torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW). Each round runs every
implementation (ours: unrolled layers as configs/tiny_cpu.py, and/or the layer scan, the base default) for
`--steps` consecutive steps, so a load change on the shared machine hits all alike, and round r rotates the order
by r. In an A/A run (the same clip_jax code in two workers, 6 rounds) the worker running second read 2.0% faster
(median of the per-round ratios; per round -4.9% to +6.5%), and seven times in one session a worker took ~250k page
faults in one round, six times the one running first; a whole worker process can also run ~4% slower than another
of the same code (experiments/results/step_breakdown.md, third session), so `--processes P` splits the rounds over
P fresh sets of workers. Use a multiple of the number of implementations for `--rounds`. Each figure is the median
over rounds. Each round also records how many cores OTHER processes used meanwhile (/proc/stat minus our own CPU
time): torch's threads lose far more than XLA's when another process takes a core, so only rounds on a quiet
machine compare fairly, and those are reported separately; so are the rounds where a worker page-faulted
(`--max-faults`). The matmul floor (a 2048^3 fp32 matmul and the model's largest product, [B*65, 192] x [192, 768])
is timed in JAX and torch in the same run.
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # reference_libs: open_clip's model code without torchvision
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from reference_libs import open_clip_model_module  # noqa: E402

from clip_jax import optim, sharding, train  # noqa: E402
from clip_jax.convert import hf_config  # noqa: E402
from clip_jax.models import layers  # noqa: E402

VOCAB, CONTEXT, IMAGE, PATCH, EMBED = 49408, 32, 64, 8, 128
VISION = {"width": 192, "layers": 4, "heads": 3}
TEXT = {"width": 128, "layers": 4, "heads": 2}


def hf_clip_config():
    tower = lambda t: {
        "hidden_size": t["width"],
        "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"],
        "intermediate_size": 4 * t["width"],
        "hidden_act": "quick_gelu",
    }
    text = {**tower(TEXT), "vocab_size": VOCAB, "max_position_embeddings": CONTEXT}
    vision = {**tower(VISION), "image_size": IMAGE, "patch_size": PATCH}
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)


def open_clip_config():
    return {
        "embed_dim": EMBED,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": IMAGE,
            "patch_size": PATCH,
            "width": VISION["width"],
            "layers": VISION["layers"],
            "head_width": VISION["width"] // VISION["heads"],
        },
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, **TEXT},
    }


def data(batch: int, seed: int = 0):
    """Normalised float32 images [B, 64, 64, 3] and int32 tokens [B, 32]: a start id, random words, the end id
    (the largest id, where all three pool) at a random position, then zero padding."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = np.zeros((batch, CONTEXT), np.int32)
    for row, length in zip(tokens, rng.integers(4, CONTEXT + 1, batch)):
        row[0], row[length - 1] = VOCAB - 2, VOCAB - 1
        row[1 : length - 1] = rng.integers(1, VOCAB - 2, length - 2)
    return images, tokens


def ours_config(batch: int, scan_layers: bool = False):
    """The same CLIP as a clip_jax config (imported from the HF config, so every option matches), set up as
    configs/tiny_cpu.py sets up a CPU run: layers unrolled (model.scan_layers=False; the scan's stacked residuals
    cost ~17% of the step's CPU time here, experiments/results/step_breakdown.md)."""
    cfg = hf_config.config_from_hf(hf_clip_config().to_dict())
    cfg.batch_size, cfg.total_steps, cfg.optim.warmup_steps, cfg.optim.lr = batch, 10_000, 100, 1e-4
    cfg.model.scan_layers = scan_layers
    return cfg


class Ours:
    name = "clip_jax"

    def __init__(self, batch, images, tokens, scan_layers=False):
        cfg = ours_config(batch, scan_layers)
        mesh = sharding.make_mesh(cfg)
        opt = optim.make(cfg)
        graphdef, self.state, shardings = train.init_state(cfg, mesh, opt)
        self.step = train.compile_step(cfg, mesh, opt, graphdef, shardings)
        self.batch = sharding.put_batch({"image": images, "tokens": tokens}, mesh)
        self.params = layers.param_count(self.state["params"])

    def run(self, steps):
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready(metrics["loss"])  # one step in flight, as train.py runs on CPU
        return float(metrics["loss"])


class Torch:
    """A torch CLIP whose forward(images NCHW, tokens) gives (image features, text features, logit scale)."""

    def __init__(self, name, model, features, images, tokens):
        self.name, self.model, self.features = name, model.train(), features
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.tokens = torch.from_numpy(tokens).long()
        self.labels = torch.arange(len(tokens))
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
        self.params = sum(p.numel() for p in model.parameters())

    def run(self, steps):
        for _ in range(steps):
            img, txt, scale = self.features(self.model, self.images, self.tokens)
            img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
            logits = scale.exp() * img @ txt.T
            ce = torch.nn.functional.cross_entropy
            loss = 0.5 * (ce(logits, self.labels) + ce(logits.T, self.labels))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        return float(loss.detach())


def hf_features(model, images, tokens):
    img = model.get_image_features(pixel_values=images)
    txt = model.get_text_features(input_ids=tokens)
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # transformers 5 may return an output object
    return img, txt, model.logit_scale


def open_clip_features(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens), model.logit_scale


def matmul_rates(m, k, n, reps=5):
    """GFLOP/s of an [m, k] x [k, n] fp32 matmul in JAX and in torch (best of 3 windows of `reps`)."""
    a, b = np.random.default_rng(0).standard_normal((2, max(m, k), max(k, n)), np.float32)
    a, b = a[:m, :k], b[:k, :n]
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    jmul = jax.jit(lambda x, y: x @ y)
    ta, tb = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
    out = {}
    for name, call in (("jax", lambda: jmul(ja, jb).block_until_ready()), ("torch", lambda: ta @ tb)):
        call()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                call()
            best = min(best, (time.perf_counter() - t) / reps)
        out[name] = 2 * m * k * n / best / 1e9
    return out


def build(name, batch, threads):
    """One implementation by name, on the benchmark's data, torch limited to `threads` intra-op threads."""
    images, tokens = data(batch)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name.startswith("clip_jax"):
        impl = Ours(batch, images, tokens, scan_layers=name == "clip_jax (scan)")
    elif name == "transformers":
        impl = Torch(name, transformers.CLIPModel(hf_clip_config()), hf_features, images, tokens)
    else:
        impl = Torch(name, open_clip_model_module().CLIP(**open_clip_config()), open_clip_features, images, tokens)
    impl.name = name
    return impl


def worker(conn, name, batch, threads, warmup):
    """A worker process: builds one implementation, warms it up, then answers each `steps` request with
    (wall s, own CPU s, page faults per step, last loss); None stops it."""
    impl = build(name, batch, threads)
    impl.run(warmup)
    conn.send(impl.params)
    while (steps := conn.recv()) is not None:
        t, cpu, faults = time.perf_counter(), sum(os.times()[:2]), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = impl.run(steps)
        wall = time.perf_counter() - t
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
        conn.send((wall, sum(os.times()[:2]) - cpu, faults, loss))


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, name, batch, threads, warmup):
        ctx = multiprocessing.get_context("spawn")
        self.name, (self.conn, child) = name, ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(child, name, batch, threads, warmup), daemon=True)
        self.process.start()
        child.close()  # only the worker holds its end now, so its death reaches recv() as EOFError
        self.params = self._recv()  # after its warm-up, so the workers do not build and compile concurrently

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            sys.exit(f"the {self.name} worker died (exit code {self.process.exitcode}); its traceback is above")

    def run(self, steps):
        self.conn.send(steps)
        return self._recv()

    def close(self):
        self.conn.send(None)
        self.process.join(timeout=60)


def busy_seconds():
    """CPU seconds the whole machine has been busy (all processes, /proc/stat), or 0 where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed_rounds(workers, rounds, steps, batch, first=0):
    """{name: [examples/s per round]}, {name: [cores used by OTHER processes during that round]}, {name: [page
    faults per step in that round]}. Round r (counted from `first`) runs the workers in rotated order
    (workers[r % n:] + workers[:r % n]), so no implementation always runs first; each round is printed with the
    worker's page faults per step (0 once its heap has reached the step's size)."""
    rates, others, faults = ({w.name: [] for w in workers} for _ in range(3))
    for r in range(first, first + rounds):
        line = []
        for w in workers[r % len(workers) :] + workers[: r % len(workers)]:
            busy = busy_seconds()
            wall, cpu, per_step, loss = w.run(steps)
            rates[w.name].append(batch * steps / wall)
            others[w.name].append(max(0.0, busy_seconds() - busy - cpu) / wall)
            faults[w.name].append(per_step)
            line.append(f"{w.name} {rates[w.name][-1]:.1f}/s (others {others[w.name][-1]:.2f} cores, "
                        f"{per_step:.0f} faults/step, loss {loss:.3f})")
        print(f"round {r}: " + ", ".join(line), flush=True)
    return rates, others, faults


def report(rates, others, faults, quiet, max_faults):
    """Medians over all rounds; over the rounds where other processes used < `quiet` cores; and over those where
    also the worker itself took < `max_faults` page faults per step (the kernel had not taken its memory back)."""
    ours = next(iter(rates))
    selections = (
        ("all rounds", lambda o, f: True),
        (f"quiet rounds (others < {quiet} cores)", lambda o, f: o < quiet),
        (f"quiet rounds without page faults (< {max_faults} per step)", lambda o, f: o < quiet and f < max_faults),
    )
    for label, keep in selections:
        kept = {k: [x for x, o, f in zip(v, others[k], faults[k]) if keep(o, f)] for k, v in rates.items()}
        empty = [k for k, v in kept.items() if not v]
        if empty:
            print(f"\n{label}: none for {', '.join(empty)}")
            continue
        med = {k: statistics.median(v) for k, v in kept.items()}
        print(f"\n{label}:\n| implementation | examples/s (median) | rounds | {ours} / it |\n|---|---|---|---|")
        for k, v in kept.items():
            print(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {med[ours] / med[k]:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6, help="rounds; each runs every implementation, rotated order")
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation and round")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--processes", type=int, default=1, help="fresh worker sets, each for a share of the rounds")
    p.add_argument("--ours", default="unrolled", help="clip_jax variants, comma-separated: unrolled, scan")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps in each worker before the first round")
    p.add_argument("--quiet", type=float, default=0.25, help="quiet rounds: others use fewer cores than this")
    p.add_argument("--max-faults", type=float, default=1000, help="rounds with more faults per step: listed apart")
    p.add_argument("--json", default="", help="append one JSON line with every figure to this file")
    args = p.parse_args()
    for flag in ("batch", "rounds", "steps", "warmup", "threads", "processes"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.processes > args.rounds:
        p.error(f"--processes {args.processes} > --rounds {args.rounds}: each worker set needs a round")
    if jax.device_count() != 1:
        p.error(f"{jax.device_count()} JAX devices: run without XLA_FLAGS device forcing (one CPU device)")
    variants = {"unrolled": "clip_jax", "scan": "clip_jax (scan)"}
    chosen = args.ours.split(",")
    unknown = set(chosen) - set(variants)
    if unknown or len(set(chosen)) != len(chosen):
        p.error(f"--ours {args.ours!r}: give each of {sorted(variants)} at most once, comma-separated")
    names = [variants[v] for v in args.ours.split(",")] + ["transformers", "open_clip"]
    rates, others, faults = ({name: [] for name in names} for _ in range(3))
    done = 0
    for worker_set in range(args.processes):  # fresh worker processes for each share of the rounds
        rounds = args.rounds * (worker_set + 1) // args.processes - done
        workers = [Worker(name, args.batch, args.threads, args.warmup) for name in names]
        counts = {w.name: w.params for w in workers}
        print(f"worker set {worker_set}: parameters {counts}", flush=True)
        measured = timed_rounds(workers, rounds, args.steps, args.batch, done)
        for whole, part in zip((rates, others, faults), measured):
            for name, values in part.items():
                whole[name] += values
        for w in workers:
            w.close()
        done += rounds
    report(rates, others, faults, args.quiet, args.max_faults)
    torch.set_num_threads(args.threads)
    floor = {"2048^3": matmul_rates(2048, 2048, 2048)}
    floor["model"] = matmul_rates(args.batch * ((IMAGE // PATCH) ** 2 + 1), VISION["width"], 4 * VISION["width"])
    for k, v in floor.items():
        print(f"matmul {k}: jax {v['jax']:.1f} GFLOP/s, torch {v['torch']:.1f} GFLOP/s")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "a") as f:
            row = {"batch": args.batch, "threads": args.threads, "params": counts, "rates": rates}
            row.update(others=others, faults=faults, order="rotated", processes=args.processes)
            f.write(json.dumps({**row, "matmul_gflops": floor, "time": time.time()}) + "\n")


if __name__ == "__main__":
    main()
