"""Bad data end to end: a deliberately dirty local corpus is prepared, read by the train iterator, and every good
example arrives while each bad kind is counted; plus the pixel-level conversions of odd image modes."""

import io
import json
import logging
import os
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from clip_jax import datasets
from clip_jax.input import decode, memory, pipeline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny_cpu  # after the sys.path line


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(seed, w=40, h=30):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _palette_with_transparency():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 10, 20))
    return _encode(img, "PNG", transparency=0)  # index 0 (red) is transparent -> white


GOOD_JPEG = _encode(_rgb(0), "JPEG")
# name -> (file bytes or None for a listed-but-missing file, caption bytes, the issue kinds the pipeline must count)
# Good examples' captions start with a unique word goodN, so the test finds each one by its first token.
CORPUS = {
    "g0.jpg": (GOOD_JPEG, b"good0 a plain photo", ()),
    "g1.png": (_encode(_rgb(1), "PNG"), b"good1 another photo", ()),
    "g2.png": (_encode(Image.new("L", (20, 20), 100), "PNG"), b"good2 grey", ("grayscale_image",)),
    "g3.jpg": (_encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), b"good3 cmyk", ("cmyk_image",)),
    "g4.png": (_encode(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG"), b"good4 clear", ("alpha_image",)),
    "g5.gif": (_encode(_rgb(5).convert("P"), "GIF"), b"good5 palette", ("palette_image",)),
    "g6.png": (_palette_with_transparency(), b"good6 palette alpha", ("palette_image", "alpha_image")),
    "g7.png": (_encode(Image.new("I;16", (20, 20), 40000), "PNG"), b"good7 sixteen bit", ("other_mode_image",)),
    "g8.jpg": (_encode(_rgb(8, 600, 300), "JPEG"), b"good8 large", ("large_image",)),
    "g9.jpg": (GOOD_JPEG, b"good9 caf\xe9 latin-1 bytes", ("non_utf8_caption",)),
    "g10.jpg": (GOOD_JPEG, b"good10 " + b"very long words " * 400, ("clipped_caption",)),
    "g11.webp": (_encode(_rgb(11), "WEBP"), b"  good11  \t spaced  ", ()),
    "b0.jpg": (b"\x00\x01garbage that is no image", b"bad corrupt", ("undecodable_image",)),
    "b1.jpg": (b"<html><body>404 not found</body></html>", b"bad html", ("undecodable_image",)),
    "b2.jpg": (b"", b"bad empty file", ("undecodable_image",)),
    "b3.jpg": (GOOD_JPEG[: len(GOOD_JPEG) // 2], b"bad truncated", ("truncated_image",)),
    "b4.png": (_encode(_rgb(4, 4, 4), "PNG"), b"bad tiny", ("tiny_image",)),
    "b5.png": (_encode(Image.new("L", (500, 500)), "PNG"), b"bad bomb", ("oversized_image",)),
    "b6.jpg": (GOOD_JPEG, b"", ("empty_caption",)),
    "b7.jpg": (GOOD_JPEG, b" \t\n ", ("empty_caption",)),
    "b8.jpg": (None, b"bad missing file", ()),  # left out while preparing
    "b9.jpg": (GOOD_JPEG, b"!!! ... ?", ("empty_caption",)),  # not blank, but hashed_words keeps no token of it
}
GOOD = sorted(k for k in CORPUS if k.startswith("g"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dirty")
    with open(folder / "captions.jsonl", "wb") as table:
        for name, (data, caption, _) in CORPUS.items():
            if data is not None:
                (folder / name).write_bytes(data)
            # surrogateescape keeps the non-UTF-8 caption's bytes through JSON, as a scraper writing str would.
            row = {"file_name": name, "caption": caption.decode("utf-8", errors="surrogateescape")}
            table.write(json.dumps(row, ensure_ascii=False).encode("utf-8", errors="surrogateescape") + b"\n")
    data_dir = tmp_path_factory.mktemp("tfds")
    datasets.prepare_local("image_text_folder", str(folder), "dirty", data_dir)
    return data_dir


@pytest.fixture
def cfg(corpus_dir, monkeypatch):
    # A low decompression-bomb limit lets a 500x500 image stand in for a 20-gigapixel one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    c = tiny_cpu.get_config()
    c.data.name, c.data.data_dir, c.data.cache = "image_text_folder/dirty", str(corpus_dir), False
    c.batch_size = 4  # 12 good examples: 3 batches per epoch
    return c


def test_preparation_keeps_bad_bytes_and_drops_missing_files(corpus_dir):
    source = datasets.local_source("image_text_folder", "dirty", "train", corpus_dir)
    stored = {r["key"].decode() if isinstance(r["key"], bytes) else r["key"]: r for r in source}
    assert set(stored) == {k for k, v in CORPUS.items() if v[0] is not None}
    assert stored["b3.jpg"]["image"] == CORPUS["b3.jpg"][0]
    assert stored["g9.jpg"]["caption"] == CORPUS["g9.jpg"][1]  # raw bytes, not yet decoded


def test_every_good_example_arrives_and_each_bad_kind_is_counted(cfg, caplog):
    caplog.set_level(logging.WARNING, logger=pipeline.log.name)
    it = pipeline.train_iterator(cfg)
    tok = pipeline.tokenizer_lib.make(cfg)
    first_word = {int(tok.word_id(f"good{n}")): f"g{n}" for n in range(len(GOOD))}
    seen = []
    for _ in range(len(GOOD) // 4):  # exactly one epoch of good examples
        batch = next(it)
        assert batch["image"].shape == (4, 32, 32, 3) and np.isfinite(batch["image"]).all()
        seen += [first_word[int(t)] for t in batch["tokens"][:, 1]]
    assert sorted(seen) == sorted(k.split(".")[0] for k in GOOD)

    # Expected counts from the records consumed so far, in the order grain's own shuffle visits them.
    source = datasets.local_source("image_text_folder", "dirty", "train", cfg.data.data_dir)
    order = grain.MapDataset.source(source).seed(cfg.seed).shuffle().repeat(None)
    state = it.get_state()
    consumed = state["position"]["chunk"]["next_index"] * 4 + state["position"]["offset"]
    expected = {}
    for i in range(consumed):
        for kind in CORPUS[order[i]["key"].decode()][2]:
            expected[kind] = expected.get(kind, 0) + 1
    assert it.counts == expected
    assert {k for k in expected if k in decode.CONVERT_KINDS} == {
        kind for name in GOOD for kind in CORPUS[name][2]
    }  # each conversion met once per epoch
    assert "input data issues so far" in caplog.text


def test_resume_is_exact_mid_chunk(cfg):
    """Skipped records make batches end mid-chunk; the state must still restore the exact next batches."""
    it = pipeline.train_iterator(cfg)
    batches, states = [], []
    for _ in range(7):
        batches.append(next(it))
        states.append(it.get_state())
    assert any(s["position"]["offset"] for s in states), states  # the case under test occurs
    for i in range(5):
        fresh = pipeline.train_iterator(cfg)
        fresh.set_state(states[i])
        for want in batches[i + 1 : i + 3]:
            got = next(fresh)
            np.testing.assert_array_equal(got["tokens"], want["tokens"])
            np.testing.assert_array_equal(got["image"], want["image"])


def test_all_bad_data_raises_instead_of_spinning(cfg, monkeypatch):
    monkeypatch.setattr(decode, "cropped", lambda *a, **k: (None, None, decode.BIT["undecodable_image"]))
    it = pipeline.train_iterator(cfg)
    with pytest.raises(pipeline.DataError, match="bad records in a row.*undecodable_image"):
        next(it)


def test_mode_conversions_pixels():
    def rgb(data):
        out, _ = decode.image(data, 32, 8)
        return out

    assert (rgb(CORPUS["g2.png"][0]) == 100).all()  # grey repeated to three channels
    assert (rgb(CORPUS["g4.png"][0]) == 255).all()  # fully transparent -> white background
    assert (np.abs(rgb(CORPUS["g3.jpg"][0]).astype(int) - (255, 0, 0)) < 8).all()  # CMYK (0,255,255,0) is red
    pal = rgb(CORPUS["g6.png"][0])
    assert (pal[:, :10] == (0, 0, 255)).all() and (pal[:, 10:] == 255).all()  # index 0 transparent -> white
    assert (rgb(CORPUS["g7.png"][0]) == round(40000 * 255 / 65535)).all()  # 16-bit scaled, not clipped
    big, bits = decode.image(CORPUS["g8.jpg"][0], 32, 8)
    assert bits == decode.BIT["large_image"] and big.shape == (150, 300, 3)  # JPEG draft: 1/2 scale, >= 4x32
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    arr, bits = decode.image(rgba, 32, 8)
    assert (arr == (200, 0, 0)).all() and bits == decode.BIT["alpha_image"]


@pytest.mark.slow
def test_worker_processes_resume_exactly_and_report_counts(cfg):
    """grain worker processes (data.num_workers) each fill their own batches from their share of the chunks: with
    skipped records the batches differ from a 0-worker run (the config fixes them), but resume is still exact."""
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; main.py parses them, a test must say so
    cfg.data.num_workers = 2
    workers = pipeline.train_iterator(cfg)
    for _ in range(3):
        next(workers)
    state = workers.get_state()
    want = [next(workers) for _ in range(3)]
    resumed = pipeline.train_iterator(cfg)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        np.testing.assert_array_equal(got["tokens"], w["tokens"])
        np.testing.assert_array_equal(got["image"], w["image"])
    assert workers.counts.get("non_utf8_caption", 0) >= 1  # counted in a worker, reported here


class _FailingReads:
    """A data source whose record `bad` cannot be read (as a corrupt ArrayRecord chunk would fail)."""

    def __init__(self, source, bad):
        self.source, self.bad = source, bad

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        if index == self.bad:
            raise OSError("corrupt record")
        return self.source[index]

    def __getitems__(self, indices):
        return [self[i] for i in indices]


def test_cache_applies_the_same_bad_record_guard_as_streaming(cfg, monkeypatch):
    """data.cache=True: the same batches and the same counts as streaming, an unreadable record included."""
    open_source = pipeline.open_source
    monkeypatch.setattr(pipeline, "open_source", lambda *a: _FailingReads(open_source(*a), bad=3))
    runs = {}
    for cache in (False, True):
        cfg.data.cache = cache
        it = pipeline.train_iterator(cfg)
        runs[cache] = ([next(it) for _ in range(2 * len(GOOD) // 4)], it.counts)
    (stream, stream_counts), (cached, cached_counts) = runs[False], runs[True]
    for a, b in zip(stream, cached, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["image"], b["image"])
    assert cached_counts == stream_counts
    assert cached_counts["unreadable_record"] == 2  # two epochs: met once in each
    assert {"undecodable_image", "truncated_image", "tiny_image", "empty_caption"} <= set(cached_counts)


def test_in_memory_source_keeps_odd_records_as_stored():
    records = [
        {"image": np.zeros((4, 6, 3), np.uint8), "captions": {"text": [b"a", b"b"]}, "other": 1},
        {"image": np.zeros((5, 5), np.uint8), "captions": {"text": [b"c"]}, "other": 2},
        {"image": b"not an image", "captions": {"text": []}, "other": 3},
    ]
    cache = memory.InMemorySource(_FailingReads(records, bad=1), ("image", "captions/text"))
    assert len(cache) == 3 and cache[1] == {decode.UNREADABLE: True}
    assert cache[0]["image"].shape == (4, 6, 3) and cache[2]["image"] == b"not an image"  # mixed: kept as a list
    assert pipeline.field(cache[0], "captions/text") == [b"a", b"b"] and "other" not in cache[0]
    same = memory.InMemorySource(records[:1] * 3, ("image",))
    assert isinstance(same.columns["image"], np.ndarray) and same.columns["image"].shape == (3, 4, 6, 3)


def test_a_blank_caption_among_several_is_never_drawn():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        assert decode.caption(["", "  ", "a dog"], 77, rng) == ("a dog", 0)
    assert decode.caption(["", "a dog"], 77) == ("a dog", 0)  # without a generator: the first written one
    assert decode.caption(["", b" \t"], 77) == (None, decode.BIT["empty_caption"])
    assert decode.caption([None, None], 77) == (None, decode.BIT["missing_caption"])
