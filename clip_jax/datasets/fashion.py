"""`clip_fashion_mnist`: Zalando's Fashion-MNIST (70,000 28x28 greyscale product photos, 10 named classes).

The files come from the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist): the
installed copy, or one fetched with `apt-get download` and unpacked without root (see debian.py). They are in
the idx format of MNIST: gzip-compressed, a big-endian header (magic 2051 for images with count, rows, columns;
2049 for labels with count) then one unsigned byte per pixel or label.

Each image is padded with its own black background to 32x32 (the original pixels sit unchanged in the middle,
no resampling) and repeated over three channels. Train captions put the class name into one of several
templates, chosen per image by the seed ("a photo of a sneaker", "the coat on a black background", ...);
`label` is a ClassLabel over CLASS_NAMES, so zero-shot evaluation works on the test split (with the
prompts in clip_jax/evaluate/templates.py: a zeroshot section's templates='clip_fashion_mnist', chosen by default).
Splits: the official 60,000 train and 10,000 test images.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from clip_jax.datasets import debian, shapes

PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = "usr/share/datasets/fashion-mnist"
FILES = {  # split -> (images, labels), as named in the package
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
# The dataset's own label names (lower-cased), in label order.
CLASS_NAMES = (
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
)
# "a" becomes "an" before a vowel (shapes.with_articles). The zero-shot prompts (evaluate/templates.py) use
# the "the" phrasings, which need no article fix.
CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a black and white photo of a {}",
    "a black and white photo of the {}",
    "a product photo of the {}",
    "a low resolution photo of the {}",
    "a small grey picture of a {}",
    "the {} on a black background",
    "an image of a {}",
)


@dataclasses.dataclass(eq=False)
class FashionConfig(tfds.core.BuilderConfig):
    """`source_dir`: a folder with the four idx(.gz) files ('' = the Debian package's); `seed`: captions."""

    source_dir: str = ""
    image_size: int = 32
    seed: int = 0


def read_idx(path: str, magic: int) -> np.ndarray:
    """An idx file (plain or .gz) -> uint8 [count] (labels) or [count, rows, cols] (images)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = 3 if magic == IMAGES_MAGIC else 1
    if len(data) < 4 * (1 + dims):
        raise ValueError(f"{path} is too short for an idx header ({len(data)} bytes)")
    header = np.frombuffer(data, ">i4", count=1 + dims)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: idx magic number {int(header[0])}, expected {magic}; is it the right file?")
    shape = tuple(int(n) for n in header[1:])
    body = np.frombuffer(data, np.uint8, offset=4 * (1 + dims))
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes, the file has {body.size}")
    return body.reshape(shape)


def _find(folder: str, name: str) -> str:
    for candidate in (name + ".gz", name):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{folder} has no {name}(.gz); it should hold the four Fashion-MNIST idx files")


def load_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of one split from the folder of idx files."""
    image_file, label_file = FILES[split]
    images = read_idx(_find(folder, image_file), IMAGES_MAGIC)
    labels = read_idx(_find(folder, label_file), LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{folder}: {split} has label {labels.max()}; Fashion-MNIST has {len(CLASS_NAMES)}")
    return images, labels


def to_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """[h, w] greyscale -> [size, size, 3], centred on black (the images' own background)."""
    h, w = image.shape
    if size < max(h, w):
        raise ValueError(f"image_size {size} is smaller than the {h}x{w} source images")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size, 3), np.uint8)
    out[top : top + h, left : left + w] = image[..., None]
    return out


def caption(label: int, template: int) -> str:
    return shapes.with_articles(CAPTION_TEMPLATES[template].format(CLASS_NAMES[label]))


class ClipFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST with captions; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [FashionConfig(name="default", description="32x32 RGB, from the Debian package")]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "index": tfds.features.Scalar(dtype=np.int32, doc="row in the split's idx file"),
                }
            ),
            supervised_keys=("image", "caption"),
            description=__doc__,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        folder = self.builder_config.source_dir
        if not folder:
            folder = debian.package_path(PACKAGE, PACKAGE_DIR, os.path.join(dl_manager.download_dir, "debian"))
        return {split: self._generate_examples(folder, split) for split in FILES}

    def _generate_examples(self, folder, split):
        images, labels = load_split(folder, split)
        seed, size = self.builder_config.seed, self.builder_config.image_size
        templates = np.random.default_rng((seed, list(FILES).index(split))).integers(
            len(CAPTION_TEMPLATES), size=len(labels)
        )
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield (
                index,
                {
                    "image": shapes.encode_png(to_rgb(image, size)),
                    "caption": caption(int(label), int(templates[index])),
                    "label": int(label),
                    "index": index,
                },
            )
