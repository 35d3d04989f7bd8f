"""Class names and prompt templates for zero-shot classification (keys class_names and templates of a zeroshot
section, evals.<name>).

Both are data shipped in the package (clip_jax/evaluate/data/*.json; sources and licences in data/NOTICE).
Each class name is put into every template; the class embedding is the renormalised mean over templates.
The embedded datasets (clip_shapes, clip_digits) have prompts phrased like their captions ("an orange circle"):
naming one of them as templates uses the dataset's own wording (articles fixed per class).
"""

import functools
import json
import os

from clip_jax.config import ConfigError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# tfds datasets that share another's classes in the same label order.
NAME_ALIASES = {
    "imagenet_v2": "imagenet2012",
    "imagenet2012_real": "imagenet2012",
    "imagenet2012_subset": "imagenet2012",
}


@functools.cache
def _load(file: str) -> dict[str, tuple[str, ...]]:
    with open(os.path.join(DATA_DIR, file), encoding="utf-8") as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


def template_sets() -> dict[str, tuple[str, ...]]:
    """Template set name -> its templates, each with one '{}' for the class name."""
    return _load("templates.json")


def names_files() -> dict[str, tuple[str, ...]]:
    """Dataset name -> class names in label order."""
    return _load("class_names.json")


def template_choices() -> tuple[str, ...]:
    """Every valid templates value: the sets of templates.json and the embedded datasets' own prompt sets."""
    from clip_jax import datasets

    return tuple(dict.fromkeys([*sorted(template_sets()), *datasets.PROMPT_TEMPLATES]))


def class_name_choices() -> tuple[str, ...]:
    """Every valid class_names value: '' (automatic), 'label' (the ClassLabel names), class_names.json's keys."""
    return ("", "label", *sorted(names_files()))


# Template sets chosen when a zeroshot section leaves `templates` empty: CLIP's published ones for the datasets it
# wrote them for, else its 80 ImageNet templates (generic "a photo of a {}." variants).
DEFAULT_TEMPLATES = {"imagenet2012": "clip_imagenet", "cifar10": "clip_cifar", "cifar100": "clip_cifar"}


def default_templates(dataset: str) -> str:
    """The template set for `dataset` when none is configured: an embedded set's own prompts (clip_shapes...), a
    set of templates.json named after the dataset, DEFAULT_TEMPLATES' choice, else 'clip_imagenet'."""
    from clip_jax import datasets

    base = dataset.partition("/")[0].partition(":")[0]  # tfds 'name/config:version'
    base = NAME_ALIASES.get(base, base)
    if base in datasets.PROMPT_TEMPLATES or base in template_sets():
        return base
    return DEFAULT_TEMPLATES.get(base, "clip_imagenet")


def class_names(choice: str, dataset: str, label_names) -> list[str]:
    """The class names to prompt with. choice (class_names): '' = the names file of `dataset` if there is one,
    else its ClassLabel names; 'label' = the ClassLabel names; any other = that entry of class_names.json."""
    label_names = list(label_names)
    base = dataset.partition("/")[0].partition(":")[0]  # tfds 'name/config:version'
    if choice == "label":
        return label_names
    if choice == "":
        key = NAME_ALIASES.get(base, base)
        if key not in names_files():
            return label_names
    else:
        key = choice
        if key not in names_files():
            raise ConfigError(
                f"class_names={choice!r} is not in {os.path.join(DATA_DIR, 'class_names.json')}; use one of "
                f"{sorted(names_files())}, 'label' (the dataset's ClassLabel names) or '' (automatic)"
            )
    names = list(names_files()[key])
    if len(names) != len(label_names):
        raise ConfigError(
            f"class_names: '{key}' lists {len(names)} classes but {dataset} has {len(label_names)}; set "
            "class_names='label' to use the dataset's own names"
        )
    return names


def class_prompts(templates: str, class_names) -> list[list[str]]:
    """Per class (in label order), its prompts."""
    from clip_jax import datasets

    if templates in datasets.PROMPT_TEMPLATES:
        if list(class_names) != list(datasets.class_names(templates)):
            raise ConfigError(
                f"templates={templates!r} are that dataset's prompts but the class names differ; use a set "
                "of templates.json (e.g. 'plain') for other datasets"
            )
        return [list(p) for p in datasets.prompts(templates)]
    sets = template_sets()
    if templates not in sets:
        raise ConfigError(f"templates={templates!r} is unknown; choose one of {', '.join(template_choices())}")
    return [[t.format(name) for t in sets[templates]] for name in class_names]
