"""HF CLIPConfig / SiglipConfig / Siglip2Config (as dicts) <-> clip_jax configs; which HF family represents a
clip_jax model.

The HF dicts are transformers' config classes' to_dict(), so every key has its value (defaults filled in).
"""

import math

from clip_jax import config as config_lib
from clip_jax.convert.hf import FAMILIES, PREPROCESS, ConversionError
from clip_jax.input import tokenizer as tokenizer_lib
from clip_jax.input.clip_bpe import VOCAB_SIZE as CLIP_BPE_VOCAB  # a model with it uses tokenizer.kind='clip_bpe'
from clip_jax.models import layers

# HF activation name -> ours. gelu_new and gelu_pytorch_tanh are the same tanh formula.
ACT_FROM_HF = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
NAFLEX_MAX_PATCHES = 256  # Siglip2ImageProcessor's default max_num_patches


def _variant(width, depth, mlp_dim, heads):
    """A size name whose preset matches, else 'mu' (every dimension is then set explicitly anyway)."""
    for name, dims in layers.SIZES.items():
        if dims == (width, depth, mlp_dim, heads):
            return name
    return "mu"


def _tower(sub, hf, act_key="hidden_act"):
    sub.width, sub.depth = hf["hidden_size"], hf["num_hidden_layers"]
    sub.mlp_dim, sub.num_heads = hf["intermediate_size"], hf["num_attention_heads"]
    if hf[act_key] not in ACT_FROM_HF:
        raise ConversionError(f"activation {hf[act_key]!r} is not supported; clip_jax has {sorted(ACT_FROM_HF)}")
    sub.act, sub.ln_eps = ACT_FROM_HF[hf[act_key]], float(hf["layer_norm_eps"])
    return _variant(sub.width, sub.depth, sub.mlp_dim, sub.num_heads)


def _square(value, what):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"{what} {value} is not square; clip_jax's ViT takes square images and patches")
        value = value[0]
    return int(value)


def config_from_hf(hf, preprocess=None, tokenizer=None, max_patches: int = NAFLEX_MAX_PATCHES):
    """HF config (a dict with every key, as transformers' config classes fill them) -> clip_jax ConfigDict.

    tokenizer: (tokenizer.kind, model file) of a SigLIP directory's tokenizer (hf_tokenizer.find), which becomes
    the config's and gives the text tower its pad and end ids (none: left unset). max_patches: a NaFlex
    (`siglip2`) model's patch budget per image, its processor's max_num_patches. Raises ConversionError for what
    clip_jax cannot represent, naming it."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConversionError(f"model_type {family!r} is not supported; clip_jax converts {list(FAMILIES)}")
    vis, txt = hf["vision_config"], hf["text_config"]
    c = config_lib.base()
    m = c.model
    if vis.get("num_channels", 3) != 3:
        raise ConversionError(f"vision num_channels={vis['num_channels']}; clip_jax's ViT takes RGB images")
    patch = _square(vis["patch_size"], "patch_size")
    if family == "siglip2":  # NaFlex: no image size; a square position grid resized to each image
        size, m.image.naflex_max_patches = _naflex_size(vis, patch), max_patches
        if max_patches <= 0:
            raise ConversionError(f"max_num_patches={max_patches}: a NaFlex model needs at least one patch")
    else:
        size = _square(vis["image_size"], "image_size")
    m.image.variant = f"{_tower(m.image, vis)}/{patch}"
    m.image.patch_size, m.image.image_size, m.image.posemb = patch, size, "learn"
    m.text.variant = _tower(m.text, txt)
    m.text.vocab_size, m.text.max_len = txt["vocab_size"], txt["max_position_embeddings"]
    pad = txt.get("pad_token_id")
    m.text.pad_id = pad if isinstance(pad, int) and 0 <= pad < m.text.vocab_size else 0
    if family == "clip":
        _clip_config(c, hf, txt)
    else:
        _siglip_config(c, hf, vis, txt, tokenizer)
    mean, std, crop, resample = preprocess or PREPROCESS[family]
    c.data.image_mean, c.data.image_std, c.data.eval_crop = tuple(mean), tuple(std), crop
    c.data.resample = resample
    return c


def _naflex_size(vis, patch):
    """A NaFlex tower's image_size: its square position grid (num_patches = G * G) times the patch."""
    grid = math.isqrt(vis["num_patches"])
    if grid * grid != vis["num_patches"]:
        raise ConversionError(f"vision num_patches={vis['num_patches']} is not a square position grid")
    return grid * patch


def _clip_config(c, hf, txt):
    m = c.model
    m.embed_dim, m.log_t_init, m.bias_init = hf["projection_dim"], float(hf["logit_scale_init_value"]), 0.0
    m.image.pool, m.image.proj, m.image.proj_bias, m.image.patch_bias, m.image.pre_ln = (
        "cls",
        True,
        False,
        False,
        True,
    )
    m.text.causal, m.text.proj, m.text.proj_bias = True, True, False
    eos = txt.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if len(eos) == 1 else None
    if eos == 2:  # HF's legacy rule: pool at the largest token id (CLIP's end token is the last id)
        m.text.pool, m.text.eos_id = "argmax", m.text.vocab_size - 1
    elif isinstance(eos, int) and 0 <= eos < m.text.vocab_size:
        m.text.pool, m.text.eos_id = "eos", eos
    else:
        raise ConversionError(f"text eos_token_id {txt.get('eos_token_id')!r} is not one id inside the vocabulary")
    c.loss.kind = "softmax"
    # A causal tower pooled at the end token never looks at what follows it, so the pad id is free: 0, what our
    # tokenizers pad with (HF's pad_token_id is written back on export only as a config value).
    m.text.pad_id = 0
    if m.text.vocab_size == CLIP_BPE_VOCAB:
        c.tokenizer.kind = "clip_bpe"


def _siglip_config(c, hf, vis, txt, tokenizer):
    m = c.model
    if not vis.get("vision_use_head", True):
        raise ConversionError("vision_use_head=False: a SiglipModel without its MAP head has no image embedding")
    proj = txt.get("projection_size") or txt["hidden_size"]
    if proj != vis["hidden_size"]:
        raise ConversionError(f"text projection_size {proj} != vision hidden_size {vis['hidden_size']}")
    m.embed_dim, m.log_t_init, m.bias_init = proj, math.log(10.0), -10.0
    m.image.pool, m.image.proj, m.image.patch_bias, m.image.pre_ln = "map", False, True, False
    m.text.causal, m.text.pool, m.text.mask_padding = False, "last", False
    m.text.proj, m.text.proj_bias = True, True
    eos = txt.get("eos_token_id")
    m.text.eos_id = eos if isinstance(eos, int) and 0 <= eos < m.text.vocab_size else m.text.pad_id
    c.loss.kind = "sigmoid"
    if tokenizer:
        _set_tokenizer(c, *tokenizer)


def _set_tokenizer(c, kind, path):
    """The directory's tokenizer becomes the config's, padding to model.text.max_len (max_position_embeddings: 64
    for SigLIP 1 and 2), and its pad and end ids become the text tower's: config.json's need not be the tokenizer's
    (SiglipTextConfig defaults to pad 1 and eos 49407; Gemma pads with 0 and ends with 1)."""
    text = c.model.text
    try:
        tok = tokenizer_lib.build(kind, text.max_len, path)
    except (ValueError, OSError, RuntimeError) as e:
        raise ConversionError(f"{path} is not a {kind} tokenizer model ({' '.join(str(e).split())})") from None
    if tok.vocab_size > text.vocab_size:
        raise ConversionError(
            f"{path} has {tok.vocab_size} pieces, more than the text tower's vocab_size {text.vocab_size}: it is "
            "not this model's tokenizer"
        )
    c.tokenizer.kind, c.tokenizer.path = kind, path
    text.pad_id, text.eos_id = tok.pad_id, tok.eos_id


def family_of(cfg):
    """Which HF family represents this clip_jax config exactly; raises naming the first key that does not fit."""
    m = cfg.model
    if m.family != "two_tower":
        raise ConversionError(f"model.family={m.family!r}: only two_tower models export to HF CLIP/SigLIP")
    family = {"cls": "clip", "map": "siglip"}.get(m.image.pool)
    if family is None:
        raise ConversionError(f"model.image.pool={m.image.pool!r}: HF CLIP pools 'cls', SigLIP 'map'")
    if m.image.naflex_max_patches > 0:
        family = "siglip2"  # SigLIP's towers, the NaFlex image input
    want = {
        "clip": {
            "image.posemb": "learn", "image.proj": True, "image.proj_bias": False, "image.patch_bias": False,
            "image.pre_ln": True, "text.causal": True, "text.proj": True, "text.proj_bias": False,
        },
        "siglip": {
            "image.posemb": "learn", "image.proj": False, "image.patch_bias": True, "image.pre_ln": False,
            "text.causal": False, "text.pool": "last", "text.mask_padding": False, "text.proj": True,
            "text.proj_bias": True,
        },
    }["clip" if family == "clip" else "siglip"]  # fmt: skip  (siglip2 has SigLIP's towers)
    for key, value in want.items():
        tower, name = key.split(".")
        if m[tower][name] != value:
            raise ConversionError(f"model.{key}={m[tower][name]!r}: HF {family} needs {value!r}")
    if family == "clip" and m.text.pool not in ("eos", "argmax"):
        raise ConversionError(f"model.text.pool={m.text.pool!r}: HF CLIP pools 'eos' or 'argmax'")
    if family == "clip" and m.text.pool == "eos" and m.text.eos_id == 2:
        raise ConversionError("model.text.eos_id=2 would make HF CLIP pool at argmax instead (its legacy rule)")
    return family


def config_to_hf(cfg):
    """clip_jax config -> (family, HF config dict for CLIPConfig / SiglipConfig)."""
    family = family_of(cfg)
    m = cfg.model
    image, text = layers.tower_dims(m.image, with_patch=True), layers.tower_dims(m.text, with_patch=False)

    def tower(dims, sub):
        return {
            "hidden_size": dims["width"],
            "intermediate_size": dims["mlp_dim"],
            "num_hidden_layers": dims["depth"],
            "num_attention_heads": dims["num_heads"],
            "hidden_act": ACT_TO_HF[sub.act],
            "layer_norm_eps": sub.ln_eps,
        }

    vis = tower(image, m.image) | {"patch_size": image["patch_size"]}
    if family == "siglip2":  # no image size: the square position grid's size, in patches
        vis["num_patches"] = (m.image.image_size // image["patch_size"]) ** 2
    else:
        vis["image_size"] = m.image.image_size
    txt = tower(text, m.text) | {"vocab_size": m.text.vocab_size, "max_position_embeddings": m.text.max_len}
    txt["pad_token_id"] = m.text.pad_id
    if family == "clip":
        txt["eos_token_id"] = 2 if m.text.pool == "argmax" else m.text.eos_id
        txt["bos_token_id"] = m.text.vocab_size - 2 if m.text.vocab_size == CLIP_BPE_VOCAB else None
        hf = {"projection_dim": m.embed_dim, "logit_scale_init_value": m.log_t_init}
    else:
        txt["eos_token_id"], txt["bos_token_id"] = m.text.eos_id, None
        txt["projection_size"] = m.embed_dim
        if image["width"] != m.embed_dim:
            raise ConversionError(f"SigLIP's image embedding is its width {image['width']}, not {m.embed_dim}")
        hf = {}
    return family, hf | {"text_config": txt, "vision_config": vis}
