"""open_clip checkpoints (open-clip-torch's CLIP with its own ViT and text transformer) <-> clip_jax.

Import reads, from local files only:
- a model directory as open_clip pushes them to the HF hub: open_clip_config.json ({"model_cfg": ...,
  "preprocess_cfg": ...}) and open_clip_model.safetensors or open_clip_pytorch_model.bin;
- or a weights file (a training checkpoint {"state_dict": ...}, a bare state dict, or safetensors) plus a model
  config: a JSON file (an open_clip_config.json or a bare model config) or the name of a config installed with
  open-clip-torch (its model_configs/ folder, e.g. ViT-B-32).
Export writes open_clip_config.json and open_clip_model.safetensors that open_clip's CLIP loads with
load_state_dict(strict=True). open_clip_config.py maps the configs; this module maps the tensors.

Layout facts (open-clip-torch 3.3 transformer.py / model.py):
- Blocks are resblocks.{i} with ln_1, attn (torch MultiheadAttention: q, k, v fused in in_proj_weight
  [3*width, width] and in_proj_bias, heads outer in each part), ln_2 and mlp.c_fc / mlp.c_proj (nn.Linear,
  weight [out, in]).
- visual.conv1 is a bias-free stride-p Conv2d [width, 3, p, p]; visual.proj and a bias-free text_projection are
  [in, out] matrices (our kernels' layout); with proj_bias the text projection is an nn.Linear.
- CLIP keeps the text tower's tensors at the top level (token_embedding, positional_embedding, transformer,
  ln_final, text_projection); CustomTextCLIP (custom_text) under 'text.'. logit_scale is [] or [1]
  (nonscalar_logit_scale), logit_bias exists when init_logit_bias is set.
Every open_clip tensor is consumed and every clip_jax parameter filled, or ConversionError names the key.
"""

import importlib.util
import json
import os

import numpy as np
from flax import traverse_util

from clip_jax.convert import files, open_clip_config
from clip_jax.convert.hf import KINDS, ConversionError

CONFIG_NAME = "open_clip_config.json"  # open_clip constants.py HF_CONFIG_NAME
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # read in this order
EXPORT_WEIGHTS = WEIGHT_NAMES[0]


def _block_rows(prefix, ours):
    """(open_clip key with '{i}', our path, kind, part of the fused in_proj or None) for one tower's blocks."""
    rows = [
        ("ln_1.weight", ("ln1", "scale"), "same", None),
        ("ln_1.bias", ("ln1", "bias"), "same", None),
        ("attn.out_proj.weight", ("attn", "out_kernel"), "out", None),
        ("attn.out_proj.bias", ("attn", "out_bias"), "same", None),
        ("ln_2.weight", ("ln2", "scale"), "same", None),
        ("ln_2.bias", ("ln2", "bias"), "same", None),
        ("mlp.c_fc.weight", ("mlp", "fc1", "kernel"), "linear", None),
        ("mlp.c_fc.bias", ("mlp", "fc1", "bias"), "same", None),
        ("mlp.c_proj.weight", ("mlp", "fc2", "kernel"), "linear", None),
        ("mlp.c_proj.bias", ("mlp", "fc2", "bias"), "same", None),
    ]
    for part, name in enumerate(("query", "key", "value")):
        rows.append(("attn.in_proj_weight", ("attn", f"{name}_kernel"), "qkv", part))
        rows.append(("attn.in_proj_bias", ("attn", f"{name}_bias"), "qkv_bias", part))
    blocks = ours + ("encoder", "blocks")
    return [
        (f"{prefix}transformer.resblocks.{{i}}.{key}", blocks + path, kind, part) for key, path, kind, part in rows
    ]


def table(model_cfg):
    """[(open_clip key, our param path, kind (hf.KINDS), fused part)] for an open_clip model config."""
    vis, txt = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    t = "text." if model_cfg.get("custom_text") else ""
    rows = [
        ("visual.conv1.weight", ("image", "patch_embed", "kernel"), "patch", None),
        ("visual.class_embedding", ("image", "cls"), "same", None),
        ("visual.positional_embedding", ("image", "pos_embedding"), "same", None),
        ("visual.ln_post.weight", ("image", "encoder", "ln_final", "scale"), "same", None),
        ("visual.ln_post.bias", ("image", "encoder", "ln_final", "bias"), "same", None),
        ("visual.proj", ("image", "proj", "kernel"), "same", None),
        (f"{t}token_embedding.weight", ("text", "token_embedding"), "same", None),
        (f"{t}positional_embedding", ("text", "pos_embedding"), "same", None),
        (f"{t}ln_final.weight", ("text", "encoder", "ln_final", "scale"), "same", None),
        (f"{t}ln_final.bias", ("text", "encoder", "ln_final", "bias"), "same", None),
        ("logit_scale", ("log_t",), "same", None),
    ]
    if not vis.get("no_ln_pre", False):
        rows.append(("visual.ln_pre.weight", ("image", "ln_pre", "scale"), "same", None))
        rows.append(("visual.ln_pre.bias", ("image", "ln_pre", "bias"), "same", None))
    if txt.get("proj_type", "linear") != "none" and txt.get("proj_bias", False):
        rows.append((f"{t}text_projection.weight", ("text", "proj", "kernel"), "linear", None))
        rows.append((f"{t}text_projection.bias", ("text", "proj", "bias"), "same", None))
    elif txt.get("proj_type", "linear") != "none":
        rows.append((f"{t}text_projection", ("text", "proj", "kernel"), "same", None))
    if model_cfg.get("init_logit_bias") is not None:
        rows.append(("logit_bias", ("bias",), "same", None))
    return rows + _block_rows("visual.", ("image",)) + _block_rows(t, ("text",))


def params_from_open_clip(state, model_cfg, abstract_params):
    """open_clip state dict {key: np.ndarray} -> our pure-dict params (float32) shaped like `abstract_params`.

    A CLIP without logit_bias gets our (unused by the softmax loss) bias 0. Raises ConversionError naming a
    missing, unexpected or mis-shaped tensor."""
    targets = traverse_util.flatten_dict(abstract_params)
    flat, used = {}, set()
    for key, path, kind, part in table(model_cfg):
        if path not in targets:
            raise ConversionError(f"clip_jax has no parameter {'.'.join(path)} for open_clip {key}")
        shape, to_ours = tuple(targets[path].shape), KINDS[kind][0]
        keys = [key.format(i=i) for i in range(shape[0])] if "{i}" in key else [key]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ConversionError(f"the open_clip weights lack {missing[0]} (expected {len(keys)} of its kind)")
        values = []
        for k in keys:
            value = np.asarray(state[k], np.float32)
            value = value if part is None else np.split(value, 3, axis=0)[part]
            want = shape[1:] if "{i}" in key else shape
            if value.size != int(np.prod(want)):
                raise ConversionError(f"open_clip {k} has shape {value.shape}; {'.'.join(path)} needs {want}")
            values.append(to_ours(value, want))
        flat[path] = np.stack(values) if "{i}" in key else values[0]
        used.update(keys)
    extra = sorted(set(state) - used)
    if extra:
        raise ConversionError(f"open_clip weights this converter does not map (another variant?): {extra[:5]}")
    if ("bias",) in targets and ("bias",) not in flat:
        flat[("bias",)] = np.zeros(targets[("bias",)].shape, np.float32)
    unfilled = [".".join(p) for p in targets if p not in flat]
    if unfilled:
        raise ConversionError(f"clip_jax parameters without an open_clip source: {unfilled[:5]}")
    return traverse_util.unflatten_dict(flat)


def params_to_open_clip(params, model_cfg):
    """Our params -> open_clip CLIP state dict {key: float32 np.ndarray} for `model_cfg` (see table)."""
    flat, state, parts = traverse_util.flatten_dict(params), {}, {}
    for key, path, kind, part in table(model_cfg):
        value, to_open_clip = np.asarray(flat[path], np.float32), KINDS[kind][1] or (lambda x: x)
        items = [(key.format(i=i), value[i]) for i in range(value.shape[0])] if "{i}" in key else [(key, value)]
        for k, v in items:
            if part is None:
                state[k] = to_open_clip(v)
            else:
                parts.setdefault(k, {})[part] = to_open_clip(v)
    for k, pieces in parts.items():
        state[k] = np.concatenate([pieces[i] for i in range(3)], axis=0)
    return {k: np.array(v, np.float32, order="C") for k, v in state.items()}


def read_weights(path):
    """{key: float32 np.ndarray} from a .safetensors file or a torch pickle holding a state dict or a training
    checkpoint {"state_dict": ...}; a 'module.' prefix on every key (DistributedDataParallel) is removed."""
    if path.endswith(".safetensors"):
        safetensors = _need("safetensors")
        try:
            with safetensors.safe_open(path, framework="flax") as f:  # flax: bfloat16 tensors read too
                state = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type on a cut or foreign file
            raise ConversionError(
                f"cannot read {path} ({e}); the file is damaged or incomplete (re-download it)"
            ) from None
    else:
        torch = _need("torch")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not its pickle
            raise ConversionError(f"{path} is not a torch checkpoint torch.load can read safely ({e})") from None
        obj = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
        if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
            raise ConversionError(f"{path} holds no state dict (a dict of tensors, or one under 'state_dict')")
        state = {k: v.float().numpy() for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_model_config(spec):
    """(model_cfg, preprocess_cfg) from a JSON file (an open_clip_config.json with "model_cfg", or a bare model
    config as in open_clip's model_configs/) or an installed open_clip model name such as 'ViT-B-32'."""
    path = spec if os.path.isfile(spec) else _installed_config(spec)
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    if "model_cfg" in config:
        return config["model_cfg"], config.get("preprocess_cfg") or {}
    if "vision_cfg" not in config or "text_cfg" not in config:
        raise ConversionError(f"{path} is not an open_clip model config (no model_cfg, vision_cfg or text_cfg)")
    return config, {}


def _installed_config(name):
    spec = importlib.util.find_spec("open_clip")  # the installed files; the package itself is not imported
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"{name!r} is not a file, and open-clip-torch (whose model configs it may name) "
                              "is not installed")  # fmt: skip
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "model_configs")
    path = os.path.join(folder, f"{name}.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{name!r} is neither a file nor an open_clip model config in {folder}")
    return path


def read(path, model_config=None):
    """(model_cfg, preprocess_cfg, state dict) of an open_clip directory or weights file (see the module doc).
    model_config (a JSON file or installed model name) replaces the directory's open_clip_config.json and is
    required for a weights file."""
    if os.path.isdir(path):
        names = [n for n in WEIGHT_NAMES if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise ConversionError(f"{path} has none of {', '.join(WEIGHT_NAMES)}")
        config_file = os.path.join(path, CONFIG_NAME)
        if model_config is None and not os.path.isfile(config_file):
            raise ConversionError(f"{path} has no {CONFIG_NAME}; name its model config with --model-config")
        weights = os.path.join(path, names[0])
        model_cfg, preprocess = read_model_config(model_config or config_file)
    elif os.path.isfile(path):
        if model_config is None:
            raise ConversionError(
                f"{path} is a weights file: name its model config with --model-config (a JSON file or an "
                "open_clip model name such as ViT-B-32)"
            )
        weights = path
        model_cfg, preprocess = read_model_config(model_config)
    else:
        raise ConversionError(f"{path} is neither an open_clip model directory nor a weights file")
    return model_cfg, preprocess, read_weights(weights)


def import_model(path, model_config=None):
    """(clip_jax config, params as nested dict of np arrays, notes: one-line strings for the user)."""
    from flax import nnx

    from clip_jax.models import two_tower

    model_cfg, preprocess, state = read(path, model_config)
    cfg, notes = open_clip_config.config_from_open_clip(model_cfg, preprocess)
    abstract = nnx.to_pure_dict(nnx.state(two_tower.abstract(cfg.model), nnx.Param))
    params = params_from_open_clip(state, model_cfg, abstract)
    return cfg, params, notes


def export_model(cfg, params, model_dir):
    """Write DIR/open_clip_config.json and DIR/open_clip_model.safetensors for open_clip's CLIP. Raises
    ConversionError for a config open_clip's CLIP cannot hold or a model_dir that is not empty."""
    files.refuse_existing(model_dir)
    config = open_clip_config.config_to_open_clip(cfg)
    state = params_to_open_clip(params, config["model_cfg"])
    safetensors_numpy = _need("safetensors.numpy")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    # 'format: pt' marks the tensors as laid out for torch, as open_clip's own safetensors files are.
    safetensors_numpy.save_file(state, os.path.join(model_dir, EXPORT_WEIGHTS), metadata={"format": "pt"})


def _need(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"open_clip conversion needs {module}: pip install -e '.[hf]'") from None
