"""Model families by config name (model.family): one typed table of what each family is built from and what it can
do. state.build_model builds from it, config_checks validates model.family against it, and the evaluators, the
tokenizer check and the trainer read its capabilities (no code tests a family's name).

Every family's `__call__(images, tokens, patch_keys=None)` (patch_keys: FLIP patch dropout, training only)
returns at least CONTRASTIVE_OUTPUTS (train.total_loss reads them); a family that captions also returns
CAPTION_OUTPUTS and has `caption_loss(images, tokens) -> (nll sum, tokens)` and the decoder that models/generate.py
drives.
"""

import dataclasses
from collections.abc import Callable

from clip_jax.models import coca, two_tower

# img, txt: unit-norm embeddings [B, d] float32; log_t: log temperature (scalar); bias: the sigmoid loss's bias.
CONTRASTIVE_OUTPUTS = ("img", "txt", "log_t", "bias")
# caption_nll: summed next-token cross-entropy (scalar); caption_tokens: the number of tokens it sums over.
CAPTION_OUTPUTS = ("caption_nll", "caption_tokens")


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its constructor (config.model section, rngs) -> nnx.Module, and its capabilities."""

    build: Callable
    captions: bool  # generates captions (needs a tokenizer with a start token; the captioning evaluator runs)
    image_proj_from_pooler: bool  # the image embedding is projected from an attentional pooler, not model.image.proj

    @property
    def outputs(self) -> tuple[str, ...]:
        """The keys its __call__ returns that the trainer relies on."""
        return CONTRASTIVE_OUTPUTS + (CAPTION_OUTPUTS if self.captions else ())


FAMILIES = {
    "two_tower": Family(two_tower.TwoTower, captions=False, image_proj_from_pooler=False),  # CLIP, SigLIP, LiT
    "coca": Family(coca.CoCa, captions=True, image_proj_from_pooler=True),
}


def captioning(names: list[str] | tuple[str, ...] = tuple(FAMILIES)) -> list[str]:
    """The families that caption, for error messages."""
    return [n for n in names if FAMILIES[n].captions]
