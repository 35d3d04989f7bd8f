"""Image geometry for training and evaluation.

Training (`train_image`): stored image -> uint8 [size, size, 3], sent to the devices as uint8 and normalised
there (train.normalise_images; 4x less host-to-device traffic than float32). `resize` squashes the whole image to
a square (what the embedded sets need: their captions name positions, and every pixel is at the final size
already), or `inception` takes CLIP's random-resized crop (a random area fraction and aspect ratio, then resize;
the box follows torchvision's RandomResizedCrop), optionally flipped. Evaluation (`eval_view`): `resize`
(SigLIP's image processor), or `centre` (shorter side to `size`, then the central square: CLIP's image
processor), the standard zero-shot protocol for photos, normalised on the host to float32 [size, size, 3] as
(x/255 - mean) / std per channel: [-1, 1] with the default mean = std = 0.5 (data.image_mean / data.image_std).
Resizing is Pillow's bicubic on uint8, as in transformers' PIL image processors.
"""

import math

import numpy as np
from PIL import Image

from clip_jax.input import decode

TRAIN_CROPS = ("resize", "inception")
# data.resample: Pillow's filter for every resize (training and evaluation). Bicubic is CLIP's and SigLIP's image
# processors' default; an imported checkpoint takes its preprocessor_config.json's `resample` (Pillow's numbering).
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
EVAL_CROPS = ("resize", "centre")
# By default images are scaled to [-1, 1]: the towers learn their own input statistics, and this is exact for
# uint8. Imported models need the statistics they were trained with (e.g. OpenAI CLIP's).
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)
_ASPECT = (3 / 4, 4 / 3)  # the crop's width/height range (log-uniform), as in Inception and CLIP
_TRIES = 10  # random crop proposals before falling back to the centre crop


def to_float(image, mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """uint8 pixels [..., 3] -> float32 (x/255 - mean) / std per channel, as one multiply-add x * 1/(255 std) -
    mean/std in float32 (with mean = std = 0.5 that is x * 2/255 - 1 bit for bit). `image` is a numpy array (the
    host, evaluation) or a jax array (the devices, training: train.normalise_images): the same constants."""
    scale = np.asarray([1.0 / (255.0 * s) for s in std], np.float32)
    offset = np.asarray([m / s for m, s in zip(mean, std)], np.float32)
    return image.astype(np.float32) * scale - offset


def _resize(image: np.ndarray, width: int, height: int, resample: str = "bicubic") -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), RESAMPLE[resample]))


def resize(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    return _resize(image, size, size, resample)


def centre_crop(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the shorter side resized to `size` (`resample`, a RESAMPLE name;
    smaller images are upscaled), the longer to int(size * long / short), truncated, then the central square, its top-left corner at
    ((H' - size) // 2, (W' - size) // 2). This is transformers' CLIPImageProcessor (PIL backend: resize
    shortest_edge, center_crop) pixel for pixel; torchvision's Resize uses the same sizes, its CenterCrop rounds
    the offset (half to even: one pixel further when the margin is 3 mod 4)."""
    h, w = image.shape[:2]
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    image = _resize(image, nw, nh, resample)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top : top + size, left : left + size]


def crop_box(h: int, w: int, rng: np.random.Generator, min_area: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering [min_area, 1] of the image, aspect in 3/4..4/3."""
    area = h * w
    for _ in range(_TRIES):
        target = area * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(math.log(_ASPECT[0]), math.log(_ASPECT[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
    # Extreme aspect ratios rarely fit: the largest centred crop with an allowed aspect instead.
    ratio = w / h
    if ratio < _ASPECT[0]:
        cw, ch = w, round(w / _ASPECT[0])
    elif ratio > _ASPECT[1]:
        cw, ch = round(h * _ASPECT[1]), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_image(
    value, size: int, min_side: int, rng, crop: str, min_area: float, flip: bool, resample: str = "bicubic"
) -> tuple[np.ndarray | None, int]:
    """One training view of a stored image: (uint8 [size, size, 3] or None, decode's issue bits); never raises
    on bad data (decode.cropped's skips), ValueError for an unknown `crop` or `resample` name.

    `value`: encoded bytes or a decoded array, as decode.image takes. `crop`: `inception` draws crop_box
    (torchvision RandomResizedCrop's box, `min_area`..1 of the area) on the upright full-size image, `resize`
    takes the whole image. A JPEG is decoded at the largest DCT-domain reduction 1/2, 1/4 or 1/8 (libjpeg's
    scaled decoding, Pillow's draft mode) that leaves the crop >= `size` on both sides (decode.cropped); the crop
    is then resized to size x size with Pillow's `resample` filter straight from the decoded image (Pillow's box
    argument), or, when no reduction applied, cropped then resized (torchvision's resized_crop, pixel for
    pixel). Then mirrored left-right with probability 1/2 if `flip`. Random draws, in order: crop, flip."""
    if crop not in TRAIN_CROPS:
        raise ValueError(f"train crop {crop!r} is not one of {TRAIN_CROPS} (set data.train_crop)")
    if resample not in RESAMPLE:
        raise ValueError(f"resample filter {resample!r} is not one of {tuple(RESAMPLE)} (set data.resample)")
    if crop == "inception":
        pick = lambda h, w: crop_box(h, w, rng, min_area)
    else:
        pick = lambda h, w: (0, 0, h, w)
    img, box, bits = decode.cropped(value, size, min_side, pick)
    if img is None:
        return None, bits
    if all(float(v).is_integer() for v in box):  # whole pixels: crop, then resize the crop alone
        box = tuple(int(v) for v in box)
        img = img if box == (0, 0, *img.size) else img.crop(box)
        view = img if img.size == (size, size) else img.resize((size, size), RESAMPLE[resample])
    else:
        view = img.resize((size, size), RESAMPLE[resample], box=box)
    if flip and rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(view, np.uint8), bits


def eval_view(
    image: np.ndarray, size: int, crop: str, mean=DEFAULT_MEAN, std=DEFAULT_STD, resample: str = "bicubic"
) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: `centre` (centre_crop: transformers' CLIPImageProcessor) or
    `resize` (a squash to size x size: SiglipImageProcessor), with the `resample` filter (a RESAMPLE name), then
    to_float. Matches those processors' PIL backends to 1e-6 (tests/test_image_fidelity.py). Raises ValueError
    for another crop or filter name."""
    if crop not in EVAL_CROPS:
        raise ValueError(f"eval crop {crop!r} is not one of {EVAL_CROPS} (set data.eval_crop)")
    if resample not in RESAMPLE:
        raise ValueError(f"resample filter {resample!r} is not one of {tuple(RESAMPLE)} (set data.resample)")
    view = centre_crop(image, size, resample) if crop == "centre" else resize(image, size, resample)
    return to_float(view, mean, std)
