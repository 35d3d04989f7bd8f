"""`clip_skimage`: the photographs bundled inside the scikit-image wheel, with captions written from their
docstrings.

About twenty real images at their original sizes (a 512x512 astronaut portrait, a 1411x1411 retina scan, ...):
too few to train on, but real photos of mixed sizes and kinds (colour, greyscale, a binary silhouette, an RGBA
logo) for demos and for exercising decoding and crops on real data. Only images that ship in the wheel are
listed; skimage.data fetches others (brain, eagle, lily, ...) with pooch, which an offline machine cannot.
Each image is stored as lossless PNG in RGB: greyscale repeated over three channels, binary as 0/255, float
scaled from 0..1, transparency composited over white. `name` is the skimage.data function, `description` the
first line of its docstring, `caption` a sentence written from that docstring. One split: `train`.
"""

from __future__ import annotations

import inspect
import io
import logging

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

log = logging.getLogger(__name__)
# skimage.data function -> caption, each written from the function's docstring.
CAPTIONS = {
    "astronaut": "a colour portrait of the astronaut eileen collins in her orange flight suit",
    "brick": "a greyscale photo of a brick wall",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "chelsea": "a photo of chelsea the tabby cat",
    "cell": "a microscope image of a cell floating in saline",
    "checkerboard": "a black and white checkerboard pattern",
    "clock": "a motion blurred photo of a clock",
    "coffee": "a photo of a cup of coffee on a saucer",
    "coins": "a greyscale photo of greek coins from pompeii",
    "colorwheel": "a colour wheel",
    "grass": "a greyscale close-up photo of grass",
    "gravel": "a greyscale close-up photo of gravel",
    "horse": "a black and white silhouette of a horse",
    "hubble_deep_field": "the hubble extreme deep field, thousands of galaxies in the dark sky",
    "immunohistochemistry": "a microscope image of tissue with immunohistochemical brown staining",
    "logo": "the scikit-image logo",
    "microaneurysms": "a greyscale retina image with microaneurysms",
    "moon": "a greyscale photo of the surface of the moon",
    "page": "a scanned page of printed text",
    "retina": "a colour photo of a human retina",
    "rocket": "a launch photo of a falcon 9 rocket carrying the dscovr satellite",
    "shepp_logan_phantom": "the shepp logan phantom, a simulated ct scan of a head",
    "stereo_motorcycle": "a photo of a red motorcycle in a garage",
    "text": "a greyscale photo of handwritten equations on lined paper",
}


class MissingDependency(ImportError):
    """scikit-image is not installed."""


def to_rgb(value) -> np.ndarray:
    """A skimage.data array (grey, binary, float 0..1, RGB or RGBA) -> uint8 [h, w, 3]."""
    arr = np.asarray(value)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"unexpected image dtype {arr.dtype}")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:].astype(np.float64) / 255.0
        return np.round(arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return arr


def load(name: str) -> tuple[np.ndarray, str] | None:
    """(RGB image, docstring summary) of skimage.data.<name>, or None where it cannot be loaded offline."""
    try:
        import skimage.data  # pylint: disable=g-import-not-at-top  (only preparation needs scikit-image)
    except ImportError:
        raise MissingDependency("clip_skimage needs scikit-image: pip install -e '.[demo]'") from None

    function = getattr(skimage.data, name)
    try:
        value = function()
    except Exception as e:  # noqa: BLE001  pooch missing, no network, moved file: leave that image out
        log.warning("skimage.data.%s left out: %s", name, e)
        return None
    if name == "stereo_motorcycle":
        value = value[0]  # (left, right, disparity): the left view
    summary = (inspect.getdoc(function) or "").split("\n\n")[0].replace("\n", " ").strip()
    return to_rgb(value), summary


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)  # lossless either way; 4x faster than 6, 23% larger
    return buf.getvalue()


class ClipSkimage(tfds.core.GeneratorBasedBuilder):
    """scikit-image's bundled photos with captions; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "name": tfds.features.Text(doc="the skimage.data function"),
                    "description": tfds.features.Text(doc="the first line of its docstring"),
                }
            ),
            supervised_keys=("image", "caption"),
            description=__doc__,
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the images ship with scikit-image
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for name, caption in CAPTIONS.items():
            loaded = load(name)
            if loaded is not None:
                rgb, summary = loaded
                yield name, {"image": _png(rgb), "caption": caption, "name": name, "description": summary}
