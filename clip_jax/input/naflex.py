"""NaFlex evaluation preprocessing (SigLIP 2 NaFlex, models/naflex.py): a decoded image -> its patches at native
aspect ratio, padded to a fixed count, with the patch mask and the patch grid's shape.

The rule is transformers' Siglip2ImageProcessor (PIL backend; big_vision's NaFlex preprocessing): the image is
resized, aspect ratio kept, to the largest size whose sides are multiples of the patch size p and whose patch count
fits max_patches (at least one patch per side); rescaled and normalised as (x/255 - mean) / std; cut into p x p
patches in row-major grid order, each flattened as (row, column, channel); padded with zero patches to
max_patches. input/eval_data.py calls `eval_patches` for every evaluator when the model is NaFlex.
"""

import math

import numpy as np
from PIL import Image

from clip_jax.input import ops

# The scale search of the reference: bisection over [TOL / 10, 100] until the bracket is narrower than TOL.
TOL, MAX_SCALE = 1e-5, 100.0


def _side(length: int, scale: float, patch: int) -> int:
    """A side scaled by `scale`, rounded up to whole patches, at least one patch (pixels)."""
    return max(patch, math.ceil(length * scale / patch) * patch)


def target_size(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """(height, width) in pixels that an image of height x width pixels is resized to: both multiples of `patch`,
    (height/patch) * (width/patch) <= max_patches, from the largest scale (at most 100x) that fits, found as
    Siglip2ImageProcessor finds it (its bisection and tolerance, so the sizes are the same even where a step of
    the patch count lies within the tolerance). A side is at least one patch even when that exceeds the budget."""
    lo, hi = TOL / 10, MAX_SCALE
    while hi - lo >= TOL:
        mid = (lo + hi) / 2
        count = (_side(height, mid, patch) / patch) * (_side(width, mid, patch) / patch)
        lo, hi = (mid, hi) if count <= max_patches else (lo, mid)
    return _side(height, lo, patch), _side(width, lo, patch)


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, C] with H and W multiples of `patch` -> [(H/p) * (W/p), p * p * C], patches in row-major order, each
    flattened as (row, column, channel): the order of Siglip2ImageProcessor and of the ViT's patch embedding."""
    h, w, c = image.shape
    grid = image.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape((h // patch) * (w // patch), patch * patch * c)


def eval_patches(rgb: np.ndarray, patch: int, max_patches: int, mean, std, resample: str) -> dict:
    """uint8 [H, W, 3] -> the NaFlex model's input for one image: {'patches': float32 [max_patches, p*p*3],
    'patch_mask': bool [max_patches] (True for the image's patches), 'spatial_shapes': int32 [2] (patch rows,
    patch columns)}. Resized with Pillow's `resample` filter (an ops.RESAMPLE name; the reference's default is
    bilinear) on uint8, as the reference's PIL backend; then (x/255 - mean) / std. Raises ValueError for an
    unknown filter name."""
    if resample not in ops.RESAMPLE:
        raise ValueError(f"resample filter {resample!r} is not one of {tuple(ops.RESAMPLE)} (set data.resample)")
    h, w = target_size(rgb.shape[0], rgb.shape[1], patch, max_patches)
    if (h, w) != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), ops.RESAMPLE[resample]))
    tokens = patchify(ops.to_float(rgb, mean, std), patch)
    n = len(tokens)
    if n > max_patches:  # a side over 10^6 patches even at the smallest scale searched
        raise ValueError(
            f"a {rgb.shape[0]}x{rgb.shape[1]} image needs {n} patches, over max_patches={max_patches}"
        )
    patches = np.zeros((max_patches, tokens.shape[1]), np.float32)
    patches[:n] = tokens
    mask = np.arange(max_patches) < n
    return {"patches": patches, "patch_mask": mask, "spatial_shapes": np.array([h // patch, w // patch], np.int32)}


def empty(patch: int, max_patches: int, rows: int) -> dict:
    """Zero storage for `rows` images (eval batches' padding rows keep it): no patch, a 0 x 0 grid."""
    return {
        "patches": np.zeros((rows, max_patches, patch * patch * 3), np.float32),
        "patch_mask": np.zeros((rows, max_patches), bool),
        "spatial_shapes": np.zeros((rows, 2), np.int32),
    }
