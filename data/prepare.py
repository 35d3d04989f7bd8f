"""Prepares the embedded and demo datasets offline (idempotent: reuses prepared data).

    python data/prepare.py --name clip_shapes --data_dir ./tfds_data
    python data/prepare.py --name demo --data_dir ./tfds_data     # clip_fashion_mnist, clip_emoji, clip_skimage
    python data/prepare.py --name all --data_dir ./tfds_data [--config 64px]

The demo sets read Debian packages (dataset-fashion-mnist, fonts-noto-color-emoji): the installed files, or a
copy fetched once with `apt-get download` and unpacked under DATA_DIR/downloads/debian (no root needed), and
scikit-image's bundled photos (`pip install -e .[demo]`).

Prints, per dataset, the split sizes and the time taken (wall and CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Run from a checkout without installing: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_jax import datasets  # pylint: disable=g-import-not-at-top


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="clip_shapes", choices=sorted(datasets.BUILDERS) + ["all", "demo"])
    parser.add_argument("--data_dir", default="./tfds_data")
    parser.add_argument("--config", default=None, help="builder config name (default: the builder's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.config and args.name in ("all", "demo"):
        raise SystemExit("--config names one builder's config; use it with a single --name")
    # One summary line per dataset instead of tqdm bars in logs.
    datasets.tfds.disable_progress_bar()
    names = {"all": sorted(datasets.BUILDERS), "demo": list(datasets.DEMO)}.get(args.name, [args.name])
    for name in names:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            builder = datasets.prepare(name, args.data_dir, args.config)
        except datasets.PREPARE_ERRORS as e:
            print(f"error: {name}: {e}", file=sys.stderr, flush=True)
            return 2
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        counts = ", ".join(f"{split}={info.num_examples}" for split, info in builder.info.splits.items())
        print(
            f"{builder.info.full_name} in {builder.data_dir}: {counts}; {wall:.1f} s wall, {cpu:.1f} s CPU",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
