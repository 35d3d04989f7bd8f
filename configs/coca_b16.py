"""CoCa at ViT-B/16 scale (Yu et al. 2022, scaled from CoCa-Base to a B/16 image tower at 224px).

CoCa-Base: a 12-layer ViT-B image encoder, a 12-layer unimodal and a 12-layer multimodal text decoder, width 768
with 12 heads; a 256-query attentional pooler for the decoder and a 1-query one for the contrastive embedding;
loss = 1.0 x contrastive (softmax) + 2.0 x captioning; batch 65,536. Differences here: patch 16 at 224px (the
paper's Base uses 18 at 288), CLIP's 49,408-token BPE (the paper: a 64k sentencepiece), AdamW (the paper:
Adafactor with decoupled weight decay) at the paper's peak learning rate and weight decay.
`configs/coca_b16.py:<batch>` sets the global batch.
"""

import math

from clip_jax import config
from clip_jax.config import base


def get_config(arg: str = ""):
    c = base()
    c.batch_size = config.int_arg(arg, 65536, "the global batch size")
    c.total_steps = 500_000
    c.model.family = "coca"
    c.model.embed_dim = 512
    c.model.dtype = "bfloat16"
    c.model.log_t_init, c.model.bias_init = math.log(1 / 0.07), 0.0
    c.model.image.variant = "B/16"
    c.model.image.image_size = 224
    c.model.image.posemb = "learn"
    c.model.text.variant = "B"  # width 768, 12 unimodal layers, 12 heads
    c.model.text.max_len = 77
    c.model.text.causal, c.model.text.pool = True, "eos"
    c.model.coca.decoder_depth = 12
    c.model.coca.num_queries = 256
    c.model.coca.pooler_heads = 12
    c.model.coca.tie_embedding = True
    c.model.coca.caption_chunk = 8
    c.loss.kind = "softmax"
    c.loss.contrastive_weight, c.loss.caption_weight = 1.0, 2.0
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 8e-4, 10_000, 0.01
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-6
    c.tokenizer.kind = "clip_bpe"  # start 49406, end 49407, pad 0
    c.data.train_crop, c.data.eval_crop = "inception", "centre"
    c.data.name = "coco_captions"  # any local tfds image-text set
    c.data.text_key = "captions/text"
    c.evals.zeroshot = config.evaluator(
        "zeroshot", dataset="imagenet2012", split="validation", templates="imagenet_short"
    )
    c.evals.captioning = config.evaluator(
        "captioning", dataset="coco_captions", split="validation", text_key="captions/text", max_examples=5000,
        batch_size=256,
    )  # fmt: skip
    c.caption.beam_size, c.caption.length_penalty = 4, 0.6
    return c
