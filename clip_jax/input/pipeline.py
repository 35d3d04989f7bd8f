"""Input pipeline: tfds ArrayRecord data sources read with grain, per host, deterministic and resumable.

Each host reads its own slice (process_index::process_count) of a globally shuffled, endlessly repeated index
space, so the data order depends only on the seed; the iterator's state is a few integers that go into every
checkpoint, and restoring it yields exactly the batches an uninterrupted run would have seen.
"""

import functools
import logging
import os
import threading
import time

import grain
import jax
import numpy as np

from clip_jax.input import decode, memory, ops
from clip_jax.input import tokenizer as tokenizer_lib
from clip_jax.input.caption_ids import body_ids

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A dataset cannot be opened; the message says how to prepare it."""


class DataChanged(DataError):
    """A saved data position is for other training data (another record count): it cannot be resumed exactly."""


def open_source(name: str, split: str, data_dir: str):
    """A random-access tfds data source, never touching the network (embedded sets are built here if missing)."""
    import tensorflow_datasets as tfds  # heavy import, only where needed

    from clip_jax import datasets  # registers the embedded builders (clip_shapes, clip_digits)

    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    base, _, builder_config = name.partition("/")  # tfds "name/config" syntax
    if base in datasets.LOCAL_BUILDERS:  # the user's own corpus, prepared by data/prepare_local.py
        try:
            return datasets.local_source(base, builder_config, split, data_dir)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise DataError(_one_line(e)) from None
    if base in datasets.BUILDERS:
        try:
            datasets.prepare(base, data_dir, builder_config or None)
        except datasets.PREPARE_ERRORS as e:  # a demo set's source (Debian package, scikit-image) is missing
            raise DataError(f"cannot prepare {name} in {data_dir}: {_one_line(e)}") from None
    how = (
        f"prepare it there first (e.g. `tfds build {name} --data_dir={data_dir} --file_format=array_record` with "
        "its source files available locally), or point --config.data.data_dir at where it is prepared"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as e:  # noqa: BLE001  unknown name and not a prepared folder either
        reason = _one_line(e).split(" Available datasets")[0]  # tfds lists its whole catalogue after this
        raise DataError(f"cannot find tfds dataset '{name}' in {data_dir} ({reason}); {how}") from None
    if not prepared:
        raise DataError(f"tfds dataset '{name}' is not prepared in {data_dir}; {how}")
    # Public sets' images stay encoded: tfds' own decoding ignores EXIF orientation and transparency, decode.image
    # applies both. The embedded sets (written from clean RGB arrays) keep tfds' faster, cacheable decoding.
    decoders = None if base in datasets.BUILDERS else datasets.encoded_images(builder.info.features)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
    except Exception as e:  # noqa: BLE001  e.g. prepared as TFRecord (no random access) or a missing split
        raise DataError(f"cannot read '{name}' split '{split}' from {data_dir}: {_one_line(e)}") from None


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def field(record, key: str):
    """record[key], where 'a/b' reaches into nested features (coco_captions' captions are 'captions/text')."""
    for part in key.split("/"):
        record = record.get(part) if isinstance(record, dict) else None
    return record


class _Preprocess(grain.transforms.MapWithIndex):
    """(index, record) -> {'image': uint8 [H, W, 3], 'tokens', '_issues'}, or {'_issues'} alone for a record to
    skip. The image is ops.train_image's view (decoded at reduced scale where the crop allows); it is normalised
    with data.image_mean/std on the devices (train.normalise_images), not here.

    A module-level class so grain worker processes can pickle it. Crops, flips and the choice among several
    captions draw from a generator seeded by (seed, host, index): deterministic, the same after a resume, new
    every epoch (the index keeps growing). It is built only for records that need it, as building one costs
    ~40 us, more than all the rest of the work on an embedded 32x32 example.
    """

    def __init__(self, cfg):
        d = cfg.data
        if d.train_crop not in ops.TRAIN_CROPS:
            raise ValueError(f"data.train_crop={d.train_crop!r}; choose one of {ops.TRAIN_CROPS}")
        self.image_key, self.text_key, self.min_side = d.image_key, d.text_key, d.min_image_size
        self.crop, self.min_area, self.flip = d.train_crop, d.crop_min_area, d.flip
        self.seed, self.size = cfg.seed, cfg.model.image.image_size
        self.host, self.hosts = jax.process_index(), jax.process_count()
        self.random_view = d.train_crop != "resize" or d.flip
        self.resample = d.resample
        self.tok = tokenizer_lib.make(cfg)

    def map_with_index(self, index, record):
        if decode.UNREADABLE in record:
            return {"_issues": decode.BIT["unreadable_record"]}
        value = field(record, self.text_key)
        several = isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0)
        # Keyed by the example's global position (this host reads positions host, host + hosts, ...), so the
        # augmentation of an example does not depend on how many hosts share the run.
        position = index * self.hosts + self.host
        rng = np.random.default_rng((self.seed, position)) if self.random_view or several else None
        text, bits = decode.caption(value, self.tok.max_len, rng)
        if text is None:  # checked first: a caption costs microseconds, an image decode milliseconds
            return {"_issues": bits}
        tokens = self.tok.encode(text)
        if not body_ids(tokens, self.tok, drop=(self.tok.bos_id,)):  # blank once cleaned: "&nbsp;", "!!!" (hashed)
            return {"_issues": bits | decode.BIT["empty_caption"]}
        value = field(record, self.image_key)
        image, more = ops.train_image(
            value, self.size, self.min_side, rng, self.crop, self.min_area, self.flip, self.resample
        )
        if image is None:
            return {"_issues": bits | more}
        return {"image": image, "tokens": tokens, "_issues": bits | more}


class _SafeSource:
    """A data source whose failing reads become marker records: one unreadable record is one skipped example."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index]
        except Exception:  # noqa: BLE001  storage and feature decoding raise many types; count, never crash
            return {decode.UNREADABLE: True}


class GoodBatches(grain.IterDataset):
    """Batches of `batch_size` good examples from a parent that yields lists of processed examples (chunks).

    Skipped records are dropped before batching, so every batch is full. Work is prefetched a chunk at a time
    (one thread task per chunk, as cheap as batching; grain's per-element prefetch costs O(buffer) per element),
    and the state is (the parent's state before the current chunk, the offset in it), so a resume is exact even
    when a batch ends mid-chunk. Each batch carries '_issues': int64 [len(decode.KINDS)], the kinds met while
    filling it (summed and logged by IssueCounter).
    """

    def __init__(self, parent, batch_size: int, max_skips: int):
        super().__init__(parent)
        self.batch_size, self.max_skips = batch_size, max_skips

    def __iter__(self):
        return _GoodBatchIterator(self._parent.__iter__(), self.batch_size, self.max_skips)


class _GoodBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size, max_skips):
        super().__init__(parent)
        self.batch_size, self.max_skips = batch_size, max_skips
        self._chunk, self._offset, self._chunk_state = [], 0, parent.get_state()

    def _next_example(self):
        while self._offset >= len(self._chunk):
            self._chunk_state = self._parent.get_state()
            self._chunk, self._offset = next(self._parent), 0
        self._offset += 1
        return self._chunk[self._offset - 1]

    def __next__(self):
        good, counts, skipped = [], np.zeros(len(decode.KINDS), np.int64), 0
        while len(good) < self.batch_size:
            example = self._next_example()
            bits = example["_issues"]
            if bits:
                counts += [(bits >> i) & 1 for i in range(len(decode.KINDS))]
            if bits & decode.SKIP_MASK:
                skipped += 1
                if skipped > self.max_skips:  # a dataset that is all bad would otherwise spin forever
                    raise DataError(
                        f"{skipped} bad records in a row while filling one batch: {_named(counts)}; check that the "
                        "data holds images and captions where data.image_key / data.text_key (or data.shards) say"
                    )
            else:
                good.append(example)
        return {
            "image": np.stack([g["image"] for g in good]),
            "tokens": np.stack([g["tokens"] for g in good]),
            "_issues": counts,
        }

    def get_state(self):
        if self._offset >= len(self._chunk):  # at a chunk boundary: no need to redo the finished chunk
            return {"chunk": self._parent.get_state(), "offset": 0}
        return {"chunk": self._chunk_state, "offset": self._offset}

    def _set_next_index(self, index: int) -> None:
        """grain's set_next_index protocol (grain.experimental.set_next_index): start at chunk `index` of this
        host's slice, which is batch `index` when no record before it was skipped."""
        grain.experimental.set_next_index(self._parent, index)
        self._chunk, self._offset, self._chunk_state = [], 0, self._parent.get_state()

    def set_state(self, state):
        if "chunk" not in state:  # a checkpoint from before filtering: its batch index is our chunk index
            state = {"chunk": state, "offset": 0}
        self._parent.set_state(state["chunk"])
        self._chunk_state, self._chunk, self._offset = state["chunk"], [], 0
        if state["offset"]:
            self._chunk, self._offset = next(self._parent), state["offset"]


def _named(counts) -> str:
    return ", ".join(f"{k}={int(n)}" for k, n in zip(decode.KINDS, counts, strict=True) if n) or "none"


class IssueCounter:
    """The train iterator as the trainer sees it: batches without '_issues', the totals in `.counts`, logged
    when they change (at most every `log_every_s` seconds). Its state is grain's plus `records`, the record count
    of each training source: set_state raises DataChanged for a state saved over other data, whose positions
    would silently mean other examples (shards added to a corpus, another dataset)."""

    def __init__(self, iterator, records: tuple = (), log_every_s: float = 60.0):
        self.iterator, self.log_every_s, self.records = iterator, log_every_s, list(records)
        self.totals = np.zeros(len(decode.KINDS), np.int64)
        self._logged, self._last_log = self.totals.copy(), -float("inf")

    @property
    def counts(self) -> dict[str, int]:
        return {k: int(n) for k, n in zip(decode.KINDS, self.totals, strict=True) if n}

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.totals += batch.pop("_issues")
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s and (self.totals != self._logged).any():
            log.warning("input data issues so far (skipped or converted): %s", _named(self.totals))
            self._logged, self._last_log = self.totals.copy(), now
        return batch

    def get_state(self):
        return {"position": self.iterator.get_state(), "records": self.records}

    def set_state(self, state):
        if not (isinstance(state, dict) and state.keys() == {"position", "records"}):
            self.iterator.set_state(state)  # grain's own state: checkpoints from before `records`, start_at
            return
        if list(state["records"]) != self.records:
            raise DataChanged(
                f"the training data has {self.records} records now and had {list(state['records'])} when the "
                "checkpoint was written, so its data position means other examples"
            )
        self.iterator.set_state(state["position"])


def start_at(iterator, index: int) -> None:
    """Moves a train iterator (train_iterator's, or prefetch_to_device's around it) to batch `index` of this
    process's slice, counted as if no record before it had been skipped. Used to resume on another number of
    processes (data.resume_reshuffle), whose slices differ from the saved ones. Raises DataError with more than
    one data worker (grain cannot move an interleave of several workers to an index)."""
    inner = iterator
    while not isinstance(inner, grain.DatasetIterator):
        inner = inner.iterator  # DevicePrefetch -> IssueCounter -> grain's iterator
    try:
        grain.experimental.set_next_index(inner, index)
    except NotImplementedError:
        raise DataError(
            "data.resume_reshuffle needs data.num_workers 0 or 1; set --config.data.num_workers=1 (grain cannot "
            "move several workers' interleaved iterators to a batch)"
        ) from None
    iterator.set_state(inner.get_state())  # the wrappers drop what they prefetched from the old position


def prefetch_to_device(iterator, size: int, mesh):
    """Wraps an iterator of host-local numpy batches: yields global arrays sharded over the mesh's batch axes
    (sharding.put_batch) with `size` more already sent to the devices; get_state/set_state pass through, at the
    position of the batch last returned. See prefetch.DevicePrefetch."""
    from clip_jax.input import prefetch  # imports flax via sharding: not needed by grain worker processes

    return prefetch.DevicePrefetch(iterator, size, mesh)


@functools.lru_cache(maxsize=2)
def decoded_source(name: str, split: str, data_dir: str, keys: tuple) -> memory.InMemorySource:
    """data.cache's decoded split, once per process: a batch-size sweep trains many runs on the same split in one
    process, and decoding the 50k shapes takes ~25 s of CPU each time. Read-only, so runs can share it."""
    return memory.InMemorySource(open_source(name, split, data_dir), keys)


def mixture(data) -> list[tuple[str, float]]:
    """[(tfds name, weight)]: data.mixture ('name:weight,name:weight') when set, else data.name alone."""
    if not data.mixture.strip():
        return [(data.name, 1.0)]
    out = []
    for part in data.mixture.split(","):
        name, _, weight = part.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not name or value <= 0:
            raise ValueError(f"data.mixture entry {part.strip()!r} is not 'name:weight' with a positive weight")
        out.append((name, value))
    return out


def train_sources(cfg) -> list[tuple[str, object, float]]:
    """[(name, random-access source, mixture weight)] of the training data: data.shards (tar shards read in place,
    input/shards.py), else data.mixture or data.name (tfds; decoded into memory with data.cache). A record the
    storage cannot return reads as a marker the pipeline counts and skips. Raises DataError (one line) when a
    dataset or the shards cannot be opened."""
    d = cfg.data
    if d.shards.strip():
        args = d.shards.strip(), d.shard_index_dir or os.path.join(d.data_dir, "shard_index")
        return [(d.shards, cached_tar_source(*args) if d.cache else _SafeSource(tar_source(*args)), 1.0)]
    out = []
    for name, weight in mixture(d):
        if d.cache:
            keys = (d.image_key, d.text_key)
            source = decoded_source(name, d.train_split, os.path.abspath(d.data_dir), keys)
        else:
            source = _SafeSource(open_source(name, d.train_split, d.data_dir))
        out.append((name, source, weight))
    return out


@functools.lru_cache(maxsize=2)
def tar_source(pattern: str, index_dir: str):
    """shards.TarShards(pattern, index_dir), once per process (the preflight check and the run share it)."""
    from clip_jax.input import shards

    try:
        return shards.TarShards(pattern, index_dir)
    except (shards.ShardError, OSError) as e:
        raise DataError(_one_line(e)) from None


@functools.lru_cache(maxsize=2)
def cached_tar_source(pattern: str, index_dir: str) -> memory.InMemorySource:
    """data.cache over tar shards: every sample's encoded bytes read into memory once per process."""
    return memory.InMemorySource(tar_source(pattern, index_dir), ("image", "caption"))


def die_with_parent(worker_index: int, worker_count: int) -> None:
    """grain worker init: a daemon thread in the worker exits it once its parent process is gone, so a run killed
    with kill -9 or by the OOM killer leaves no orphaned decoder processes. (prctl's PR_SET_PDEATHSIG is tied to
    the parent's spawning thread, which grain does not keep alive: it killed live workers.)"""
    del worker_index, worker_count
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="clip_jax-parent-watch").start()


def train_iterator(cfg):
    """Endless iterator of host-local batches {'image': [b,H,W,3] uint8, 'tokens': [b,L] i32}; has get/set_state.
    The images are normalised on the devices, in the train step (train.normalise_images).

    Order: seed -> global shuffle (a fresh permutation per epoch) -> this host's slice -> decode/augment/tokenize
    (prefetched by threads, or grain worker processes) -> drop bad records -> batch.
    """
    pc, pi = jax.process_count(), jax.process_index()
    if cfg.batch_size % pc:
        raise ValueError(f"batch_size={cfg.batch_size} does not divide over {pc} hosts")
    local = cfg.batch_size // pc
    parts, weights = [], []
    sources = train_sources(cfg)
    for i, (_, source, weight) in enumerate(sources):
        # Each source is shuffled and repeated on its own before mixing, so the weights hold at every scale.
        parts.append(grain.MapDataset.source(source).seed(cfg.seed + i).shuffle().repeat(None))
        weights.append(weight)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    # Chunks of `local` processed examples (a plain list each): the unit of prefetching; GoodBatches re-cuts
    # them into full batches of good examples.
    ds = ds[pi::pc].map_with_index(_Preprocess(cfg)).batch(local, batch_fn=list)
    read = grain.ReadOptions(num_threads=cfg.data.read_threads, prefetch_buffer_size=max(1, cfg.data.prefetch))
    it_ds = GoodBatches(ds.to_iter_dataset(read), local, max_skips=max(1000, 100 * local))
    if cfg.data.num_workers > 0:
        options = grain.MultiprocessingOptions(num_workers=cfg.data.num_workers)
        it_ds = it_ds.mp_prefetch(options, worker_init_fn=die_with_parent)
    return IssueCounter(iter(it_ds), records=[len(source) for _, source, _ in sources])
