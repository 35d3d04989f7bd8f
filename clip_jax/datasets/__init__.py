"""The embedded, offline image-caption datasets, as tfds builders.

Importing this package registers `clip_shapes`, `clip_digits` and `clip_shapes_captions` (retrieval;
generated locally) and the demo sets `clip_fashion_mnist`, `clip_emoji` (from Debian packages, fetched
without root when not installed) and `clip_skimage` (scikit-image's bundled photos) with tfds. All are stored
as ArrayRecord, so they are read with `tfds.data_source` / grain without TensorFlow:

    from clip_jax import datasets
    datasets.prepare("clip_shapes", "./tfds_data")   # once; fast if present
    source = datasets.data_source("clip_shapes", "train", "./tfds_data")
    source[0]  # {'image': uint8 [32, 32, 3], 'caption': bytes, 'label': int,
               #  'unseen': bool}

Nothing here reaches the network: builders are constructed from their classes
(never looked up on GCS) and preparation runs with GCS downloads disabled.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os

import tensorflow_datasets as tfds

from clip_jax.datasets import debian, digits, emoji, fashion, local, photos, shapes, shapes_captions

BUILDERS = {
    "clip_shapes": shapes.ClipShapes,
    "clip_digits": digits.ClipDigits,
    "clip_shapes_captions": shapes_captions.ClipShapesCaptions,  # retrieval: several captions per image
    "clip_fashion_mnist": fashion.ClipFashionMnist,
    "clip_emoji": emoji.ClipEmoji,
    "clip_skimage": photos.ClipSkimage,
}
# The real-data demo sets (data/prepare.py --name demo); their sources are Debian packages and scikit-image.
DEMO = ("clip_fashion_mnist", "clip_emoji", "clip_skimage")
# Builders over the user's own files (see local.py): one config per corpus, named when it is prepared.
LOCAL_BUILDERS = {
    "image_text_folder": local.ImageTextFolder,
    "webdataset": local.Webdataset,
}
CLASS_NAMES = {
    "clip_shapes": shapes.CLASS_NAMES,  # "red circle", ... (colour x shape)
    "clip_digits": digits.CLASS_NAMES,  # "0" .. "9"
    "clip_fashion_mnist": fashion.CLASS_NAMES,  # "t-shirt/top" .. "ankle boot" (prompts: evaluate/templates.py)
}
# Zero-shot prompt templates that match each dataset's caption phrasing.
PROMPT_TEMPLATES = {
    "clip_shapes": shapes.PROMPT_TEMPLATES,
    "clip_digits": digits.PROMPT_TEMPLATES,
}
FILE_FORMAT = "array_record"
# What preparing a demo set raises when its source cannot be had; the message says how to provide it.
PREPARE_ERRORS = (debian.PackageError, photos.MissingDependency)


def class_names(name: str) -> tuple[str, ...]:
    """Class names of `name`'s label feature, in label order."""
    if _check_name(name) not in CLASS_NAMES:
        raise ValueError(f"{name} has no class labels; datasets with them: {sorted(CLASS_NAMES)}")
    return CLASS_NAMES[name]


def prompts(name: str) -> tuple[tuple[str, ...], ...]:
    """Per class (in label order), its zero-shot prompts, phrased like the
    training captions: prompts("clip_shapes")[25][0] == "an orange circle"."""
    fix = shapes.with_articles if name == "clip_shapes" else str
    return tuple(
        tuple(fix(template.format(label)) for template in PROMPT_TEMPLATES[name]) for label in class_names(name)
    )


def _check_name(name: str) -> str:
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    return name


def builder(name: str, data_dir: str | os.PathLike, config: str | tfds.core.BuilderConfig | None = None):
    """The builder for `name` (config: a name like "64px", or a config object)."""
    cls = BUILDERS[_check_name(name)]
    return cls(data_dir=os.fspath(data_dir), config=config, file_format=FILE_FORMAT)


def prepare(name: str, data_dir: str | os.PathLike, config: str | tfds.core.BuilderConfig | None = None):
    """Generates `name` in data_dir unless already there; returns the builder.

    Idempotent: a prepared dataset is detected from its files and reused.
    """
    result = builder(name, data_dir, config)
    # Belt and braces: tfds 4.9 keeps GCS off by default; make sure nothing
    # (e.g. another library flipping it) sends us to gs://tfds-data.
    tfds.core.utils.gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
    download_config = tfds.download.DownloadConfig(
        try_download_gcs=False,
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    )
    return _generate(result, name, data_dir, download_config)


def data_source(
    name: str, split: str, data_dir: str | os.PathLike, config: str | tfds.core.BuilderConfig | None = None
):
    """Random-access source over a prepared split (no TensorFlow, no download).

    Raises a clear error if the dataset has not been prepared, instead of
    generating it implicitly (preparation is `prepare`'s job).
    """
    result = builder(name, data_dir, config)
    if not result.is_prepared():
        raise FileNotFoundError(
            f"{name} is not prepared in {result.data_dir}; run "
            f"`python data/prepare.py --name {name} --data_dir {data_dir}`"
        )
    return result.as_data_source(split=split)


def encoded_images(features: tfds.features.FeaturesDict) -> dict | None:
    """tfds decoders leaving every Image feature (nested ones too) as its stored file bytes, or None if none:
    tfds' own image decoding ignores EXIF orientation and transparency, clip_jax.input.decode applies both."""
    out = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            out[key] = tfds.decode.SkipDecoding()
        elif isinstance(feature, tfds.features.FeaturesDict):
            inner = encoded_images(feature)
            if inner:
                out[key] = inner
    return out or None


def _generate(builder, name: str, data_dir, download_config):
    """builder.download_and_prepare() unless already prepared, announced in one line of our own: tfds' banner
    ("Downloading and preparing dataset Unknown size (download: ...)") would mislead, as the embedded sets and local
    corpora are generated on this machine."""
    if builder.is_prepared():
        return builder
    print(f"preparing dataset {name} in {data_dir} (once; later runs reuse it)", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
    return builder


def prepare_local(kind: str, source: str, name: str, data_dir: str | os.PathLike):
    """Prepares a local corpus (kind: 'image_text_folder' or 'webdataset'; source: its folder or shard glob) as
    `<data_dir>/<kind>/<name>`, read afterwards as data.name='<kind>/<name>'. Idempotent like `prepare`."""
    if kind not in LOCAL_BUILDERS:
        raise ValueError(f"unknown local corpus kind {kind!r}; expected one of {sorted(LOCAL_BUILDERS)}")
    config = local.LocalConfig(name=name, source=os.path.abspath(os.path.expanduser(source)))
    result = LOCAL_BUILDERS[kind](data_dir=os.fspath(data_dir), config=config, file_format=FILE_FORMAT)
    tfds.core.utils.gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
    download_config = tfds.download.DownloadConfig(
        try_download_gcs=False, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    return _generate(result, f"{kind}/{name}", data_dir, download_config)


def local_source(kind: str, name: str, split: str, data_dir: str | os.PathLike):
    """Random-access source over a prepared local corpus, read from its directory (its config is not registered
    by name, so the builder class cannot be looked up; the directory holds everything needed to read it)."""
    root = os.path.join(os.fspath(data_dir), kind, name)
    versions = sorted(glob.glob(os.path.join(root, "*", "dataset_info.json")))
    if not name or not versions:
        raise FileNotFoundError(
            f"{kind}/{name} is not prepared in {data_dir}; run `python data/prepare_local.py "
            f"{'folder' if kind == 'image_text_folder' else 'webdataset'} SOURCE --name {name or 'NAME'} "
            f"--data_dir {data_dir}`"
        )
    return tfds.builder_from_directory(os.path.dirname(versions[-1])).as_data_source(split=split)
