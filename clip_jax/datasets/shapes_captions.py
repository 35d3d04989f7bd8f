"""`clip_shapes_captions`: clip_shapes' test images, each with all its captions, for image<->text retrieval.

The images are exactly clip_shapes' test split (one shape per image, the 40 colour-shape classes in turn, the
held-out ones included); each carries one caption per single-shape phrasing of clip_shapes, filled with that
image's own size, colour, kind and position, so every image has five correct captions, as COCO has about five.
Some phrasings ("a red circle") fit every image of a class: text->image retrieval is then ambiguous by nature,
and the ranks count it as it is.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from clip_jax.datasets import shapes


@dataclasses.dataclass(eq=False)
class CaptionsConfig(tfds.core.BuilderConfig):
    """Image side, number of images (the first of clip_shapes' test split) and the seed."""

    image_size: int = 32
    num_images: int = 1_000
    seed: int = 0


def make_examples(config: CaptionsConfig):
    """Yields (index, {'image', 'captions', 'label'}) for the first config.num_images test images."""
    source = shapes.ShapesConfig(name="test", image_size=config.image_size, seed=config.seed)
    for chunk in range(-(-config.num_images // shapes._CHUNK)):
        plan = shapes._plan_chunk("test", chunk, source)
        size = min(shapes._CHUNK, config.num_images - chunk * shapes._CHUNK)
        layouts, captions = [], []
        for i in range(size):
            phrasings = []
            for template in range(len(shapes.SINGLE_TEMPLATES)):
                plan["template"][i] = template  # the layout does not depend on the phrasing, only the caption
                layout, caption = shapes._layout(plan, i)
                phrasings.append(caption)
            layouts.append(layout)
            captions.append(phrasings)
        images = shapes.render(layouts, config.image_size, plan["background"][:size])
        for i in range(size):
            yield (
                chunk * shapes._CHUNK + i,
                {"image": images[i], "captions": captions[i], "label": plan["first"][i]},
            )


class ClipShapesCaptions(tfds.core.GeneratorBasedBuilder):
    """clip_shapes test images with five captions each; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        CaptionsConfig(name="default", description="32x32, 1,000 images x 5 captions"),
        CaptionsConfig(name="small", num_images=200, description="32x32, 200 images x 5 captions (tests)"),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "label": tfds.features.ClassLabel(names=shapes.CLASS_NAMES),
                }
            ),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for index, example in make_examples(self.builder_config):
            example["image"] = shapes.encode_png(example["image"])
            example["label"] = int(example["label"])
            yield index, example
