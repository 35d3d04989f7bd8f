"""The one evaluation data path: what every evaluator (zero-shot, linear probe, retrieval, captioning) and the
caption CLI see of a stored image (`eval_image`: decode.image, then ops.eval_view with the config's crop, pixel
mean/std and resampling filter), the zero-shot set's class names, and its padded, masked eval batches.
"""

import logging

import jax
import numpy as np

from clip_jax.input import decode, ops
from clip_jax.input.pipeline import DataError, open_source

log = logging.getLogger(__name__)


def class_names(cfg) -> list[str]:
    """Class names of the zero-shot set, from its ClassLabel feature."""
    source = open_source(cfg.eval.dataset, cfg.eval.split, cfg.data.data_dir)
    features = source.dataset_info.features
    if cfg.eval.label_key not in features:
        raise DataError(
            f"{cfg.eval.dataset} has no feature eval.label_key={cfg.eval.label_key!r}; its features are "
            f"{sorted(features.keys())}"
        )
    feature = features[cfg.eval.label_key]
    if not hasattr(feature, "names"):
        raise DataError(f"eval.label_key '{cfg.eval.label_key}' of {cfg.eval.dataset} is not a ClassLabel feature")
    return list(feature.names)


def load_image(image, size: int) -> np.ndarray:
    """Stored image (any channel layout, or encoded bytes) -> float32 [size, size, 3] in [-1, 1]; raises on a
    bad image (the train pipeline skips those instead, see _Preprocess)."""
    rgb, bits = decode.image(image, size, min_side=1)
    if rgb is None:
        raise ValueError(f"bad image: {', '.join(decode.issue_names(bits))}")
    return ops.eval_view(rgb, size, "resize")


def eval_image(cfg, value) -> tuple[np.ndarray | None, int]:
    """What a model sees of a stored image at evaluation (every evaluator and the caption CLI use this one path):
    decode.image, then ops.eval_view with data.eval_crop / image_mean / image_std / resample. -> (float32
    [S, S, 3], S = model.image.image_size, or None for an unreadable image; decode's issue bits)."""
    size, d = cfg.model.image.image_size, cfg.data
    rgb, bits = decode.image(value, size, 1)
    if rgb is None:
        return None, bits
    return ops.eval_view(rgb, size, d.eval_crop, d.image_mean, d.image_std, d.resample), bits


def eval_batches(cfg, *, batch_size: int, num_devices: int):
    """Yields this host's eval batches {'image', 'label', 'mask', ...}, each padded to batch_size // hosts rows.

    Padding rows have mask 0, so every host runs the same number of equally shaped steps (a collective needs all).
    """
    e, pc, pi = cfg.eval, jax.process_count(), jax.process_index()
    if batch_size % num_devices:
        raise ValueError(f"eval.batch_size={batch_size} must divide over the {num_devices} devices")
    source = open_source(e.dataset, e.split, cfg.data.data_dir)
    total = len(source) if e.max_examples < 0 else min(len(source), e.max_examples)
    local, size = batch_size // pc, cfg.model.image.image_size
    for start in range(0, total, batch_size):
        idx = list(range(start + pi * local, min(start + (pi + 1) * local, total)))
        records = [source[i] for i in idx]
        n = len(records)
        batch = {
            "image": np.zeros((local, size, size, 3), np.float32),
            "label": np.zeros((local,), np.int32),
            "mask": np.zeros((local,), np.float32),
        }
        batch["mask"][:n] = 1.0
        for j, r in enumerate(records):
            batch["label"][j] = int(r[e.label_key])
            image, bits = eval_image(cfg, r[cfg.data.image_key])
            if image is None:  # an unreadable eval image is left out of the score (mask 0), and logged
                batch["mask"][j] = 0.0
                log.warning("eval image %d skipped: %s", idx[j], ", ".join(decode.issue_names(bits)))
            else:
                batch["image"][j] = image
        if records and "unseen" in records[0]:
            batch["unseen"] = np.zeros((local,), np.float32)
            batch["unseen"][:n] = [float(r["unseen"]) for r in records]
        yield batch
