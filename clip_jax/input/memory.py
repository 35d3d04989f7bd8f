"""data.cache: a training split decoded once into host memory, read like any random-access source."""

import logging

import numpy as np

from clip_jax.input import decode

log = logging.getLogger(__name__)


class InMemorySource:
    """A split read once into host memory: random access without re-reading or re-decoding records.

    For datasets small enough to hold (the embedded 50k 32x32 shapes are ~150 MB), this removes the per-step
    record unpacking and PNG decoding that otherwise takes a large share of a small CPU machine. Only the
    features the pipeline reads are kept, as stored: the images and captions still pass through _Preprocess,
    so bad ones are skipped and counted exactly as when streaming; a record the storage cannot return becomes
    the same unreadable marker as in pipeline._SafeSource (it used to abort the whole cache).
    """

    def __init__(self, source, keys):
        keys = list(dict.fromkeys(k.split("/")[0] for k in keys))  # nested 'captions/text' lives in 'captions'
        parts, self.unreadable = {k: [] for k in keys}, set()
        chunk = 1024
        for start in range(0, len(source), chunk):
            for i, record in zip(range(start, min(start + chunk, len(source))), _read_chunk(source, start, chunk)):
                if record is None:
                    self.unreadable.add(i)
                for k in keys:
                    parts[k].append(None if record is None else record.get(k))
        self.columns = {k: _column(v) for k, v in parts.items()}
        self.length = len(source)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if index in self.unreadable:
            return {decode.UNREADABLE: True}
        return {k: v[index] for k, v in self.columns.items()}


def _read_chunk(source, start: int, size: int) -> list:
    """Records start..start+size of `source`, None for each one that cannot be read."""
    indices = list(range(start, min(start + size, len(source))))
    if hasattr(source, "__getitems__"):  # tfds' batched read: much faster than one record at a time
        try:
            return list(source.__getitems__(indices))
        except Exception as e:  # noqa: BLE001  one bad record fails the whole chunk: read it record by record
            log.info("cache: a chunk read failed (%s); reading its records one by one", " ".join(str(e).split())[:300])
    out = []
    for i in indices:
        try:
            out.append(source[i])
        except Exception:  # noqa: BLE001  storage and feature decoding raise many types
            out.append(None)
    return out


def _column(values: list):
    """One array when every value is an array of one shape and dtype (compact, fast to index), else the list."""
    first = values[0] if values else None
    if isinstance(first, np.ndarray) and all(
        isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype for v in values
    ):
        return np.stack(values)
    return values
