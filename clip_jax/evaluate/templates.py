"""Prompt templates for zero-shot classification, by name (config key eval.templates).

Each class name is put into every template; the class embedding is the renormalised mean over templates.
"""

TEMPLATES = {
    # The embedded procedural shapes: class names are "<colour> <shape>".
    "clip_shapes": ("a {}.", "a photo of a {}.", "a small {}.", "a large {}.", "a drawing of a {}."),
    # scikit-learn's handwritten digits: class names are the digits "0".."9".
    "clip_digits": ('a photo of the number "{}".', "a handwritten {}.", "the digit {}."),
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
}


def get(name: str) -> tuple[str, ...]:
    if name not in TEMPLATES:
        raise ValueError(f"unknown eval.templates {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
