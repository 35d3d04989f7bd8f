"""HF transformers CLIPModel / SiglipModel / Siglip2Model <-> clip_jax parameters, as plain dicts of arrays (the
configs are in hf_config.py).

Import reads a local model directory (no hub access); export writes one that transformers' `from_pretrained`
loads. Every HF tensor is consumed and every clip_jax parameter is filled, or the conversion stops naming the
keys, so an architecture variant we do not represent is an error, never a silently half-loaded model.

Layout facts (transformers 5.x modeling_clip.py / modeling_siglip.py):
- nn.Linear stores weight [out, in]; our kernels are [in, out]. Attention heads are the outer part of the
  out dimension, so q/k/v weights [heads*kv, width] are our [width, heads, kv] kernels transposed.
- Patch embedding is a stride-p Conv2d [width, 3, p, p]; ours is a Dense over (row, col, channel) patches.
- SigLIP's MAP head is torch.nn.MultiheadAttention: q, k and v fused in one in_proj [3*width, width].
- CLIP: no bias on the patch embedding or the projections; a LayerNorm before the encoder; post_layernorm on
  the class token (= our final LayerNorm, applied per token); quick_gelu; LayerNorm eps 1e-5; one logit scale.
- SigLIP: no class token; the MAP head output is the image embedding; text pooled at the last position (which
  is padding: the tower attends to it) then a Linear with bias; logit scale and bias of shape [1].
- SigLIP 2 NaFlex (`siglip2`, modeling_siglip2.py): SigLIP's tensors and names, except that the patch embedding
  is a Linear [width, p*p*3] on patches the processor flattened in (row, column, channel) order, our order; its
  position table [G*G, width] is the square grid our NaFlex tower resizes per image.
"""

import math

import numpy as np

FAMILIES = ("clip", "siglip", "siglip2")  # HF model_type values we convert (siglip2: NaFlex)
# The preprocessing each family's released weights expect, when the model directory has no
# preprocessor_config.json (or a setting it lacks): (mean, std, eval crop, resample filter).
PREPROCESS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "centre", "bicubic"),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "resize", "bicubic"),
    "siglip2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "resize", "bilinear"),  # Siglip2ImageProcessor's (no crop)
}


class ConversionError(ValueError):
    """The model or config cannot be converted; the message names what and why."""


# ---------------------------------------------------------------------------------------------------- tensors
# Each kind is (HF -> ours given our shape, ours -> HF).
def _linear_in(w, shape):
    return w.T.reshape(shape)


KINDS = {
    "same": (lambda w, shape: w.reshape(shape), None),  # export: reshape to the HF shape (see _to_hf)
    "linear": (_linear_in, lambda x: x.T),  # [out, in] <-> [in, out]
    "qkv": (_linear_in, lambda x: x.reshape(x.shape[0], -1).T),  # [h*k, d] <-> [d, h, k]
    "qkv_bias": (lambda w, shape: w.reshape(shape), lambda x: x.reshape(-1)),  # [h*k] <-> [h, k]
    "out": (_linear_in, lambda x: x.reshape(-1, x.shape[-1]).T),  # [d, h*k] <-> [h, k, d]
    "patch": (
        lambda w, shape: w.transpose(2, 3, 1, 0).reshape(shape),  # [d, c, p, p] <-> [(p, p, c), d]
        lambda x: x.reshape(math.isqrt(x.shape[0] // 3), math.isqrt(x.shape[0] // 3), 3, -1).transpose(3, 2, 0, 1),
    ),
}


def _block_table(prefix, ours):
    """(hf suffix within layer i, our path within the stacked blocks, kind) of one encoder layer."""
    rows = []
    for hf, our in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        rows.append((f"self_attn.{hf}.weight", ("attn", f"{our}_kernel"), "qkv"))
        rows.append((f"self_attn.{hf}.bias", ("attn", f"{our}_bias"), "qkv_bias"))
    rows += [
        ("self_attn.out_proj.weight", ("attn", "out_kernel"), "out"),
        ("self_attn.out_proj.bias", ("attn", "out_bias"), "same"),
        ("layer_norm1.weight", ("ln1", "scale"), "same"),
        ("layer_norm1.bias", ("ln1", "bias"), "same"),
        ("layer_norm2.weight", ("ln2", "scale"), "same"),
        ("layer_norm2.bias", ("ln2", "bias"), "same"),
        ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "linear"),
        ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "same"),
        ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "linear"),
        ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "same"),
    ]
    return [(f"{prefix}.{hf}", ours + ("encoder", "blocks") + path, kind) for hf, path, kind in rows]


_PATCH_KIND = {"clip": "patch", "siglip": "patch", "siglip2": "linear"}  # Conv2d, or NaFlex's Linear


def _table(family):
    """[(hf key, our param path, kind, stacked)] for a family; keys with '{i}' are per layer, stacked on axis 0."""
    t, v = "text_model", "vision_model"
    rows = [
        (f"{t}.embeddings.token_embedding.weight", ("text", "token_embedding"), "same"),
        (f"{t}.embeddings.position_embedding.weight", ("text", "pos_embedding"), "same"),
        (f"{t}.final_layer_norm.weight", ("text", "encoder", "ln_final", "scale"), "same"),
        (f"{t}.final_layer_norm.bias", ("text", "encoder", "ln_final", "bias"), "same"),
        (f"{v}.embeddings.patch_embedding.weight", ("image", "patch_embed", "kernel"), _PATCH_KIND[family]),
        (f"{v}.embeddings.position_embedding.weight", ("image", "pos_embedding"), "same"),
        (f"{v}.post_layernorm.weight", ("image", "encoder", "ln_final", "scale"), "same"),
        (f"{v}.post_layernorm.bias", ("image", "encoder", "ln_final", "bias"), "same"),
        ("logit_scale", ("log_t",), "same"),
    ]
    rows += _block_table(f"{t}.encoder.layers.{{i}}", ("text",))
    rows += _block_table(f"{v}.encoder.layers.{{i}}", ("image",))
    if family == "clip":
        rows += [
            (f"{v}.embeddings.class_embedding", ("image", "cls"), "same"),
            (f"{v}.pre_layrnorm.weight", ("image", "ln_pre", "scale"), "same"),
            (f"{v}.pre_layrnorm.bias", ("image", "ln_pre", "bias"), "same"),
            ("visual_projection.weight", ("image", "proj", "kernel"), "linear"),
            ("text_projection.weight", ("text", "proj", "kernel"), "linear"),
        ]
    else:
        h = f"{v}.head"
        rows += [
            (f"{v}.embeddings.patch_embedding.bias", ("image", "patch_embed", "bias"), "same"),
            (f"{t}.head.weight", ("text", "proj", "kernel"), "linear"),
            (f"{t}.head.bias", ("text", "proj", "bias"), "same"),
            ("logit_bias", ("bias",), "same"),
            (f"{h}.probe", ("image", "map_head", "probe"), "same"),
            (f"{h}.attention.out_proj.weight", ("image", "map_head", "attn", "out_kernel"), "out"),
            (f"{h}.attention.out_proj.bias", ("image", "map_head", "attn", "out_bias"), "same"),
            (f"{h}.layernorm.weight", ("image", "map_head", "ln", "scale"), "same"),
            (f"{h}.layernorm.bias", ("image", "map_head", "ln", "bias"), "same"),
        ]
        for i, name in enumerate(("query", "key", "value")):
            # Pieces of the fused in_proj, named by _split_fused.
            rows.append(
                (f"{h}.attention.in_proj_weight#{i}", ("image", "map_head", "attn", f"{name}_kernel"), "qkv")
            )
            rows.append(
                (f"{h}.attention.in_proj_bias#{i}", ("image", "map_head", "attn", f"{name}_bias"), "qkv_bias")
            )
        for fc in ("fc1", "fc2"):
            rows.append((f"{h}.mlp.{fc}.weight", ("image", "map_head", "mlp", fc, "kernel"), "linear"))
            rows.append((f"{h}.mlp.{fc}.bias", ("image", "map_head", "mlp", fc, "bias"), "same"))
    return rows


_FUSED = (".attention.in_proj_weight", ".attention.in_proj_bias")


def _split_fused(state):
    """torch MultiheadAttention's fused in_proj -> three entries 'key#0' (q), 'key#1' (k), 'key#2' (v)."""
    out = {}
    for key, value in state.items():
        if key.endswith(_FUSED):
            for i, part in enumerate(np.split(value, 3, axis=0)):
                out[f"{key}#{i}"] = part
        else:
            out[key] = value
    return out


def _fuse(state):
    out, parts = {}, {}
    for key, value in state.items():
        base, sep, i = key.partition("#")
        if sep:
            parts.setdefault(base, {})[int(i)] = value
        else:
            out[key] = value
    for base, pieces in parts.items():
        out[base] = np.concatenate([pieces[i] for i in range(3)], axis=0)
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    else:
        yield prefix


# Our parameters that a family has no tensor for: CLIP has no logit bias (the softmax loss ignores ours).
_NO_SOURCE = {"clip": {("bias",): 0.0}, "siglip": {}, "siglip2": {}}


def _reshaping(to_ours, hf_key, path):
    """to_ours, with a reshape that cannot fit (weights that do not match config.json) as a one-line error."""

    def convert(w, shape):
        try:
            return to_ours(w, shape)
        except ValueError:
            raise ConversionError(
                f"HF {hf_key.split('#')[0]} has shape {w.shape}, which does not fit {'.'.join(path)} "
                f"{tuple(shape)}: the weights do not match config.json"
            ) from None

    return convert


def params_from_hf(state, family, abstract_params):
    """HF state dict {name: np.ndarray} -> our pure-dict params (float32), shaped like `abstract_params`."""
    state = _split_fused({k: v for k, v in state.items() if not k.endswith("position_ids")})  # buffers
    used, params = set(), {}
    for path, value in _NO_SOURCE[family].items():
        _set(params, path, np.full(_get(abstract_params, path).shape, value, np.float32))
    for hf_key, path, kind in _table(family):
        try:
            target = _get(abstract_params, path)
        except KeyError:
            raise ConversionError(f"clip_jax has no parameter {'.'.join(path)} for HF {hf_key}") from None
        to_ours = _reshaping(KINDS[kind][0], hf_key, path)
        if "{i}" in hf_key:
            depth = target.shape[0]
            keys = [hf_key.format(i=i) for i in range(depth)]
            missing = [k for k in keys if k not in state]
            if missing:
                raise ConversionError(f"the HF weights lack {missing[0]} (expected {depth} layers)")
            value = np.stack([to_ours(np.asarray(state[k], np.float32), target.shape[1:]) for k in keys])
        else:
            if hf_key not in state:
                raise ConversionError(f"the HF weights lack {hf_key.split('#')[0]}")
            keys = [hf_key]
            value = to_ours(np.asarray(state[hf_key], np.float32), target.shape)
        if value.shape != tuple(target.shape):
            raise ConversionError(f"HF {hf_key} gives shape {value.shape}; {'.'.join(path)} needs {target.shape}")
        used.update(keys)
        _set(params, path, value)
    extra = sorted(k.split("#")[0] for k in set(state) - used)
    if extra:
        raise ConversionError(f"HF weights this converter does not map (an unsupported variant?): {extra[:5]}")
    unfilled = [".".join(p) for p in _paths(abstract_params) if not _has(params, p)]
    if unfilled:
        raise ConversionError(f"clip_jax parameters without an HF source: {unfilled[:5]}")
    return params


def _has(tree, path):
    try:
        _get(tree, path)
        return True
    except KeyError:
        return False


def params_to_hf(params, family, hf_shapes):
    """Our params -> HF state dict {name: float32 np.ndarray}. hf_shapes maps the scalar-ish entries whose HF
    shape differs from ours (SigLIP's [1] logit scale/bias, the [1, 1, width] probe)."""
    state = {}
    for hf_key, path, kind in _table(family):
        value = np.asarray(_get(params, path), np.float32)
        to_hf = KINDS[kind][1] or (lambda x: x)
        if "{i}" in hf_key:
            for i in range(value.shape[0]):
                state[hf_key.format(i=i)] = to_hf(value[i])
        else:
            state[hf_key] = to_hf(value)
    state = _fuse(state)
    for key, shape in hf_shapes.items():
        state[key] = state[key].reshape(shape)
    return {k: np.array(v, np.float32, order="C") for k, v in state.items()}  # (ascontiguousarray makes 0-d 1-d)


def hf_shape_fixes(family, width):
    if family == "clip":
        return {}
    return {"logit_scale": (1,), "logit_bias": (1,), "vision_model.head.probe": (1, 1, width)}
