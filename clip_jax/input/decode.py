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
    # A side over 4x the image size. Evaluation decodes such JPEGs at reduced scale (>= 4x the size, draft mode);
    # training reduces any JPEG as far as its crop allows (cropped), counted here by the same rule.
    "large_image",
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


def _open(data: bytes, size: int, min_side: int, pick=None) -> tuple[Image.Image | None, tuple | None, int]:
    """Decoded, upright image (any mode) or None, the box `pick` chose mapped into its pixels (None without
    `pick`), and the issue bits. Without `pick` (evaluation), a JPEG with a side over 4 * size is decoded at the
    reduction that keeps >= 4 * size; with it, at the largest that keeps the picked crop >= size (see _draft)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return None, None, BIT["oversized_image"]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, None, BIT["undecodable_image"]
    if min(img.size) < min_side:
        return None, None, BIT["tiny_image"]
    bits = BIT["large_image"] if max(img.size) > 4 * size else 0
    plan = None
    if pick is not None:
        plan = _draft(img, size, pick)
    elif bits:  # JPEG decodes at 1/2, 1/4, 1/8 scale for a fraction of the cost: >= 4x keeps detail for any use
        img.draft("RGB", (4 * size, 4 * size))
    try:
        img.load()
    except OSError as e:
        return None, None, BIT["truncated_image" if "truncated" in str(e) else "undecodable_image"]
    except Exception:  # noqa: BLE001  Pillow plugins raise many types on corrupt data; any of them is one skip
        return None, None, BIT["undecodable_image"]
    bits |= _upright(img)  # after draft mode: the reduced image is turned, whatever its scale
    if pick is None:
        return img, None, bits
    if plan is None:  # not a JPEG: the box is drawn on the decoded, upright image
        top, left, h, w = pick(img.size[1], img.size[0])
        return img, (left, top, left + w, top + h), bits
    return img, _box_in(img.size, *plan), bits


# EXIF orientation -> whether the upright image's (x, y) axes run backwards through the stored pixels (Pillow's
# exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 270, 7 transverse, 8 rotate 90).
_REVERSED = {2: (1, 0), 3: (1, 1), 4: (0, 1), 6: (1, 0), 7: (1, 1), 8: (0, 1)}


def _orientation(img: Image.Image) -> int:
    """The EXIF Orientation (1..8) a JPEG's header declares, read before decoding; 1 if absent or unreadable
    (exactly when exif_transpose leaves the pixels as stored)."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001  corrupt EXIF: _upright counts it
        return 1
    return int(value) if isinstance(value, (int, float)) and value in range(1, 9) else 1


def _draft(img: Image.Image, size: int, pick) -> tuple | None:
    """For a JPEG, before decoding: the crop box drawn by pick(height, width) on the upright full-size image, and
    draft mode set to the largest DCT reduction 1/s (s in 8, 4, 2) that leaves that crop >= size pixels on both
    sides. Returns (box, upright full size, s, orientation), or None for other formats (drawn after decoding)."""
    if img.format != "JPEG":
        return None
    orientation = _orientation(img)
    w, h = img.size[::-1] if orientation >= 5 else img.size  # 5..8 swap width and height
    box = pick(h, w)
    s = next((s for s in (8, 4, 2) if min(box[2], box[3]) >= s * size), 1)
    if s > 1:
        img.draft("RGB", (img.size[0] // s, img.size[1] // s))  # Pillow picks the scale s for exactly this size
    return box, (w, h), s, orientation


def _box_in(decoded: tuple, box: tuple, full: tuple, s: int, orientation: int) -> tuple:
    """(top, left, height, width) in the upright full-size image -> Pillow's (left, upper, right, lower) in the
    upright decoded one. A JPEG decoded at 1/s maps stored pixel x to x / s, its size rounded up; an upright axis
    that runs backwards through the stored pixels is shifted by that rounding. If the decoded size is not the
    expected one (draft mode refused), the box scales with the sizes."""
    top, left, h, w = box
    expected = (-(-full[0] // s), -(-full[1] // s))
    if decoded != expected:
        fx, fy, ox, oy = decoded[0] / full[0], decoded[1] / full[1], 0.0, 0.0
    else:
        rx, ry = _REVERSED.get(orientation, (0, 0))
        fx = fy = 1.0 / s
        ox, oy = rx * (decoded[0] - full[0] / s), ry * (decoded[1] - full[1] / s)
    if (fx, fy, ox, oy) == (1.0, 1.0, 0.0, 0.0):
        return left, top, left + w, top + h  # full scale: whole pixels
    return left * fx + ox, top * fy + oy, (left + w) * fx + ox, (top + h) * fy + oy


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
    img, _, bits = _encoded(value, size, min_side, None)
    return (None if img is None else np.asarray(img, np.uint8)), bits


def cropped(value, size: int, min_side: int, pick) -> tuple[Image.Image | None, tuple | None, int]:
    """A training crop's source: (upright RGB Pillow image or None, crop box, issue bits); never raises.

    `value` as for `image` (same conversions, issues and skips). pick(height, width) -> (top, left, crop height,
    crop width) draws the crop on the upright full-size image, before any pixel is decoded for a JPEG, which is
    then decoded at the largest DCT reduction 1/2, 1/4 or 1/8 (Pillow's draft mode) that leaves the crop at >=
    `size` pixels on both sides. The box is Pillow's (left, upper, right, lower) in the returned image's pixels:
    whole pixels at full scale, else fractional (the crop's exact place in the reduced image).
    """
    if isinstance(value, np.ndarray) and value.dtype != object:
        rgb, bits = _array_to_rgb(value, min_side)
        if rgb is None:
            return None, None, bits
        top, left, h, w = pick(rgb.shape[0], rgb.shape[1])
        return Image.fromarray(rgb), (left, top, left + w, top + h), bits
    return _encoded(value, size, min_side, pick)


def _encoded(value, size: int, min_side: int, pick) -> tuple[Image.Image | None, tuple | None, int]:
    if isinstance(value, np.ndarray):  # a 0-d object array holding the bytes
        value = value.item()
    if not isinstance(value, (bytes, bytearray)) or not value:
        return None, None, BIT["undecodable_image"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Pillow's per-file warnings (EXIF, decompression bomb) become counts
        img, box, bits = _decode(bytes(value), size, min_side, pick)
    return img, box, bits | (BIT["bad_exif"] if any(_exif_warning(w) for w in caught) else 0)


def _decode(data: bytes, size: int, min_side: int, pick) -> tuple[Image.Image | None, tuple | None, int]:
    img, box, bits = _open(data, size, min_side, pick)
    if img is None:
        return None, None, bits
    try:
        img, more = _to_rgb(img)
    except Exception:  # noqa: BLE001  a conversion of a half-valid file is one skip, not a crash
        return None, None, BIT["undecodable_image"]
    return img, box, bits | more


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
