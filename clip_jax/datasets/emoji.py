"""`clip_emoji`: every single-codepoint emoji of Noto Color Emoji, drawn by Pillow, captioned by its Unicode name.

About 1,400 real drawn images (faces, animals, food, flags' letters, objects, signs), each with a distinct
caption: an image-text retrieval set that needs no download beyond the Debian font package
`fonts-noto-color-emoji` (installed, or fetched with `apt-get download` and unpacked without root, see
debian.py). Noto's NotoColorEmoji.ttf is a CBDT bitmap font whose glyphs exist only at size 109 and are drawn in
colour with `embedded_color=True`.

Which codepoints: those in RANGES that Unicode names (`unicodedata.name`), that are not combining marks,
format characters or skin-tone modifiers, and whose glyph the font has. A glyph is "missing" when it draws
nothing or draws the font's .notdef glyph (what a private-use codepoint draws), so any font works, colour or
outline (the tests use DejaVu Sans's symbols). Each glyph is centred on white with a small margin and resized
to `image_size` (Lanczos). Captions: the lower-cased name in a template ("an emoji of grinning face", "a
grinning face icon", ...), one per image chosen by the seed; the test split always uses the first template,
so retrieval queries are plain. `name` holds the bare lower-cased name. A seeded ~20% of the emoji form `test`.
"""

from __future__ import annotations

import dataclasses
import os
import unicodedata

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from clip_jax.datasets import debian, shapes

PACKAGE = "fonts-noto-color-emoji"
FONT_FILE = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CBDT_SIZE = 109  # the one size NotoColorEmoji's bitmaps come in
# Latin-1 signs (copyright, registered), general punctuation to symbols and arrows, CJK symbols, and the
# supplementary emoji planes (mahjong tiles to symbols-and-pictographs-extended-A).
RANGES = ((0x00A9, 0x00AE), (0x2000, 0x2BFF), (0x3000, 0x33FF), (0x1F000, 0x1FAFF))
# Combining marks, format/control characters, spaces, private use, unassigned and modifier symbols (the
# skin-tone swatches): not pictures of anything on their own.
_SKIP_CATEGORIES = frozenset({"Mn", "Me", "Cf", "Cc", "Zs", "Co", "Cn", "Sk"})
_NOTDEF_PROBE = "\U0010fffd"  # private use: no font maps it, so it draws the font's .notdef glyph
CAPTION_TEMPLATES = (
    "an emoji of {}",
    "{} emoji",
    "a {} icon",
    "a picture of {}",
    "{}",
)
TEST_FRACTION = 0.2
_MARGIN = 0.08  # of the glyph's longer side, on each side


@dataclasses.dataclass(eq=False)
class EmojiConfig(tfds.core.BuilderConfig):
    """`font_path` ('' = the Debian Noto Color Emoji), `font_size` (109 for that CBDT font), `ranges` of
    codepoints to try, output `image_size`, and the `seed` of split and captions."""

    font_path: str = ""
    font_size: int = CBDT_SIZE
    ranges: tuple = RANGES
    image_size: int = 64
    seed: int = 0


def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one codepoint needs no shaping, and raqm fails outright on some codepoints of this font.
    try:
        return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)
    except OSError as e:
        raise ValueError(f"cannot load font {path} at size {size} ({e}); CBDT emoji fonts need size 109") from None


def glyph(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray | None:
    """The glyph of `char` as uint8 RGBA cropped to its ink (black ink for outline fonts), or None if empty."""
    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    canvas = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), char, font=font, fill=(0, 0, 0, 255), embedded_color=True)
    pixels = np.asarray(canvas)
    return pixels if pixels[..., 3].any() else None


def codepoints(font: ImageFont.FreeTypeFont, ranges) -> list[int]:
    """The codepoints in `ranges` that are named, pictorial and drawn by `font` (see the module docstring)."""
    notdef = glyph(font, _NOTDEF_PROBE)
    found = []
    for low, high in ranges:
        for code in range(low, high + 1):
            char = chr(code)
            if unicodedata.category(char) in _SKIP_CATEGORIES or not unicodedata.name(char, ""):
                continue
            pixels = glyph(font, char)
            if pixels is not None and (notdef is None or not np.array_equal(pixels, notdef)):
                found.append(code)
    return found


def render(font: ImageFont.FreeTypeFont, char: str, size: int) -> np.ndarray:
    """`char` centred on white, [size, size, 3] uint8."""
    pixels = glyph(font, char)
    if pixels is None:
        raise ValueError(f"the font draws nothing for U+{ord(char):04X}")
    h, w = pixels.shape[:2]
    side = round(max(h, w) * (1 + 2 * _MARGIN))
    sheet = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    sheet.alpha_composite(Image.fromarray(pixels, "RGBA"), ((side - w) // 2, (side - h) // 2))
    return np.asarray(sheet.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


def name(code: int) -> str:
    return unicodedata.name(chr(code)).lower()


def caption(code: int, template: int) -> str:
    return CAPTION_TEMPLATES[template].format(name(code))


def split_codepoints(codes: list[int], seed: int) -> dict[str, list[int]]:
    order = np.random.default_rng(seed).permutation(len(codes))
    test = set(order[: round(TEST_FRACTION * len(codes))].tolist())
    return {
        "train": [c for i, c in enumerate(codes) if i not in test],
        "test": [c for i, c in enumerate(codes) if i in test],
    }


class ClipEmoji(tfds.core.GeneratorBasedBuilder):
    """Rendered emoji with their Unicode names; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [EmojiConfig(name="default", description="64x64 RGB from Noto Color Emoji")]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "name": tfds.features.Text(doc="unicodedata.name, lower-cased"),
                    "codepoint": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "caption"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        path = cfg.font_path or debian.package_path(
            PACKAGE, FONT_FILE, os.path.join(dl_manager.download_dir, "debian")
        )
        font = load_font(path, cfg.font_size)
        codes = codepoints(font, cfg.ranges)
        if not codes:
            raise ValueError(f"{path} draws none of the codepoints in {cfg.ranges}; is it the right font?")
        return {
            split: self._generate_examples(font, part, split)
            for split, part in split_codepoints(codes, cfg.seed).items()
        }

    def _generate_examples(self, font, codes, split):
        cfg = self.builder_config
        templates = np.random.default_rng((cfg.seed, 1)).integers(len(CAPTION_TEMPLATES), size=len(codes))
        for i, code in enumerate(codes):
            yield (
                code,
                {
                    "image": shapes.encode_png(render(font, chr(code), cfg.image_size)),
                    "caption": caption(code, int(templates[i]) if split == "train" else 0),
                    "name": name(code),
                    "codepoint": code,
                },
            )
