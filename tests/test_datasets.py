"""The embedded datasets: offline preparation, determinism, captions vs pixels.

Small custom configs keep this file fast; the checks on captions use an
independent reading of the pixels (nearest named colour, areas, centroids),
not the generator's own bookkeeping.
"""

import hashlib
import os
import re

import numpy as np
import pytest

from clip_jax import datasets
from clip_jax.datasets import digits, shapes

SMALL = dict(num_train=600, num_test=200)  # 600: crosses a 500-example chunk
COLOUR_WORDS = "|".join(shapes.COLOURS)
SHAPE_WORDS = "|".join(shapes.SHAPES)
# A colour word directly followed by a shape word, optionally after a size.
MENTION = re.compile(rf"(?:(small|large) )?({COLOUR_WORDS}) ({SHAPE_WORDS})")


pytestmark = pytest.mark.usefixtures("no_network")  # conftest: any connection attempt fails the test


def _small(name="small_test", seed=0):  # not "small": tfds refuses a custom config named like a registered one
    return shapes.ShapesConfig(name=name, seed=seed, **SMALL)


def _records(source):
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    datasets.prepare("clip_shapes", data_dir, _small())
    return data_dir


@pytest.fixture(scope="module")
def shapes_split(shapes_dir):
    return {
        split: _records(datasets.data_source("clip_shapes", split, shapes_dir, _small()))
        for split in ("train", "test")
    }


def _mentions(caption: bytes):
    """[(size or None, colour, shape), ...] in caption order."""
    return MENTION.findall(caption.decode())


def _nearest_colour(image: np.ndarray):
    """Per pixel: index of the nearest named colour, or -1 if none is close."""
    palette = np.array(list(shapes.COLOURS.values()), np.float64)
    dist = np.linalg.norm(image[:, :, None, :] - palette, axis=-1)
    nearest = dist.argmin(-1)
    return np.where(dist.min(-1) < 40, nearest, -1)


def _colour_pixels(image, colour: str) -> np.ndarray:
    """Boolean mask of the pixels showing `colour` (shape interiors)."""
    return _nearest_colour(image.astype(np.float64)) == list(shapes.COLOURS).index(colour)


def _kind_from_pixels(mask: np.ndarray) -> str:
    """Shape kind from geometry alone: how much of its bounding box it fills
    and how its mass splits between top and bottom halves. Diamond and cross
    fill alike at 32x32, so they are one group."""
    rows, cols = np.nonzero(mask)
    height = rows.max() - rows.min() + 1
    fill = mask.sum() / (height * (cols.max() - cols.min() + 1))
    top = mask[rows.min() : rows.min() + height // 2].sum()
    bottom = mask[rows.max() - height // 2 + 1 : rows.max() + 1].sum()
    if fill > 0.95:
        return "square"
    if top < 0.5 * bottom:
        return "triangle"  # points up: little mass at the top
    return "circle" if fill > 0.68 else "diamond|cross"


def test_counts_and_class_names(shapes_dir, shapes_split):
    assert len(shapes_split["train"]) == SMALL["num_train"]
    assert len(shapes_split["test"]) == SMALL["num_test"]
    assert datasets.class_names("clip_shapes")[:2] == ("red circle", "red square")
    assert len(shapes.CLASS_NAMES) == 40 and len(shapes.UNSEEN) == 8
    assert shapes.UNSEEN < set(shapes.CLASS_NAMES)
    info = datasets.builder("clip_shapes", shapes_dir, _small()).info
    assert info.features["label"].names == list(shapes.CLASS_NAMES)
    assert datasets.class_names("clip_digits") == tuple("0123456789")


def test_prepare_is_idempotent(shapes_dir):
    files = sorted((shapes_dir / "clip_shapes" / "small_test").rglob("*"))
    stamps = [os.stat(f).st_mtime_ns for f in files]
    datasets.prepare("clip_shapes", shapes_dir, _small())
    assert [os.stat(f).st_mtime_ns for f in files] == stamps


def test_preparation_is_deterministic(tmp_path, shapes_split):
    datasets.prepare("clip_shapes", tmp_path, _small())
    again = _records(datasets.data_source("clip_shapes", "train", tmp_path, _small()))
    for first, second in zip(shapes_split["train"], again, strict=True):
        assert first["caption"] == second["caption"]
        np.testing.assert_array_equal(first["image"], second["image"])
    # The seed matters: another seed gives other images.
    other = next(shapes.make_examples("train", 1, _small("other", seed=1)))[1]
    same = next(shapes.make_examples("train", 1, _small()))[1]
    assert not np.array_equal(other["image"], same["image"])


def test_pixels_and_captions_match_the_recorded_checksum():
    """Regression on purpose: every machine must generate the same data. A
    change here means the dataset changed (new numpy streams, edited
    generator): bump ClipShapes.VERSION and update the checksum."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for _, example in shapes.make_examples(split, 600, _small()):
            digest.update(example["image"].tobytes())
            digest.update(example["caption"].encode())
            digest.update(bytes([example["label"]]))
    assert digest.hexdigest() == ("411e09cfba32de449b7ac3c89b7a39566b1599022e136819e0c62355e47d86b9")


def test_unseen_combinations_never_in_train(shapes_split):
    drawn = set()
    for example in shapes_split["train"]:
        mentions = _mentions(example["caption"])
        assert mentions, example["caption"]
        drawn.update(f"{colour} {kind}" for _, colour, kind in mentions)
        assert not example["unseen"]
    assert not drawn & shapes.UNSEEN
    assert len(drawn) == 40 - 8  # every seen combination does occur
    test = shapes_split["test"]
    assert {shapes.CLASS_NAMES[e["label"]] for e in test} == set(shapes.CLASS_NAMES)
    for example in test:
        assert example["unseen"] == (shapes.CLASS_NAMES[example["label"]] in shapes.UNSEEN)


def test_prompts_are_phrased_like_captions(shapes_split):
    prompts = datasets.prompts("clip_shapes")
    assert prompts[shapes.CLASS_NAMES.index("orange circle")][0] == ("an orange circle")
    matched = 0
    for example in shapes_split["train"]:
        caption = example["caption"].decode()
        if len(caption.split()) == 3:  # the bare "a(n) <colour> <shape>"
            assert caption == prompts[example["label"]][0]
            matched += 1
    assert matched > 10
    assert datasets.prompts("clip_digits")[3][0] == 'a photo of the number "3"'


def test_test_captions_match_label_and_pixels(shapes_split):
    areas = {"small": [], "large": []}
    for example in shapes_split["test"]:
        ((size, colour, kind),) = _mentions(example["caption"])
        assert f"{colour} {kind}" == shapes.CLASS_NAMES[example["label"]]
        found = _nearest_colour(example["image"].astype(np.float64))
        counts = np.bincount(found[found >= 0], minlength=len(shapes.COLOURS))
        assert list(shapes.COLOURS)[counts.argmax()] == colour
        # Nearly all shape pixels have the named colour (edges blend).
        assert counts.max() >= 0.9 * counts.sum()
        assert kind in _kind_from_pixels(_colour_pixels(example["image"], colour))
        if size:
            areas[size].append(counts.max())
    # Sizes named in captions agree with the drawn areas.
    assert max(areas["small"]) < min(areas["large"])


def test_train_captions_match_pixels(shapes_split):
    checked = 0
    for example in shapes_split["train"]:
        caption = example["caption"].decode()
        mentions = _mentions(example["caption"])
        colour, kind = mentions[0][1:]
        assert f"{colour} {kind}" == shapes.CLASS_NAMES[example["label"]]
        for _, named, _ in mentions:
            assert _colour_pixels(example["image"], named).sum() >= 10, caption
        where = re.search(r"(left|right|above|below|top|bottom)", caption)
        if len(mentions) != 2 or not where or mentions[1][1] == colour:
            continue
        # The first shape lies on the side the relation names.
        first = np.argwhere(_colour_pixels(example["image"], colour)).mean(0)
        second = np.argwhere(_colour_pixels(example["image"], mentions[1][1])).mean(0)
        axis = 0 if where.group(1) in ("above", "below") else 1
        sign = -1 if where.group(1) in ("above", "left") else 1
        assert sign * (first[axis] - second[axis]) > 0, caption
        checked += 1
    assert checked > 50


def test_single_shape_positions(shapes_split):
    checked = 0
    for example in shapes_split["test"]:
        caption = example["caption"].decode()
        where = re.search(r"on the (left|right)|at the (top|bottom)", caption)
        if not where:
            continue
        colour = _mentions(example["caption"])[0][1]
        row, col = np.argwhere(_colour_pixels(example["image"], colour)).mean(0)
        centre = example["image"].shape[0] / 2
        side = where.group(1) or where.group(2)
        offset = {"left": centre - col, "right": col - centre, "top": centre - row, "bottom": row - centre}[side]
        assert offset > 2, caption
        checked += 1
    assert checked > 20


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_digits")
    datasets.prepare("clip_digits", data_dir)
    return data_dir


def test_digits_match_sklearn(digits_dir):
    from sklearn.datasets import load_digits

    source = load_digits()
    seen = []
    for split in ("train", "test"):
        records = _records(datasets.data_source("clip_digits", split, digits_dir))
        assert len({r["label"] for r in records}) == 10  # stratified
        for record in records:
            index = record["index"]
            image = record["image"].astype(np.float64)
            assert image.shape == (32, 32, 3)
            # Averaging each 4x4 block recovers the 8x8 source exactly.
            small = image[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
            expected = np.round(source.images[index] * 255 / 16)
            np.testing.assert_array_equal(small, expected)
            assert record["label"] == source.target[index]
            digit = source.target[index]
            assert f"{digit}" in record["caption"].decode() or digits.WORDS[digit] in record["caption"].decode()
            seen.append(index)
        if split == "train":
            assert 0.78 < len(records) / len(source.target) < 0.82
    assert sorted(seen) == list(range(len(source.target)))


def test_tfds_data_source_reads_registered_builder(digits_dir, shapes_dir):
    import tensorflow_datasets as tfds

    source = tfds.data_source("clip_digits", data_dir=os.fspath(digits_dir), split="test")
    record = source[0]
    assert record["image"].dtype == np.uint8
    assert record["image"].shape == (32, 32, 3)
    assert isinstance(record["caption"], bytes)
    assert 0 <= record["label"] < 10
    # A custom config is not registered by name: read it from its directory.
    path = shapes_dir / "clip_shapes" / "small_test" / "1.0.0"
    direct = tfds.builder_from_directory(os.fspath(path)).as_data_source(split="test")
    ours = datasets.data_source("clip_shapes", "test", shapes_dir, _small())
    assert direct[3]["caption"] == ours[3]["caption"]
    np.testing.assert_array_equal(direct[3]["image"], ours[3]["image"])


def test_data_source_refuses_unprepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        datasets.data_source("clip_shapes", "train", tmp_path, _small())
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.class_names("clip_nothing")
