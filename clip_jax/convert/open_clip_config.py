"""open_clip model configs (`model_cfg`, `preprocess_cfg` of an open_clip_config.json) <-> clip_jax configs.

Facts from open-clip-torch 3.3 (model.py CLIPVisionCfg / CLIPTextCfg / CLIP, transformer.py, transform.py):
- ViT tower: heads = width // head_width, MLP width int(width * mlp_ratio), a class token pooled after ln_post
  ('tok'), a bias-free stride-p patch convolution and projection, ln_pre unless no_ln_pre. LayerNorm eps 1e-5
  unless norm_kwargs sets 'eps'. The activation is QuickGELU when the top-level quick_gelu is set (both towers),
  else nn.GELU(**act_kwargs) (exact erf, or tanh with {"approximate": "tanh"}).
- Text tower: causal unless no_causal_mask (bidirectional towers attend to their padding: CLIP never passes
  use_pad_mask), pooled by pool_type ('argmax' by default: the largest id, CLIP's end token), projected by a
  [width, embed_dim] matrix or, with proj_bias, an nn.Linear; proj_type 'none' drops the projection.
- init_logit_bias present: a sigmoid-loss (SigLIP-style) model with a logit_bias parameter.
- Preprocessing (eval): resize_mode 'shortest' = shorter side to size + centre crop (our eval_crop 'centre'),
  'squash' = resize to size x size (our 'resize'); interpolation bicubic or bilinear ('random' is bicubic at
  eval). Defaults: OpenAI's mean/std, bicubic, shortest.
One difference: a token row without the eos id (pool_type 'eos') pools its last position here and position 0 in
open_clip (the argmax of an all-false row); both tokenizers always keep the end token, so only hand-made ids
meet it. Any option our model cannot reproduce raises ConversionError naming it; options that change neither the weights
nor the embeddings (patch_dropout, a training-time FLIP setting; output_tokens; the pooler/timm/HF settings that
are only read when their feature is on) are ignored.
"""

import math

from clip_jax import config as config_lib
from clip_jax.convert.hf import ConversionError
from clip_jax.input.clip_bpe import VOCAB_SIZE as CLIP_BPE_VOCAB
from clip_jax.models import layers

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip constants.py OPENAI_DATASET_MEAN / _STD
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LN_EPS = 1e-5  # torch.nn.LayerNorm's default
RESIZE_MODES = {"shortest": "centre", "squash": "resize"}  # open_clip resize_mode -> our data.eval_crop
INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}  # -> data.resample

# Options read by our mapping; options ignored (see the module docstring); options that must keep their default.
_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
        "nonscalar_logit_scale", "custom_text"}  # fmt: skip
_TOP_IGNORED = {"output_dict"}
# Options that must be off (falsy; ls_init_value None, block_type None or 'default'), as open_clip tests them.
_CUSTOM_BLOCK = {"qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                 "block_type", "ls_init_value"}  # fmt: skip
_VISION = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "no_ln_pre", "pool_type",
           "final_ln_after_pool", "pos_embed_type", "act_kwargs", "norm_kwargs"}  # fmt: skip
_VISION_IGNORED = {
    "patch_dropout",
    "output_tokens",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}
_VISION_OFF = _CUSTOM_BLOCK | {"attentional_pool", "timm_model_name"}
_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "no_causal_mask", "pool_type",
         "eos_id", "pad_id", "proj_bias", "proj_type", "act_kwargs", "norm_kwargs",
         "tokenizer_kwargs"}  # fmt: skip
_TEXT_IGNORED = {"output_tokens", "final_ln_after_pool", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
                 "tokenizer_mode"}  # fmt: skip
_TEXT_OFF = _CUSTOM_BLOCK | {"embed_cls", "hf_model_name", "hf_tokenizer_name"}
_WHY = {
    "ls_init_value": "LayerScale",
    "attentional_pool": "open_clip's attentional pooler (CoCa's)",
    "timm_model_name": "timm image towers",
    "hf_model_name": "HF text towers",
    "hf_tokenizer_name": "HF tokenizers (open_clip's SigLIP / multilingual models)",
    "embed_cls": "CoCa's appended text class token",
    "multimodal_cfg": "CoCa's multimodal decoder",
}


def _is_on(key, value):
    if key == "ls_init_value":
        return value is not None
    return value not in (None, "default") if key == "block_type" else bool(value)


def _check_keys(section, cfg, known, ignored, off):
    """Features we lack first (they say more than an unknown key next to them), then keys we do not know."""
    for key, value in cfg.items():
        if key in off and _is_on(key, value):
            why = _WHY.get(key, "this option")
            raise ConversionError(f"open_clip {section}{key}={value!r}: clip_jax's models have no {why}")
    for key in cfg:
        if key not in known | ignored | off:
            raise ConversionError(f"open_clip {section}{key} is an option this converter does not know")


def _act(quick_gelu, kwargs, section):
    if quick_gelu:
        if kwargs:
            raise ConversionError(
                f"open_clip {section}act_kwargs={kwargs!r} with quick_gelu: QuickGELU takes none"
            )
        return "quick_gelu"
    approximate = dict(kwargs or {}).pop("approximate", "none")
    if set(kwargs or {}) - {"approximate"} or approximate not in ("none", "tanh"):
        raise ConversionError(
            f"open_clip {section}act_kwargs={kwargs!r}: clip_jax has nn.GELU's erf and tanh forms"
        )
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _eps(kwargs, section):
    if set(kwargs or {}) - {"eps"}:
        raise ConversionError(f"open_clip {section}norm_kwargs={kwargs!r}: clip_jax's LayerNorm takes only eps")
    return float((kwargs or {}).get("eps", LN_EPS))


def _square(value, what):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"open_clip {what}={value}: clip_jax's ViT takes square images and patches")
        value = value[0]
    return int(value)


def _dims(sub, width, depth, mlp_ratio, heads):
    sub.width, sub.depth, sub.num_heads = int(width), int(depth), int(heads)
    sub.mlp_dim = int(width * mlp_ratio)  # as open_clip sizes its MLP
    dims = (sub.width, sub.depth, sub.mlp_dim, sub.num_heads)
    presets = [name for name, preset in layers.SIZES.items() if preset == dims]
    return presets[0] if presets else "mu"  # a cosmetic name: every dimension is set explicitly


def config_from_open_clip(model_cfg, preprocess_cfg=None):
    """open_clip model_cfg (+ preprocess_cfg) dicts -> (clip_jax ConfigDict, notes: list of one-line strings).

    Raises ConversionError naming the first option clip_jax cannot represent. Notes say what the import leaves
    to the user (no tokenizer for a vocabulary that is not CLIP's BPE; preprocessing our eval view lacks)."""
    if "multimodal_cfg" in model_cfg:
        raise ConversionError(
            f"open_clip multimodal_cfg: clip_jax's two-tower import has no {_WHY['multimodal_cfg']}"
        )
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ConversionError(f"the open_clip model config lacks {missing[0]} (is it an open_clip model config?)")
    _check_keys("", model_cfg, _TOP, _TOP_IGNORED, set())
    vis, txt = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    if isinstance(vis.get("layers", 12), (list, tuple)):
        raise ConversionError("open_clip vision_cfg.layers is a list: ModifiedResNet towers are not supported")
    _check_keys("vision_cfg.", vis, _VISION, _VISION_IGNORED, _VISION_OFF)
    _check_keys("text_cfg.", txt, _TEXT, _TEXT_IGNORED, _TEXT_OFF)
    c = config_lib.base()
    m, quick = c.model, bool(model_cfg.get("quick_gelu", False))
    m.embed_dim = int(model_cfg["embed_dim"])
    m.log_t_init = float(model_cfg.get("init_logit_scale", math.log(1 / 0.07)))
    bias = model_cfg.get("init_logit_bias")
    m.bias_init, c.loss.kind = (float(bias), "sigmoid") if bias is not None else (0.0, "softmax")
    _vision_config(m.image, vis, quick)
    notes = _text_config(c, txt, quick)
    return c, notes + _preprocess_config(c, preprocess_cfg or {})


def _vision_config(sub, vis, quick):
    pool, posemb = vis.get("pool_type", "tok"), vis.get("pos_embed_type", "learnable")
    if pool != "tok":
        raise ConversionError(
            f"open_clip vision_cfg.pool_type={pool!r}: clip_jax pools the class token ('tok'); its 'gap' has no "
            "class token in the sequence"
        )
    if posemb != "learnable":
        raise ConversionError(f"open_clip vision_cfg.pos_embed_type={posemb!r}: clip_jax imports 'learnable' only")
    width = int(vis.get("width", 768))
    patch = _square(vis.get("patch_size", 16), "vision_cfg.patch_size")
    size = _square(vis.get("image_size", 224), "vision_cfg.image_size")
    head_width = int(vis.get("head_width", 64))
    if width % head_width:
        raise ConversionError(f"open_clip vision_cfg.width={width} is not a multiple of head_width={head_width}")
    heads = width // head_width
    name = _dims(sub, width, vis.get("layers", 12), vis.get("mlp_ratio", 4.0), heads)
    sub.variant, sub.patch_size, sub.image_size = f"{name}/{patch}", patch, size
    sub.pool, sub.posemb, sub.proj, sub.proj_bias, sub.patch_bias = "cls", "learn", True, False, False
    # final_ln_after_pool with 'tok' pooling: LayerNorm acts per token, so before or after pooling is the same.
    sub.pre_ln = not vis.get("no_ln_pre", False)
    sub.act, sub.ln_eps = (
        _act(quick, vis.get("act_kwargs"), "vision_cfg."),
        _eps(vis.get("norm_kwargs"), "vision_cfg."),
    )


def _text_config(c, txt, quick):
    sub = c.model.text
    width = int(txt.get("width", 512))
    sub.variant = _dims(sub, width, txt.get("layers", 12), txt.get("mlp_ratio", 4.0), txt.get("heads", 8))
    sub.vocab_size, sub.max_len = int(txt.get("vocab_size", CLIP_BPE_VOCAB)), int(txt.get("context_length", 77))
    sub.causal = not txt.get("no_causal_mask", False)
    sub.mask_padding = False  # only read by bidirectional towers: open_clip's CLIP lets them attend to padding
    pool = txt.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "first", "last"):
        raise ConversionError(f"open_clip text_cfg.pool_type={pool!r}: clip_jax pools argmax, eos, first or last")
    sub.pool, sub.pad_id = pool, 0  # the pad id is not read by these pools (nor by open_clip's CLIP)
    sub.eos_id = int(txt.get("eos_id", 2)) if pool == "eos" else sub.vocab_size - 1
    proj_type = txt.get("proj_type", "linear")
    if proj_type not in ("linear", "none"):
        raise ConversionError(f"open_clip text_cfg.proj_type={proj_type!r}: clip_jax has 'linear' or 'none'")
    sub.proj, sub.proj_bias = proj_type == "linear", bool(txt.get("proj_bias", False))
    sub.act, sub.ln_eps = (
        _act(quick, txt.get("act_kwargs"), "text_cfg."),
        _eps(txt.get("norm_kwargs"), "text_cfg."),
    )
    kwargs = txt.get("tokenizer_kwargs") or {}
    if kwargs and kwargs != {"clean": "lower"}:
        raise ConversionError(f"open_clip text_cfg.tokenizer_kwargs={kwargs!r}: clip_bpe cleans as clean='lower'")
    if sub.vocab_size != CLIP_BPE_VOCAB:
        return [f"note: a {sub.vocab_size}-token vocabulary is not CLIP's BPE: no tokenizer set (set tokenizer.*)"]
    c.tokenizer.kind, c.tokenizer.path = "clip_bpe", ""  # open_clip's SimpleTokenizer, context = max_len
    return []


def _preprocess_config(c, pp):
    """open_clip PreprocessCfg -> data.*; notes for what the eval view does not reproduce."""
    d, size, notes = c.data, c.model.image.image_size, []
    d.image_mean, d.image_std = tuple(pp.get("mean") or OPENAI_MEAN), tuple(pp.get("std") or OPENAI_STD)
    interpolation, mode = pp.get("interpolation") or "bicubic", pp.get("resize_mode") or "shortest"
    if interpolation not in INTERPOLATIONS:
        raise ConversionError(f"open_clip preprocess_cfg.interpolation={interpolation!r}: not one open_clip has")
    d.resample = INTERPOLATIONS[interpolation]
    if mode in RESIZE_MODES:
        d.eval_crop = RESIZE_MODES[mode]
    else:
        d.eval_crop = "centre"
        notes.append(f"note: preprocess_cfg.resize_mode={mode!r} is not reproduced: clip_jax's eval view crops")
    if pp.get("size") is not None and _square(pp["size"], "preprocess_cfg.size") != size:
        notes.append(
            f"note: preprocess_cfg.size={pp['size']} but the model takes {size} px: evaluation uses {size}"
        )
    if len(d.image_mean) != 3 or len(d.image_std) != 3:
        raise ConversionError("open_clip preprocess_cfg mean/std must have 3 values (RGB)")
    return notes


def config_to_open_clip(cfg):
    """clip_jax config -> {"model_cfg": ..., "preprocess_cfg": ...} as open_clip_config.json holds them; raises
    ConversionError naming the first key open_clip's CLIP (ViT + text transformer) cannot represent."""
    m, d = cfg.model, cfg.data
    _check_exportable(cfg)
    image, text = layers.tower_dims(m.image, with_patch=True), layers.tower_dims(m.text, with_patch=False)
    quick = m.image.act == "quick_gelu"
    vision = {"image_size": m.image.image_size, "layers": image["depth"], "width": image["width"],
              "head_width": image["width"] // image["num_heads"], "mlp_ratio": _ratio(image),
              "patch_size": image["patch_size"]}  # fmt: skip
    if not m.image.pre_ln:
        vision["no_ln_pre"] = True
    txt = {"context_length": m.text.max_len, "vocab_size": m.text.vocab_size, "width": text["width"],
           "heads": text["num_heads"], "layers": text["depth"], "mlp_ratio": _ratio(text)}  # fmt: skip
    if not m.text.causal:
        txt["no_causal_mask"] = True
    txt["pool_type"] = m.text.pool
    if m.text.pool == "eos":
        txt["eos_id"] = m.text.eos_id
    if not m.text.proj:
        txt["proj_type"] = "none"
    elif m.text.proj_bias:
        txt["proj_bias"] = True
    for out, sub in ((vision, m.image), (txt, m.text)):
        if sub.act == "gelu_tanh":
            out["act_kwargs"] = {"approximate": "tanh"}
        if sub.ln_eps != LN_EPS:
            out["norm_kwargs"] = {"eps": sub.ln_eps}
    model_cfg = {"embed_dim": m.embed_dim, "quick_gelu": quick, "vision_cfg": vision, "text_cfg": txt,
                 "init_logit_scale": m.log_t_init}  # fmt: skip
    if cfg.loss.kind == "sigmoid":
        model_cfg["init_logit_bias"] = m.bias_init
    resize_mode = {crop: mode for mode, crop in RESIZE_MODES.items()}[d.eval_crop]
    preprocess = {"size": m.image.image_size, "mean": list(d.image_mean), "std": list(d.image_std),
                  "interpolation": d.resample, "resize_mode": resize_mode}  # fmt: skip
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def _ratio(dims):
    """mlp_ratio with int(width * ratio) == mlp_dim exactly (a plain quotient can round one below)."""
    ratio = dims["mlp_dim"] / dims["width"]
    while int(dims["width"] * ratio) < dims["mlp_dim"]:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _check_exportable(cfg):
    m = cfg.model
    if m.family != "two_tower":
        raise ConversionError(f"model.family={m.family!r}: only two_tower models export to open_clip's CLIP")
    want = {"image.pool": "cls", "image.posemb": "learn", "image.proj": True, "image.proj_bias": False,
            "image.patch_bias": False}  # fmt: skip
    for key, value in want.items():
        tower, name = key.split(".")
        if m[tower][name] != value:
            raise ConversionError(f"model.{key}={m[tower][name]!r}: open_clip's ViT needs {value!r}")
    if m.text.pool not in ("argmax", "eos", "first", "last"):
        raise ConversionError(f"model.text.pool={m.text.pool!r}: open_clip pools argmax, eos, first or last")
    if not m.text.causal and m.text.mask_padding:
        raise ConversionError(
            "model.text.mask_padding=True: open_clip's bidirectional text tower attends to padding"
        )
    if (m.image.act == "quick_gelu") != (m.text.act == "quick_gelu"):
        raise ConversionError(
            f"model.image.act={m.image.act!r}, model.text.act={m.text.act!r}: open_clip's quick_gelu sets both "
            "towers"
        )
    if cfg.data.eval_crop not in RESIZE_MODES.values():
        raise ConversionError(f"data.eval_crop={cfg.data.eval_crop!r} has no open_clip resize_mode")
    if cfg.data.resample not in ("bicubic", "bilinear"):
        raise ConversionError(f"data.resample={cfg.data.resample!r}: open_clip resizes bicubic or bilinear")
    if cfg.tokenizer.kind != "clip_bpe" or cfg.tokenizer.path or m.text.vocab_size != CLIP_BPE_VOCAB:
        raise ConversionError(
            f"tokenizer.kind={cfg.tokenizer.kind!r} (path {cfg.tokenizer.path!r}, vocabulary "
            f"{m.text.vocab_size}): open_clip pairs this text tower with its CLIP BPE tokenizer (clip_bpe with "
            "the vendored merges, 49408 ids)"
        )
