"""`clip_digits`: scikit-learn's bundled handwritten digits as image-caption pairs.

1,797 real 8x8 greyscale scans (values 0..16) ship inside scikit-learn, so this
is a real-image dataset that needs no download. Each image is scaled to 0..255,
enlarged by pixel replication to 32x32 (so averaging each 4x4 block gives the
source back exactly) and repeated over three channels. Captions use a few
templates ('a photo of the number "3"', 'the digit three', ...); labels are the
ClassLabel names "0".."9". A fixed, class-stratified ~80/20 split gives
train (1,438) and test (359).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from clip_jax.datasets import shapes

CLASS_NAMES = tuple(str(d) for d in range(10))
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    'a photo of the number "{digit}"',
    "a handwritten {digit}",
    "the digit {word}",
    "a handwritten digit {word}",
    "a blurry photo of the number {word}",
)
# Zero-shot prompts over the class names "0".."9".
PROMPT_TEMPLATES = ('a photo of the number "{}"', "a handwritten {}")
TEST_FRACTION = 0.2


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    """Output side (a multiple of 8) and the seed of split and captions."""

    image_size: int = 32
    seed: int = 0


def load_source() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: images [1797, 8, 8] float in 0..16, labels [1797]."""
    # Imported here: scikit-learn takes seconds to import and only
    # preparation needs it.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    return digits.images, digits.target


def split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Class-stratified split: round(20%) of each digit's examples go to test."""
    rng = np.random.default_rng(seed)
    test = []
    for digit in range(len(CLASS_NAMES)):
        members = np.flatnonzero(labels == digit)
        count = int(round(TEST_FRACTION * len(members)))
        test.append(rng.permutation(members)[:count])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


def to_rgb(image: np.ndarray, image_size: int) -> np.ndarray:
    """8x8 values 0..16 -> image_size^2 x 3 uint8 by pixel replication."""
    if image_size % image.shape[0]:
        raise ValueError(f"image_size {image_size} is not a multiple of {image.shape[0]}")
    scale = image_size // image.shape[0]
    grey = np.round(image * (255.0 / 16.0)).astype(np.uint8)
    grey = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)
    return np.repeat(grey[..., None], 3, axis=-1)


def caption(digit: int, template: int) -> str:
    return CAPTION_TEMPLATES[template].format(digit=digit, word=WORDS[digit])


class ClipDigits(tfds.core.GeneratorBasedBuilder):
    """Handwritten digits with captions; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [DigitsConfig(name="default", description="32x32 RGB")]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "index": tfds.features.Scalar(dtype=np.int32, doc="row in sklearn's load_digits()"),
                }
            ),
            supervised_keys=("image", "caption"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the images ship with scikit-learn
        images, labels = load_source()
        splits = split_indices(labels, self.builder_config.seed)
        # One template per source image, fixed by the seed.
        rng = np.random.default_rng((self.builder_config.seed, 1))
        templates = rng.integers(len(CAPTION_TEMPLATES), size=len(labels))
        return {
            name: self._generate_examples(images, labels, templates, indices) for name, indices in splits.items()
        }

    def _generate_examples(self, images, labels, templates, indices):
        size = self.builder_config.image_size
        for index in indices:
            digit = int(labels[index])
            yield (
                int(index),
                {
                    "image": shapes.encode_png(to_rgb(images[index], size)),
                    "caption": caption(digit, int(templates[index])),
                    "label": digit,
                    "index": int(index),
                },
            )
