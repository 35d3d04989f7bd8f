"""SigLIP ViT-B/16 (Zhai et al. 2023): sigmoid loss with learned temperature (init 10) and bias (init -10),
MAP-head pooling, bidirectional text tower pooled at the last token, 32k batch.

`configs/siglip_b16.py:<batch>` sets the global batch (for batch-size sweeps).
"""

import math

from clip_jax import config
from clip_jax.config import base


def get_config(arg: str = ""):
    c = base()
    c.batch_size = config.int_arg(arg, 32768, "the global batch size")
    c.total_steps = 100_000
    c.model.embed_dim = 768
    c.model.dtype = "bfloat16"
    c.model.log_t_init, c.model.bias_init = math.log(10.0), -10.0
    c.model.image.variant = "B/16"
    c.model.image.image_size = 224
    c.model.image.pool = "map"
    c.model.image.posemb = "learn"
    c.model.image.proj = False  # the MAP head output is the embedding (width 768 = embed_dim)
    c.model.text.variant = "B"
    c.model.text.vocab_size = 32000
    c.model.text.max_len = 64
    c.model.text.causal, c.model.text.pool = False, "last"
    c.model.text.proj = True
    c.loss.kind = "sigmoid"
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-3, 5_000, 1e-4
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
    c.data.name = "coco_captions"
    c.evals.zeroshot = config.evaluator(
        "zeroshot", dataset="imagenet2012", split="validation", templates="imagenet_short"
    )
    return c
