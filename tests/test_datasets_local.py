"""Local corpora (a folder with a CSV table, webdataset tar shards incl. a truncated one) prepared into tfds
ArrayRecord and read back by the train iterator; all data is made here, nothing touches the network."""

import csv
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from clip_jax import datasets
from clip_jax.input import pipeline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
import prepare_local  # after the sys.path lines
import tiny_cpu

pytestmark = pytest.mark.usefixtures("no_network")  # conftest: any connection attempt fails the test


def _image(value: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (value, 255 - value, 7)).save(buf, fmt)
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                _add(tar, f"{key}.{ext}", data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    _shard(
        root / "00000.tar",
        [
            ("a/000", {"jpg": _image(10, "JPEG"), "txt": b"first caption"}),
            ("a/001", {"png": _image(20, "PNG"), "json": json.dumps({"caption": "second caption"}).encode()}),
            ("a/002", {"webp": _image(30, "WEBP"), "txt": b"third caption", "json": b"{}"}),
            ("a/003", {"jpg": _image(40, "JPEG")}),  # no caption file: kept with an empty caption
            ("a/004", {"txt": b"a caption without an image"}),  # dropped at preparation
        ],
    )
    _shard(
        root / "00001.tar", [(f"b/{i:03d}", {"jpg": _image(50 + i, "JPEG"), "txt": b"x" * 3000}) for i in range(4)]
    )
    whole = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-stream, as an interrupted copy
    return root


def test_webdataset_shards_with_a_truncated_one(shards, tmp_path):
    assert (
        prepare_local.main(
            ["webdataset", str(shards / "{00000..00001}.tar"), "--name", "w", "--data_dir", str(tmp_path)]
        )
        == 0
    )
    source = datasets.local_source("webdataset", "w", "train", tmp_path)
    records = {r["key"].decode(): r for r in source}
    first = {f"00000.tar/a/00{i}" for i in range(4)}
    assert first <= set(records)
    survivors = set(records) - first
    assert survivors and all(k.startswith("00001.tar/b/") for k in survivors)
    assert len(survivors) < 4  # the cut lost the tail of the second shard
    assert records["00000.tar/a/001"]["caption"] == b"second caption"  # from the JSON
    assert records["00000.tar/a/002"]["caption"] == b"third caption"  # .txt preferred
    assert records["00000.tar/a/003"]["caption"] == b""
    img = Image.open(io.BytesIO(records["00000.tar/a/000"]["image"]))
    assert img.format == "JPEG" and img.size == (24, 16)


def test_folder_with_csv_trains_through_the_pipeline(tmp_path):
    folder = tmp_path / "pets"
    folder.mkdir()
    names = []
    with open(folder / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        for i in range(8):
            name = f"sub/{i}.png"
            (folder / "sub").mkdir(exist_ok=True)
            (folder / name).write_bytes(_image(i * 30, "PNG"))
            writer.writerow([name, f"pet number{i}, with a comma"])
            names.append(name)
    data_dir = tmp_path / "tfds"
    datasets.prepare_local("image_text_folder", str(folder), "pets", data_dir)
    cfg = tiny_cpu.get_config()
    cfg.data.name, cfg.data.data_dir, cfg.data.cache, cfg.batch_size = (
        "image_text_folder/pets",
        str(data_dir),
        False,
        8,
    )
    batch = next(pipeline.train_iterator(cfg))
    tok = pipeline.tokenizer_lib.make(cfg)
    assert sorted(batch["tokens"][:, 2].tolist()) == sorted(tok.word_id(f"number{i}") for i in range(8))
    # Pixels survive storage (uint8 to the devices): the red channel encodes i * 30.
    assert batch["image"].dtype == np.uint8
    reds = sorted(batch["image"][:, 0, 0, 0].astype(int).tolist())
    assert reds == [i * 30 for i in range(8)]


def test_unprepared_local_corpus_says_how(tmp_path):
    with pytest.raises(pipeline.DataError, match="prepare_local.py webdataset SOURCE --name nope"):
        pipeline.open_source("webdataset/nope", "train", str(tmp_path))


def _folder(root, name, count, word):
    folder = root / name
    folder.mkdir()
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(count):
            (folder / f"{i}.png").write_bytes(_image(i, "PNG"))
            f.write(json.dumps({"file_name": f"{i}.png", "caption": f"{word} {i}"}) + "\n")
    return folder


def test_weighted_mixture_of_sources(tmp_path):
    data_dir = tmp_path / "tfds"
    for name, count, word in (("a", 10, "alpha"), ("b", 6, "beta")):
        datasets.prepare_local("image_text_folder", str(_folder(tmp_path, name, count, word)), name, data_dir)
    cfg = tiny_cpu.get_config()
    cfg.data.data_dir, cfg.data.cache, cfg.batch_size = str(data_dir), False, 16
    cfg.data.mixture = "image_text_folder/a:3, image_text_folder/b:1"
    tok = pipeline.tokenizer_lib.make(cfg)
    alpha = tok.word_id("alpha")
    it = pipeline.train_iterator(cfg)
    firsts = np.concatenate([next(it)["tokens"][:, 1] for _ in range(8)])
    assert (firsts == alpha).mean() == 0.75  # grain's mix interleaves exactly by weight
    state = it.get_state()
    want = next(it)["tokens"]
    fresh = pipeline.train_iterator(cfg)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["tokens"], want)
    cfg.data.mixture = "image_text_folder/a"
    with pytest.raises(ValueError, match="name:weight"):
        pipeline.train_iterator(cfg)
