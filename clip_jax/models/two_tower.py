"""Two-tower image-text model (CLIP / SigLIP / LiT): L2-normalised embeddings + temperature and bias.

Used functionally by the trainer: `graphdef, state = nnx.split(model)` once, then
`nnx.merge(graphdef, params)` inside a jitted pure function. __call__ mutates nothing and needs no RNG.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from clip_jax.models import layers, naflex, text, vit


class TwoTower(nnx.Module):
    """cfg is the `model` ConfigDict (embed_dim, dtype, log_t_init, bias_init, remat, image.*, text.*)."""

    def __init__(self, cfg, *, rngs):
        dtype = layers.compute_dtype(cfg.dtype)
        keys = layers.KeyStream(rngs.params())  # one key from rngs; see KeyStream for why
        common = dict(embed_dim=cfg.embed_dim, dtype=dtype, rngs=keys, scan=cfg.scan_layers)
        # A SigLIP 2 NaFlex tower takes patches at native aspect ratio (models/naflex.py) instead of square images.
        image_tower = naflex.NaFlexViT if cfg.image.get("naflex_max_patches", 0) > 0 else vit.ViT
        self.image = image_tower(cfg.image, remat=tower_remat(cfg, "image"), **common)
        self.text = text.TextTransformer(cfg.text, remat=tower_remat(cfg, "text"), **common)
        self.log_t = nnx.Param(jnp.asarray(cfg.log_t_init, jnp.float32), sharding_names=())
        self.bias = nnx.Param(jnp.asarray(cfg.bias_init, jnp.float32), sharding_names=())

    def encode_image(self, images, patch_keys=None):
        """float32 [B,H,W,3] (a NaFlex tower: the dict of models/naflex.py's INPUTS) -> float32 [B, embed_dim],
        unit norm. patch_keys: see vit.ViT.features (training only, never for NaFlex; the evaluators pass none and
        see every patch)."""
        if patch_keys is None:
            return layers.l2_normalize(self.image(images))
        return layers.l2_normalize(self.image(images, patch_keys))

    def encode_text(self, tokens):
        """int32 [B,L] -> float32 [B, embed_dim], unit norm."""
        return layers.l2_normalize(self.text(tokens))

    def __call__(self, images, tokens, patch_keys=None):
        """The trainer's model interface (every family returns these keys): img [B,d], txt [B,d] (unit norm),
        log_t (), bias () (the loss uses t = exp(log_t)). Families with a generative head add 'caption_nll' (sum of
        token NLLs over the batch) and 'caption_tokens' (how many tokens were scored). patch_keys: uint32 [B, 2]
        per-example keys of FLIP patch dropout (vit.ViT.features), or None for every patch."""
        return {
            "img": self.encode_image(images, patch_keys),
            "txt": self.encode_text(tokens),
            "log_t": self.log_t[...],
            "bias": self.bias[...],
        }


def tower_remat(cfg, tower: str) -> str:
    """The remat policy of one tower: model.<tower>.remat, or model.remat when that is ''."""
    return cfg[tower].remat or cfg.remat


def abstract(cfg):
    """The model with ShapeDtypeStruct parameters: shapes and counts without allocating memory."""
    return nnx.eval_shape(lambda: TwoTower(cfg, rngs=nnx.Rngs(params=0)))


def param_count(model):
    """Total parameter count of a model or state (concrete or abstract)."""
    return layers.param_count(model)


def param_counts(model):
    """{'image': n, 'text': n, 'total': n}; 'total' includes log_t and bias."""
    return {
        "image": layers.param_count(model.image),
        "text": layers.param_count(model.text),
        "total": layers.param_count(model),
    }


def weight_decay_mask(params):
    """True for the parameters to decay: kernels and embedding tables; False for biases, LayerNorm parameters,
    the cls token, the MAP probe, log_t and bias.

    Decided by name, not ndim: block parameters are stacked on a layer axis, so a LayerNorm scale is
    [depth, width] and per-head biases are [depth, heads, kv]. Works on an nnx.State or a plain dict.
    """

    def decay(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1].endswith("kernel") or names[-1].endswith("_embedding")

    return jax.tree_util.tree_map_with_path(decay, params)
