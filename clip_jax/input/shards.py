"""Webdataset tar shards read in place: a random-access training source, globally shuffled and exactly resumable.

img2dataset and webdataset write a corpus as uncompressed tar shards in which the members of one sample are
adjacent and share a key (the member's path up to the first dot of its file name): an image (`.jpg` `.jpeg` `.png`
`.webp`) and a caption (`.txt`, or `.json` with a `caption` / `text` field). This module reads such shards where
they are (local paths, globs, `{000000..000999}` brace ranges; `gs://` and other remote paths through etils.epath)
without converting them:

- Index. One pass over each shard's tar headers (seeking over the member data; a few KB read per sample) records,
  per sample, the byte offset and size of its image and caption. The index is cached beside the data
  (`data.shard_index_dir`, by default `<data.data_dir>/shard_index`), one file per shard, keyed by the shard's
  path and size, so later runs and other hosts reuse it. Hosts build the missing ones starting at different
  shards, so a pod shares the first pass. Cost in memory: `ROW.itemsize` (25) bytes per sample, in one
  memory-mapped local file that grain's worker processes share.
- Reads. Sample i is one ranged read (image and caption together) from its shard: grain's global shuffle, per-host
  slicing and iterator state then work exactly as for a tfds ArrayRecord source.
- Damage. A truncated shard keeps the samples before the cut; a corrupt member header is stepped over (tarfile
  scans for the next valid header), costing that member; corrupt image bytes reach the pipeline's decode and are
  skipped and counted there. What the index could not use is counted per kind and logged once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import threading

import braceexpand
import numpy as np
from etils import epath

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")  # in order of preference when a sample has several
TEXT_KEYS = ("caption", "text")  # a .json caption's field, first found
INDEX_VERSION = 1
# One sample: where its image and caption bytes are in the shard. text_size -1: the sample has no caption file.
ROW = np.dtype(
    [("image_offset", "<i8"), ("image_size", "<u4"), ("text_offset", "<i8"), ("text_size", "<i4"), ("json", "u1")]
)
DAMAGE_KINDS = (
    "truncated_shard",  # the shard ends inside a member: the samples before it are kept
    "corrupt_member",  # a member header that is not a tar header was stepped over: that member is lost
    "sample_without_image",  # no image member under a key (e.g. its image member was the corrupt one)
    "missing_caption_file",  # an image without .txt / .json: kept, read as an empty caption (counted again later)
    "missing_shard",  # a shard named by a brace range does not exist (img2dataset leaves gaps where downloads failed)
    "not_a_tar",  # a named file that holds no tar header at all (a stray .parquet / .json among the shards)
)
_OPEN_FILES = 8  # per reading thread
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd: no random access


class ShardError(RuntimeError):
    """The shards cannot be listed or are not tar files; the message says which and how to fix it."""


def expand(pattern: str) -> list[str]:
    """Shard paths named by `pattern`, in order: brace ranges and lists (`{000..099}`, `{a,b}`, as webdataset and
    img2dataset write them) expanded by braceexpand, then each part globbed (sorted); duplicates removed. Named
    paths are not checked here (one request each on a bucket): a missing one is counted when indexed. Raises
    ShardError when nothing matches."""
    paths = []
    try:
        parts = list(braceexpand.braceexpand(pattern.strip()))
    except braceexpand.UnbalancedBracesError:
        raise ShardError(f"data.shards={pattern!r} has unbalanced braces; e.g. '/data/{{00000..00099}}.tar'") from None
    for part in parts:
        paths.extend(_glob(part) if glob.has_magic(part) else [part])
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise ShardError(f"data.shards={pattern!r} matches no file; give a tar path, a glob or a {{000..099}} range")
    return paths


def _glob(pattern: str) -> list[str]:
    if "://" not in pattern:
        return sorted(glob.glob(os.path.expanduser(pattern)))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = epath.Path(f"{scheme}://{'/'.join(parts[:fixed])}")
    return sorted(str(p) for p in root.glob("/".join(parts[fixed:])))


def sample_key(name: str) -> tuple[str, str]:
    """A member's (sample key, lower-case extension): 'dir/000123.jpg' -> ('dir/000123', '.jpg')."""
    head, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(head, stem), (dot + ext).lower()


def index_shard(path: str) -> tuple[np.ndarray, list[str], collections.Counter]:
    """(ROW [n] per sample, in shard order; the n sample keys; Counter of DAMAGE_KINDS) from one pass over the
    shard's headers. A shard that does not end with tar's end-of-archive blocks is truncated: its last sample is
    dropped (its later members may be lost) and it is counted. Raises ShardError for a compressed file (no random
    access) or a directory."""
    counts, rows, keys = collections.Counter(), [], []
    if epath.Path(path).is_dir():
        raise ShardError(f"data.shards names a directory, {path}; name the tar files in it, e.g. '{path}/*.tar'")
    with epath.Path(path).open("rb") as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        magic = f.read(6)
        f.seek(0)
        if any(magic.startswith(m) for m in _COMPRESSED):
            raise ShardError(f"{path} is a compressed file, not an uncompressed tar; decompress it first")
        try:
            # ignore_zeros: step over blocks that are not a header (a corrupt member) to the next valid one
            tar = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)  # noqa: SIM115  f closes it
        except tarfile.ReadError:  # shorter than one header, or no header anywhere
            return np.zeros(0, ROW), [], collections.Counter(not_a_tar=1)
        key, parts, expected, members = None, {}, 0, 0
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, OSError):
                counts["truncated_shard"] += 1
                parts = {}  # the sample being read when the shard broke may be incomplete
                break
            if member is None:
                if not members:
                    counts["not_a_tar"] += 1
                elif not _ends_archive(f, expected, size):
                    counts["truncated_shard"] += 1
                    parts = {}
                break
            members += 1
            if member.offset > expected:  # tarfile skipped blocks that were not a header to reach this one
                counts["corrupt_member"] += 1
            expected = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not member.isfile():
                continue
            name, ext = sample_key(member.name)
            if name != key:
                _add(rows, keys, key, parts, counts)
                key, parts = name, {}
            if member.offset_data + member.size > size:
                counts["truncated_shard"] += 1
                parts = {}  # this sample's members after the cut are lost: it may be incomplete
                break
            parts[ext] = (member.offset_data, member.size)
        _add(rows, keys, key, parts, counts)
    return np.array(rows, ROW), keys, counts


def _ends_archive(f, end: int, size: int) -> bool:
    """Whether the shard ends, after its last member (at byte `end`), with tar's two zero blocks: a copy cut at a
    member boundary or inside a header has no end marker."""
    if size - end < 2 * tarfile.BLOCKSIZE:
        return False
    f.seek(end)
    return not f.read(2 * tarfile.BLOCKSIZE).strip(b"\0")


def _add(rows: list, keys: list, key: str, parts: dict, counts: collections.Counter) -> None:
    if not parts:
        return
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:
        counts["sample_without_image"] += 1
        return
    text, is_json = parts.get(".txt"), False
    if text is None and ".json" in parts:
        text, is_json = parts[".json"], True
    if text is None:
        counts["missing_caption_file"] += 1
        text = (0, -1)
    rows.append((image[0], image[1], text[0], text[1], is_json))
    keys.append(key)


def caption_from_json(data: bytes) -> bytes | None:
    """A .json member's caption (its first `caption` / `text` field) as UTF-8 bytes; None if it has none."""
    try:
        row = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(row, dict):
        return None
    text = next((row[k] for k in TEXT_KEYS if k in row), None)
    return None if text is None else str(text).encode("utf-8", errors="surrogatepass")


def read_sample(read, row) -> dict:
    """{'image': bytes, 'caption': bytes} of one index row, with one call of read(offset, size) -> bytes over the
    span holding both members. No caption file, or a .json without a caption field: b""."""
    image = int(row["image_offset"]), int(row["image_size"])
    text = int(row["text_offset"]), int(row["text_size"])
    spans = [image] + ([text] if text[1] >= 0 else [])
    start = min(s for s, _ in spans)
    data = read(start, max(s + n for s, n in spans) - start)
    caption = data[text[0] - start : text[0] - start + text[1]] if text[1] >= 0 else b""
    if row["json"]:
        caption = caption_from_json(caption) or b""
    return {"image": data[image[0] - start : image[0] - start + image[1]], "caption": caption}


def _stat(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns: local files to the file system's resolution, remote ones to the
    second). Raises FileNotFoundError."""
    if "://" not in path:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    st = epath.Path(path).stat()
    return st.length, int(st.mtime * 1e9)


def _cache_path(index_dir: str, path: str, stat: tuple[int, int]) -> epath.Path:
    """Keyed by the shard's path, size and modification time: a shard rewritten in place (tar pads files to 10 KiB,
    so a same-size rewrite is common) gets a new index."""
    digest = hashlib.sha1(f"{path}\0{stat[0]}\0{stat[1]}".encode()).hexdigest()[:20]
    return epath.Path(index_dir) / f"{os.path.basename(path)}.{digest}.v{INDEX_VERSION}.npz"


def load_index(path: str, index_dir: str) -> tuple[np.ndarray, collections.Counter]:
    """index_shard(path), read from index_dir when cached there (same path, size and mtime), else built and cached
    (written to a temporary name and renamed, so hosts racing on one shard never read a partial file). An index
    directory that cannot be written only costs the cache: the index is rebuilt next time."""
    path = str(path)
    try:
        stat = _stat(path)
    except FileNotFoundError:
        return np.zeros(0, ROW), collections.Counter(missing_shard=1)
    cached = _cache_path(index_dir, path, stat)
    if cached.exists():
        try:
            with cached.open("rb") as f, np.load(f) as npz:
                return npz["rows"], collections.Counter(json.loads(str(npz["counts"])))
        except Exception as e:  # noqa: BLE001  a cut or foreign file (zip, EOF, pickle errors): rebuild it
            log.warning("shard index %s is unreadable (%s); rebuilding it", cached, e)
    rows, _, counts = index_shard(path)
    buffer = io.BytesIO()
    np.savez(buffer, rows=rows, counts=np.array(json.dumps(counts)))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.parent / f"{cached.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        partial.write_bytes(buffer.getvalue())
        partial.rename(cached)
    except OSError as e:
        _warn_once(f"cannot cache shard indexes in {index_dir} ({e.strerror}); they will be rebuilt next time")
    return rows, counts


def load_indexes(paths: list[str], index_dir: str, threads: int = 16) -> tuple[list[np.ndarray], collections.Counter]:
    """Every shard's index (load_index), in the order of `paths`, read or built `threads` at a time (reads from a
    bucket are latency-bound), and the damage counts summed. Each host starts at its own share of the list (by
    jax.process_index()), so on a pod the hosts build the missing indexes side by side before they read each
    other's. Shards that are missing, not tar files or truncated are logged by name (the first few)."""
    import jax

    start = len(paths) * jax.process_index() // jax.process_count()
    order = list(range(start, len(paths))) + list(range(start))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        done = dict(zip(order, pool.map(lambda i: load_index(paths[i], index_dir), order), strict=True))
    counts = collections.Counter()
    for _, c in done.values():
        counts.update(c)
    for kind in ("missing_shard", "not_a_tar", "truncated_shard"):
        named = [paths[i] for i in range(len(paths)) if done[i][1][kind]]
        if named:
            more = f" and {len(named) - 3} more" if len(named) > 3 else ""
            log.warning("%s: %s%s", kind, ", ".join(named[:3]), more)
    return [done[i][0] for i in range(len(paths))], counts


class TarShards:
    """Random access to the samples of webdataset tar shards: `source[i]` -> {'image': bytes, 'caption': bytes}.

    Samples are numbered shard after shard (in `expand(pattern)` order), each shard's in tar order, so a corpus
    prepared into ArrayRecord by data/prepare_local.py (which keeps that order) has the same record i. A sample
    without a caption file reads as b"" (the pipeline counts it as an empty caption). The index rows live in one
    memory-mapped file under a local directory (index_dir when local, else the system's temp dir), so the grain
    worker processes this source is pickled into share them instead of each holding a copy. Reads are
    thread-safe: each thread keeps its own open files. Raises ShardError if the pattern matches nothing, a
    shard is not an uncompressed tar file, or the shards hold no sample.
    """

    def __init__(self, pattern: str, index_dir: str):
        self.pattern, self.paths = pattern, expand(pattern)
        indexes, counts = load_indexes(self.paths, index_dir)
        self.damage = {k: counts[k] for k in DAMAGE_KINDS if counts[k]}
        if self.damage:
            log.warning("%s: left out or converted while indexing: %s", pattern, self.damage)
        self.starts = np.cumsum([0] + [len(rows) for rows in indexes], dtype=np.int64)
        if not self.starts[-1]:
            found = f" ({', '.join(f'{k}: {n}' for k, n in self.damage.items())})" if self.damage else ""
            raise ShardError(f"data.shards={pattern!r}: no image-text sample in its {len(self.paths)} shard(s){found}")
        local_dir = index_dir if "://" not in index_dir else tempfile.gettempdir()
        self.rows_path = _combined(indexes, self.paths, local_dir)
        self.__setstate__(self.__getstate__())

    def __getstate__(self):  # pickled into grain workers: the paths, never the open files or the mapping
        return {k: getattr(self, k) for k in ("pattern", "paths", "damage", "starts", "rows_path")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.rows = np.load(self.rows_path, mmap_mode="r")
        self._local = threading.local()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return read_sample(lambda offset, size: self._read(shard, offset, size), self.rows[index])

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        files = self._local.__dict__.setdefault("files", collections.OrderedDict())
        f = files.pop(shard, None) or epath.Path(self.paths[shard]).open("rb")
        files[shard] = f  # most recently used last
        while len(files) > _OPEN_FILES:
            files.popitem(last=False)[1].close()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.paths[shard]}: {size} bytes at {offset} cannot be read (the shard changed?)")
        return data


def _combined(indexes: list[np.ndarray], paths: list[str], local_dir: str) -> str:
    """One .npy of all shards' rows (named by the shard list), written once, for np.load(mmap_mode='r'): under
    local_dir, or the system's temp dir when local_dir cannot be written."""
    digest = hashlib.sha1("\n".join(paths).encode())
    for rows in indexes:  # the count and the first and last rows of each shard: a re-indexed shard is a new file
        digest.update(np.int64(len(rows)).tobytes() + rows[:1].tobytes() + rows[-1:].tobytes())
    name = f"combined.{digest.hexdigest()[:20]}.npy"
    for folder in (os.path.abspath(os.path.expanduser(local_dir)), tempfile.gettempdir()):
        out = os.path.join(folder, name)
        try:
            if not os.path.exists(out):
                os.makedirs(folder, exist_ok=True)
                partial = f"{out}.{os.getpid()}.{threading.get_ident()}.tmp"
                with open(partial, "wb") as f:
                    np.save(f, np.concatenate(indexes))
                os.replace(partial, out)
            return out
        except OSError as e:
            _warn_once(f"cannot write the combined shard index in {folder} ({e})")
    raise ShardError(f"cannot write the shard index in {local_dir} or {tempfile.gettempdir()}; set data.shard_index_dir")


_WARNED = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)
