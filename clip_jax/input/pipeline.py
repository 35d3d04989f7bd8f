"""Input pipeline: tfds ArrayRecord data sources read with grain, per host, deterministic and resumable.

Each host reads its own slice (process_index::process_count) of a globally shuffled, endlessly repeated index
space, so the data order depends only on the seed; the iterator's state is a few integers that go into every
checkpoint, and restoring it yields exactly the batches an uninterrupted run would have seen.
"""

import os

import grain
import jax
import numpy as np
from PIL import Image

from clip_jax.input import tokenizer as tokenizer_lib

# Images are scaled to [-1, 1]: the towers learn their own input statistics, and this is exact for uint8.
_SCALE = 2.0 / 255.0


class DataError(RuntimeError):
    """A dataset cannot be opened; the message says how to prepare it."""


def open_source(name: str, split: str, data_dir: str):
    """A random-access tfds data source, never touching the network (embedded sets are built here if missing)."""
    import tensorflow_datasets as tfds  # heavy import, only where needed

    from clip_jax import datasets  # registers the embedded builders (clip_shapes, clip_digits)

    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    base, _, builder_config = name.partition("/")  # tfds "name/config" syntax
    if base in datasets.BUILDERS:
        datasets.prepare(base, data_dir, builder_config or None)
    how = (
        f"prepare it there first (e.g. `tfds build {name} --data_dir={data_dir} --file_format=array_record` with "
        "its source files available locally), or point --config.data.data_dir at where it is prepared"
    )
    try:
        prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception as e:  # unknown name and not a prepared folder either
        raise DataError(f"cannot find tfds dataset '{name}' in {data_dir} ({_one_line(e)}); {how}") from None
    if not prepared:
        raise DataError(f"tfds dataset '{name}' is not prepared in {data_dir}; {how}")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # e.g. prepared as TFRecord (no random access) or a missing split
        raise DataError(f"cannot read '{name}' split '{split}' from {data_dir}: {_one_line(e)}") from None


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def class_names(cfg) -> list[str]:
    """Class names of the zero-shot set, from its ClassLabel feature."""
    source = open_source(cfg.eval.dataset, cfg.eval.split, cfg.data.data_dir)
    feature = source.dataset_info.features[cfg.eval.label_key]
    if not hasattr(feature, "names"):
        raise DataError(f"eval.label_key '{cfg.eval.label_key}' of {cfg.eval.dataset} is not a ClassLabel feature")
    return list(feature.names)


def load_image(image, size: int) -> np.ndarray:
    """uint8 HxWxC (any C) -> float32 [size, size, 3] in [-1, 1]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3]
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image.astype(np.float32) * _SCALE - 1.0


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class _Preprocess(grain.transforms.Map):
    """Record -> {'image', 'tokens'}; a module-level class so grain worker processes can pickle it."""

    def __init__(self, cfg):
        self.image_key, self.text_key = cfg.data.image_key, cfg.data.text_key
        self.size = cfg.model.image.image_size
        self.tok = tokenizer_lib.make(cfg)

    def map(self, record):
        return {
            "image": load_image(record[self.image_key], self.size),
            "tokens": self.tok.encode(_text(record[self.text_key])),
        }


class InMemorySource:
    """A split decoded once into host memory: random access without re-reading or re-decoding records.

    For datasets small enough to hold (the embedded 50k 32x32 shapes are ~150 MB), this removes the per-step
    record unpacking and PNG decoding that otherwise takes a large share of a small CPU machine.
    """

    def __init__(self, source, keys):
        chunk = 1024
        parts = {k: [] for k in keys}
        for start in range(0, len(source), chunk):
            records = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
            for k in keys:
                parts[k].extend(r[k] for r in records)
        self.columns = {k: np.stack(v) if isinstance(v[0], np.ndarray) else v for k, v in parts.items()}
        self.length = len(source)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.columns.items()}


def train_iterator(cfg):
    """Endless iterator of host-local batches {'image': [b,H,W,3] f32, 'tokens': [b,L] i32}; has get/set_state."""
    pc, pi = jax.process_count(), jax.process_index()
    if cfg.batch_size % pc:
        raise ValueError(f"batch_size={cfg.batch_size} does not divide over {pc} hosts")
    source = open_source(cfg.data.name, cfg.data.train_split, cfg.data.data_dir)
    if cfg.data.cache:
        source = InMemorySource(source, (cfg.data.image_key, cfg.data.text_key))
    ds = grain.MapDataset.source(source).seed(cfg.seed).shuffle().repeat(None)  # a fresh permutation per epoch
    ds = ds[pi::pc].map(_Preprocess(cfg)).batch(cfg.batch_size // pc, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=cfg.data.prefetch))
    if cfg.data.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers))
    return iter(it_ds)


def eval_batches(cfg, *, batch_size: int, num_devices: int):
    """Yields this host's eval batches {'image', 'label', 'mask', ...}, each padded to batch_size // hosts rows.

    Padding rows have mask 0, so every host runs the same number of equally shaped steps (a collective needs all).
    """
    e, pc, pi = cfg.eval, jax.process_count(), jax.process_index()
    if batch_size % num_devices:
        raise ValueError(f"eval.batch_size={batch_size} must divide over the {num_devices} devices")
    source = open_source(e.dataset, e.split, cfg.data.data_dir)
    total = len(source) if e.max_examples < 0 else min(len(source), e.max_examples)
    local = batch_size // pc
    for start in range(0, total, batch_size):
        idx = list(range(start + pi * local, min(start + (pi + 1) * local, total)))
        records = [source[i] for i in idx]
        n = len(records)
        batch = {
            "image": np.zeros((local, cfg.model.image.image_size, cfg.model.image.image_size, 3), np.float32),
            "label": np.zeros((local,), np.int32),
            "mask": np.zeros((local,), np.float32),
        }
        for j, r in enumerate(records):
            batch["image"][j] = load_image(r[cfg.data.image_key], cfg.model.image.image_size)
            batch["label"][j] = int(r[e.label_key])
        batch["mask"][:n] = 1.0
        if records and "unseen" in records[0]:
            batch["unseen"] = np.zeros((local,), np.float32)
            batch["unseen"][:n] = [float(r["unseen"]) for r in records]
        yield batch
