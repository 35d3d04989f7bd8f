"""Reading and writing HF model directories and clip_jax checkpoints for `main.py convert`.

Import: DIR/config.json (+ preprocessor_config.json if present) and DIR/model.safetensors (or a sharded
model.safetensors.index.json, or pytorch_model.bin) -> a clip_jax checkpoint at step 0 in WORKDIR (the same
Checkpointer as training, so `main.py eval` reads it) plus WORKDIR/config.json, which `configs/imported.py:WORKDIR`
turns back into a config. Export: WORKDIR's latest checkpoint -> DIR/config.json, DIR/model.safetensors,
DIR/preprocessor_config.json and the tokenizer's files (hf_tokenizer.py). Nothing is downloaded: only files on
disk are read.
"""

import json
import os

import numpy as np

from clip_jax.convert import hf, hf_config, hf_tokenizer
from clip_jax.convert.hf_tokenizer import NO_TOKENIZER, find_spiece  # noqa: F401 (main.py and tests use them here)
from clip_jax.input import ops
from clip_jax.models import layers

CONFIG_FILE = "config.json"  # the clip_jax config beside the checkpoint (configs/imported.py reads it)


def _need(module):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"HF conversion needs {module}: pip install -e '.[hf]'") from None


def read_hf_config(model_dir):
    """config.json with every default filled in, as a plain dict (transformers' config classes know them)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise hf.ConversionError(f"{model_dir} has no config.json (an HF model directory holds one)")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError) as e:  # not JSON, or JSON that is not an object
        raise hf.ConversionError(
            f"{path} is not a JSON object ({_one_line(e)}); restore the model's config.json"
        ) from None
    if model_type not in hf.FAMILIES:
        raise hf.ConversionError(
            f"{path}: model_type {model_type!r} is not supported; clip_jax converts {list(hf.FAMILIES)} "
            "(CLIPModel, SiglipModel, Siglip2Model)"
        )
    return _config_class(model_type).from_pretrained(model_dir).to_dict()


def _config_class(family):
    transformers = _need("transformers")
    classes = {"clip": "CLIPConfig", "siglip": "SiglipConfig", "siglip2": "Siglip2Config"}
    return getattr(transformers, classes[family])


def read_preprocess(model_dir, family="clip"):
    """(mean, std, eval crop, resample filter name) from preprocessor_config.json, or None when the directory has
    none (or it names no mean/std); a filter it does not name is the family's processor's default (hf.PREPROCESS).
    Raises ConversionError for a resample number Pillow does not define."""
    p = _preprocessor_config(model_dir)
    if p is None or "image_mean" not in p or "image_std" not in p:
        return None
    by_number = {int(v): name for name, v in ops.RESAMPLE.items()}
    number = p.get("resample", int(ops.RESAMPLE[hf.PREPROCESS[family][3]]))
    if number not in by_number:
        raise hf.ConversionError(f"preprocessor_config.json: resample={number!r} is not a Pillow filter number")
    crop = "centre" if p.get("do_center_crop") else "resize"
    return tuple(p["image_mean"]), tuple(p["image_std"]), crop, by_number[number]


def read_max_patches(model_dir, patch: int) -> int:
    """A NaFlex (siglip2) directory's patch budget per image: preprocessor_config.json's max_num_patches, else
    Siglip2ImageProcessor's default. Raises ConversionError when the processor's patch_size is not the model's."""
    p = _preprocessor_config(model_dir) or {}
    if p.get("patch_size", patch) != patch:
        raise hf.ConversionError(
            f"{model_dir}: preprocessor_config.json cuts {p['patch_size']}-pixel patches, the model embeds {patch}"
        )
    return int(p.get("max_num_patches", hf_config.NAFLEX_MAX_PATCHES))


def preprocess_notes(model_dir, image_size: int) -> list[str]:
    """One line per preprocessor_config.json setting clip_jax's eval view does not reproduce (it resizes straight
    to the model's image size, rescales by 1/255 and normalises): the imported model's weights are exact, but
    evaluation pixels would differ from the HF image processor's. A NaFlex processor (Siglip2ImageProcessor) gets
    one line saying what evaluation does instead."""
    p = _preprocessor_config(model_dir) or {}
    notes = []
    if "max_num_patches" in p:  # NaFlex: no fixed size to differ from
        rule = (
            f"note: {model_dir}: NaFlex: evaluation resizes each image, aspect ratio kept, to at most "
            f"{p['max_num_patches']} patches (Siglip2ImageProcessor's rule; --config.model.image.naflex_max_patches "
            "changes the budget)"
        )
        return [rule]
    size, crop = p.get("size"), p.get("crop_size") if p.get("do_center_crop") else None
    for value in (v for v in (size, crop) if v is not None):
        sides = set(value.values()) if isinstance(value, dict) else {value}
        if not sides <= {image_size, None}:
            notes.append(f"its processor resizes/crops to {value}, clip_jax to the model's image size {image_size}")
    if p.get("do_rescale", True) and abs(p.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        notes.append(f"rescale_factor={p['rescale_factor']} (clip_jax divides by 255)")
    if p.get("do_normalize", True) is False:
        notes.append("do_normalize=false (clip_jax always normalises by data.image_mean/std)")
    return [f"note: {model_dir}: preprocessor_config.json: {n}; zero-shot numbers may differ from HF's" for n in notes]


def _preprocessor_config(model_dir):
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_hf_weights(model_dir):
    """{name: float32 np.ndarray} from safetensors (single or sharded) or pytorch_model.bin. Raises
    ConversionError (one line) for a file that is missing, cut short or not a state dict."""
    try:
        return _read_hf_weights(model_dir)
    except hf.ConversionError:
        raise
    except Exception as e:  # noqa: BLE001  safetensors, torch's unpickler and json raise many types on bad files
        raise hf.ConversionError(
            f"cannot read the weights in {model_dir} ({type(e).__name__}: {_one_line(e)}); the file is damaged or "
            "incomplete (re-download it)"
        ) from None


def _one_line(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _read_hf_weights(model_dir):
    files = os.listdir(model_dir)
    if "model.safetensors.index.json" in files:
        with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif "model.safetensors" in files:
        shards = ["model.safetensors"]
    elif "pytorch_model.bin" in files:
        torch = _need("torch")
        state = torch.load(os.path.join(model_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            kind = type(state).__name__
            raise hf.ConversionError(f"{model_dir}/pytorch_model.bin holds a {kind}, not a state dict")
        return {k: v.float().numpy() for k, v in state.items()}
    else:
        raise hf.ConversionError(f"{model_dir} has no model.safetensors(.index.json) or pytorch_model.bin")
    safetensors = _need("safetensors")
    state = {}
    for shard in shards:
        # framework='flax': numpy has no bfloat16, and released checkpoints are often stored in it.
        with safetensors.safe_open(os.path.join(model_dir, shard), framework="flax") as f:
            for key in f.keys():
                state[key] = np.asarray(f.get_tensor(key), np.float32)
    return state


def import_model(model_dir):
    """(clip_jax config, params as nested dict of np arrays) of the HF model in model_dir."""
    from clip_jax.models import two_tower

    hf_cfg = read_hf_config(model_dir)
    family = hf_cfg["model_type"]
    naflex = {}
    if family == "siglip2":
        patch = hf_cfg["vision_config"]["patch_size"]
        naflex["max_patches"] = read_max_patches(model_dir, patch if isinstance(patch, int) else patch[0])
    preprocess = read_preprocess(model_dir, family)
    cfg = hf_config.config_from_hf(hf_cfg, preprocess, hf_tokenizer.find(model_dir), **naflex)
    abstract = _pure(two_tower.abstract(cfg.model))
    params = hf.params_from_hf(read_hf_weights(model_dir), family, abstract)
    return cfg, params


def _pure(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def write_checkpoint(cfg, params, workdir):
    """A full train state at step 0 (fresh optimizer state) in workdir, plus workdir/config.json."""
    import jax
    import jax.numpy as jnp

    from clip_jax import checkpoint, config_checks, optim, sharding
    from clip_jax import state as run_state

    config_checks.validate(cfg, jax.device_count(), tokenizer=False)  # see NO_TOKENIZER
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    _, abstract, shardings = run_state.state_shardings(cfg, mesh, opt)
    want = jax.tree.structure(abstract["params"])
    if jax.tree.structure(params) != want:
        raise hf.ConversionError("converted parameters do not match the model's parameter tree")

    def make_state(p):
        rng = jax.random.PRNGKey(cfg.seed)
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": opt.init(p), "rng": rng}

    params = jax.device_put(jax.tree.map(jnp.asarray, params), shardings["params"])
    state = jax.jit(make_state, out_shardings=shardings)(params)
    ckpt = checkpoint.Checkpointer(workdir, cfg)
    if ckpt.latest_step() is not None:
        ckpt.close()
        raise hf.ConversionError(f"{ckpt.directory} already holds a checkpoint; convert into a new --workdir")
    ckpt.save(0, state, {}, cfg, force=True)
    ckpt.close()
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)


def read_checkpoint(workdir):
    """(config, params as nested dict of np arrays) from the latest checkpoint in workdir."""
    import jax

    from clip_jax import state as run_state

    try:
        cfg, step = run_state.load_config(workdir, strict=True)
        _, params, _, _ = run_state.restore_params(cfg, workdir, step=step)
    except run_state.TrainingError as e:
        raise hf.ConversionError(str(e)) from None
    return cfg, jax.tree.map(np.asarray, jax.device_get(params))


def export_model(cfg, params, model_dir):
    """Write config.json, model.safetensors, preprocessor_config.json and (SentencePiece kinds) the tokenizer's
    files, which transformers loads. Raises ConversionError for a config HF cannot hold or a model_dir that is not
    empty."""
    refuse_existing(model_dir)
    family, hf_cfg = hf_config.config_to_hf(cfg)
    width = hf_cfg["vision_config"]["hidden_size"]
    state = hf.params_to_hf(params, family, hf.hf_shape_fixes(family, width))
    safetensors_numpy = _need("safetensors.numpy")
    config = _config_class(family)(**hf_cfg)
    config.architectures = [{"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}[family]]
    os.makedirs(model_dir, exist_ok=True)
    config.save_pretrained(model_dir)
    # transformers reads the 'format' entry to know the tensors are laid out as torch's.
    safetensors_numpy.save_file(state, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(cfg, family), f, indent=2)
    hf_tokenizer.write_files(cfg, model_dir)
    return family


def refuse_existing(model_dir) -> None:
    """Raise ConversionError if the export's directory exists and holds anything (an export would overwrite a model
    there and leave its other files, e.g. another tokenizer, mixed with the new ones). Called before any work."""
    if os.path.exists(model_dir) and (not os.path.isdir(model_dir) or os.listdir(model_dir)):
        raise hf.ConversionError(
            f"{model_dir} already exists and is not an empty directory; export into a new --model-dir"
        )


def preprocessor_config(cfg, family):
    """HF image processor settings equivalent to ours: data.resample's filter, mean/std, and the geometry: a
    resize with or without a centre crop, or (siglip2) NaFlex's patch budget."""
    size, d = cfg.model.image.image_size, cfg.data
    crop = d.eval_crop == "centre"
    common = {
        "do_resize": True,
        "resample": int(ops.RESAMPLE[d.resample]),  # Pillow's number for the filter
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(d.image_mean),
        "image_std": list(d.image_std),
        "do_convert_rgb": True,
    }
    if family == "siglip2":
        patch = layers.tower_dims(cfg.model.image, with_patch=True)["patch_size"]
        naflex = {"patch_size": patch, "max_num_patches": cfg.model.image.naflex_max_patches}
        return {"image_processor_type": "Siglip2ImageProcessor", **common, **naflex}
    return {
        "image_processor_type": "CLIPImageProcessor" if family == "clip" else "SiglipImageProcessor",
        **common,
        "size": {"shortest_edge": size} if crop else {"height": size, "width": size},
        "do_center_crop": crop,
        "crop_size": {"height": size, "width": size},
    }
