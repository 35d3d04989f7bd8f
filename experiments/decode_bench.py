"""Per-core training decode rate: clip_jax's ops.train_image vs open_clip's training transform, same JPEG bytes.

    .venv/bin/python experiments/decode_bench.py [--sizes 256 384 512 768 1024] [--rounds 5] [--seconds 1.0]

The bytes: the real photos that ship with scikit-learn and scikit-image, each resized (Lanczos) to each longer
side and saved as JPEG quality 90 (Pillow's default 4:2:0 chroma). One process pinned to one core, torch held to
one thread. Timed per image, 224 px output, random-resized crop of area 0.9..1 (open_clip's default scale and
clip_jax's data.crop_min_area), bicubic, no flip (open_clip's train transform has none):
  ours:      ops.train_image (what the train pipeline's workers run: crop box drawn from the header, JPEG DCT
             reduction, Pillow resize) plus its per-example generator -> uint8 [224, 224, 3]
  exact:     the same without the DCT reduction (Pillow full decode, exif_transpose, crop, resize) -> uint8
  open_clip: open_clip.transform.image_transform(224, is_train=True) on Image.open(BytesIO(bytes)), as its
             webdataset path does -> normalised float32 [3, 224, 224]
The methods alternate within each round; a size's rate is the median over rounds. Also printed: how far ours is
from the exact path (mean |difference| per pixel, 0..255) and which reductions it used. The table goes to
experiments/results/decode_bench.md.

open_clip needs torchvision, which must stay out of the project's environment (a CUDA torchvision breaks
transformers beside the CPU torch). Install it elsewhere; only its Pillow-based transforms are imported (its C
extension, built for CUDA torch, is never loaded):
    .venv/bin/python -m pip install --no-deps --target /work/bench-deps torchvision==0.28.0
"""

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import time
import types

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image, ImageOps

SIZE, MIN_AREA = 224, 0.9
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode_bench.md")


def photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = dict(zip(("china", "flower"), load_sample_images().images))
    for name in ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field"):
        out[name] = getattr(skimage.data, name)()
    out["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    return out


def encode(photo: np.ndarray, side: int) -> bytes:
    img = Image.fromarray(photo).convert("RGB")
    scale = side / max(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def open_clip_transform(deps: str):
    """open_clip's train transform, importing only torchvision's and open_clip's Python modules it needs: their
    package __init__ files would load torchvision's C extension and open_clip's models (transformers)."""
    import torch

    torch.set_num_threads(1)
    for name, path in (("torchvision", os.path.join(deps, "torchvision")), ("open_clip", None)):
        if path is None:
            path = next(iter(importlib.util.find_spec(name).submodule_search_locations))
        if not os.path.isdir(path):
            raise SystemExit(f"{name} not found at {path}; see this script's docstring for the install line")
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    from open_clip import transform  # after the stand-in packages

    return transform.image_transform(SIZE, is_train=True)


def ours(data: bytes, i: int):
    from clip_jax.input import ops

    rng = np.random.default_rng((0, i))  # as the pipeline: one generator per example
    return ops.train_image(data, SIZE, 1, rng, "inception", MIN_AREA, False)[0]


def exact(data: bytes, i: int):
    from clip_jax.input import ops

    rng = np.random.default_rng((0, i))
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    top, left, h, w = ops.crop_box(img.size[1], img.size[0], rng, MIN_AREA)
    return np.asarray(img.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def rate(fn, items: list[bytes], seconds: float) -> float:
    """Images per second of fn over items, repeated for about `seconds`."""
    done, start = 0, time.perf_counter()
    while True:
        for i, data in enumerate(items):
            fn(data, i)
        done += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def fidelity(items: list[bytes]) -> tuple[float, dict[int, int]]:
    """(mean |ours - exact| per pixel over the views, {reduction: views}) for view seeds 0..len(items)*4-1."""
    from clip_jax.input import ops

    diffs, reductions = [], {}
    for k in range(4 * len(items)):
        data = items[k % len(items)]
        diffs.append(np.abs(ours(data, k).astype(np.float64) - exact(data, k)).mean())
        w, h = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size
        _, _, ch, cw = ops.crop_box(h, w, np.random.default_rng((0, k)), MIN_AREA)
        s = next((s for s in (8, 4, 2) if min(ch, cw) >= s * SIZE), 1)
        reductions[s] = reductions.get(s, 0) + 1
    return float(np.mean(diffs)), reductions


def machine(core: int) -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    load = os.getloadavg()
    ps = ["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"]
    listing = subprocess.run(ps, check=False, capture_output=True, text=True).stdout
    busy = [line.split() for line in listing.splitlines()]
    others = [f"{name} {cpu}%" for pid, cpu, name in busy[1:] if pid != str(os.getpid())][:4]
    return (
        f"{model}, {os.cpu_count()} cores (this run pinned to core {core}); load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); other busiest processes (CPU % over "
        f"each one's life): {', '.join(others)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512, 768, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per method, size and round")
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--deps", default="/work/bench-deps", help="where torchvision was installed (--target)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    transform = open_clip_transform(args.deps)
    methods = {"ours": ours, "exact": exact, "open_clip": lambda data, i: transform(Image.open(io.BytesIO(data)))}
    sources = photos()
    rows = []
    for side in args.sizes:
        items = [encode(p, side) for p in sources.values()]
        for fn in methods.values():
            rate(fn, items, 0.2)  # warm-up: imports, caches
        rates = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                rates[name].append(rate(fn, items, args.seconds))
        med = {name: float(np.median(r)) for name, r in rates.items()}
        diff, reductions = fidelity(items)
        rows.append((side, med, diff, reductions, sum(map(len, items)) / len(items) / 1024))
        print(f"{side:5d} px: ours {med['ours']:7.1f}/s  exact {med['exact']:7.1f}/s  open_clip "
              f"{med['open_clip']:7.1f}/s  ratio {med['ours'] / med['open_clip']:.2f}", flush=True)  # fmt: skip
    write(rows, args, len(sources), machine(args.core))


def write(rows, args, n_photos: int, where: str) -> None:
    import torch
    import torchvision  # the stand-in package: no __version__
    from PIL import __version__ as pillow

    tv = getattr(torchvision, "__version__", None) or _dist_version(args.deps, "torchvision")
    total = {k: len(rows) / sum(1 / r[1][k] for r in rows) for k in ("ours", "exact", "open_clip")}  # same count
    lines = [
        "# Training decode + random-resized crop at 224 px, one core: clip_jax vs open_clip",
        "",
        f"Machine: {where}.",
        (
            f"Pillow {pillow}, torch {torch.__version__}, torchvision {tv} (Python transforms only), numpy "
            f"{np.__version__}. {n_photos} real photos per size (scikit-learn / scikit-image), JPEG q90; median "
            f"of {args.rounds} rounds of {args.seconds:g} s per method. Command: `python "
            f"experiments/decode_bench.py --rounds {args.rounds} --seconds {args.seconds:g}`."
        ),
        "",
        (
            "| longer side | mean JPEG | ours img/s | exact img/s | open_clip img/s | ours / open_clip | "
            "exact / open_clip | ours vs exact, mean abs diff (0..255) | views by DCT reduction |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = [
        "",
        "exact / open_clip is the gain of stopping at uint8 (normalising on the devices instead); ours / exact is",
        "the gain of the DCT reduction, which applies when the crop's shorter side is >= 448 px (2 x 224).",
        "Seven of the nine photos are under 768 px: the larger sizes are upscaled from them (smoother than native",
        "photos of that size, so every method decodes them a little faster than real ones).",
    ]
    for side, med, diff, reductions, kib in rows:
        red = ", ".join(f"1/{s}: {n}" for s, n in sorted(reductions.items()))
        lines.append(
            f"| {side} | {kib:.0f} KiB | {med['ours']:.1f} | {med['exact']:.1f} | {med['open_clip']:.1f} | "
            f"{med['ours'] / med['open_clip']:.2f} | {med['exact'] / med['open_clip']:.2f} | {diff:.2f} | {red} |"
        )
    lines.append(
        f"| all (equal count per size) | | {total['ours']:.1f} | {total['exact']:.1f} | "
        f"{total['open_clip']:.1f} | "
        f"{total['ours'] / total['open_clip']:.2f} | {total['exact'] / total['open_clip']:.2f} | | |"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines + notes) + "\n")
    print("\n".join(lines[-len(rows) - 3 :]))
    print(f"written to {args.out}")


def _dist_version(deps: str, name: str) -> str:
    found = [d for d in os.listdir(deps) if d.startswith(f"{name}-") and d.endswith(".dist-info")]
    return found[0][len(name) + 1 : -len(".dist-info")] if found else "unknown"


if __name__ == "__main__":
    main()
