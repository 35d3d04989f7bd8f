"""CLIP ViT-B/16 (Radford et al. 2021): softmax loss, 32k batch, 224px, text tower width 512 x 12 layers.

For pods: point data.name at a prepared image-text tfds dataset and evals.zeroshot.dataset at a classification set.
`configs/clip_b16.py:<batch>` sets the global batch (for batch-size sweeps).
"""

import math

from clip_jax import config
from clip_jax.config import base


def get_config(arg: str = ""):
    c = base()
    c.batch_size = config.int_arg(arg, 32768, "the global batch size")
    c.total_steps = 100_000
    c.model.embed_dim = 512
    c.model.dtype = "bfloat16"
    c.model.log_t_init, c.model.bias_init = math.log(1 / 0.07), 0.0
    c.model.image.variant = "B/16"
    c.model.image.image_size = 224
    c.model.image.pool = "cls"
    c.model.image.posemb = "learn"
    c.model.text.variant = "M"
    c.model.text.max_len = 77
    c.model.text.causal, c.model.text.pool = True, "eos"
    c.loss.kind = "softmax"
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 5e-4, 10_000, 0.2
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.tokenizer.kind = "clip_bpe"  # CLIP's 49,408-token BPE (start 49406, end 49407, pad 0)
    c.data.train_crop, c.data.eval_crop = "inception", "centre"
    c.data.name = "coco_captions"  # any local tfds image-text set
    c.data.text_key = "captions/text"  # coco_captions holds several captions per image; one is drawn per visit
    c.evals.zeroshot = config.evaluator(
        "zeroshot", dataset="imagenet2012", split="validation", templates="imagenet_short"
    )
    return c
