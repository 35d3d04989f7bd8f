"""Prompt templates for zero-shot classification (config key eval.templates).

Each class name is put into every template; the class embedding is the renormalised mean over templates.
The embedded datasets (clip_shapes, clip_digits) bring their own prompts, phrased like their captions
("an orange circle"), so eval.templates may also name one of them.
"""

TEMPLATES = {
    # Single generic prompt, for any dataset.
    "plain": ("a photo of a {}.",),
    # The short ensemble commonly used for ImageNet-style natural images.
    "imagenet_short": (
        "a photo of a {}.",
        "a bad photo of a {}.",
        "a photo of the large {}.",
        "a photo of the small {}.",
        "a low resolution photo of a {}.",
        "itap of a {}.",
        "a cropped photo of a {}.",
    ),
    # Fashion-MNIST (data.name clip_fashion_mnist): phrased like its captions; "the" needs no a/an fix.
    "clip_fashion_mnist": (
        "a photo of the {}.",
        "a black and white photo of the {}.",
        "a product photo of the {}.",
        "a low resolution photo of the {}.",
    ),
}


def class_prompts(templates: str, class_names) -> list[list[str]]:
    """Per class (in label order), its prompts."""
    from clip_jax import datasets

    if templates in datasets.PROMPT_TEMPLATES:
        if list(class_names) != list(datasets.class_names(templates)):
            raise ValueError(f"eval.templates={templates!r} are that dataset's prompts but the class names differ")
        return [list(p) for p in datasets.prompts(templates)]
    if templates not in TEMPLATES:
        choices = sorted(TEMPLATES) + sorted(datasets.PROMPT_TEMPLATES)
        raise ValueError(f"unknown eval.templates {templates!r}; choose one of {choices}")
    return [[t.format(name) for t in TEMPLATES[templates]] for name in class_names]
