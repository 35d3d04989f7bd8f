"""Zero-shot classification: prompt-ensembled class embeddings; top-1, top-5 and mean per-class accuracy.

Class embedding = normalise(mean over templates of the normalised text embeddings of "template(class)"), built
once per evaluation with the prompts spread over all devices. Images are encoded batch-sharded over every
device; each step reduces to per-class counts on the devices ([groups, 3, classes], replicated), so only those
counts reach the host, identical on every process.

Conventions, checked against CLIP_benchmark 1.6.2 (clip_benchmark/metrics/zeroshot_classification.py) by
tests/test_clip_benchmark_metrics.py: top1 / top5 / mean_per_class are its acc1 / acc5 / mean_per_class_recall
(sklearn's balanced_accuracy_score of the argmax: top-1 recall averaged over the classes that have images), in %
instead of fractions; the class embeddings are the same prompt ensemble. Differences: exact score ties go to the
lower class index here (lax.top_k); CLIP_benchmark's acc1 / acc5 use torch.topk, which leaves tied scores in no
specified order, while its mean_per_class_recall uses argmax (the first maximum, as here). With fewer than 5
classes, top5 here is top-k over all classes (100%), where CLIP_benchmark reports nan.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import sharding
from clip_jax.config import ConfigError
from clip_jax.evaluate import common
from clip_jax.evaluate import templates as templates_lib
from clip_jax.input import eval_data
from clip_jax.input import tokenizer as tokenizer_lib

GROUPS = ("", "_seen", "_unseen")  # metric suffixes: all images; those of classes seen / unseen in training


def class_embeddings(encode_text, tokens_per_class: np.ndarray, mesh, chunk: int = 1024) -> jax.Array:
    """tokens_per_class: [C, T, L] -> [C, d] unit-norm class embeddings (replicated)."""
    c, t, l = tokens_per_class.shape
    emb = common.encode_all(encode_text, tokens_per_class.reshape(c * t, l), mesh, chunk)
    emb = emb.astype(np.float64).reshape(c, t, -1).mean(axis=1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    return jax.device_put(emb.astype(np.float32), sharding.replicated(mesh))


@functools.partial(jax.jit, static_argnames=("k",))
def _counts(img_emb, class_emb, labels, groups, k):
    return class_counts(img_emb, class_emb, labels, groups, k)


def class_counts(img_emb, class_emb, labels, groups, k):
    """[G, 3, C] float32: per group (weights [B, G]) and class, the numbers of images, top-1 hits and top-k hits.

    img_emb [B, d], class_emb [C, d], labels [B] int. Ties between classes go to the lower class index (lax.top_k's
    order), as numpy's and torch's argmax do for top-1.
    """
    top = jax.lax.top_k(img_emb @ class_emb.T, k)[1]
    hit1 = (top[:, 0] == labels).astype(jnp.float32)
    hitk = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
    stats = jnp.stack([jnp.ones_like(hit1), hit1, hitk])  # [3, B]
    onehot = jax.nn.one_hot(labels, class_emb.shape[0], dtype=jnp.float32)
    return jnp.einsum("bg,sb,bc->gsc", groups, stats, onehot)


def score(encode_image, class_emb, batches, mesh, k: int) -> np.ndarray:
    """Sum of class_counts over host batches {'image', 'label', 'mask', optional 'unseen'}: float64 [G, 3, C]."""
    total = np.zeros((len(GROUPS), 3, class_emb.shape[0]))
    for batch in batches:
        mask = batch["mask"].astype(np.float32)
        unseen = batch.get("unseen", np.zeros_like(mask)).astype(np.float32)
        groups = np.stack([mask, mask * (1 - unseen), mask * unseen], axis=1)  # [b, G]: sharded with the batch
        dev = sharding.put_batch({"image": batch["image"], "label": batch["label"], "groups": groups}, mesh)
        out = _counts(encode_image(dev["image"]), class_emb, dev["label"], dev["groups"], k=k)
        total += common.to_host(out)
    return total


def metrics(counts: np.ndarray, k: int) -> dict:
    """Accuracies (%) from score()'s counts: top1, top5 (top-k with k = min(5, classes)), mean_per_class (top-1
    averaged over the classes that have images: sklearn's balanced_accuracy_score, CLIP_benchmark's
    mean_per_class_recall) and examples, per group present; num_classes and chance levels."""
    out = {}
    num_classes = counts.shape[-1]
    has_unseen = counts[GROUPS.index("_unseen"), 0].sum() > 0
    for g, suffix in enumerate(GROUPS):
        if suffix and not has_unseen:
            continue  # no held-out classes in this dataset: the overall figures only
        n_per_class, hit1, hitk = counts[g]
        n = n_per_class.sum()
        present = n_per_class > 0
        per_class = hit1[present] / n_per_class[present]
        out[f"top1{suffix}"] = 100.0 * hit1.sum() / max(n, 1.0)
        out[f"top5{suffix}"] = 100.0 * hitk.sum() / max(n, 1.0)
        out[f"mean_per_class{suffix}"] = 100.0 * float(per_class.mean()) if present.any() else 0.0
        out[f"examples{suffix}"] = int(n)
    out.update(num_classes=num_classes, chance_top1=100.0 / num_classes, chance_top5=100.0 * k / num_classes)
    return out


class ZeroShot(common.Evaluator):
    """Zero-shot accuracies (%) on one labelled set (an `evals.<name>` section of type 'zeroshot'), with chance
    levels for reference. Class names, prompts and their tokens are made once, when the evaluator is built."""

    def __init__(self, name, section, cfg, mesh):
        super().__init__(name, section, cfg, mesh)
        eval_data.check_section(cfg, section, self.key, label=True)
        label_names = eval_data.class_names(section, cfg.data.data_dir, self.key)
        templates = section.templates or templates_lib.default_templates(section.dataset)
        try:
            names = templates_lib.class_names(section.class_names, section.dataset, label_names)
            prompts = templates_lib.class_prompts(templates, names)
        except ConfigError as e:
            raise ConfigError(f"{self.key}.{e}") from None
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("every class needs the same number of prompts")
        tok = tokenizer_lib.make(cfg)
        self.tokens = np.stack([tok(p) for p in prompts])  # [C, T, L]
        self.templates, self.k = templates, min(5, len(names))

    def run(self, params, encoders, graphdef=None) -> dict:
        """-> top1, top5, mean_per_class (%), examples, num_classes, chance_top1, chance_top5 (+ _seen/_unseen)."""
        class_emb = class_embeddings(lambda x: encoders.text(params, x), self.tokens, self.mesh)
        batches = eval_data.eval_batches(self.cfg, self.section, num_devices=self.mesh.devices.size)
        counts = score(lambda x: encoders.image(params, x), class_emb, batches, self.mesh, self.k)
        return metrics(counts, self.k)
