"""Training input straight from webdataset tar shards: index cost and memory, and examples/s by worker count.

    .venv/bin/python experiments/shard_bench.py [--photos 1024] [--per_shard 128] [--batch 64] [--batches 12]
                                                [--workers 0 1 2] [--index_members 200000]

1. Index at scale: one shard of `--index_members` tiny members (a 1-byte image and a caption each) is indexed cold,
   then loaded from its cache; prints members/s, the bytes per member in memory (the memory-mapped rows, shared by
   grain's worker processes) and on disk (the cached .npz), and the memory per million members.
2. End to end: the photo corpus of experiments/input_bench.py (JPEG crops of real photos, 320-800 px on the longer
   side) written as tar shards, then the full 224 px training path from them (read -> decode -> random-resized crop
   -> flip -> uint8 batch -> CLIP BPE tokens) with 0, 1, 2 grain worker processes, and the same corpus prepared into
   ArrayRecord (data/prepare_local.py), read the same way in the same run: the ratio tar / ArrayRecord.
"""

import argparse
import io
import os
import resource
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))



def write_shards(folder: str, out: str, per_shard: int) -> str:
    """The input_bench photo folder as webdataset shards <out>/<000000>.tar; returns the brace pattern."""
    import json

    with open(os.path.join(folder, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    os.makedirs(out, exist_ok=True)
    count = -(-len(rows) // per_shard)
    for s in range(count):
        with tarfile.open(os.path.join(out, f"{s:06d}.tar"), "w") as tar:
            for i, row in enumerate(rows[s * per_shard : (s + 1) * per_shard]):
                key = f"{s * per_shard + i:09d}"
                with open(os.path.join(folder, row["file_name"]), "rb") as f:
                    parts = {"jpg": f.read(), "txt": row["caption"].encode()}
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(out, f"{{000000..{count - 1:06d}}}.tar")


def index_at_scale(folder: str, members: int) -> None:
    from clip_jax.input import shards

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"big{members}.tar")
    if not os.path.exists(path):
        with tarfile.open(path, "w") as tar:
            for i in range(members):
                for ext, data in (("jpg", b"\xff"), ("txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    index_dir = os.path.join(folder, f"index-{time.time_ns()}")
    start = time.perf_counter()
    rows, _ = shards.load_index(path, index_dir)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    rows, _ = shards.load_index(path, index_dir)
    warm = time.perf_counter() - start
    disk = sum(os.path.getsize(os.path.join(index_dir, f)) for f in os.listdir(index_dir))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"index of one {os.path.getsize(path) / 2**20:.0f} MiB shard of {len(rows)} samples:")
    print(f"  built in {cold:.2f} s ({len(rows) / cold:,.0f} samples/s), loaded from its cache in {warm:.3f} s")
    print(f"  memory {rows.nbytes / len(rows):.0f} B/sample = {rows.nbytes / len(rows):.0f} MB per million samples")
    print(f"  cache on disk {disk / len(rows):.1f} B/sample; process max RSS so far {rss / 1024:.0f} MiB")


def rate(args, workers: int, **data) -> float:
    import tiny_cpu

    from clip_jax.input import pipeline

    cfg = tiny_cpu.get_config()
    cfg.data.cache, cfg.data.train_crop, cfg.data.flip, cfg.data.num_workers = False, "inception", True, workers
    cfg.data.update(data)
    cfg.batch_size, cfg.model.image.image_size = args.batch, 224
    cfg.tokenizer.kind, cfg.model.text.vocab_size, cfg.model.text.max_len = "clip_bpe", 49408, 77
    cfg.model.text.eos_id, cfg.model.text.pad_id = 49407, 0
    import input_bench

    return input_bench.time_iterator(pipeline.train_iterator(cfg), args.batch, args.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1024)
    parser.add_argument("--per_shard", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--index_members", type=int, default=200_000)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "clip_jax_shard_bench"))
    args = parser.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (their defaults suffice)
    import input_bench

    from clip_jax import datasets

    datasets.tfds.disable_progress_bar()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores; batch {args.batch}, {args.batches} batches per figure")
    index_at_scale(args.dir, args.index_members)

    folder, data_dir = os.path.join(args.dir, "photos"), os.path.join(args.dir, "tfds")
    if not os.path.isfile(os.path.join(folder, "captions.jsonl")):
        input_bench.make_corpus(folder, args.photos)
    pattern = write_shards(folder, os.path.join(args.dir, f"tars{args.per_shard}"), args.per_shard)
    datasets.prepare_local("webdataset", pattern, f"bench{args.per_shard}", data_dir)
    print(f"{args.photos} JPEG photos (320-800 px) in shards of {args.per_shard}: {pattern}")
    print("workers  tar shards ex/s  ArrayRecord ex/s  tar/ArrayRecord")
    for w in args.workers:
        tar = rate(args, w, shards=pattern, data_dir=data_dir)
        copy = rate(args, w, name=f"webdataset/bench{args.per_shard}", data_dir=data_dir)
        print(f"{w:7d}  {tar:15.1f}  {copy:16.1f}  {tar / copy:15.2f}")


if __name__ == "__main__":  # grain worker processes re-import this module: nothing may run on import
    main()
