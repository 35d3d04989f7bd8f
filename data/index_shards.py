"""Indexes webdataset tar shards ahead of training from them in place (data.shards), with many threads at once.

    python data/index_shards.py 'gs://bucket/laion/{000000..099999}.tar' --data_dir gs://bucket/tfds --threads 64

Optional: a run indexes the shards it lacks an index for when it starts (each host starting at its own share).
Doing it once beforehand, on one machine close to the data, makes the first start of a pod run as quick as the
others. Writes one index file per shard to --index_dir (default <data_dir>/shard_index, where data.shards looks
by default) and prints the totals: samples, what damage left out, the time taken.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etils import epath

from clip_jax.input import shards  # after the sys.path line: a checkout runs without installing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="tar shards: a path, glob or {000..099} brace range (local or remote)")
    parser.add_argument("--data_dir", default="tfds_data", help="the run's data.data_dir")
    parser.add_argument("--index_dir", default="", help="the run's data.shard_index_dir ('' = <data_dir>/shard_index)")
    parser.add_argument("--threads", type=int, default=32, help="shards indexed at once (reads wait on storage)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads={args.threads}; give a positive number of threads")
    index_dir = args.index_dir or os.path.join(args.data_dir, "shard_index")
    try:  # writing the indexes is this tool's only job: an index directory it cannot write is an error here
        probe = epath.Path(index_dir) / f".write_test.{os.getpid()}"
        epath.Path(index_dir).mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        print(f"error: cannot write shard indexes to {index_dir} ({e}); pick another --index_dir", file=sys.stderr)
        return 2
    wall = time.perf_counter()
    try:
        paths = shards.expand(args.shards)
        indexes, counts = shards.load_indexes(paths, index_dir, threads=args.threads)
    except shards.ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples = sum(len(rows) for rows in indexes)
    damage = {k: counts[k] for k in shards.DAMAGE_KINDS if counts[k]} or "none"
    print(
        f"{len(paths)} shards, {samples} samples indexed in {index_dir} ({time.perf_counter() - wall:.1f} s); "
        f"left out or converted: {damage}; index memory {shards.ROW.itemsize * samples / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
