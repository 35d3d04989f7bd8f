"""The training decode path (ops.train_image): the crop box is drawn before decoding and a JPEG is decoded at the
largest DCT reduction that leaves the crop >= the training size. Compared with the exact path built here from
Pillow alone (decode at full size, exif_transpose, crop the same box, bicubic resize, as torchvision's
RandomResizedCrop does): identical without a reduction, close with one, and the crop in the same place for every
EXIF orientation; the issue bits are decode.image's."""

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_images
from test_image_fidelity import STORED, TRANSPARENT
from test_input_bad_data import CORPUS

from clip_jax.input import decode, ops

T = Image.Transpose
# exif_transpose's turn for each orientation, and the turn that stores an upright image under that tag.
TURN = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
        7: T.TRANSVERSE, 8: T.ROTATE_90}  # fmt: skip
STORE = {**TURN, 6: T.ROTATE_90, 8: T.ROTATE_270}


def _jpeg(img: Image.Image, orientation: int = 1, quality: int = 90) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def _exact(data: bytes, size: int, seed: int, min_area: float) -> tuple[np.ndarray, int]:
    """(the exact path's view, the reduction the fast path may use: the largest s in 1, 2, 4, 8 with the crop's
    shorter side >= s * size)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    top, left, h, w = ops.crop_box(img.size[1], img.size[0], np.random.default_rng(seed), min_area)
    view = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(view).astype(np.float64), next(s for s in (8, 4, 2, 1) if min(h, w) >= s * size)


def _fast(data, size: int, seed: int, min_area: float) -> np.ndarray:
    view, bits = ops.train_image(data, size, 1, np.random.default_rng(seed), "inception", min_area, False)
    assert view.dtype == np.uint8 and view.shape == (size, size, 3) and not bits & decode.SKIP_MASK
    return view.astype(np.float64)


PHOTOS = [*load_sample_images().images, skimage.data.coffee(), skimage.data.astronaut(), skimage.data.chelsea()]


def test_real_photos_exact_without_reduction_and_close_with_it():
    """The photos are 300-640 px; sizes 56 and 112 give crop/size ratios of 224 px training on web images."""
    diffs = {1: [], 2: [], 4: [], 8: []}
    for photo in PHOTOS:
        data = _jpeg(Image.fromarray(photo))
        for size in (56, 112):
            for seed in range(12):
                want, s = _exact(data, size, seed, 0.1)
                diffs[s].append(np.abs(_fast(data, size, seed, 0.1) - want).mean())
    assert len(diffs[1]) >= 10 and max(diffs[1]) == 0.0  # no reduction: pixel for pixel
    reduced = diffs[2] + diffs[4] + diffs[8]
    assert len(diffs[2]) >= 20 and len(diffs[4]) >= 20 and diffs[8]
    # DCT-domain scaling is another low-pass than Pillow's bicubic: about the gap between bicubic and Lanczos.
    assert np.mean(reduced) < 2.0 and max(reduced) < 4.0, (np.mean(reduced), max(reduced))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_crop_stays_in_place_under_every_exif_orientation(orientation):
    """A ramp (red = x, green = y, upright) stored turned under each tag, 701 x 427 (not a multiple of the DCT
    block: the reduced image's size is rounded up). A crop misplaced by under one reduced pixel shifts the view's
    mean by > 1 level (measured: 1.1-2.9 for an axis that runs backwards), in place it moves < 0.25."""
    h, w = 427, 701
    y, x = np.mgrid[0:h, 0:w]
    ramp = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.full(x.shape, 128.0)], -1).round().astype(np.uint8)
    upright = Image.fromarray(ramp)
    stored = upright if orientation == 1 else upright.transpose(STORE[orientation])
    data = _jpeg(stored, orientation, quality=95)
    reductions = set()
    for size in (40, 64):
        for seed in range(10):
            want, s = _exact(data, size, seed, 0.1)
            reductions.add(s)
            shift = np.abs(_fast(data, size, seed, 0.1).mean((0, 1)) - want.mean((0, 1)))
            assert shift[:2].max() < 0.5, (size, seed, s, shift)
    assert reductions == {2, 4, 8}


def test_other_formats_and_arrays_take_the_exact_path():
    photo = Image.fromarray(PHOTOS[0])
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    for value in (buf.getvalue(), PHOTOS[0]):
        for seed in range(4):
            view, bits = ops.train_image(value, 56, 1, np.random.default_rng(seed), "inception", 0.1, True)
            rng = np.random.default_rng(seed)
            top, left, h, w = ops.crop_box(427, 640, rng, 0.1)
            want = photo.crop((left, top, left + w, top + h)).resize((56, 56), Image.Resampling.BICUBIC)
            want = np.asarray(want)
            np.testing.assert_array_equal(view, want[:, ::-1] if rng.random() < 0.5 else want)
            assert bits == (decode.BIT["large_image"] if isinstance(value, bytes) else 0)  # 640 > 4 * 56


def test_resize_view_reduces_too_and_squashes_the_whole_image():
    data = _jpeg(Image.fromarray(PHOTOS[1]))
    view, bits = ops.train_image(data, 100, 1, None, "resize", 1.0, False)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((100, 100), Image.Resampling.BICUBIC)
    assert bits == decode.BIT["large_image"]  # 640 > 4 * 100
    assert np.abs(view.astype(np.float64) - np.asarray(full)).mean() < 2.0


def test_issue_bits_and_skips_are_decode_images(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # the bad-data corpus' stand-in for a bomb
    values = [v[0] for v in CORPUS.values() if v[0] is not None] + list(STORED)
    values += [v[0] for v in TRANSPARENT.values()]
    values += [b"", np.zeros((3, 3), np.uint8), np.zeros((9, 9, 2), np.uint16)]  # not bytes; tiny; grey + alpha
    for value in values:
        rgb, bits = decode.image(value, 32, 8)
        view, got = ops.train_image(value, 32, 8, np.random.default_rng(0), "inception", 0.5, True)
        assert got == bits, (decode.issue_names(got), decode.issue_names(bits))
        assert (view is None) == (rgb is None)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="data.train_crop"):
        ops.train_image(PHOTOS[0], 32, 1, None, "center", 1.0, False)
    with pytest.raises(ValueError, match="data.resample"):
        ops.train_image(PHOTOS[0], 32, 1, None, "resize", 1.0, False, resample="cubic")


def test_a_refused_draft_still_crops_the_drawn_box(monkeypatch):
    """If Pillow declines draft mode (it may for odd JPEG layouts) the image arrives at full size: the box then
    scales with the decoded size, here 1, so the view is the exact one."""
    from PIL import JpegImagePlugin

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)
    data = _jpeg(Image.fromarray(PHOTOS[0]), orientation=6)
    for seed in range(4):
        want, s = _exact(data, 56, seed, 0.1)
        assert s > 1
        np.testing.assert_array_equal(_fast(data, 56, seed, 0.1), want)
