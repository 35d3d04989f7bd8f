"""Local image-text corpora as tfds builders: prepared once into ArrayRecord, then read like any tfds set.

- `image_text_folder`: a folder of images plus a caption table, `captions.jsonl` / `metadata.jsonl` (one JSON
  object per line) or `captions.csv`, each row naming a file (`file_name` / `image` / `path`, relative to the
  folder) and its caption (`caption` / `text`).
- `webdataset`: tar shards as written by img2dataset and webdataset (see clip_jax/input/shards.py, which can also
  train from them in place, with no preparation): members grouped by key (the file name up to its first dot), an
  image (`.jpg` `.jpeg` `.png` `.webp`) with a caption (`.txt`, or `.json` with a `caption` / `text` field).

Each corpus is one builder config, named by the user: `python data/prepare_local.py folder DIR --name pets`
writes `<data_dir>/image_text_folder/pets/1.0.0`, read with `--config.data.name=image_text_folder/pets`.
Images are stored as their original encoded bytes and captions as raw bytes: decoding, colour conversion and
text repair happen in the input pipeline (clip_jax/input/decode.py), which skips or converts bad records and
counts each kind, so a corrupt file costs one example, never the preparation. What preparation itself cannot
read (a truncated shard's tail, a listed file that is missing, an image without a caption) is counted in the
log and in the dataset's description.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds

from clip_jax.input import shards

log = logging.getLogger(__name__)
_FILE_KEYS = ("file_name", "image", "path", "file")
_TEXT_KEYS = ("caption", "text")


@dataclasses.dataclass(eq=False)
class LocalConfig(tfds.core.BuilderConfig):
    """`source`: the folder (image_text_folder) or a glob of tar shards (webdataset)."""

    source: str = ""


def _features():
    return tfds.features.FeaturesDict(
        {
            # Encoded bytes, undecoded: a corrupt file must reach the pipeline's counters, not fail preparation.
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "caption": tfds.features.Tensor(shape=(), dtype=np.object_),  # raw bytes: may be bad UTF-8
            "key": tfds.features.Text(),
        }
    )


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [LocalConfig(name="default", description="pass a LocalConfig naming the source")]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self):
        return self.dataset_info_from_configs(features=_features(), description=__doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        if not self.builder_config.source:
            raise ValueError(f"{self.name}: the builder config needs `source`")
        return {"train": self._generate_examples(self.builder_config.source)}

    @staticmethod
    def _report(name: str, counts: collections.Counter):
        if counts:
            log.warning("%s: left out while preparing: %s", name, dict(counts))


class ImageTextFolder(_LocalBuilder):
    """A folder of images with a caption table (see the module docstring)."""

    def _generate_examples(self, folder):
        rows, counts = _read_table(folder), collections.Counter()
        for i, (name, caption) in enumerate(rows):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                counts["missing_image_file"] += 1
                continue
            with open(path, "rb") as f:
                data = f.read()
            yield f"{i}:{name}", {"image": data, "caption": caption, "key": name}
        self._report(self.builder_config.name, counts)


def _read_table(folder: str) -> list[tuple[str, bytes]]:
    """[(relative file name, caption bytes)] from the folder's caption table."""
    for name in ("captions.jsonl", "metadata.jsonl", "captions.csv"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f"{folder} has no captions.jsonl, metadata.jsonl or captions.csv")
    with open(path, "rb") as f:  # bytes: a caption that is not UTF-8 must survive to be counted, not crash here
        data = f.read()
    if path.endswith(".csv"):
        text = data.decode("utf-8", errors="surrogateescape")
        records = list(csv.DictReader(text.splitlines()))
    else:
        records = []
        for line in data.splitlines():
            try:
                records.append(
                    json.loads(line.decode("utf-8", errors="surrogateescape")) if line.strip() else None
                )
            except ValueError:
                log.warning("%s: a line that is not JSON was left out", path)
    rows = []
    for row in filter(None, records):
        name = next((row[k] for k in _FILE_KEYS if row.get(k)), None)
        caption = next((row[k] for k in _TEXT_KEYS if k in row), None)
        if name is None:
            continue
        caption = b"" if caption is None else _raw_bytes(str(caption))
        rows.append((str(name), caption))
    return rows


def _raw_bytes(text: str) -> bytes:
    """Undo surrogateescape decoding: a caption's undecodable bytes come back as they were in the file."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \\u escape: keep it visible, not fatal
        return text.encode("utf-8", errors="replace")


class Webdataset(_LocalBuilder):
    """Webdataset-style tar shards (see the module docstring), kept in shard and tar order: record i is sample i
    of clip_jax.input.shards.TarShards over the same shards, so training from the shards in place or from this
    copy sees the same examples in the same order for a seed."""

    def _info(self):
        return self.dataset_info_from_configs(features=_features(), description=__doc__, disable_shuffling=True)

    def _generate_examples(self, pattern):
        counts = collections.Counter()
        for shard in shards.expand(pattern):
            for key, sample in _shard_samples(shard, counts):
                uid = f"{os.path.basename(shard)}/{key}"
                yield uid, {**sample, "key": uid}
        self._report(self.builder_config.name, counts)


def _shard_samples(shard: str, counts: collections.Counter):
    """(key, {'image', 'caption'}) per sample: an uncompressed shard through its index (as shards.TarShards reads
    it, damage handled alike), a compressed one (.tar.gz, ...) streamed."""
    try:
        rows, keys, damage = shards.index_shard(shard)
    except shards.ShardError:
        yield from _streamed(shard, counts)
        return
    counts.update(damage)
    with open(shard, "rb") as f:

        def read(offset, size):
            f.seek(offset)
            return f.read(size)

        for key, row in zip(keys, rows, strict=True):
            yield key, shards.read_sample(read, row)


def _streamed(shard: str, counts: collections.Counter):
    for key, parts in _samples(shard, counts):
        image = next((parts[e] for e in shards.IMAGE_EXTS if e in parts), None)
        if image is None:
            counts["sample_without_image"] += 1
            continue
        caption = parts.get(".txt")
        if caption is None and ".json" in parts:
            caption = shards.caption_from_json(parts[".json"])
        if caption is None:
            counts["missing_caption_file"] += 1
            caption = b""  # kept: the pipeline counts and skips it with the other empty captions
        yield key, {"image": image, "caption": caption}


def _samples(shard: str, counts: collections.Counter):
    """(key, {ext: bytes}) per sample of one compressed shard, in order; a truncated shard yields what precedes
    the cut."""
    current, parts = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:  # streaming: members are read in order, never seeked
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = shards.sample_key(member.name)
                data = tar.extractfile(member).read()
                if key != current:
                    if parts:
                        yield current, parts
                    current, parts = key, {}
                parts[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        counts["truncated_shard"] += 1
        log.warning("%s: unreadable from here on (%s); the samples before it are kept", shard, e)
        parts = {}  # the sample being read when the shard broke may be incomplete
    if parts:
        yield current, parts
