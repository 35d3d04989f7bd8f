"""Training straight from webdataset tar shards (clip_jax/input/shards.py): the samples equal what the webdataset
library itself reads from the same shards, damage costs only the damaged members, the index cache is reused and
refreshed, and the train iterator over the shards equals the one over the same corpus prepared into ArrayRecord."""

import collections
import concurrent.futures
import io
import json
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import webdataset
from PIL import Image

from clip_jax import config_checks
from clip_jax.config import ConfigError
from clip_jax.input import pipeline, preflight, shards

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
import index_shards  # after the sys.path lines
import prepare_local
import tiny_cpu

pytestmark = pytest.mark.usefixtures("no_network")  # conftest: any connection attempt fails the test


def _image(i: int, fmt: str) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12 + i % 5, 16, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            if "/" in key:
                folder = tarfile.TarInfo(os.path.dirname(key))
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)  # a directory member, as `tar cf` writes: not a sample
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _samples(shard: int, count: int):
    """Every member layout a real corpus has: .jpg/.png/.webp, .txt or .json captions, keys in sub-folders,
    multi-dot extensions (img2dataset's .json metadata beside .txt)."""
    out = []
    for i in range(count):
        n = 100 * shard + i
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][n % 3]
        parts = {ext: _image(n, fmt)}
        if n % 4 == 1:
            parts["json"] = json.dumps({"caption": f"json caption {n}", "url": "http://x"}).encode()
        else:
            parts["txt"] = f"caption number {n}".encode()
        if n % 5 == 2:
            parts["meta.json"] = b"{}"
        out.append((f"part{shard}/{n:06d}", parts))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for s in range(3):
        _shard(root / f"{s:05d}.tar", _samples(s, 7 + s))
    return root


def _reference(pattern: str) -> list[dict]:
    """The webdataset library's own reading of the shards (in order): {'image', 'caption'} per sample."""
    out = []
    for sample in webdataset.WebDataset(pattern, shardshuffle=False, empty_check=False):
        image = next(sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample)
        caption = sample["txt"] if "txt" in sample else json.loads(sample["json"])["caption"].encode()
        out.append({"image": image, "caption": caption})
    return out


def _records(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def test_samples_equal_the_webdataset_library(corpus, tmp_path):
    pattern = str(corpus / "{00000..00002}.tar")
    source = shards.TarShards(pattern, str(tmp_path / "index"))
    assert len(source) == 7 + 8 + 9 and not source.damage
    assert _records(source) == _reference(pattern)


def test_expand_braces_globs_and_lists(corpus):
    names = lambda paths: [os.path.basename(p) for p in paths]
    assert names(shards.expand(str(corpus / "{00000..00001}.tar"))) == ["00000.tar", "00001.tar"]
    assert names(shards.expand(str(corpus / "*.tar"))) == ["00000.tar", "00001.tar", "00002.tar"]
    assert names(shards.expand(str(corpus / "{00002,00000}.tar"))) == ["00002.tar", "00000.tar"]  # as listed
    with pytest.raises(shards.ShardError, match=r"matches no file; give a tar path, a glob or a \{000..099\}"):
        shards.expand(str(corpus / "*.tgz"))


def _image_offset(path, key: str) -> int:
    """Where the header of sample `key`'s image member starts in the shard."""
    with tarfile.open(path) as tar:
        return next(m.offset for m in tar.getmembers() if m.name.split(".")[0] == key and "json" not in m.name
                    and not m.name.endswith(".txt") and m.isfile())


def test_a_truncated_shard_keeps_the_samples_before_the_cut(corpus, tmp_path):
    data = (corpus / "00001.tar").read_bytes()
    cut = _image_offset(corpus / "00001.tar", "part1/000104") + 700  # inside sample 4's image
    (tmp_path / "00001.tar").write_bytes(data[:cut])
    source = shards.TarShards(str(tmp_path / "00001.tar"), str(tmp_path / "index"))
    assert _records(source) == _reference(str(corpus / "00001.tar"))[:4]
    assert source.damage == {"truncated_shard": 1}


def test_a_corrupt_member_header_costs_that_member_only(corpus, tmp_path):
    data = bytearray((corpus / "00002.tar").read_bytes())
    at = _image_offset(corpus / "00002.tar", "part2/000203")
    data[at : at + 512] = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    (tmp_path / "00002.tar").write_bytes(bytes(data))
    source = shards.TarShards(str(tmp_path / "00002.tar"), str(tmp_path / "index"))
    expected = _reference(str(corpus / "00002.tar"))
    assert _records(source) == expected[:3] + expected[4:]  # sample 3 lost its image; all after it are intact
    assert source.damage == {"corrupt_member": 1, "sample_without_image": 1}


def test_compressed_or_empty_shards_are_one_line_errors(corpus, tmp_path):
    import gzip

    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((corpus / "00000.tar").read_bytes()))
    with pytest.raises(shards.ShardError, match="is a compressed file, not an uncompressed tar; decompress it first"):
        shards.TarShards(str(tmp_path / "a.tar.gz"), str(tmp_path / "index"))
    _shard(tmp_path / "text_only.tar", [("k", {"txt": b"no image"})])
    with pytest.raises(shards.ShardError, match=r"no image-text sample in its 1 shard\(s\) \(sample_without_image: 1\)$"):
        shards.TarShards(str(tmp_path / "text_only.tar"), str(tmp_path / "index"))


def test_the_index_is_cached_and_rebuilt_when_the_shard_changes(corpus, tmp_path, monkeypatch):
    (tmp_path / "s.tar").write_bytes((corpus / "00000.tar").read_bytes())
    index_dir = str(tmp_path / "index")
    first = _records(shards.TarShards(str(tmp_path / "s.tar"), index_dir))
    built = collections.Counter()
    real = shards.index_shard
    monkeypatch.setattr(shards, "index_shard", lambda path: built.update([path]) or real(path))
    assert _records(shards.TarShards(str(tmp_path / "s.tar"), index_dir)) == first and not built
    _shard(tmp_path / "s.tar", _samples(0, 3))  # rewritten with fewer samples: another size
    assert len(shards.TarShards(str(tmp_path / "s.tar"), index_dir)) == 3 and built[str(tmp_path / "s.tar")] == 1
    (tmp_path / "file").write_bytes(b"")  # an index 'directory' that cannot be created only costs the cache
    source = shards.TarShards(str(tmp_path / "s.tar"), str(tmp_path / "file" / "index"))
    assert len(source) == 3


def test_pickled_copies_and_threads_read_the_same_samples(corpus, tmp_path):
    pattern = str(corpus / "*.tar")
    source = shards.TarShards(pattern, str(tmp_path / "index"))
    copy = pickle.loads(pickle.dumps(source))  # what a grain worker process gets
    assert isinstance(copy.rows, np.memmap) and _records(copy) == _records(source)
    order = np.random.default_rng(1).permutation(len(source)).tolist() * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: source[i], order))
    assert got == [_records(source)[i] for i in order]
    with pytest.raises(IndexError):
        source[len(source)]


def _cfg(**data):
    cfg = tiny_cpu.get_config()
    cfg.batch_size, cfg.model.image.image_size, cfg.data.cache, cfg.data.min_image_size = 6, 16, False, 1
    cfg.data.update(data)
    return cfg


def _batches(cfg, n: int, state=None):
    it = pipeline.train_iterator(cfg)
    if state is not None:
        it.set_state(state)
    return [next(it) for _ in range(n)], it.get_state()


def test_streamed_shards_equal_the_arrayrecord_copy_batch_for_batch(corpus, tmp_path):
    pattern = str(corpus / "{00000..00002}.tar")
    args = ["webdataset", pattern, "--name", "same", "--data_dir", str(tmp_path / "tfds")]
    assert prepare_local.main(args) == 0
    streamed = _cfg(shards=pattern, data_dir=str(tmp_path / "tfds"))
    copied = _cfg(name="webdataset/same", data_dir=str(tmp_path / "tfds"))
    preflight.check_train_sources(streamed)
    a, _ = _batches(streamed, 6)  # 36 examples: past the first epoch (24 samples) into the reshuffled second
    b, _ = _batches(copied, 6)
    cached, _ = _batches(_cfg(shards=pattern, data_dir=str(tmp_path / "tfds"), cache=True), 6)  # tiny_cpu's own
    for x, y, z in zip(a, b, cached, strict=True):
        np.testing.assert_array_equal(x["image"], z["image"])
        np.testing.assert_array_equal(x["tokens"], z["tokens"])
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    first, _ = _batches(streamed, 2)
    again, _ = _batches(streamed, 2, state=_batches(streamed, 4)[1])  # a resume after batch 4
    np.testing.assert_array_equal(first[0]["tokens"], a[0]["tokens"])
    np.testing.assert_array_equal(again[1]["tokens"], a[5]["tokens"])


def test_config_clashes_and_missing_shards_are_one_line_errors(corpus, tmp_path):
    cfg = _cfg(shards=str(corpus / "*.tar"), mixture="clip_shapes:1")
    with pytest.raises(ConfigError, match="'data.mixture' cannot be combined with data.shards"):
        config_checks.validate(cfg, 2)
    cfg = _cfg(shards=str(corpus / "*.tar"), name="")  # data.name is not needed with shards
    config_checks.validate(cfg, 2)
    cfg = _cfg(shards=str(corpus / "*.tar"), text_key="txt")
    with pytest.raises(ConfigError, match="'data.text_key' cannot be combined with data.shards"):
        config_checks.validate(cfg, 2)
    cfg = _cfg(shards=str(tmp_path / "missing-{000..009}.tar"), data_dir=str(tmp_path))
    with pytest.raises(pipeline.DataError, match=r"no image-text sample in its 10 shard\(s\) \(missing_shard: 10\)"):
        preflight.check_train_sources(cfg)


def test_gaps_in_a_shard_range_are_counted_and_the_rest_trained_on(corpus, tmp_path):
    source = shards.TarShards(str(corpus / "{00000..00005}.tar"), str(tmp_path / "index"))  # 00003-5 missing
    assert source.damage == {"missing_shard": 3} and _records(source) == _reference(str(corpus / "{00000..00002}.tar"))


def test_index_shards_script_fills_the_cache_a_run_reads(corpus, tmp_path, monkeypatch, capsys):
    assert index_shards.main([str(corpus / "*.tar"), "--data_dir", str(tmp_path)]) == 0
    assert "3 shards, 24 samples indexed" in capsys.readouterr().out
    (tmp_path / "file").write_bytes(b"")
    assert index_shards.main([str(corpus / "*.tar"), "--index_dir", str(tmp_path / "file" / "index")]) == 2
    assert "error: cannot write shard indexes to" in capsys.readouterr().err
    monkeypatch.setattr(shards, "index_shard", lambda path: pytest.fail(f"{path} indexed again"))
    cfg = _cfg(shards=str(corpus / "*.tar"), data_dir=str(tmp_path))
    assert len(pipeline.train_sources(cfg)[0][1]) == 24


def test_a_position_saved_over_other_data_is_refused_or_reshuffled(corpus, tmp_path, caplog):
    import types

    from clip_jax import checkpoint as checkpoint_lib
    from clip_jax import train

    for s in range(3):
        (tmp_path / f"{s}.tar").write_bytes((corpus / f"{s:05d}.tar").read_bytes())
    cfg = _cfg(shards=str(tmp_path / "{0..1}.tar"), data_dir=str(tmp_path))
    _, state = _batches(cfg, 2)
    assert state["records"] == [15]
    grown = _cfg(shards=str(tmp_path / "{0..2}.tar"), data_dir=str(tmp_path))  # a shard added to the corpus
    ckpt = types.SimpleNamespace(directory="WORKDIR/checkpoints")
    with pytest.raises(checkpoint_lib.CheckpointMismatch, match=r"has \[24\] records now and had \[15\] .*"
                       r"resume_reshuffle=True to continue at that step in the new data's order"):  # fmt: skip
        train._resume_data(grown, ckpt, 2, pipeline.train_iterator(grown), state)
    grown.data.resume_reshuffle = True
    it = pipeline.train_iterator(grown)
    train._resume_data(grown, ckpt, 2, it, state)
    expected, _ = _batches(grown, 3)  # batch 2 of the new order (none skipped): the third of a fresh iterator
    np.testing.assert_array_equal(next(it)["tokens"], expected[2]["tokens"])
    assert "starting at batch 2 of the new data's order" in caplog.text


def _raw_shard(path, sizes):
    """A shard whose samples' image members have the given byte sizes (content irrelevant to indexing)."""
    _shard(path, [(f"{i:03d}", {"jpg": bytes([i + 1]) * n, "txt": b"c"}) for i, n in enumerate(sizes)])


def test_cuts_without_the_end_marker_are_truncations(corpus, tmp_path):
    data = (corpus / "00001.tar").read_bytes()
    at = _image_offset(corpus / "00001.tar", "part1/000104")
    expected = _reference(str(corpus / "00001.tar"))
    for name, cut in (("boundary", at), ("in_header", at + 100)):  # after sample 3's caption; inside 4's header
        (tmp_path / f"{name}.tar").write_bytes(data[:cut])
        source = shards.TarShards(str(tmp_path / f"{name}.tar"), str(tmp_path / "index"))
        assert _records(source) == expected[:3], name  # sample 3 may have lost members after the cut: dropped
        assert source.damage == {"truncated_shard": 1}, name


def test_files_that_are_not_tars_are_counted_and_skipped(corpus, tmp_path):
    (tmp_path / "a.tar").write_bytes((corpus / "00000.tar").read_bytes())
    (tmp_path / "b.tar").write_bytes(b"url,caption\n" * 100)  # a stray table among the shards
    (tmp_path / "c.tar").write_bytes(b"{}")  # shorter than one tar header
    source = shards.TarShards(str(tmp_path / "*.tar"), str(tmp_path / "index"))
    assert source.damage == {"not_a_tar": 2} and _records(source) == _reference(str(corpus / "00000.tar"))


def test_a_same_size_rewrite_gets_a_new_index(tmp_path):
    _raw_shard(tmp_path / "s.tar", [100, 700])
    first = shards.TarShards(str(tmp_path / "s.tar"), str(tmp_path / "index"))
    assert [len(r["image"]) for r in _records(first)] == [100, 700]
    size = (tmp_path / "s.tar").stat().st_size
    _raw_shard(tmp_path / "s.tar", [700, 100])  # same blocks, so the same file size; other offsets
    os.utime(tmp_path / "s.tar", ns=(1, (tmp_path / "s.tar").stat().st_mtime_ns + 10**9))
    assert (tmp_path / "s.tar").stat().st_size == size
    again = shards.TarShards(str(tmp_path / "s.tar"), str(tmp_path / "index"))
    assert [len(r["image"]) for r in _records(again)] == [700, 100]


def test_unreadable_cache_files_are_rebuilt_and_bad_patterns_are_one_line_errors(corpus, tmp_path, caplog):
    (tmp_path / "s.tar").write_bytes((corpus / "00000.tar").read_bytes())
    shards.TarShards(str(tmp_path / "s.tar"), str(tmp_path / "index"))
    (cached,) = (tmp_path / "index").glob("s.tar.*.npz")
    for damaged in (cached.read_bytes()[:300], b""):  # cut (np.load: BadZipFile), empty (EOFError)
        cached.write_bytes(damaged)
        source = shards.TarShards(str(tmp_path / "s.tar"), str(tmp_path / "index"))
        assert _records(source) == _reference(str(corpus / "00000.tar")) and "unreadable" in caplog.text
        caplog.clear()
    with pytest.raises(shards.ShardError, match=r"names a directory, .*; name the tar files in it, e.g. '.*/\*.tar'"):
        shards.TarShards(str(corpus), str(tmp_path / "index"))
    with pytest.raises(shards.ShardError, match="unbalanced braces"):
        shards.expand(str(corpus / "{00000..00002.tar"))
