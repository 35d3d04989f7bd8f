"""The default config: a tiny CLIP that trains in minutes on 2 CPU cores on the embedded shapes dataset.

Variants by argument (comma-separated): `configs/tiny_cpu.py:sigmoid` trains SigLIP's loss instead,
`configs/tiny_cpu.py:digits` trains and evaluates on scikit-learn's real handwritten digits, `:fashion` trains on
Fashion-MNIST's captioned train split and evaluates zero-shot on its test split (10 clothing classes), `:emoji`
trains on the rendered emoji and their names (no zero-shot set: every emoji is its own caption). The demo sets
are prepared on first use (see data/prepare.py --name demo). `:retrieval` adds an image<->text retrieval evaluator
on clip_shapes_captions beside zero-shot. `:sweep` has one transformer layer per tower (the batch-size sweep's
model) and both evaluators.
"""

import math

from clip_jax.config import base, evaluator


def get_config(arg: str = ""):
    opts = set(filter(None, (arg or "").split(",")))
    known = {"sigmoid", "digits", "fashion", "emoji", "sweep", "retrieval"}
    unknown = opts - known
    if unknown:
        raise ValueError(f"unknown tiny_cpu option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    if len(opts & {"digits", "fashion", "emoji"}) > 1:
        raise ValueError("tiny_cpu options digits, fashion and emoji each name the dataset; pick one")
    c = base()
    # Sized for 2 CPU cores: ~1 GFLOP of forward pass per step, so the whole run takes minutes.
    c.batch_size = 128
    c.total_steps = 2000
    c.log_every = 100
    c.eval_every = 500
    c.ckpt_every = 500
    c.evals.zeroshot.batch_size = 256
    c.data.cache = True  # 150 MB decoded once: the 2 cores go to the train step, not to PNG decoding

    c.tokenizer.kind = "hashed_words"
    c.model.embed_dim = 96
    c.model.image.variant = "mu/8"  # 32x32 images in 8x8 patches: 16 tokens
    c.model.image.width, c.model.image.depth, c.model.image.mlp_dim, c.model.image.num_heads = 96, 2, 384, 4
    c.model.image.image_size = 32
    c.model.image.pool = "gap"
    c.model.image.posemb = "sincos2d"
    c.model.text.variant = "mu"
    c.model.text.width, c.model.text.depth, c.model.text.mlp_dim, c.model.text.num_heads = 96, 2, 384, 4
    c.model.text.vocab_size = 4096  # hashed word ids; the captions use a few dozen words
    c.model.text.max_len = 16
    c.model.text.eos_id, c.model.text.pad_id = 2, 0  # the hashed_words tokenizer's ids
    # Unrolled layers: 1.11x the examples/s of the layer scan on 2 CPU cores (no stacked residual buffers to fill
    # and slice; experiments/results/step_breakdown.md); compiling two layers unrolled costs little.
    c.model.scan_layers = False

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.1

    if "sigmoid" in opts:
        c.loss.kind = "sigmoid"
        c.model.log_t_init, c.model.bias_init = math.log(10.0), -10.0
    if "sweep" in opts:
        # 2.3x the examples/s of two layers on CPU (measured), so experiments/batch_size_sweep.py's 16 runs fit in
        # under an hour on 2 cores with enough examples that its largest batch still takes dozens of steps.
        c.model.image.depth = c.model.text.depth = 1
    if "retrieval" in opts or "sweep" in opts:  # R@1 beside zero-shot top-1 (in the sweep's plot too)
        c.evals.retrieval = evaluator("retrieval", dataset="clip_shapes_captions", batch_size=256)
    if "digits" in opts:
        c.data.name = c.evals.zeroshot.dataset = "clip_digits"
    if "fashion" in opts:  # 28x28 images padded to 32x32; 60k train captions, 10k test images for zero-shot
        c.data.name = c.evals.zeroshot.dataset = "clip_fashion_mnist"
    if "emoji" in opts:  # 64x64 renders, resized to 32x32 by the pipeline
        c.data.name, c.evals.zeroshot.dataset = "clip_emoji", ""
        c.evals.retrieval = evaluator("retrieval", dataset="clip_emoji", text_key="caption", batch_size=256)
    return c
