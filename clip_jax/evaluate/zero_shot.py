"""Zero-shot classification: prompt-ensembled class embeddings, top-1/top-5 accuracy, on all devices.

Class embedding = normalise(mean over templates of the normalised text embeddings of "template(class)").
Images are encoded batch-sharded over every device; only per-example hit flags come back to the host.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clip_jax import sharding
from clip_jax.evaluate import templates as templates_lib
from clip_jax.input import pipeline
from clip_jax.input import tokenizer as tokenizer_lib


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    pad = (-len(x)) % multiple
    return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x


def class_embeddings(encode_text, tokens_per_class: np.ndarray, mesh, chunk: int = 1024) -> jax.Array:
    """tokens_per_class: [C, T, L] -> [C, d] unit-norm class embeddings."""
    c, t, l = tokens_per_class.shape
    flat = tokens_per_class.reshape(c * t, l)
    n_dev = mesh.devices.size
    outs = []
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        emb = encode_text(sharding.put_batch({"t": _pad_rows(part, n_dev)}, mesh)["t"])
        outs.append(np.asarray(jax.device_get(emb))[: len(part)])
    emb = np.concatenate(outs).reshape(c, t, -1).mean(axis=1)
    return jnp.asarray(emb / np.linalg.norm(emb, axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("k",))
def _hits(img_emb, class_emb, labels, k):
    """Per-example top-1 and top-k hit flags."""
    logits = img_emb @ class_emb.T
    topk = jax.lax.top_k(logits, k)[1]
    return topk[:, 0] == labels, jnp.any(topk == labels[:, None], axis=-1)


def evaluate(cfg, params, graphdef, mesh) -> dict:
    """Zero-shot top-1/top-5 (%) of the model in `params` on cfg.eval.dataset, with chance levels for reference."""
    names = pipeline.class_names(cfg)
    prompts = templates_lib.class_prompts(cfg.eval.templates, names)
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("every class needs the same number of prompts")
    tok = tokenizer_lib.make(cfg)
    tokens = np.stack([tok(p) for p in prompts])
    encode_text = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_text(x))
    encode_image = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
    class_emb = class_embeddings(functools.partial(encode_text, params), tokens, mesh)
    k = min(5, len(names))
    hit1, hitk, mask, unseen = [], [], [], []
    for batch in pipeline.eval_batches(cfg, batch_size=cfg.eval.batch_size, num_devices=mesh.devices.size):
        dev = sharding.put_batch({"image": batch["image"], "label": batch["label"]}, mesh)
        h1, hk = _hits(encode_image(params, dev["image"]), class_emb, dev["label"], k)
        hit1.append(np.asarray(jax.device_get(h1)))
        hitk.append(np.asarray(jax.device_get(hk)))
        mask.append(batch["mask"])
        unseen.append(batch.get("unseen", np.zeros_like(batch["mask"])))
    hit1, hitk, mask, unseen = map(np.concatenate, (hit1, hitk, mask, unseen))
    out = _accuracies(hit1, hitk, mask, "")
    out.update(num_classes=len(names), chance_top1=100.0 / len(names), chance_top5=100.0 * k / len(names))
    if unseen.any():  # datasets with held-out combinations report seen / unseen separately
        out.update(_accuracies(hit1, hitk, mask * (1 - unseen), "_seen"))
        out.update(_accuracies(hit1, hitk, mask * unseen, "_unseen"))
    return out


def _accuracies(hit1, hitk, mask, suffix):
    n = float(mask.sum())
    return {
        f"top1{suffix}": 100.0 * float((hit1 * mask).sum()) / max(n, 1.0),
        f"top5{suffix}": 100.0 * float((hitk * mask).sum()) / max(n, 1.0),
        f"examples{suffix}": int(n),
    }
