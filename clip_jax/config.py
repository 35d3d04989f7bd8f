"""Every configuration key, its default and what it means; key and type checks.

A config file in configs/ returns `base()` with some values changed. `base()` is locked, so a config file or a
command-line override that names a key that does not exist fails at once (ml_collections suggests the closest
key). `config_checks.validate()` then checks every value (choices against the modules that implement them, ranges,
values against each other and the device count) before anything is compiled.
"""

import difflib
import math

import ml_collections


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and how to fix it."""


def base() -> ml_collections.ConfigDict:
    """Defaults: ViT-B/16 CLIP on a pod-sized batch. Configs override what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for parameter init, data order and any other randomness

    c.batch_size = 32768  # global batch (all devices, all hosts); must divide by the batch-axis device count
    c.total_steps = 100_000  # optimizer steps
    c.accum_steps = 1  # micro-batches per step (GradCache: the loss still sees the whole batch's negatives)
    c.log_every = 100  # steps between metric writes (metrics leave the device only then)
    c.eval_every = 5000  # steps between evaluations (zero-shot, retrieval; 0 = only at the end)
    c.ckpt_every = 1000  # steps between checkpoints (0 = only at the end)
    c.keep_ckpts = 3  # how many recent checkpoints to keep
    c.nan_policy = "stop"  # NaN/Inf loss or grads (nan_policy.py): stop (name step and last good ckpt) | skip
    # McCandlish et al.'s gradient noise scale B_simple, logged as 'noise_scale' (with 'grad_sq', 'trace_sigma'):
    # from the GradCache micro-batch shares vs the whole step's gradient (noise_scale.py says what it measures).
    c.noise_scale = False  # log the gradient noise scale (needs accum_steps >= 2); off: the step is unchanged
    c.noise_scale_decay = 0.99  # its moving averages' weight of the past per step, in [0, 1) (0.99: ~100 steps)
    # Train until a metric reaches a target (target.py); total_steps becomes the budget. The metric is an evaluator's
    # '<evals section>/<metric>' (checked at each of its periodic runs, e.g. 'zeroshot/top1') or 'loss' (the
    # training loss over each log interval); reached at >= value for accuracies/recalls, <= for losses.
    c.target = ml_collections.ConfigDict()
    c.target.metric = ""  # '' = off: train total_steps
    c.target.value = 0.0  # the target, in the metric's units (% for accuracies and recalls)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # size of the 'data' mesh axis (-1 = all devices not used by the other axis)
    c.mesh.fsdp = 1  # size of the 'fsdp' mesh axis (parameters sharded over it; -1 = the rest)
    # Logical parameter axis -> mesh axis ('' = replicated). One table; changing parallelism never touches models.
    c.sharding = ml_collections.ConfigDict()
    c.sharding.embed = "fsdp"  # the model width of every weight: FSDP shards it
    c.sharding.mlp = ""  # MLP hidden dim
    c.sharding.heads = ""  # attention heads
    c.sharding.kv = ""  # per-head dim
    c.sharding.vocab = ""  # token vocabulary
    c.sharding.patch = ""  # flattened patch pixels
    c.sharding.pos = ""  # positions
    c.sharding.joint = ""  # joint embedding dim

    c.data = ml_collections.ConfigDict()
    c.data.name = "clip_shapes"  # tfds dataset under data_dir (the embedded sets are built on demand)
    c.data.data_dir = "tfds_data"  # tfds data_dir; nothing is ever downloaded
    c.data.train_split = "train"  # tfds split for training
    c.data.image_key = "image"  # feature holding the image
    c.data.text_key = "caption"  # feature holding the caption(s); 'a/b' = nested (coco_captions: 'captions/text')
    c.data.num_workers = 0  # grain worker processes for decoding (0 = in the main process)
    # A checkpoint holds each process's own data position; on another process count a resume is refused unless
    # this is True: then each process starts its new slice at the checkpoint's step (near-exact, not exact).
    c.data.resume_reshuffle = False  # allow resuming on a different number of processes (re-slices the data)
    c.data.prefetch = 2  # batches prepared ahead of the train step
    c.data.device_prefetch = 1  # batches copied to the devices ahead of the train step (0 = none)
    c.data.cache = False  # decode the whole train split into memory once (small datasets: no per-step decoding)
    c.data.min_image_size = 8  # images with a shorter side are skipped (and counted as tiny_image)
    c.data.train_crop = "resize"  # input/ops.py TRAIN_CROPS: resize (whole image) | inception (random-resized)
    c.data.crop_min_area = 0.9  # inception crop's smallest area fraction (0.9: captions name the scene)
    c.data.flip = False  # random horizontal flips in training (off: captions can say left/right)
    c.data.eval_crop = "resize"  # input/ops.py EVAL_CROPS: resize (whole image) | centre (shorter side, square)
    # Pixel normalisation (x/255 - mean) / std per RGB channel. The default maps to [-1, 1] (SigLIP's too);
    # imported OpenAI CLIPs need their own statistics (convert/hf.py records them).
    c.data.image_mean = (0.5, 0.5, 0.5)  # per-channel mean subtracted from pixels scaled to [0, 1]
    c.data.image_std = (0.5, 0.5, 0.5)  # per-channel std the centred pixels are divided by
    c.data.resample = "bicubic"  # input/ops.py RESAMPLE: Pillow filter of every resize, train and eval
    c.data.mixture = ""  # train on several tfds sets: 'name:weight,name:weight' (overrides data.name; same keys)
    # Webdataset tar shards (img2dataset's output) read in place, no conversion (input/shards.py): a path, glob or
    # {000000..000999} range, local or gs://. Records are 'image' + 'caption'.
    c.data.shards = ""  # tar shards to train on ('' = none); overrides data.name for training
    c.data.shard_index_dir = ""  # where each shard's sample index is cached ('' = <data.data_dir>/shard_index)
    c.data.read_threads = 2  # threads per data process that read and decode records (more for remote shards)

    c.tokenizer = ml_collections.ConfigDict()
    # input/tokenizer.py KINDS: hashed_words | clip_bpe | sentencepiece | siglip_sentencepiece | gemma_sentencepiece
    c.tokenizer.kind = "hashed_words"  # text -> ids (SigLIP 2's is gemma_sentencepiece: A-Z lower-cased, no BOS)
    c.tokenizer.path = ""  # vocab/model file: clip_bpe '' = the vendored merges; *sentencepiece: a .model

    c.model = ml_collections.ConfigDict()
    c.model.family = "two_tower"  # models/families.py FAMILIES: two_tower (CLIP/SigLIP/LiT) | coca
    c.model.embed_dim = 512  # joint embedding dim
    c.model.dtype = "float32"  # compute dtype (params stay fp32; loss in fp32)
    c.model.log_t_init = math.log(1 / 0.07)  # CLIP init; SigLIP uses log(10)
    # CLIP clips t at 100 (its paper, §2.5; open_clip clamps after every step): the loss never sees a larger t and
    # the stored log t is clamped after each update.
    c.model.max_log_t = math.log(100.0)  # cap on log t (t = exp(log_t) scales the logits); <= 0 or inf: no cap
    c.model.bias_init = 0.0  # SigLIP uses -10; unused by the softmax loss
    c.model.remat = "none"  # layers.py REMAT_POLICIES: none | dots (keep matmul outputs) | full (block inputs)
    c.model.scan_layers = True  # lax.scan over the stacked blocks (False: unrolled; same parameters)
    c.model.image = ml_collections.ConfigDict()
    c.model.image.variant = "B/16"  # "<size>/<patch>", size in mu,Ti,S,M,B,L,So400m,H,g,G
    c.model.image.width = -1  # -1 = from the variant
    c.model.image.depth = -1  # -1 = from the variant
    c.model.image.mlp_dim = -1  # -1 = from the variant
    c.model.image.num_heads = -1  # -1 = from the variant
    c.model.image.patch_size = -1  # -1 = from the variant
    c.model.image.image_size = 224  # input resolution (square)
    c.model.image.pool = "cls"  # gap | map | cls
    c.model.image.posemb = "learn"  # learn | sincos2d
    c.model.image.proj = True  # linear projection to embed_dim
    c.model.image.remat = ""  # this tower's remat policy ('' = model.remat)
    c.model.image.proj_bias = True  # the projection has a bias (OpenAI CLIP's has none)
    c.model.image.patch_bias = True  # the patch embedding has a bias (OpenAI CLIP's has none)
    c.model.image.pre_ln = False  # LayerNorm on the embedded tokens before the first block (OpenAI CLIP's ln_pre)
    c.model.image.act = "gelu_tanh"  # MLP activation: gelu_tanh | gelu (exact erf) | quick_gelu (OpenAI CLIP)
    c.model.image.ln_eps = 1e-6  # LayerNorm epsilon (HF CLIP uses 1e-5)
    c.model.image.patch_dropout = 0.0  # FLIP: fraction of patch tokens dropped at random, training only; [0, 1)
    # SigLIP 2 NaFlex (models/naflex.py; import and evaluation only): > 0 = images keep their aspect ratio as at most
    # this many patches (Siglip2ImageProcessor's max_num_patches), position table resized per image; image_size is
    # then the table's grid times the patch. 0 = fixed square images of image_size.
    c.model.image.naflex_max_patches = 0  # max patches per image of a NaFlex tower (0 = a fixed-resolution ViT)
    c.model.text = ml_collections.ConfigDict()
    c.model.text.variant = "M"  # CLIP B/16's text tower: width 512, depth 12, 8 heads
    c.model.text.width = -1  # -1 = from the variant
    c.model.text.depth = -1  # -1 = from the variant
    c.model.text.mlp_dim = -1  # -1 = from the variant
    c.model.text.num_heads = -1  # -1 = from the variant
    c.model.text.vocab_size = 49408  # token vocabulary size (the tokenizer must agree)
    c.model.text.max_len = 77  # tokens per caption, start and end tokens included
    c.model.text.causal = True  # causal (CLIP) or bidirectional (SigLIP) attention
    c.model.text.pool = "eos"  # eos | last | first | mean | argmax (largest id: HF CLIP's legacy EOS rule)
    c.model.text.eos_id = 49407  # end-of-text id (pooling position for 'eos')
    c.model.text.pad_id = 0  # padding id
    c.model.text.proj = True  # linear projection to embed_dim
    c.model.text.remat = ""  # this tower's remat policy ('' = model.remat)
    c.model.text.proj_bias = True  # the projection has a bias (SigLIP's head has one, OpenAI CLIP's has none)
    c.model.text.mask_padding = True  # bidirectional towers ignore padding (False: attend to it, as SigLIP's)
    c.model.text.act = "gelu_tanh"  # MLP activation: gelu_tanh | gelu (exact erf) | quick_gelu (OpenAI CLIP)
    c.model.text.ln_eps = 1e-6  # LayerNorm epsilon (HF CLIP uses 1e-5)
    # CoCa (model.family='coca'): model.text is the unimodal decoder (causal; its 'eos' output is the text
    # embedding), model.image the ViT whose tokens the attentional poolers read (its pool/proj are not used).
    c.model.coca = ml_collections.ConfigDict()
    c.model.coca.decoder_depth = -1  # multimodal (cross-attending) decoder layers (-1 = model.text's depth)
    c.model.coca.num_queries = 256  # queries of the decoder's attentional pooler (the contrastive one has 1)
    c.model.coca.pooler_heads = -1  # heads of both attentional poolers (-1 = model.image's num_heads)
    c.model.coca.tie_embedding = True  # vocabulary head = the token embedding table, transposed
    c.model.coca.caption_chunk = 8  # caption positions per chunk of the cross-entropy (bounds the live logits)

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
    c.loss.impl = "ring"  # ring (memory-flat) | allgather (n x B logits per device; the baseline)
    c.loss.tile = -1  # rows per tile inside a device (-1 = the loss's default)
    c.loss.contrastive_weight = 1.0  # weight of the contrastive term
    c.loss.caption_weight = 2.0  # weight of the captioning cross-entropy (models that caption: coca)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4  # peak learning rate
    c.optim.warmup_steps = 10_000  # linear warmup from 0
    c.optim.end_lr_frac = 0.0  # cosine decays to lr * end_lr_frac at total_steps
    c.optim.b1 = 0.9  # AdamW beta1
    c.optim.b2 = 0.98  # AdamW beta2
    c.optim.eps = 1e-6  # AdamW epsilon
    c.optim.weight_decay = 0.2  # decoupled; kernels and embedding tables only (see optim.py)
    c.optim.clip_norm = 1.0  # global gradient-norm clip (0 = off)
    c.optim.freeze = ""  # regex over parameter paths to lock, e.g. '^image/' (LiT); '' = train everything

    # Start from another run's parameters (LiT: a pretrained image tower). Used only when the workdir is new.
    c.init = ml_collections.ConfigDict()
    c.init.workdir = ""  # workdir (or its checkpoints/ dir) to copy parameters from ('' = random init)
    c.init.params = ""  # regex over parameter paths to copy, e.g. '^image/' ('' = all of them)

    # Evaluators, any number: evals.<name> = evaluator(type, key=value, ...) (evaluate/sections.py lists every
    # type's keys and defaults). Each runs every `every` steps during training (-1: eval_every) and at the end.
    c.evals = ml_collections.ConfigDict()
    c.evals.zeroshot = evaluator("zeroshot", dataset="clip_shapes")  # '' dataset = off

    # Caption search (the `caption` command and the 'captioning' evaluator; families that caption: coca).
    c.caption = ml_collections.ConfigDict()
    c.caption.beam_size = 4  # beams of the caption search (1 = greedy decoding)
    c.caption.length_penalty = 0.6  # beams ranked by log-prob / length**length_penalty (0 = raw log-prob)
    c.caption.max_len = -1  # longest caption in tokens, start and end included (-1 = model.text.max_len)

    # Fault injection for the reliability tests; leave at the defaults in real runs.
    c.debug = ml_collections.ConfigDict()
    c.debug.poison_step = -1  # test only: this step's images become NaN, to exercise nan_policy (-1 = never)

    c.lock()
    c.evals.unlock()  # config files add sections (evals.<name> = evaluator(...)); each section stays locked
    for section in c.evals.values():
        section.lock()
    return c


# Keys that earlier versions saved with a checkpoint and that no longer exist (the eval.* / caption.dataset keys
# became evals.<name> sections); from_dict skips them, so an old run's checkpoint still loads.
RETIRED = ("eval.", "caption.dataset", "caption.split", "caption.max_examples", "caption.batch_size")


def from_dict(saved: dict, *, strict: bool = True) -> ml_collections.ConfigDict:
    """A config saved as JSON (a checkpoint's, an import's config.json) -> base() with its values; lists become
    tuples and evals.<name> sections are rebuilt with evaluator(). A saved key that base() lacks raises ConfigError
    when strict, and is skipped otherwise (a run saved by a newer version); RETIRED keys are always skipped."""
    cfg = base()
    known = _flatten(cfg)
    for key, value in _flatten(ml_collections.ConfigDict(saved)).items():
        if key.startswith(RETIRED) or key.startswith("evals."):
            continue
        if key not in known:
            if strict:
                raise ConfigError(f"the saved config has unknown key '{key}'{_closest(key, known)}")
            continue
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = tuple(value) if isinstance(value, list) else value
    sections = saved.get("evals", {})
    for name in list(cfg.evals):
        if name not in sections:
            del cfg.evals[name]  # the saved run had no such section
    for name, section in sections.items():
        values = {k: v for k, v in section.items() if k != "type"}
        cfg.evals[name] = evaluator(section.get("type", ""), **values)
    return cfg


def evaluator(kind: str, **values) -> ml_collections.ConfigDict:
    """An `evals.<name>` section: evaluator type `kind` (a key of evaluate/sections.py TYPES) with its defaults
    and `values` over them. Raises ConfigError naming an unknown type or key (and the closest valid one)."""
    vocabulary = _section_vocabulary(kind, "evaluator()")
    section = ml_collections.ConfigDict({**vocabulary, "type": kind})
    for key, value in values.items():
        if key not in vocabulary or key == "type":
            raise ConfigError(f"evaluator type {kind!r} has no key {key!r}{_closest(key, vocabulary)}")
        try:
            section[key] = value
        except TypeError:
            raise ConfigError(
                f"evaluator type {kind!r}: {key}={value!r} must be {type(vocabulary[key]).__name__}"
            ) from None
    section.lock()
    return section


def _section_vocabulary(kind: str, where: str) -> dict:
    from clip_jax.evaluate import sections  # pure data, no imports: no cycle

    if kind not in sections.TYPES:
        raise ConfigError(f"{where}: unknown evaluator type {kind!r}; choose one of {', '.join(sections.TYPES)}")
    return sections.TYPES[kind]


def _closest(key, known, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def _flatten(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def known_keys(cfg) -> dict:
    """Flat key -> default of every key cfg may have: base()'s, with each of cfg's `evals.<name>` sections taking
    the keys of its type (evaluate/sections.py). Raises ConfigError for a section without a known type."""
    known = {k: v for k, v in _flatten(base()).items() if not k.startswith("evals.")}
    for name, section in cfg.get("evals", {}).items():
        if not isinstance(section, ml_collections.ConfigDict) or "type" not in section:
            raise ConfigError(f"config key 'evals.{name}' must be a section made by config.evaluator(type, ...)")
        vocabulary = _section_vocabulary(section.type, f"evals.{name}.type")
        known.update({f"evals.{name}.{k}": v for k, v in vocabulary.items()})
    return known


def check_keys(cfg) -> None:
    """Every key of cfg must exist in base() (or its evaluator type's vocabulary) with a value of the same type."""
    known = known_keys(cfg)
    for key, value in _flatten(cfg).items():
        if key not in known and key.startswith("evals."):  # name the section's type: its keys decide
            section = key.rsplit(".", 1)[0]
            kind = cfg.evals[section.split(".")[1]].type
            keys = sorted(k.rsplit(".", 1)[1] for k in known if k.startswith(section + "."))
            hint = _closest(key, [f"{section}.{k}" for k in keys], cutoff=0.8)
            raise ConfigError(
                f"unknown config key '{key}'{hint} ({section} is a {kind!r} evaluator; its keys: {', '.join(keys)})"
            )
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'{_closest(key, known)}")
        ref = known[key]
        ok = isinstance(value, type(ref)) or (isinstance(ref, float) and isinstance(value, int))
        if not ok or (isinstance(ref, int) and isinstance(value, bool) != isinstance(ref, bool)):
            raise ConfigError(
                f"config key '{key}' must be {type(ref).__name__}, got {value!r} ({type(value).__name__})"
            )


def int_arg(arg: str, default: int, meaning: str) -> int:
    """A config file's integer argument (`--config=configs/X.py:<int>`), or `default` when there is none.

    Raises ConfigError naming the argument and what it means when it is not a positive integer."""
    if not arg:
        return default
    try:
        value = int(arg)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"the config argument {arg!r} must be a positive integer ({meaning}), e.g. {default}")
    return value


def mesh_shape(cfg, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes with -1 resolved; errors name the key."""
    data, fsdp = cfg.mesh.data, cfg.mesh.fsdp
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh.data and mesh.fsdp are both -1; set one of them to a size")
    for key, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if size == 0 or size < -1:
            raise ConfigError(f"config key '{key}' is {size}; use a positive size or -1 for the rest")
    known = fsdp if data == -1 else data
    if num_devices % known:
        raise ConfigError(f"mesh axis size {known} does not divide the {num_devices} devices")
    data = num_devices // fsdp if data == -1 else data
    fsdp = num_devices // data if fsdp == -1 else fsdp
    if data * fsdp != num_devices:
        raise ConfigError(f"mesh.data * mesh.fsdp = {data}*{fsdp} != {num_devices} devices")
    return data, fsdp


def model_fingerprint(cfg) -> dict:
    """The keys that fix the train state (model shapes, and what token ids mean): a checkpoint must agree on all of
    them to be resumed."""
    flat = _flatten(cfg)
    # optim.freeze fixes which parameters have optimizer state, so it shapes the checkpoint too. INPUT_ONLY keys
    # (a NaFlex patch budget, patch dropout) are not parameter shapes: a checkpoint serves any value of them.
    shaping = [k for k in flat if k.startswith(("model.", "tokenizer.")) and k not in INPUT_ONLY]
    return {k: flat[k] for k in [*shaping, "optim.freeze"]}


# Model keys that change no parameter (model_fingerprint): a NaFlex patch budget; FLIP's patch dropout (its final
# unmasked tuning is a resume with patch_dropout=0).
INPUT_ONLY = ("model.image.naflex_max_patches", "model.image.patch_dropout")
