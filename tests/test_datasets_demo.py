"""The real-data demo sets, on small local stand-ins (CI has neither Debian package, nor network):

- clip_fashion_mnist from tiny idx(.gz) files written here in the real format (big-endian magic 2051 / 2049),
  and from a tiny .deb fetched by a stand-in `apt-get download` (the no-root path);
- clip_emoji drawn with DejaVu Sans's symbol glyphs, checked against the font's own cmap (fontTools);
- clip_skimage against scikit-image's arrays and docstrings.
"""

import gzip
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from clip_jax import config_checks, datasets
from clip_jax.datasets import debian, emoji, fashion
from clip_jax.evaluate import templates
from clip_jax.input import pipeline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny_cpu  # after the sys.path line

pytestmark = pytest.mark.usefixtures("no_network")
# Fashion-MNIST's labels as its README lists them (T-shirt/top, Trouser, ..., Ankle boot), lower-cased.
README_LABELS = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def _write_idx(path, array, gz=True):
    """The idx format by hand: magic (0x0000, type 0x08 = ubyte, ndim), big-endian int32 dims, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(data)


def _fake_fashion(folder, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        image_file, label_file = fashion.FILES[split]
        _write_idx(os.path.join(folder, image_file), images, gz)
        _write_idx(os.path.join(folder, label_file), labels, gz)
        out[split] = (images, labels)
    return out


def test_idx_header_magic_numbers_are_the_real_ones(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((2, 3, 4), np.uint8))
    _write_idx(tmp_path / "y", np.zeros((2,), np.uint8))
    assert (
        struct.unpack(">i", gzip.decompress((tmp_path / "x.gz").read_bytes())[:4])[0]
        == 2051
        == fashion.IMAGES_MAGIC
    )
    assert (
        struct.unpack(">i", gzip.decompress((tmp_path / "y.gz").read_bytes())[:4])[0]
        == 2049
        == fashion.LABELS_MAGIC
    )


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip_and_clear_errors(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "img", images, gz)
    path = str(tmp_path / "img") + (".gz" if gz else "")
    np.testing.assert_array_equal(fashion.read_idx(path, 2051), images)
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        fashion.read_idx(path, 2049)
    raw = gzip.decompress(Path(path).read_bytes()) if gz else Path(path).read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="header says"):
        fashion.read_idx(str(tmp_path / "cut"), 2051)


def test_fashion_builder_from_idx_files(tmp_path):
    source = _fake_fashion(tmp_path / "src")
    config = fashion.FashionConfig(name="tiny", source_dir=str(tmp_path / "src"))
    built = datasets.prepare("clip_fashion_mnist", tmp_path / "tfds", config)
    assert built.info.features["label"].names == README_LABELS
    for split, (images, labels) in source.items():
        rows = sorted(datasets.data_source("clip_fashion_mnist", split, tmp_path / "tfds", config), key=_index)
        assert len(rows) == len(labels)
        for row, image, label in zip(rows, images, labels, strict=True):
            assert row["image"].shape == (32, 32, 3)
            for c in range(3):  # the source pixels unchanged in the middle, black around them
                np.testing.assert_array_equal(row["image"][2:30, 2:30, c], image)
            assert row["image"].sum() == 3 * int(image.sum())
            assert row["label"] == label
            filled = (t.format(README_LABELS[label]) for t in fashion.CAPTION_TEMPLATES)
            assert row["caption"].decode() in {re.sub(r"\ba (?=[aeiou])", "an ", c) for c in filled}


def _index(row):
    return int(row["index"])


def test_fashion_captions_vary_and_prompts_name_the_classes(tmp_path):
    captions = {fashion.caption(9, t) for t in range(len(fashion.CAPTION_TEMPLATES))}
    assert "a photo of an ankle boot" in captions and len(captions) == len(fashion.CAPTION_TEMPLATES)
    prompts = templates.class_prompts("clip_fashion_mnist", list(fashion.CLASS_NAMES))
    assert prompts[9][0] == "a photo of the ankle boot." and len(prompts) == 10
    assert all(fashion.CLASS_NAMES[i] in p for i, ps in enumerate(prompts) for p in ps)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_fetches_the_debian_package_without_root(tmp_path, monkeypatch):
    """No installed copy: the builder runs `apt-get download` (a stand-in that copies a tiny .deb built here)
    and unpacks it with the real dpkg-deb under the tfds download folder, once."""
    pkg = tmp_path / "pkg"
    source = _fake_fashion(pkg / fashion.PACKAGE_DIR, n_train=4, n_test=2)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    deb = tmp_path / "dataset-fashion-mnist_0.1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True
    )
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncp {deb} .\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(debian, "SYSTEM_ROOT", str(tmp_path / "empty_root"))

    datasets.prepare("clip_fashion_mnist", tmp_path / "tfds")
    rows = datasets.data_source("clip_fashion_mnist", "train", tmp_path / "tfds")
    assert sorted(int(r["label"]) for r in rows) == sorted(source["train"][1].tolist())
    assert calls.read_text().split() == ["download", "dataset-fashion-mnist"]
    again = debian.package_path(fashion.PACKAGE, fashion.PACKAGE_DIR, tmp_path / "tfds" / "downloads" / "debian")
    assert again.startswith(str(tmp_path / "tfds")) and len(calls.read_text().splitlines()) == 1  # cached


def test_without_apt_the_error_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(debian, "SYSTEM_ROOT", str(tmp_path / "empty_root"))
    monkeypatch.setattr(debian.shutil, "which", lambda tool: None)
    with pytest.raises(debian.PackageError, match=r"`apt-get` is not available.*apt-get install dataset-fashion"):
        debian.package_path(fashion.PACKAGE, fashion.PACKAGE_DIR, tmp_path / "cache")
    with pytest.raises(pipeline.DataError, match="cannot prepare clip_fashion_mnist.*apt-get install") as e:
        pipeline.open_source("clip_fashion_mnist", "train", str(tmp_path / "tfds"))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- emoji
needs_dejavu = pytest.mark.skipif(not os.path.exists(DEJAVU), reason="needs fonts-dejavu-core")
SYMBOLS = (
    (0x2600, 0x2660),
    (0x1F600, 0x1F601),
    (0x1F680, 0x1F681),
)  # weather, suits...; two faces; rockets (absent)


def _cmap_reference(path, ranges):
    """Independent reference: the codepoints the font's cmap maps, filtered like the module's docstring says."""
    ttlib = pytest.importorskip("fontTools.ttLib")
    cmap = ttlib.TTFont(path).getBestCmap()
    skip = {"Mn", "Me", "Cf", "Cc", "Zs", "Co", "Cn", "Sk"}
    return sorted(
        c
        for lo, hi in ranges
        for c in range(lo, hi + 1)
        if c in cmap and unicodedata.category(chr(c)) not in skip and unicodedata.name(chr(c), "")
    )


@needs_dejavu
def test_emoji_codepoints_are_the_glyphs_the_font_has():
    font = emoji.load_font(DEJAVU, 40)
    found = emoji.codepoints(font, SYMBOLS)
    assert found == _cmap_reference(DEJAVU, SYMBOLS)
    assert 0x263A in found and 0x1F600 in found and 0x1F680 not in found  # DejaVu has faces, no rocket


@needs_dejavu
def test_emoji_render_is_centred_black_ink_on_white():
    font = emoji.load_font(DEJAVU, 64)
    image = emoji.render(font, "\u2660", 32)  # black spade suit
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert (image[0] == 255).all() and (image[:, 0] == 255).all() and (image[-1] == 255).all()  # margin
    ink = np.argwhere(image.min(axis=-1) < 128)
    assert len(ink) > 100  # a solid spade
    centre = (ink.min(0) + ink.max(0)) / 2
    assert np.abs(centre - 15.5).max() <= 1.0
    assert not np.array_equal(image, emoji.render(font, "\u2663", 32))  # clubs differ from spades
    with pytest.raises(ValueError, match="draws nothing"):
        emoji.render(font, " ", 32)


@needs_dejavu
def test_emoji_builder_captions_splits_and_pixels(tmp_path):
    config = emoji.EmojiConfig(name="dejavu", font_path=DEJAVU, font_size=40, ranges=SYMBOLS, image_size=32)
    datasets.prepare("clip_emoji", tmp_path, config)
    splits = {s: list(datasets.data_source("clip_emoji", s, tmp_path, config)) for s in ("train", "test")}
    codes = {s: [int(r["codepoint"]) for r in rows] for s, rows in splits.items()}
    expected = _cmap_reference(DEJAVU, SYMBOLS)
    assert sorted(codes["train"] + codes["test"]) == expected  # every glyph once, no overlap
    assert len(codes["test"]) == round(0.2 * len(expected))
    font = emoji.load_font(DEJAVU, 40)
    for split, rows in splits.items():
        for row in rows:
            name = unicodedata.name(chr(int(row["codepoint"]))).lower()
            assert row["name"].decode() == name
            caption = row["caption"].decode()
            if split == "test":
                assert caption == f"an emoji of {name}"
            else:
                assert caption in {t.format(name) for t in emoji.CAPTION_TEMPLATES}
            np.testing.assert_array_equal(row["image"], emoji.render(font, chr(int(row["codepoint"])), 32))
    assert len({r["caption"] for r in splits["train"]}) == len(splits["train"])  # one caption per image


def test_emoji_bad_font_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load font"):
        emoji.load_font(str(tmp_path / "missing.ttf"), 109)


# -------------------------------------------------------------------------------------------- skimage
def test_skimage_photos_are_the_bundled_arrays(tmp_path):
    data = pytest.importorskip("skimage.data")
    datasets.prepare("clip_skimage", tmp_path)
    rows = {r["name"].decode(): r for r in datasets.data_source("clip_skimage", "train", tmp_path)}
    assert {"astronaut", "camera", "chelsea", "coffee", "rocket", "horse", "logo", "retina"} <= set(rows)
    assert not {"brain", "eagle", "lily"} & set(rows)  # fetched by pooch: not in the wheel
    np.testing.assert_array_equal(rows["astronaut"]["image"], data.astronaut())
    np.testing.assert_array_equal(rows["coffee"]["image"], data.coffee())
    camera = rows["camera"]["image"]
    assert camera.shape == (512, 512, 3) and all((camera[..., c] == data.camera()).all() for c in range(3))
    horse = rows["horse"]["image"][..., 0]
    assert set(np.unique(horse)) == {0, 255} and ((horse == 255) == data.horse()).all()
    np.testing.assert_array_equal(rows["logo"]["image"], data.logo()[..., :3])  # RGBA, fully opaque
    phantom = rows["shepp_logan_phantom"]["image"][..., 1]  # float 0..1 -> 0..255
    np.testing.assert_array_equal(phantom, np.round(data.shepp_logan_phantom() * 255))
    assert rows["astronaut"]["description"].decode() == "Color image of the astronaut Eileen Collins."
    for word, name in (("astronaut", "astronaut"), ("cat", "chelsea"), ("coffee", "coffee"), ("rocket", "rocket")):
        assert word in rows[name]["caption"].decode()
    assert all(r["caption"].strip() for r in rows.values())


def test_skimage_rgba_over_white():
    from clip_jax.datasets import photos

    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 200, 51]]], np.uint8)
    # Hand-computed: transparent -> white; opaque unchanged; alpha 0.2: 0.2*c + 0.8*255.
    assert photos.to_rgb(rgba).tolist() == [[[255, 255, 255], [10, 20, 30], [204, 204, 244]]]


@pytest.mark.parametrize(
    "arg, train, zero_shot, prompts",
    [
        ("fashion", "clip_fashion_mnist", "clip_fashion_mnist", "clip_fashion_mnist"),
        ("emoji,sigmoid", "clip_emoji", "", None),
    ],
)
def test_tiny_cpu_demo_variants(arg, train, zero_shot, prompts):
    cfg = tiny_cpu.get_config(arg)
    config_checks.validate(cfg, 8)
    assert (cfg.data.name, cfg.evals.zeroshot.dataset) == (train, zero_shot)
    if prompts:  # chosen for the dataset by default
        assert templates.default_templates(zero_shot) == prompts and prompts in templates.template_sets()
    with pytest.raises(ValueError, match="pick one"):
        tiny_cpu.get_config("fashion,digits")
