"""Training and evaluation image views: random-resized crop geometry, flips, centre crop, and that augmented
training stays deterministic and exactly resumable."""

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from clip_jax import datasets
from clip_jax.input import ops, pipeline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny_cpu  # after the sys.path line


@pytest.mark.parametrize("h,w", [(100, 100), (60, 200), (300, 40)])
def test_inception_crop_box_obeys_area_and_aspect(h, w):
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, ch, cw = ops.crop_box(h, w, rng, min_area=0.3)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05  # rounding to whole pixels
        if h == w:  # a square image always fits a proposal: the area bound holds
            assert 0.3 - 0.03 <= ch * cw / (h * w) <= 1.0


def test_extreme_aspect_falls_back_to_an_allowed_centred_crop():
    top, left, ch, cw = ops.crop_box(10, 1000, np.random.default_rng(0), min_area=0.9)
    assert (ch, cw) == (10, 13) and left == (1000 - 13) // 2 and top == 0


def test_centre_crop_keeps_the_middle():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :20] = (255, 0, 0)
    img[:, 20:60] = (0, 255, 0)
    img[:, 60:] = (0, 0, 255)
    out = ops.centre_crop(img, 32)
    assert out.shape == (32, 32, 3)
    assert (np.abs(out[:, 2:-2].astype(int) - (0, 255, 0)) < 10).all()  # only the green middle remains
    assert ops.eval_view(img, 32, "resize")[0, 0, 0] > 0.9  # resize keeps the red left edge


def test_flip_mirrors_about_half_the_views():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flipped = 0
    for seed in range(40):
        view, bits = ops.train_image(img, 32, 1, np.random.default_rng(seed), "resize", 1.0, True)
        assert view.dtype == np.uint8 and bits == 0
        if np.array_equal(view, img[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(view, img)
    assert 10 <= flipped <= 30


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(24):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
            (folder / f"{i}.png").write_bytes(buf.getvalue())
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"photo {i}"}) + "\n")
    data_dir = tmp_path_factory.mktemp("tfds")
    datasets.prepare_local("image_text_folder", str(folder), "photos", data_dir)
    cfg = tiny_cpu.get_config()
    cfg.data.name, cfg.data.data_dir, cfg.data.cache, cfg.batch_size = (
        "image_text_folder/photos",
        str(data_dir),
        False,
        8,
    )
    cfg.data.train_crop, cfg.data.crop_min_area, cfg.data.flip = "inception", 0.2, True
    return cfg


def test_augmented_training_is_deterministic_and_resumable(photos):
    it = pipeline.train_iterator(photos)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]  # crosses an epoch: the second epoch's crops are new draws
    assert all(w["image"].dtype == np.uint8 and w["image"].shape == (8, 32, 32, 3) for w in want)  # to the devices
    fresh = pipeline.train_iterator(photos)
    fresh.set_state(state)
    for w in want:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], w["image"])
        np.testing.assert_array_equal(got["tokens"], w["tokens"])
    # Epoch 2 shows the same photos with other crops.
    by_caption = {}
    for batch in want:
        for image, tokens in zip(batch["image"], batch["tokens"], strict=True):
            by_caption.setdefault(tokens.tobytes(), []).append(image)
    repeats = [v for v in by_caption.values() if len(v) > 1]
    assert repeats and all(not np.array_equal(v[0], v[1]) for v in repeats)
    other = photos.copy_and_resolve_references()
    other.seed = 1
    assert not np.array_equal(
        next(pipeline.train_iterator(other))["image"], next(pipeline.train_iterator(photos))["image"]
    )


def test_a_state_saved_before_filtering_existed_still_resumes(photos):
    """Checkpoints written when the iterator batched directly hold grain's {'next_index': batches}: the same
    position, since a chunk is one batch when nothing is skipped."""
    it = pipeline.train_iterator(photos)
    for _ in range(3):
        next(it)
    fresh = pipeline.train_iterator(photos)
    fresh.set_state({"next_index": 3})
    np.testing.assert_array_equal(next(fresh)["image"], next(it)["image"])


def test_nested_caption_lists_pick_one_caption_per_visit():
    """tfds coco_captions stores several captions under captions/text: each visit draws one, reproducibly."""
    cfg = tiny_cpu.get_config()
    cfg.data.text_key = "captions/text"
    prep = pipeline._Preprocess(cfg)
    record = {
        "image": np.zeros((32, 32, 3), np.uint8),
        "captions": {"id": np.array([1, 2]), "text": np.array([b"one dog", b"two cats"], dtype=object)},
    }
    tok = pipeline.tokenizer_lib.make(cfg)
    options = {tok.encode("one dog").tobytes(), tok.encode("two cats").tobytes()}
    drawn = [prep.map_with_index(i, record)["tokens"].tobytes() for i in range(20)]
    assert set(drawn) == options
    assert drawn == [prep.map_with_index(i, record)["tokens"].tobytes() for i in range(20)]
