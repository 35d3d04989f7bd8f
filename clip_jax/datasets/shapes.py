"""`clip_shapes`: a procedural image-caption dataset that needs no download.

Each image shows one or two flat shapes (5 kinds x 8 colours, two sizes) on a
dark, lightly noisy background; its caption names colour, kind and, depending on
the phrasing, size, position or the spatial relation between the two shapes.
Eight of the 40 colour-shape combinations (one per colour, every kind at least
once) never appear in any train image, so the `test` split measures zero-shot
transfer to unseen compositions as well as to seen ones.

Everything is drawn by numpy from a seed per chunk of 500 examples and
rasterised with exact float arithmetic (no font or Pillow drawing code), so the
pixels and captions are identical on every machine.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Class index = colour_index * len(SHAPES) + shape_index ("red circle" is 0).
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# Held out of train: one shape per colour, chosen so every kind is held out for
# at least one colour (a model must compose colour and shape, not memorise).
UNSEEN = frozenset(
    {
        "red triangle",
        "green cross",
        "blue square",
        "yellow diamond",
        "purple circle",
        "orange triangle",
        "cyan cross",
        "white square",
    }
)
SEEN_CLASSES = tuple(i for i, n in enumerate(CLASS_NAMES) if n not in UNSEEN)

# Half-extent of a shape as a fraction of the image side.
SIZES = {"small": 0.16, "large": 0.27}
_MARGIN = 0.02  # keep shapes off the border
_SUPERSAMPLE = 2  # 2x2 samples per pixel: anti-aliased edges at low cost
_SPLIT_CODES = {"train": 0, "test": 1}  # part of each example's seed

SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape}",
    "a {colour} {shape} {where}",
    "a photo of a {size} {colour} {shape}",
    "a {size} {colour} {shape} on a dark background",
)
PAIR_TEMPLATES = (
    "a {size} {colour} {shape} {relation} a {size2} {colour2} {shape2}",
    "a {colour} {shape} {relation} a {colour2} {shape2}",
    "a {colour} {shape} and a {colour2} {shape2}",
)
# Zero-shot prompts that match the caption phrasings above (pass the results
# through with_articles: "an orange circle").
PROMPT_TEMPLATES = ("a {}", "a photo of a {}", "a {} on a dark background")

# Single-shape placements: name -> (axis moved off centre, direction).
_WHERE = {
    "in the middle": None,
    "on the left": (0, -1),
    "on the right": (0, +1),
    "at the top": (1, -1),
    "at the bottom": (1, +1),
}
# Relation of the first shape to the second: (axis, first shape's side).
_RELATIONS = {
    "to the left of": (0, -1),
    "to the right of": (0, +1),
    "above": (1, -1),
    "below": (1, +1),
}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image side in pixels, split sizes and the seed everything derives from."""

    image_size: int = 32
    num_train: int = 50_000
    num_test: int = 2_000
    seed: int = 0


# Examples sampled and drawn together (memory ~60 MB at 32px). Part of the
# data's definition: changing it changes every example.
_CHUNK = 500


@functools.cache
def _axis(image_size: int) -> np.ndarray:
    """Sub-pixel sample coordinates along one axis, in [0, 1]."""
    n = image_size * _SUPERSAMPLE
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def shape_mask(kind: str, cx, cy, r, gx, gy) -> np.ndarray:
    """Boolean mask of a shape of half-extent r at sample points (gx, gy).

    All arguments broadcast, so one call draws a batch of shapes of one kind.
    """
    dx, dy = np.abs(gx - cx), np.abs(gy - cy)
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        # Slightly smaller so a square's area is close to a circle's.
        return (dx <= 0.85 * r) & (dy <= 0.85 * r)
    if kind == "triangle":
        # Pointing up: apex at cy - r, base at cy + 0.8r, base half-width r.
        return (gy <= cy + 0.8 * r) & (1.8 * dx <= gy - (cy - r))
    if kind == "diamond":
        return dx + dy <= r
    if kind == "cross":
        arm = 0.33 * r
        return ((dx <= r) & (dy <= arm)) | ((dy <= r) & (dx <= arm))
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def render(layouts, image_size: int, backgrounds: np.ndarray) -> np.ndarray:
    """Draws a batch of images: uint8 [N, S, S, 3].

    layouts: per image a list of shapes (kind, rgb, cx, cy, r), drawn in order;
    backgrounds: grey levels [N, S, S]. Each pixel blends towards a shape's
    colour by the fraction of its SUPERSAMPLE^2 sample points inside the shape
    (anti-aliasing). The whole batch is drawn with array operations, one shape
    slot and kind at a time: per-image numpy calls would cost more than the
    arithmetic.
    """
    k, n = _SUPERSAMPLE, len(layouts)
    axis = _axis(image_size)
    images = np.repeat(backgrounds[..., None], 3, axis=-1)
    for slot in range(max(len(layout) for layout in layouts)):
        rows = [i for i in range(n) if len(layouts[i]) > slot]
        drawn = [layouts[i][slot] for i in rows]
        kinds = np.array([SHAPES.index(shape[0]) for shape in drawn])
        rgb = np.array([shape[1] for shape in drawn])
        cx, cy, r = (np.array([shape[j] for shape in drawn])[:, None, None] for j in (2, 3, 4))
        mask = np.zeros((len(rows), len(axis), len(axis)), bool)
        for index, kind in enumerate(SHAPES):
            sel = kinds == index
            if sel.any():
                mask[sel] = shape_mask(kind, cx[sel], cy[sel], r[sel], axis[None, None, :], axis[None, :, None])
        # Fraction of each pixel's k x k samples inside (strided adds are
        # several times faster than a reduction over two inner axes).
        cover = np.zeros((len(rows), image_size, image_size))
        for a in range(k):
            for b in range(k):
                cover += mask[:, a::k, b::k]
        cover = cover[..., None] * (1.0 / (k * k))
        patch = images[rows]
        images[rows] = patch + (rgb[:, None, None, :] - patch) * cover
    return np.round(images).astype(np.uint8)


def _single_centre(where: str, r: float, u: np.ndarray) -> tuple[float, float]:
    """Centre in the named region from uniforms u[0], u[1] in [0, 1)."""
    if _WHERE[where] is None:
        return 0.45 + 0.1 * u[0], 0.45 + 0.1 * u[1]
    axis, sign = _WHERE[where]
    # Off-centre by at least 0.12 (clearly in the region) and at most what
    # keeps the shape inside the margin.
    reach = 0.5 - r - _MARGIN
    centre = [0.0, 0.0]
    centre[axis] = 0.5 + sign * (0.12 + (reach - 0.12) * u[0])
    centre[1 - axis] = 0.4 + 0.2 * u[1]
    return centre[0], centre[1]


def _pair_centres(relation: str, r1: float, r2: float, u: np.ndarray):
    """Centres of two non-overlapping shapes, the first on `relation`'s side.

    u: four uniforms in [0, 1).
    """
    axis, sign = _RELATIONS[relation]
    gap = 0.04
    low_r, high_r = (r1, r2) if sign < 0 else (r2, r1)
    # Free length along the axis, cut at two random points: space before the
    # low shape, extra space between the shapes, space after the high one.
    slack = 1.0 - 2 * _MARGIN - 2 * (low_r + high_r) - gap
    cut_a, cut_b = sorted((u[0] * slack, u[1] * slack))
    low = _MARGIN + cut_a + low_r
    high = low + low_r + gap + (cut_b - cut_a) + high_r
    first, second = (low, high) if sign < 0 else (high, low)
    c1, c2 = [0.0, 0.0], [0.0, 0.0]
    c1[axis], c2[axis] = first, second
    # Off-axis jitter kept small so the relation is unambiguous.
    c1[1 - axis] = 0.38 + 0.24 * u[2]
    c2[1 - axis] = 0.38 + 0.24 * u[3]
    return tuple(c1), tuple(c2)


def _plan_chunk(split: str, chunk: int, config: ShapesConfig) -> dict:
    """All random choices of one chunk of examples, drawn as arrays at once.

    Seeding per (seed, split, chunk) keeps any example reproducible without
    generating the examples before its chunk.
    """
    rng = np.random.default_rng((config.seed, _SPLIT_CODES[split], chunk))
    n, size = _CHUNK, config.image_size
    seen = np.asarray(SEEN_CLASSES)
    first = seen[rng.integers(len(seen), size=n)]
    # A different seen class: shift the first one's position by 1..len-1.
    shift = rng.integers(1, len(seen), size=n)
    second = seen[(np.searchsorted(seen, first) + shift) % len(seen)]
    if split == "test":
        # Cycle through all classes so the test split is balanced.
        first = (chunk * n + np.arange(n)) % len(CLASS_NAMES)
    return {
        "first": first,
        "second": second,
        "pair": (rng.uniform(size=n) < 0.5) & (split == "train"),
        "background": np.clip(
            rng.uniform(15, 70, size=(n, 1, 1)) + rng.normal(0.0, 4.0, size=(n, size, size)), 0, 255
        ),
        # Per-shape colour jitter; far smaller than the distances between
        # the named colours, so every pixel stays nearest its colour's name.
        "jitter": rng.uniform(-10, 10, size=(n, 2, 3)),
        "size": rng.integers(len(SIZES), size=n),
        "big": rng.integers(3, size=n),  # pair: first, second or none large
        "where": rng.integers(len(_WHERE), size=n),
        "relation": rng.integers(len(_RELATIONS), size=n),
        # Taken modulo either template count; the product keeps both uniform.
        "template": rng.integers(len(SINGLE_TEMPLATES) * len(PAIR_TEMPLATES), size=n),
        "u": rng.uniform(size=(n, 4)),
    }


def _rgb(colour: str, jitter: np.ndarray) -> np.ndarray:
    """The named colour plus its jitter (the sum stays inside 0..255)."""
    return np.asarray(COLOURS[colour], np.float64) + jitter


def with_articles(text: str) -> str:
    """'a orange circle' -> 'an orange circle' (captions and prompts alike)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _layout(plan: dict, i: int) -> tuple[list, str]:
    """Shapes [(kind, rgb, cx, cy, r), ...] and caption of example i of a plan."""
    colour1, kind1 = CLASS_NAMES[plan["first"][i]].split(" ")
    u, jitter = plan["u"][i], plan["jitter"][i]
    if plan["pair"][i]:
        colour2, kind2 = CLASS_NAMES[plan["second"][i]].split(" ")
        # At most one large shape, so the two always fit side by side.
        sizes = ["small", "small"]
        if plan["big"][i] < 2:
            sizes[plan["big"][i]] = "large"
        relation = list(_RELATIONS)[plan["relation"][i]]
        r1, r2 = SIZES[sizes[0]], SIZES[sizes[1]]
        c1, c2 = _pair_centres(relation, r1, r2, u)
        shapes = [(kind1, _rgb(colour1, jitter[0]), *c1, r1), (kind2, _rgb(colour2, jitter[1]), *c2, r2)]
        template = PAIR_TEMPLATES[plan["template"][i] % len(PAIR_TEMPLATES)]
        caption = template.format(
            size=sizes[0],
            colour=colour1,
            shape=kind1,
            relation=relation,
            size2=sizes[1],
            colour2=colour2,
            shape2=kind2,
        )
    else:
        size = list(SIZES)[plan["size"][i]]
        where = list(_WHERE)[plan["where"][i]]
        shapes = [(kind1, _rgb(colour1, jitter[0]), *_single_centre(where, SIZES[size], u), SIZES[size])]
        template = SINGLE_TEMPLATES[plan["template"][i] % len(SINGLE_TEMPLATES)]
        caption = template.format(size=size, colour=colour1, shape=kind1, where=where)
    return shapes, with_articles(caption)


def make_examples(split: str, count: int, config: ShapesConfig):
    """Yields (index, example) for the first `count` examples of `split`.

    example: image uint8 [S, S, 3], caption str, label int, unseen bool.
    """
    for chunk in range(-(-count // _CHUNK)):
        plan = _plan_chunk(split, chunk, config)
        size = min(_CHUNK, count - chunk * _CHUNK)
        layouts, captions = zip(*(_layout(plan, i) for i in range(size)), strict=True)
        images = render(layouts, config.image_size, plan["background"][:size])
        for i in range(size):
            label = int(plan["first"][i])
            yield (
                chunk * _CHUNK + i,
                {
                    "image": images[i],
                    "caption": captions[i],
                    "label": label,
                    "unseen": CLASS_NAMES[label] in UNSEEN,
                },
            )


def encode_png(image: np.ndarray) -> bytes:
    """Minimal RGB8 PNG writer (no filtering, fast zlib level).

    Several times faster than Pillow's encoder for 32x32 images and than
    tfds' TensorFlow-graph encoder (which also costs a ~10 s TF import).
    """
    height, width, _ = image.shape
    rows = np.zeros((height, 1 + width * 3), np.uint8)  # filter byte 0
    rows[:, 1:] = image.reshape(height, width * 3)

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


class ClipShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes with captions; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="32x32, 50k train, 2k test"),
        ShapesConfig(name="64px", image_size=64, description="64x64, 50k train, 2k test"),
        # For tests and smoke runs: prepares in about a second.
        ShapesConfig(name="small", num_train=4_000, num_test=400, description="32x32, 4k train, 400 test"),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "unseen": tfds.features.Scalar(dtype=np.bool_, doc="colour-shape pair absent from train"),
                }
            ),
            supervised_keys=("image", "caption"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test),
        }

    def _generate_examples(self, split: str, count: int):
        for index, example in make_examples(split, count, self.builder_config):
            example["image"] = encode_png(example["image"])
            yield index, example
