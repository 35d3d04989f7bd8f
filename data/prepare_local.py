"""Prepares a local image-text corpus into a tfds data_dir (ArrayRecord), once; later runs reuse it.

    python data/prepare_local.py folder /data/pets --name pets --data_dir ./tfds_data
    python data/prepare_local.py webdataset '/data/laion/{00000..00099}.tar' --name laion --data_dir ./tfds_data

A folder holds images and captions.jsonl / metadata.jsonl / captions.csv; webdataset takes tar shards as a path,
glob or brace range like {00000..00099} (or train from them in place, without this step: data.shards). Train on it with
--config.data.name=image_text_folder/NAME (or webdataset/NAME) --config.data.data_dir=DATA_DIR.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_jax import datasets  # after the sys.path line: a checkout runs without installing

KINDS = {"folder": "image_text_folder", "webdataset": "webdataset"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("source", help="the folder, or a glob of .tar shards")
    parser.add_argument("--name", required=True, help="the corpus's name (the tfds builder config)")
    parser.add_argument("--data_dir", default="./tfds_data")
    args = parser.parse_args(argv)
    source = args.source  # brace ranges and globs: expanded by clip_jax.input.shards.expand, local or remote
    datasets.tfds.disable_progress_bar()
    wall = time.perf_counter()
    builder = datasets.prepare_local(KINDS[args.kind], source, args.name, args.data_dir)
    n = builder.info.splits["train"].num_examples
    print(f"{KINDS[args.kind]}/{args.name} in {builder.data_dir}: train={n}; {time.perf_counter() - wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
