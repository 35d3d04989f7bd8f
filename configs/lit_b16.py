"""LiT (Zhai et al. 2022, "locked-image tuning"): a pretrained image tower, locked; a text tower trained to match it.

    python -m clip_jax.main train --config=configs/lit_b16.py:<pretrained workdir> --workdir=DIR

The argument names the run whose image tower is used: a clip_jax workdir, or one written by
`convert --from hf` (then the image tower's shapes must be ViT-B/16's as below, e.g. openai/clip-vit-base-patch16
imported; set the pretrained model's own image options with --config.model.image.* if they differ). The image
encoder is copied and frozen; its projection to the joint space stays trainable (LiT's "locked tower, trainable
head" variant), as does everything in the text tower, the temperature and the bias.
"""

from configs import clip_b16


def get_config(arg: str = ""):
    if not arg:
        raise ValueError(
            "lit_b16 needs the pretrained run: --config=configs/lit_b16.py:<workdir with checkpoints>"
        )
    c = clip_b16.get_config()
    c.init.workdir = arg
    c.init.params = "^image/"  # the whole image tower, projection included, starts from the pretrained run
    c.optim.freeze = "^image/(?!proj/)"  # locked: everything in the image tower except its projection
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-3, 10_000, 1e-4  # LiT's text-tower settings
    c.loss.kind = "softmax"
    return c
