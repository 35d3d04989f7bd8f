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
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in hf.FAMILIES:
        raise hf.ConversionError(
            f"{path}: model_type {model_type!r} is not supported; clip_jax converts {list(hf.FAMILIES)} "
            "(CLIPModel, SiglipModel)"
        )
    transformers = _need("transformers")
    cls = {"clip": transformers.CLIPConfig, "siglip": transformers.SiglipConfig}[model_type]
    return cls.from_pretrained(model_dir).to_dict()


def read_preprocess(model_dir):
    """(mean, std, eval crop, resample filter name) from preprocessor_config.json, or None when the directory has
    none (or it names no mean/std). Raises ConversionError for a resample number Pillow does not define."""
    p = _preprocessor_config(model_dir)
    if p is None or "image_mean" not in p or "image_std" not in p:
        return None
    by_number = {int(v): name for name, v in ops.RESAMPLE.items()}
    number = p.get("resample", int(ops.RESAMPLE["bicubic"]))
    if number not in by_number:
        raise hf.ConversionError(f"preprocessor_config.json: resample={number!r} is not a Pillow filter number")
    crop = "centre" if p.get("do_center_crop") else "resize"
    return tuple(p["image_mean"]), tuple(p["image_std"]), crop, by_number[number]


def preprocess_notes(model_dir, image_size: int) -> list[str]:
    """One line per preprocessor_config.json setting clip_jax's eval view does not reproduce (it resizes straight
    to the model's image size, rescales by 1/255 and normalises): the imported model's weights are exact, but
    evaluation pixels would differ from the HF image processor's."""
    p = _preprocessor_config(model_dir) or {}
    notes = []
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
    """{name: float32 np.ndarray} from safetensors (single or sharded) or pytorch_model.bin."""
    files = os.listdir(model_dir)
    if "model.safetensors.index.json" in files:
        with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif "model.safetensors" in files:
        shards = ["model.safetensors"]
    elif "pytorch_model.bin" in files:
        torch = _need("torch")
        state = torch.load(os.path.join(model_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
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
    cfg = hf_config.config_from_hf(hf_cfg, read_preprocess(model_dir), hf_tokenizer.find(model_dir))
    abstract = _pure(two_tower.abstract(cfg.model))
    params = hf.params_from_hf(read_hf_weights(model_dir), hf_cfg["model_type"], abstract)
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
    files, which transformers loads."""
    family, hf_cfg = hf_config.config_to_hf(cfg)
    width = hf_cfg["vision_config"]["hidden_size"]
    state = hf.params_to_hf(params, family, hf.hf_shape_fixes(family, width))
    transformers, safetensors_numpy = _need("transformers"), _need("safetensors.numpy")
    cls = {"clip": transformers.CLIPConfig, "siglip": transformers.SiglipConfig}[family]
    config = cls(**hf_cfg)
    config.architectures = ["CLIPModel" if family == "clip" else "SiglipModel"]
    os.makedirs(model_dir, exist_ok=True)
    config.save_pretrained(model_dir)
    # transformers reads the 'format' entry to know the tensors are laid out as torch's.
    safetensors_numpy.save_file(state, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(cfg, family), f, indent=2)
    hf_tokenizer.write_files(cfg, model_dir)
    return family


def preprocessor_config(cfg, family):
    """HF image processor settings equivalent to ours: bicubic resize, centre crop or not, mean/std."""
    size, d = cfg.model.image.image_size, cfg.data
    crop = d.eval_crop == "centre"
    return {
        "image_processor_type": "CLIPImageProcessor" if family == "clip" else "SiglipImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size} if crop else {"height": size, "width": size},
        "resample": 3,  # PIL bicubic, as ours
        "do_center_crop": crop,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(d.image_mean),
        "image_std": list(d.image_std),
        "do_convert_rgb": True,
    }
