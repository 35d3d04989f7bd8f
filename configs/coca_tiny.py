"""A tiny CoCa that learns to caption the embedded shapes dataset in minutes on 2 CPU cores.

tiny_cpu's towers (width 96, 32x32 images in 8x8 patches) with CoCa's parts: attentional poolers over the 16
patch tokens, a 2-layer unimodal and a 2-layer multimodal decoder, the vocabulary head tied to the (hashed-word)
token embedding; loss = contrastive + 2 x captioning. At the end: zero-shot accuracy, and captions of the test
images scored by perplexity and CIDEr-D (clip_jax/evaluate/captioning.py).

`configs/coca_tiny.py:<steps>` sets the number of steps (default 400).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_cpu  # noqa: E402

from clip_jax import config  # noqa: E402


def get_config(arg: str = ""):
    c = tiny_cpu.get_config()
    c.total_steps = config.int_arg(arg, 400, "the number of training steps")
    c.log_every, c.eval_every, c.ckpt_every = 50, 0, 200
    c.batch_size = 64
    # Decoding 64 PNGs per step costs little next to the step itself; caching all 50k first costs minutes.
    c.data.cache = False
    # The captions use 34 words; in 512 hashed ids none of them collide (in 4096 two do), and a small vocabulary
    # keeps the captioning head cheap.
    c.model.text.vocab_size = 512
    c.model.family = "coca"
    c.model.coca.decoder_depth = 2
    c.model.coca.num_queries = 16  # as many as the image has patches
    c.model.coca.pooler_heads = 4
    c.model.coca.tie_embedding = True
    c.model.coca.caption_chunk = 8  # 15 caption positions: 2 chunks of [64, 8, 512] logits
    c.loss.contrastive_weight, c.loss.caption_weight = 1.0, 2.0
    c.evals.captioning = config.evaluator(
        "captioning", dataset="clip_shapes", split="test", max_examples=256, batch_size=128
    )
    c.caption.beam_size, c.caption.length_penalty = 3, 0.6
    return c
