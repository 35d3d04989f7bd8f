"""Whole-config validation, run before anything is compiled or written (by the CLI's train, eval and caption
commands, train.run and the HF import).

Every choice-valued key is checked against the vocabulary of the module that implements it (CHOICES holds those
modules' own tuples and dicts, imported, never copied), every number against its range, and every fact that would
otherwise fail later, deep in a run: the tokenizer against the text tower (vocabulary size, special ids, its
file), the image size against the patch size, widths against head counts, regexes, batch sizes against the device
count, the zero-shot templates and class names. A failure is a `config.ConfigError` whose one-line message names
the key, the bad value, the valid values (with the closest one, by difflib, as in `config.check_keys`) and the fix.
What needs the data (dataset names, splits, feature keys, class counts) is checked when a run starts, before it
writes anything: input/preflight.py for training, the evaluators when evaluate/suite.py builds them.
"""

import difflib
import math
import os
import re

# The module itself, not through the evaluate package (whose functions import train, which imports this module).
import clip_jax.evaluate.templates as templates  # noqa: PLR0402
from clip_jax import config, losses, nan_policy, sharding, target
from clip_jax.config import ConfigError
from clip_jax.input import ops, pipeline
from clip_jax.input import tokenizer as tokenizer_lib
from clip_jax.models import layers, text, vit
from clip_jax.models.families import FAMILIES

# Config key -> the vocabulary of the module that implements it (a tuple of names, or a dict keyed by them).
CHOICES = {
    "nan_policy": nan_policy.POLICIES,  # applied by train.py's loop
    "data.train_crop": ops.TRAIN_CROPS,
    "data.eval_crop": ops.EVAL_CROPS,
    "data.resample": ops.RESAMPLE,
    "tokenizer.kind": tokenizer_lib.KINDS,
    "model.family": FAMILIES,
    "model.dtype": layers.DTYPES,
    "model.remat": layers.REMAT_POLICIES,
    "model.image.pool": vit.POOLS,
    "model.image.posemb": vit.POSEMBS,
    "model.image.act": layers.ACTIVATIONS,
    "model.text.pool": text.POOLS,
    "model.text.act": layers.ACTIVATIONS,
    "loss.kind": losses.KINDS,
    "loss.impl": losses.IMPLS,
}
# Choice keys where '' is also valid: a tower's remat policy ('' = model.remat), a logical axis's mesh axis ('' =
# replicated; one key per logical axis name, see `sharding_keys`).
CHOICES_OR_EMPTY = {"model.image.remat": layers.REMAT_POLICIES, "model.text.remat": layers.REMAT_POLICIES}
# The other string keys, and what checks them: names, splits and feature keys of tfds datasets (opened by the
# data pipeline and the evaluators: a bad one is a one-line DataError), paths, regexes and parsed values.
OTHER_STRINGS = (
    "data.name", "data.data_dir", "data.train_split", "data.image_key", "data.text_key",
    "data.mixture",  # parsed here with the pipeline's parser
    "data.shards", "data.shard_index_dir",  # listed and indexed when a run starts (input/shards.py: ShardError)
    "tokenizer.path",  # read here by the tokenizer it configures
    "model.image.variant", "model.text.variant",  # parsed here against layers.SIZES
    "optim.freeze", "init.params",  # compiled here as regexes
    "init.workdir",  # read when a new run starts (warm_start.py)
    "target.metric",  # checked here against evaluate/sections.METRICS (target.goal_of)
)  # fmt: skip
# The string keys of evals.<name> sections: type (checked by config.check_keys against evaluate/sections.py),
# templates and class_names (checked here against evaluate/templates.py), datasets, splits and features (opened by
# the evaluator when it is built, before training starts: a bad one is a one-line DataError).
SECTION_STRINGS = (
    "type", "templates", "class_names", "dataset", "split", "train_split", "image_key", "label_key", "text_key",
)  # fmt: skip

# Numbers that must be > 0, >= 0, or either positive or -1 (-1 = "the default": from the variant, the whole
# split, the loss's own tile ...).
_POSITIVE = (
    "batch_size", "total_steps", "accum_steps", "log_every", "keep_ckpts", "optim.lr", "optim.eps",
    "data.min_image_size", "data.read_threads", "model.embed_dim", "model.image.image_size", "model.image.ln_eps",
    "model.text.vocab_size", "model.text.max_len", "model.text.ln_eps",
    "caption.beam_size",
)  # fmt: skip
_NON_NEGATIVE = (
    "ckpt_every", "eval_every", "optim.warmup_steps", "optim.weight_decay", "optim.clip_norm", "optim.end_lr_frac",
    "loss.contrastive_weight", "loss.caption_weight", "caption.length_penalty",
    "data.num_workers", "data.prefetch", "data.device_prefetch", "model.text.eos_id", "model.text.pad_id",
    "model.image.naflex_max_patches",
)  # fmt: skip
_MAY_BE_INFINITE = ("model.max_log_t",)  # float keys where inf means "off" (the temperature cap); never NaN
_POSITIVE_OR_DEFAULT = (
    "model.image.width", "model.image.depth", "model.image.mlp_dim", "model.image.num_heads",
    "model.image.patch_size", "model.text.width", "model.text.depth", "model.text.mlp_dim", "model.text.num_heads",
    "model.coca.decoder_depth", "model.coca.pooler_heads", "loss.tile",
)  # fmt: skip


def sharding_keys(cfg) -> list[str]:
    """'sharding.<logical axis>' for every rule of the config's table."""
    return [f"sharding.{name}" for name in cfg.sharding]


def choice(key: str, value, names) -> None:
    """Raise unless `value` is one of `names` (a tuple, or a dict's keys); the message suggests the closest."""
    names = tuple(names)
    if value in names:
        return
    named = [n for n in names if n]
    close = difflib.get_close_matches(str(value), named, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; e.g. --config.{key}={named[0]}"
    raise ConfigError(f"config key '{key}' is {value!r}; choose one of {', '.join(map(repr, names))}{hint}")


def validate(cfg, num_devices: int, *, tokenizer: bool = True) -> None:
    """Reject a config before anything is compiled or written: keys and types (`config.check_keys`), choices,
    ranges, the mesh against `num_devices` (the devices of the batch axes), and the facts below. Raises
    ConfigError with a one-line message.

    tokenizer: also build the configured tokenizer and check that it fits the text tower. The HF import turns
    this off: it stores weights, and a model whose tokenizer it cannot recognise gets one chosen by its user."""
    config.check_keys(cfg)
    flat = config._flatten(cfg)
    for key, names in CHOICES.items():
        choice(key, flat[key], names)
    for key, names in CHOICES_OR_EMPTY.items():
        choice(key, flat[key], (*names, ""))
    for key in sharding_keys(cfg):
        choice(key, flat[key], (*sharding.MESH_AXES, ""))
    _check_ranges(flat)
    config.mesh_shape(cfg, num_devices)  # raises on a bad mesh
    _check_batches(cfg, num_devices)
    _check_data(cfg)
    _check_model(cfg)
    if tokenizer:
        _check_tokenizer(cfg)
    _check_optim(cfg)
    _check_evals(cfg, num_devices)
    target.goal_of(cfg)  # an unknown target metric or one never evaluated
    if FAMILIES[cfg.model.family].captions:
        _check_decoder(cfg)


def _check_ranges(flat) -> None:
    for key, value in flat.items():
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (finite or (key in _MAY_BE_INFINITE and not math.isnan(value))):
            raise ConfigError(f"config key '{key}' is {value}; use a finite number")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {flat[key]}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {flat[key]}")
    for key in _POSITIVE_OR_DEFAULT:
        if flat[key] <= 0 and flat[key] != -1:
            raise ConfigError(f"config key '{key}' must be positive, or -1 for the default; got {flat[key]}")
    for key in ("data.image_mean", "data.image_std"):
        values = flat[key]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if len(values) != 3 or not numbers or (key.endswith("std") and min(values) <= 0):
            raise ConfigError(
                f"config key '{key}' is {values!r}; use 3 finite numbers (R, G, B){' > 0' * key.endswith('std')}, "
                f"e.g. --config.{key}='(0.5, 0.5, 0.5)'"
            )
    for key in ("optim.b1", "optim.b2", "model.image.patch_dropout", "noise_scale_decay"):
        if not 0 <= flat[key] < 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {flat[key]}")
    if not 0 < flat["data.crop_min_area"] <= 1:
        raise ConfigError(f"config key 'data.crop_min_area' must be in (0, 1], got {flat['data.crop_min_area']}")
    if flat["debug.poison_step"] < -1:
        raise ConfigError(f"config key 'debug.poison_step' is {flat['debug.poison_step']}; use a step >= 1, or -1")


def _check_batches(cfg, num_devices: int) -> None:
    """The global batch, its micro-batches and the loss tiles against the devices of the batch axes."""
    if cfg.batch_size % num_devices:
        lo = cfg.batch_size // num_devices * num_devices
        near = " or ".join(map(str, sorted({max(lo, num_devices), lo + num_devices})))  # one value when lo is 0
        raise ConfigError(
            f"batch_size={cfg.batch_size} does not divide over the {num_devices} devices of the batch axes; "
            f"use a multiple of {num_devices}, e.g. {near}"
        )
    if cfg.batch_size % (num_devices * cfg.accum_steps):
        per = num_devices * cfg.accum_steps
        raise ConfigError(
            f"batch_size={cfg.batch_size} does not split into accum_steps={cfg.accum_steps} micro-batches over "
            f"{num_devices} devices; use a multiple of {per} (devices x accum_steps), or change accum_steps"
        )
    if cfg.noise_scale and cfg.accum_steps < 2:
        raise ConfigError(
            f"noise_scale=True needs gradients at two batch sizes: set accum_steps >= 2 (it is {cfg.accum_steps}; "
            "the noise scale compares the GradCache micro-batch shares with the whole step), or noise_scale=False"
        )
    n = cfg.batch_size // num_devices
    if cfg.loss.tile > 0 and n % cfg.loss.tile:
        raise ConfigError(
            f"loss.tile={cfg.loss.tile} does not divide the per-device batch {n} "
            f"(batch_size {cfg.batch_size} over {num_devices} devices); pick a divisor of {n}, or -1"
        )


def _check_data(cfg) -> None:
    """The training data's name and mixture; whether the datasets exist is checked when a run starts
    (input/preflight.py), as that needs the data."""
    if not cfg.data.name and not cfg.data.shards.strip():
        raise ConfigError("config key 'data.name' is empty; name a tfds dataset (e.g. clip_shapes) or set data.shards")
    try:
        pipeline.mixture(cfg.data)
    except ValueError as e:
        raise ConfigError(f"config key 'data.mixture' is {cfg.data.mixture!r}: {e}") from None
    if not cfg.data.shards.strip():
        return
    clash = {"data.mixture": cfg.data.mixture.strip()}
    clash.update({"data.image_key": cfg.data.image_key != "image", "data.text_key": cfg.data.text_key != "caption"})
    for key, value in clash.items():
        if value:
            raise ConfigError(
                f"config key '{key}' cannot be combined with data.shards (tar records are 'image' and 'caption', "
                "read in place); leave it at its default or clear data.shards"
            )


def _check_model(cfg) -> None:
    """Shape facts the model would otherwise discover while it is being built or traced."""
    image, txt = cfg.model.image, cfg.model.text
    size, slash, patch = image.variant.partition("/")
    if size not in layers.SIZES or not slash or not patch.isdigit() or int(patch) <= 0:
        close = difflib.get_close_matches(size, list(layers.SIZES), n=1)
        raise ConfigError(
            f"config key 'model.image.variant' is {image.variant!r}; use '<size>/<patch>' with size one of "
            f"{', '.join(layers.SIZES)}, e.g. '{close[0] if close else 'B'}/16'"
        )
    choice("model.text.variant", txt.variant, layers.SIZES)
    cap = cfg.model.max_log_t
    if 0 < cap < math.inf and cfg.model.log_t_init > cap:
        raise ConfigError(
            f"config key 'model.log_t_init' is {cfg.model.log_t_init} (t = {math.exp(cfg.model.log_t_init):.4g}), "
            f"above model.max_log_t={cap:.4g} (t = {math.exp(cap):.4g}): the loss would use the cap from step 0; "
            "lower log_t_init, or raise max_log_t (<= 0 or inf: no cap)"
        )
    dims = {"image": _dims(cfg, "image"), "text": _dims(cfg, "text")}
    patch = dims["image"]["patch_size"]
    if image.image_size < patch:  # a size that is not a multiple leaves its last pixels unseen (vit.py)
        raise ConfigError(
            f"model.image.image_size={image.image_size} is smaller than the patch size {patch} "
            f"(model.image.variant / model.image.patch_size); use at least {patch}"
        )
    if image.posemb == "sincos2d" and dims["image"]["width"] % 4:  # layers.posemb_sincos_2d: 4 channel groups
        raise ConfigError(
            f"model.image.posemb='sincos2d' needs a width divisible by 4, got model.image.width="
            f"{dims['image']['width']}; change the width or use --config.model.image.posemb=learn"
        )
    for tower, sub in (("image", image), ("text", txt)):
        width = dims[tower]["width"]
        # A family whose image embedding comes from an attentional pooler (CoCa) projects there, not with proj.
        uses_proj = tower == "text" or not FAMILIES[cfg.model.family].image_proj_from_pooler
        if uses_proj and not sub.proj and width != cfg.model.embed_dim:
            raise ConfigError(
                f"model.{tower}.proj=False needs model.{tower}.width == model.embed_dim, got {width} != "
                f"{cfg.model.embed_dim}; set --config.model.embed_dim={width} or model.{tower}.proj=True"
            )
    if image.naflex_max_patches > 0:
        _check_naflex(cfg, patch)
    for key in ("eos_id", "pad_id") if txt.pool == "eos" else ("pad_id",):  # eos_id matters only to 'eos'
        if txt[key] >= txt.vocab_size:
            raise ConfigError(
                f"config key 'model.text.{key}' is {txt[key]}, outside the vocabulary "
                f"(model.text.vocab_size={txt.vocab_size})"
            )


NAFLEX_MAX_PATCHES = 16_384  # a 128 x 128 patch grid


def _check_naflex(cfg, patch: int) -> None:
    """A NaFlex image tower (models/naflex.py) is SigLIP 2's: a two_tower family, MAP pooling, a learned position
    grid of image_size / patch, no pre-LN, no projection (its width is the embedding)."""
    image, n = cfg.model.image, cfg.model.image.naflex_max_patches
    why = f"model.image.naflex_max_patches={n} (a SigLIP 2 NaFlex tower)"
    if n > NAFLEX_MAX_PATCHES:  # every eval batch is padded to the budget: a huge one only exhausts memory
        raise ConfigError(f"{why} is over {NAFLEX_MAX_PATCHES}; SigLIP 2's checkpoints use 256 to 1024")
    if cfg.model.family != "two_tower":
        raise ConfigError(f"{why} is built for model.family='two_tower', not {cfg.model.family!r}; set it to 0")
    want = {"pool": "map", "posemb": "learn", "pre_ln": False, "proj": False}
    for key, value in want.items():
        if image[key] != value:
            raise ConfigError(f"{why} needs model.image.{key}={value!r}, got {image[key]!r}")
    if image.image_size % patch:
        raise ConfigError(
            f"{why} needs model.image.image_size (the position grid times the patch) a multiple of the patch "
            f"{patch}, got {image.image_size}"
        )


def check_trainable(cfg) -> None:
    """Training feeds fixed square images: a NaFlex model (import and evaluation only) is refused in one line."""
    n = cfg.model.image.naflex_max_patches
    if n > 0:
        raise ConfigError(
            f"model.image.naflex_max_patches={n}: NaFlex models import and evaluate only; training feeds fixed "
            "square images, which only a fixed-resolution tower (naflex_max_patches=0) takes"
        )


def _dims(cfg, tower: str) -> dict:
    """One tower's width, depth, mlp_dim, num_heads (and patch_size) as the model resolves them."""
    sub = cfg.model[tower]
    try:
        return layers.tower_dims(sub, with_patch=tower == "image")
    except ValueError as e:  # e.g. a width that the head count does not divide
        raise ConfigError(
            f"config keys model.{tower}.*: {e} (model.{tower}.variant={sub.variant!r} sets the sizes left at -1);"
            f" set model.{tower}.num_heads to a divisor of the width"
        ) from None


def _check_tokenizer(cfg) -> None:
    """Build the configured tokenizer (cheap: its vocabulary file is read once per process) and let it check the
    text tower: vocabulary size, start/end/pad ids, max_len (tokenizer.make's checks, made one line here)."""
    kind, path = cfg.tokenizer.kind, cfg.tokenizer.path
    if kind == "hashed_words" and path:
        raise ConfigError(
            f"config key 'tokenizer.path' is {path!r} but tokenizer.kind='hashed_words' reads no file; set "
            "--config.tokenizer.path='' or choose the tokenizer.kind that reads it"
        )
    if path and not os.path.isfile(path):
        raise ConfigError(
            f"config key 'tokenizer.path' is {path!r}: no such file; point it at the {kind} tokenizer's file"
            + (" or set it to '' for the vendored merge list" if kind == "clip_bpe" else "")
        )
    try:
        tok = tokenizer_lib.make(cfg)
    except ValueError as e:  # make()'s own checks name the key to change and the value to use
        raise ConfigError(" ".join(str(e).split())) from None
    except (OSError, RuntimeError) as e:  # a file that is missing or not a tokenizer of this kind
        raise ConfigError(
            f"config key 'tokenizer.path' is {path!r}, which tokenizer.kind={kind!r} cannot read "
            f"({' '.join(str(e).split())}); point it at that tokenizer's file"
        ) from None
    if FAMILIES[cfg.model.family].captions and tok.bos_id < 0:
        raise ConfigError(
            f"model.family={cfg.model.family!r} decodes from a start token, and the tokenizer.kind={kind!r} "
            "tokenizer has none; choose one that has (hashed_words, clip_bpe, or a sentencepiece model with <s>)"
        )


def _check_optim(cfg) -> None:
    for key in ("optim.freeze", "init.params"):
        try:
            re.compile(config._flatten(cfg)[key])
        except re.error as e:
            raise ConfigError(f"config key '{key}' is not a valid regex ({e}); e.g. '^image/'") from None
    if cfg.init.params and not cfg.init.workdir:
        raise ConfigError(
            f"config key 'init.params' is {cfg.init.params!r} but init.workdir is empty; set "
            "--config.init.workdir to the run to copy parameters from, or init.params=''"
        )


def _check_evals(cfg, num_devices: int) -> None:
    """Every evals.<name> section that is on (its keys and types were checked against its evaluator type by
    config.check_keys): sizes, batches that divide over the devices, zero-shot prompts from evaluate/templates.py's
    vocabulary, and captioning only for families that caption."""
    for name, s in cfg.evals.items():
        key = f"evals.{name}"
        if not s.dataset:
            continue
        for k in ("batch_size", "tile", "c"):
            if k in s and not s[k] > 0:
                raise ConfigError(f"config key '{key}.{k}' must be positive, got {s[k]}")
        for k in ("max_examples", "every"):
            if s[k] < -1 or (k == "max_examples" and s[k] == 0):
                raise ConfigError(f"config key '{key}.{k}' is {s[k]}; use a positive number or -1")
        if s.batch_size % num_devices:
            raise ConfigError(
                f"{key}.batch_size={s.batch_size} does not divide over the {num_devices} devices; use a multiple "
                f"of {num_devices}"
            )
        if s.type == "zeroshot":
            choice(f"{key}.templates", s.templates, ("", *templates.template_choices()))
            choice(f"{key}.class_names", s.class_names, templates.class_name_choices())
        if s.type == "captioning" and not FAMILIES[cfg.model.family].captions:
            able = [n for n, f in FAMILIES.items() if f.captions]
            raise ConfigError(
                f"{key} is a captioning evaluator but model.family={cfg.model.family!r} does not caption; set "
                f"--config.{key}.dataset='' or train a family that captions ({', '.join(able)})"
            )


def _check_decoder(cfg) -> None:
    """A captioning family's text tower is a decoder: it must be causal (no look-ahead) and generation must fit
    its positions."""
    txt, coca, cap = cfg.model.text, cfg.model.coca, cfg.caption
    if not txt.causal:
        raise ConfigError(
            f"model.family={cfg.model.family!r} needs model.text.causal=True (the text tower is a decoder)"
        )
    if txt.max_len < 2:
        raise ConfigError(f"model.text.max_len={txt.max_len}: a caption needs at least start and end tokens")
    for key in ("num_queries", "caption_chunk"):
        if coca[key] <= 0:
            raise ConfigError(f"config key 'model.coca.{key}' must be positive, got {coca[key]}")
    image_dims = _dims(cfg, "image")
    heads = coca.pooler_heads if coca.pooler_heads > 0 else image_dims["num_heads"]
    for tower, dims in (("image", image_dims), ("text", _dims(cfg, "text"))):
        if dims["width"] % heads:
            raise ConfigError(
                f"model.coca.pooler_heads={heads} does not divide model.{tower}.width={dims['width']} "
                "(the attentional poolers use that many heads); pick a common divisor of both widths"
            )
    if cap.max_len > txt.max_len or cap.max_len in (0, 1) or cap.max_len < -1:
        raise ConfigError(
            f"config key 'caption.max_len' is {cap.max_len}; use 2..model.text.max_len={txt.max_len}, or -1"
        )
