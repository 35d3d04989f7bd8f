"""Turning one stored record's image and caption into clean inputs, or a reason to skip it.

Web-scale image-text data is dirty: files that do not decode or stop halfway, grey / CMYK / transparent /
palette images, phone photos stored sideways with an EXIF orientation tag, thumbnails and 50-megapixel scans,
captions that are empty, not UTF-8 or a whole web page.
Every function here returns its result together with an `issues` bit mask, so one bad record costs one skipped
example and a count in the log, never a crash. Bits in SKIPPED mean "drop the example"; the others say what was
converted. The pipeline sums the bits per kind (see pipeline.GoodBatches) and logs the totals.
"""

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Reasons to drop an example; then conversions that keep it. The order is the order of the counts array.
SKIP_KINDS = (
    "unreadable_record",  # the storage layer could not return the record at all
    "undecodable_image",  # not an image file Pillow knows (garbage bytes, HTML error page, empty file)
    "truncated_image",  # a valid header but the pixel data stops early
    "oversized_image",  # more pixels than Pillow's decompression-bomb guard allows
    "tiny_image",  # a side shorter than data.min_image_size: nothing left to learn after upscaling
    "missing_caption",  # no caption value at all
    "empty_caption",  # only whitespace, or no token left after the tokenizer's cleaning: all would share one text
)
CONVERT_KINDS = (
    "grayscale_image",  # L / 1 / LA / one channel: repeated to three channels
    "cmyk_image",  # print-workflow JPEGs
    "alpha_image",  # any transparency (alpha band, tRNS colour, transparent palette entry): composited over white
    "palette_image",  # GIF-style indexed colours (with or without a transparent index)
    "other_mode_image",  # 16-bit, float, YCbCr, LAB, ...
    "large_image",  # a side over 4x the training size: decoded at reduced scale (JPEG draft mode)
    "rotated_image",  # an EXIF Orientation tag other than 1: turned upright, as photo viewers show it
    "bad_exif",  # EXIF data Pillow could only partly read (or not at all): what it read is used, the rest ignored
    "non_utf8_caption",  # bytes that are not UTF-8: decoded with replacement characters
    "clipped_caption",  # longer than any tokenizer could use: cut before tokenizing
)
KINDS = SKIP_KINDS + CONVERT_KINDS
BIT = {kind: 1 << i for i, kind in enumerate(KINDS)}
SKIP_MASK = sum(BIT[k] for k in SKIP_KINDS)
UNREADABLE = "__unreadable__"  # the key of the marker record that replaces one the storage could not read
_CHARS_PER_TOKEN = 16  # generous: real captions average ~4-5 characters per BPE token


def issue_names(bits: int) -> list[str]:
    return [k for k in KINDS if bits & BIT[k]]


def _white_background(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")  # Pillow turns an alpha band or info["transparency"] into the alpha channel
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


_MODE_KIND = {"1": "grayscale_image", "L": "grayscale_image", "LA": "grayscale_image", "La": "grayscale_image"}
_MODE_KIND.update({"P": "palette_image", "PA": "palette_image", "CMYK": "cmyk_image"})
_COLOUR_MODES = ("RGB", "RGBA", "RGBa")  # no conversion to count beyond their alpha


def _has_transparency(img: Image.Image) -> bool:
    """An alpha band (premultiplied or not) or a transparent colour / palette entry (PNG tRNS, GIF)."""
    return not {"A", "a"}.isdisjoint(img.getbands()) or img.info.get("transparency") is not None


def _wide_to_grey(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grey -> L, or LA when a transparent grey value is set (Pillow clips these modes on
    convert and ignores their tRNS value, so both are done here: values scaled to 0..255, the exact match of
    info["transparency"] made fully transparent)."""
    raw = np.asarray(img)
    arr = raw.astype(np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    grey = Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8))
    value = img.info.get("transparency")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return grey
    return Image.merge("LA", (grey, Image.fromarray(np.where(raw == value, 0, 255).astype(np.uint8))))


def _to_rgb(img: Image.Image) -> tuple[Image.Image, int]:
    """Any Pillow mode -> RGB, with the bits naming the conversions. Whatever the mode, an image carrying
    transparency is composited over opaque white (as transformers' convert_to_rgb does) and counted."""
    mode = img.mode
    bits = 0 if mode in _COLOUR_MODES else BIT[_MODE_KIND.get(mode, "other_mode_image")]
    if mode.startswith("I;16") or mode in ("I", "F"):
        img = _wide_to_grey(img)
    if _has_transparency(img):
        return _white_background(img), bits | BIT["alpha_image"]
    return (img if img.mode == "RGB" else img.convert("RGB")), bits


def _upright(img: Image.Image) -> int:
    """Turns a loaded image upright in place by its EXIF Orientation tag (Pillow's ImageOps.exif_transpose, as
    transformers' load_image does); returns the issue bits. If Pillow raises on corrupt EXIF, the pixels are kept
    as stored and the image counted as bad_exif."""
    try:
        turned = img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001  corrupt EXIF raises many types inside Pillow's TIFF parser
        return BIT["bad_exif"]
    return BIT["rotated_image"] if turned else 0


def _exif_warning(w: warnings.WarningMessage) -> bool:
    """Pillow skips EXIF (TIFF-structured) data it cannot read with a warning: one per bad file."""
    return w.filename.endswith("TiffImagePlugin.py") or "exif" in str(w.message).lower()


def _open(data: bytes, size: int, min_side: int) -> tuple[Image.Image | None, int]:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return None, BIT["oversized_image"]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, BIT["undecodable_image"]
    if min(img.size) < min_side:
        return None, BIT["tiny_image"]
    bits = 0
    if max(img.size) > 4 * size:
        bits |= BIT["large_image"]
        # JPEG can decode at 1/2, 1/4, 1/8 scale for a fraction of the cost; keep >= 4x the training size so a
        # small random crop still has full resolution.
        img.draft("RGB", (4 * size, 4 * size))
    try:
        img.load()
    except OSError as e:
        return None, BIT["truncated_image" if "truncated" in str(e) else "undecodable_image"]
    except Exception:  # noqa: BLE001  Pillow plugins raise many types on corrupt data; any of them is one skip
        return None, BIT["undecodable_image"]
    return img, bits | _upright(img)  # after draft mode: the reduced image is turned, whatever its scale


def _array_to_rgb(arr: np.ndarray, min_side: int) -> tuple[np.ndarray | None, int]:
    """An already decoded array (tfds Image features, in-memory caches) -> uint8 HxWx3."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        return None, BIT["undecodable_image"]
    if min(arr.shape[:2]) < min_side:
        return None, BIT["tiny_image"]
    bits = 0
    if arr.dtype != np.uint8:
        bits |= BIT["other_mode_image"]
        top = 65535.0 if arr.dtype == np.uint16 else (1.0 if arr.dtype.kind == "f" else 255.0)
        arr = np.clip(np.round(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    channels = arr.shape[-1]
    if channels in (2, 4):  # LA / RGBA: over white by the same Pillow compositing as encoded images
        arr = np.asarray(_white_background(Image.fromarray(np.ascontiguousarray(arr))))
        bits |= BIT["alpha_image"] | (BIT["grayscale_image"] if channels == 2 else 0)
    elif channels == 1:
        arr = np.repeat(arr, 3, axis=-1)
        bits |= BIT["grayscale_image"]
    return arr, bits


def image(value, size: int, min_side: int) -> tuple[np.ndarray | None, int]:
    """Stored image -> (uint8 [H, W, 3] or None, issue bits); never raises: a bad image is None with a SKIP bit.

    `value`: encoded bytes (any format Pillow reads; a 0-d object array holding them), or an already decoded
    uint8 / uint16 / float (0..1) array [H, W] or [H, W, C], C in 1..4. Encoded images are turned upright by their
    EXIF Orientation tag (Pillow's ImageOps.exif_transpose) and JPEGs with a side over 4 * `size` are decoded at
    reduced scale (draft mode). Any transparency (alpha band, PNG tRNS colour of an RGB / grey / 16-bit image,
    transparent palette entry; an array's 2nd or 4th channel) is composited over opaque white by Pillow, in
    both paths alike. Images with a side under `min_side` are skipped as tiny_image.
    """
    if isinstance(value, np.ndarray) and value.dtype != object:
        return _array_to_rgb(value, min_side)
    if isinstance(value, np.ndarray):  # a 0-d object array holding the bytes
        value = value.item()
    if not isinstance(value, (bytes, bytearray)) or not value:
        return None, BIT["undecodable_image"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Pillow's per-file warnings (EXIF, decompression bomb) become counts
        rgb, bits = _decode(bytes(value), size, min_side)
    return rgb, bits | (BIT["bad_exif"] if any(_exif_warning(w) for w in caught) else 0)


def _decode(data: bytes, size: int, min_side: int) -> tuple[np.ndarray | None, int]:
    img, bits = _open(data, size, min_side)
    if img is None:
        return None, bits
    try:
        img, more = _to_rgb(img)
    except Exception:  # noqa: BLE001  a conversion of a half-valid file is one skip, not a crash
        return None, BIT["undecodable_image"]
    return np.asarray(img, np.uint8), bits | more


def caption(value, max_tokens: int, rng: np.random.Generator | None = None) -> tuple[str | None, int]:
    """Stored caption(s) -> (text or None, issue bits). Several captions (a list, as in COCO): one at random among
    the non-blank ones."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        choices = [v for v in value if v is not None]
        if not choices:
            return None, BIT["missing_caption"]
        written = [v for v in choices if not isinstance(v, (str, bytes, bytearray)) or v.strip()]
        if not written:
            return None, BIT["empty_caption"]
        choices = written  # a blank one among several is never the one drawn
        value = choices[int(rng.integers(len(choices))) if rng is not None and len(choices) > 1 else 0]
    if value is None:
        return None, BIT["missing_caption"]
    bits = 0
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            value, bits = bytes(value).decode("utf-8", errors="replace"), BIT["non_utf8_caption"]
    text = str(value)
    limit = _CHARS_PER_TOKEN * max_tokens
    if len(text) > limit:  # a tokenizer would throw the rest away; cutting first bounds its work
        text, bits = text[:limit], bits | BIT["clipped_caption"]
    if not text.strip():
        return None, bits | BIT["empty_caption"]
    return text, bits
