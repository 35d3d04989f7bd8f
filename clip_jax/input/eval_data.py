"""The one evaluation data path: what every evaluator (zero-shot, linear probe, retrieval, captioning) and the
caption CLI see of a stored image (`eval_image`: decode.image, then ops.eval_view with the config's crop, pixel
mean/std and resampling filter, or for a NaFlex model naflex.eval_patches), the zero-shot set's class names, and
its padded, masked eval batches. A batch's images are `image_rows` filled with `set_image`: one float32 array
[B, S, S, 3], or for a NaFlex model (model.image.naflex_max_patches > 0) a dict of arrays (input/naflex.py).
"""

import logging

import jax
import numpy as np

from clip_jax.input import decode, naflex, ops, pipeline
from clip_jax.input.pipeline import DataError
from clip_jax.models import layers

log = logging.getLogger(__name__)


def class_names(section, data_dir: str, where: str = "evals") -> list[str]:
    """Class names of a labelled evaluation set (an `evals.<name>` section: dataset, split, label_key), from its
    ClassLabel feature. Raises DataError naming `where` (the section's config key) when there is none."""
    source = pipeline.open_source(section.dataset, section.split, data_dir)
    features = source.dataset_info.features
    if section.label_key not in features:
        raise DataError(
            f"{where}.label_key={section.label_key!r}: {section.dataset} has no such feature; its features are "
            f"{sorted(features.keys())}"
        )
    feature = features[section.label_key]
    if not hasattr(feature, "names"):
        raise DataError(f"{where}.label_key={section.label_key!r} of {section.dataset} is not a ClassLabel feature")
    return list(feature.names)


def check_section(cfg, section, where: str, *, split: str | None = None, label: bool = False,
                  text_key: str = "") -> None:  # fmt: skip
    """Before an evaluator runs: its split opens, and its first record has a decodable image under image_key, a
    label under label_key that is a ClassLabel (`label`), and text under `text_key` (one caption or several).
    Raises DataError naming the section key (`where`.<key>) and what the feature holds instead."""
    source = pipeline.open_source(section.dataset, split or section.split, cfg.data.data_dir)
    record = source[0] if len(source) else None
    if not isinstance(record, dict):
        return  # an empty split: the evaluator says so
    name = f"{section.dataset} (split '{split or section.split}')"

    def value_of(key):
        value = pipeline.field(record, section[key])
        if value is None:
            raise DataError(f"{where}.{key}={section[key]!r}: {name} has no such feature; its features are "
                            f"{sorted(record)}")  # fmt: skip
        return value

    image, bits = eval_image(cfg, value_of("image_key"))
    if image is None:
        raise DataError(
            f"{where}.image_key={section.image_key!r}: the first record of {name} holds no image there "
            f"({', '.join(decode.issue_names(bits))}); its features are {sorted(record)}"
        )
    if label:
        value_of("label_key")
        class_names(section, cfg.data.data_dir, where)  # the label must be a ClassLabel
    if text_key:
        value = value_of(text_key)
        value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
        items = list(value) if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) else [value]
        if not all(isinstance(v, (str, bytes)) for v in items):
            raise DataError(
                f"{where}.{text_key}={section[text_key]!r}: {name} holds no text there (a {type(value).__name__}); "
                f"its features are {sorted(record)}"
            )


def load_image(image, size: int) -> np.ndarray:
    """Stored image (any channel layout, or encoded bytes) -> float32 [size, size, 3] in [-1, 1]; raises on a
    bad image (the train pipeline skips those instead, see _Preprocess)."""
    rgb, bits = decode.image(image, size, min_side=1)
    if rgb is None:
        raise ValueError(f"bad image: {', '.join(decode.issue_names(bits))}")
    return ops.eval_view(rgb, size, "resize")


def _naflex(cfg) -> tuple[int, int] | None:
    """(patch size, max patches) of a NaFlex model, None for a fixed-resolution one."""
    image = cfg.model.image
    if image.get("naflex_max_patches", 0) <= 0:
        return None
    return layers.tower_dims(image, with_patch=True)["patch_size"], image.naflex_max_patches


def eval_image(cfg, value) -> tuple[np.ndarray | dict | None, int]:
    """What a model sees of a stored image at evaluation (every evaluator and the caption CLI use this one path):
    decode.image, then ops.eval_view with data.eval_crop / image_mean / image_std / resample. -> (float32
    [S, S, 3], S = model.image.image_size, or None for an unreadable image; decode's issue bits).

    A NaFlex model (model.image.naflex_max_patches = N > 0) gets naflex.eval_patches instead: the image at its
    own aspect ratio as {'patches' [N, p*p*3], 'patch_mask' [N], 'spatial_shapes' [2]} (Siglip2ImageProcessor's
    rule; data.eval_crop is not used). Its JPEGs are decoded at full size unless a side exceeds 4 * p * N pixels
    (decode.image's reduced-scale decoding), where the reference always decodes at full size."""
    d, flex = cfg.data, _naflex(cfg)
    size = cfg.model.image.image_size if flex is None else flex[0] * flex[1]  # the longest side a model reads
    rgb, bits = decode.image(value, size, 1)
    if rgb is None:
        return None, bits
    if flex is not None:
        return naflex.eval_patches(rgb, *flex, d.image_mean, d.image_std, d.resample), bits
    return ops.eval_view(rgb, size, d.eval_crop, d.image_mean, d.image_std, d.resample), bits


def image_rows(cfg, rows: int) -> np.ndarray | dict:
    """Zero storage for `rows` evaluation images as eval_image makes them: float32 [rows, S, S, 3], or a NaFlex
    model's dict of [rows, ...] arrays (a padding row left as made has no patches)."""
    flex = _naflex(cfg)
    if flex is not None:
        return naflex.empty(*flex, rows)
    size = cfg.model.image.image_size
    return np.zeros((rows, size, size, 3), np.float32)


def set_image(rows, j: int, image) -> None:
    """Store one eval_image result at row j of image_rows' storage."""
    if isinstance(rows, dict):
        for key, array in rows.items():
            array[j] = image[key]
    else:
        rows[j] = image


def eval_batches(cfg, section, *, split: str | None = None, num_devices: int):
    """Yields this host's batches of a labelled evaluation set {'image', 'label', 'mask', maybe 'unseen'}.

    section: an `evals.<name>` section (dataset, split, image_key, label_key, batch_size, max_examples); split
    overrides its split (the probe reads two). Each batch is padded to section.batch_size // hosts rows; padding
    rows and unreadable images (logged) have mask 0, so every host runs the same number of equally shaped steps
    (a collective needs all). Images are image_rows' storage (float32 [b, S, S, 3], or a NaFlex model's dict);
    labels int32.
    """
    pc, pi, batch_size = jax.process_count(), jax.process_index(), section.batch_size
    if batch_size % num_devices:
        raise ValueError(f"batch_size={batch_size} of {section.dataset} must divide over the {num_devices} devices")
    source = pipeline.open_source(section.dataset, split or section.split, cfg.data.data_dir)
    total = len(source) if section.max_examples < 0 else min(len(source), section.max_examples)
    local = batch_size // pc
    for start in range(0, total, batch_size):
        idx = list(range(start + pi * local, min(start + (pi + 1) * local, total)))
        records = [source[i] for i in idx]
        n = len(records)
        batch = {
            "image": image_rows(cfg, local),
            "label": np.zeros((local,), np.int32),
            "mask": np.zeros((local,), np.float32),
        }
        batch["mask"][:n] = 1.0
        for j, r in enumerate(records):
            batch["label"][j] = int(r[section.label_key])
            image, bits = eval_image(cfg, r[section.image_key])
            if image is None:  # an unreadable eval image is left out of the score (mask 0), and logged
                batch["mask"][j] = 0.0
                log.warning("%s image %d skipped: %s", section.dataset, idx[j], ", ".join(decode.issue_names(bits)))
            else:
                set_image(batch["image"], j, image)
        if records and "unseen" in records[0]:
            batch["unseen"] = np.zeros((local,), np.float32)
            batch["unseen"][:n] = [float(r["unseen"]) for r in records]
        yield batch
