"""CLIP BPE tokenization speed: clip_jax's ClipBPE vs open_clip's SimpleTokenizer on the same captions.

    .venv/bin/python experiments/clip_bpe_speed.py [--captions 5000] [--repeats 3]

Two caption sets of the same size: `messy` (tests/caption_mix.py: scraped alt text with entities, mojibake, emoji,
other scripts, long and blank captions) and `plain` (ASCII COCO-like captions). Each tokenizer starts with an
empty word cache and encodes the whole set `repeats` times (the cache warms, as in training); the best pass is
reported as captions/s and tokens/s (tokens = non-padding ids of the 77-slot rows, start and end included).
Also times ftfy.fix_text alone, the step both tokenizers run first.
"""

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # clip_jax, and the tests' caption mix and reference loader

import caption_mix
import numpy as np


def plain_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(caption_mix.PLAIN).replace(",", "").replace(".", "").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(n)]


def best_rate(encode, texts, repeats: int) -> tuple[float, int]:
    """(best captions/s over `repeats` passes, non-padding ids of one pass)."""
    best, tokens = 0.0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = encode(texts)
        best = max(best, len(texts) / (time.perf_counter() - start))
        tokens = int((np.asarray(rows) != 0).sum())
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ftfy

    from clip_jax.input import clip_bpe

    try:
        from reference_libs import open_clip_module

        reference = open_clip_module("tokenizer")
    except BaseException:  # noqa: BLE001  pytest.skip when open-clip-torch is absent
        reference = None
    print(f"machine: {os.cpu_count()} CPU cores; {args.captions} captions per set, best of {args.repeats} passes")
    sets = {"messy": caption_mix.captions(args.captions), "plain": plain_captions(args.captions)}
    for name, texts in sets.items():
        ours = clip_bpe.ClipBPE(77)
        rate, tokens = best_rate(ours, texts, args.repeats)
        line = f"{name:6s} clip_jax {rate:8.0f} captions/s {rate * tokens / len(texts):9.0f} tokens/s"
        fix_rate, _ = best_rate(lambda t: [[len(ftfy.fix_text(x))] for x in t], texts, args.repeats)
        line += f" | ftfy.fix_text alone {fix_rate:8.0f} captions/s"
        if reference is not None:
            ref_rate, _ = best_rate(reference.SimpleTokenizer(), texts, args.repeats)
            line += f" | open_clip {ref_rate:8.0f} captions/s (clip_jax / open_clip = {rate / ref_rate:.2f})"
        print(line)


if __name__ == "__main__":
    main()
