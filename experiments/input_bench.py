"""Input pipeline throughput: the 224px training pipeline vs what the tiny config's train step consumes.

    .venv/bin/python experiments/input_bench.py [--photos 512] [--batch 64] [--batches 12] [--workers 0 2]

Builds a local corpus of JPEG photos once (crops and rescales, 320-800 px on a side, of the two real photos that
ship with scikit-learn, so decode cost is that of real photos), prepares it as an `image_text_folder` tfds set, and
times the full training path on it: read the record -> decode JPEG -> random-resized crop -> flip -> 224x224
uint8 -> CLIP BPE tokenization -> filtered batch. Then times the tiny config's embedded-data pipeline and its
jitted train step (synthetic batch), all in this one process, and prints examples/s and the ratios.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))

import numpy as np
from PIL import Image

CAPTIONS = ("a photo of {}", "{} seen from far away", "a close-up of {}, in colour", "an old picture of {}")
SUBJECTS = ("a chinese temple", "a red flower", "a pagoda among trees", "petals and leaves")


def make_corpus(folder: str, count: int) -> None:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two real 427x640 photos
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "captions.jsonl"), "w") as table:
        for i in range(count):
            photo = photos[i % 2]
            h, w = photo.shape[:2]
            ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
            top, left = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
            side = rng.integers(320, 801)  # the longer side, as web images come
            img = Image.fromarray(photo[top : top + ch, left : left + cw])
            scale = side / max(img.size)
            img = img.resize(
                (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BICUBIC
            )
            img.save(os.path.join(folder, f"{i}.jpg"), "JPEG", quality=90)
            caption = CAPTIONS[i % len(CAPTIONS)].format(SUBJECTS[(i // 2) % len(SUBJECTS)])
            table.write(json.dumps({"file_name": f"{i}.jpg", "caption": caption}) + "\n")


def time_iterator(it, batch: int, batches: int) -> float:
    next(it)  # warm-up: opening files, starting threads or workers
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def photo_pipeline(args, data_dir: str, workers: int) -> float:
    import tiny_cpu

    from clip_jax.input import pipeline

    cfg = tiny_cpu.get_config()
    cfg.data.name, cfg.data.data_dir, cfg.data.cache = "image_text_folder/bench_photos", data_dir, False
    cfg.data.train_crop, cfg.data.flip, cfg.data.num_workers = "inception", True, workers
    cfg.batch_size, cfg.model.image.image_size = args.batch, 224
    cfg.tokenizer.kind, cfg.model.text.vocab_size, cfg.model.text.max_len = "clip_bpe", 49408, 77
    cfg.model.text.eos_id, cfg.model.text.pad_id = 49407, 0
    return time_iterator(pipeline.train_iterator(cfg), args.batch, args.batches)


def tiny_rates(steps: int) -> tuple[float, float]:
    """(examples/s of the tiny config's own input pipeline, examples/s its train step consumes)."""
    import jax
    import tiny_cpu

    from clip_jax import optim, sharding, train
    from clip_jax.input import pipeline

    cfg = tiny_cpu.get_config()
    data = time_iterator(pipeline.train_iterator(cfg), cfg.batch_size, 40)
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, state, shardings = train.init_state(cfg, mesh, opt)
    step = train.compile_step(cfg, mesh, opt, graphdef, shardings)
    batch = next(pipeline.train_iterator(cfg))
    state, metrics = step(state, sharding.put_batch(batch, mesh))  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, sharding.put_batch(batch, mesh))
        jax.block_until_ready(metrics["loss"])
    return data, steps * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "clip_jax_input_bench"))
    args = parser.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (their defaults suffice)

    from clip_jax import datasets

    datasets.tfds.disable_progress_bar()
    folder, data_dir = os.path.join(args.dir, "photos"), os.path.join(args.dir, "tfds")
    if not os.path.isfile(os.path.join(folder, "captions.jsonl")):
        make_corpus(folder, args.photos)
    datasets.prepare_local("image_text_folder", folder, "bench_photos", data_dir)
    print(f"machine: {os.cpu_count()} CPU cores; {args.photos} JPEG photos 320-800 px; batch {args.batch}")
    rates = {w: photo_pipeline(args, data_dir, w) for w in args.workers}
    data, step = tiny_rates(args.steps)
    for w, rate in rates.items():
        print(f"224px train pipeline, {w} worker processes: {rate:8.1f} examples/s")
    print(f"tiny config input pipeline (embedded, cached): {data:8.1f} examples/s")
    print(f"tiny config train step consumes:               {step:8.1f} examples/s")
    best = max(rates.values())
    print(f"ratio 224px pipeline (best) / tiny train step: {best / step:.2f}")
    print(f"ratio tiny pipeline / tiny train step:        {data / step:.2f}")


if __name__ == "__main__":  # grain worker processes re-import this module: nothing may run on import
    main()
