"""SigLIP 2 NaFlex image tower: images at their native aspect ratio as a variable number of patches.

Input (input/naflex.py makes it from a stored image, as transformers' Siglip2ImageProcessor does): a dict with
- 'patches' float32 [B, N, p*p*3]: the image resized to h x w patches of p pixels (aspect ratio kept, h*w <= N),
  each patch flattened in (row, column, channel) order, row-major over the patch grid, zero rows after h*w;
- 'patch_mask' bool [B, N]: True for the h*w real patches;
- 'spatial_shapes' int32 [B, 2]: (h, w) of each image.
The learned position table is a square G x G grid (G = model.image.image_size / patch); each image adds it resized
to its own h x w grid with the resampling of torch.nn.functional.interpolate(mode='bilinear', align_corners=False,
antialias=True), which is what transformers' Siglip2VisionEmbeddings does. Padded patches are masked out of every
attention in the encoder and of the MAP head's pooling, so they change no real patch's output.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from clip_jax.models import layers

INPUTS = ("patches", "patch_mask", "spatial_shapes")  # the keys of a NaFlex image batch


def _axis_weights(index, out_size, in_size: int):
    """Antialiased linear resampling weights [..., in_size] (float32) of output pixel `index` when in_size pixels
    are resized to `out_size` (index and out_size broadcast, integer arrays; traced values are fine).

    The rule of PyTorch's antialiased bilinear interpolation (aten UpSampleKernel, _compute_indices_weights_aa,
    the same as Pillow's BILINEAR resize): scale = in/out, the output pixel's centre in input coordinates is
    scale * (index + 0.5), and input pixel j weighs triangle((j + 0.5 - centre) / max(scale, 1)), the triangle
    widened by the scale when shrinking; the weights are normalised to sum to 1. An output pixel outside the image
    (index >= out_size) gets zero weights instead of a division by zero.
    """
    scale = in_size / out_size.astype(jnp.float32)
    inv = jnp.where(scale >= 1.0, 1.0 / scale, 1.0)
    centre = scale * (index.astype(jnp.float32) + 0.5)
    j = jnp.arange(in_size, dtype=jnp.float32)
    w = jnp.maximum(0.0, 1.0 - jnp.abs((j - centre[..., None] + 0.5) * inv[..., None]))
    total = w.sum(-1, keepdims=True)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def resize_pos_embedding(table, spatial_shapes, num_patches: int):
    """A square learned position table resized to each image's patch grid, laid out as its patches are.

    table: float [G*G, D] (row-major G x G grid); spatial_shapes: int [B, 2], (h, w) patches per image (h, w >= 1;
    0 is read as 1); num_patches: N, the patch axis length. Returns float32 [B, N, D]: row n < h*w holds the
    position (n // w, n % w) of the table resized to h x w as torch.nn.functional.interpolate(mode='bilinear',
    align_corners=False, antialias=True) resizes it (transformers' Siglip2VisionEmbeddings); rows n >= h*w are
    zero. Raises ValueError when the table's rows are not a square number.
    """
    grid = math.isqrt(table.shape[0])
    if grid * grid != table.shape[0]:
        raise ValueError(f"the position table has {table.shape[0]} rows, not a square grid")
    h = jnp.maximum(spatial_shapes[:, 0:1], 1)  # [B, 1]
    w = jnp.maximum(spatial_shapes[:, 1:2], 1)
    n = jnp.arange(num_patches)[None, :]
    valid = n < h * w  # [B, N]
    rows = _axis_weights(n // w, h, grid)  # [B, N, G]
    cols = _axis_weights(n % w, w, grid)
    # The separable resize as one weight per table row: each position mixes G*G table rows.
    mix = (rows[..., :, None] * cols[..., None, :]).reshape(*valid.shape, grid * grid)
    out = jnp.einsum("bnk,kd->bnd", mix, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.where(valid[..., None], out, 0.0)


class MaskedMAPHead(layers.MAPHead):
    """layers.MAPHead (the same parameters) whose probe attends only to the tokens where mask is True."""

    def __call__(self, x, mask=None):
        """x [B, N, width], mask bool [B, N] or None -> [B, width]."""
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1]))
        y = self.attn(probe, x, None if mask is None else mask[:, None, None, :])
        y = y + self.mlp(self.ln(y))
        return y[:, 0]


class NaFlexViT(nnx.Module):
    """Maps a NaFlex image batch (see the module docstring) to unnormalised features [B, width] (float32).

    cfg is the `model.image` ConfigDict: SigLIP 2's tower only (pool 'map', posemb 'learn', no pre-LN and no
    projection: the MAP head's output is the embedding); config_checks says so before this is built. Parameters
    have ViT's names and shapes (patch_embed, pos_embedding [G*G, width], encoder, map_head), so a fixed-resolution
    SigLIP checkpoint's tensors fit too. Raises ValueError for another option or a non-multiple image size.
    """

    def __init__(self, cfg, *, embed_dim, dtype, remat, rngs, scan=True):
        dims = layers.tower_dims(cfg, with_patch=True)
        width, patch = dims["width"], dims["patch_size"]
        wrong = {"pool": ("map", cfg.pool), "posemb": ("learn", cfg.posemb), "pre_ln": (False, cfg.get("pre_ln")),
                 "proj": (False, cfg.proj)}  # fmt: skip
        for key, (want, got) in wrong.items():
            if want != got:
                raise ValueError(f"the NaFlex tower needs model.image.{key}={want!r} (SigLIP 2's), got {got!r}")
        if cfg.image_size % patch or width != embed_dim:
            raise ValueError(
                f"the NaFlex tower needs image_size ({cfg.image_size}) a multiple of the patch ({patch}) and width "
                f"({width}) == embed_dim ({embed_dim})"
            )
        self.dtype, self.width, self.patch = dtype, width, patch
        self.grid = cfg.image_size // patch
        ln_eps, act = cfg.get("ln_eps", 1e-6), cfg.get("act", "gelu_tanh")
        self.patch_embed = layers.Dense(
            patch * patch * 3, width, ("patch", "embed"), dtype=dtype, rngs=rngs,
            init=nnx.initializers.lecun_normal(), use_bias=cfg.get("patch_bias", True),
        )  # fmt: skip
        normal = nnx.initializers.normal(0.02)
        self.pos_embedding = layers.param(rngs, normal, (self.grid * self.grid, width), ("pos", "embed"))
        self.encoder = layers.Encoder(
            width, dims["depth"], dims["mlp_dim"], dims["num_heads"], dtype=dtype, remat=remat, rngs=rngs,
            scan=scan, ln_eps=ln_eps, act=act,
        )  # fmt: skip
        self.map_head = MaskedMAPHead(
            width, dims["mlp_dim"], dims["num_heads"], dtype=dtype, rngs=rngs, ln_eps=ln_eps, act=act
        )

    def _inputs(self, images):
        if not isinstance(images, dict) or set(images) != set(INPUTS):
            what = (
                f"keys {sorted(images)}" if isinstance(images, dict) else f"shape {getattr(images, 'shape', '?')}"
            )
            raise ValueError(
                f"the NaFlex image tower takes {{{', '.join(INPUTS)}}} (input/naflex.py makes them; training feeds "
                f"square images, which only fixed-resolution towers take), got {what}"
            )
        patches, mask, shapes = (images[k] for k in INPUTS)
        b, n = mask.shape
        if patches.shape != (b, n, self.patch * self.patch * 3) or shapes.shape != (b, 2):
            raise ValueError(
                f"NaFlex inputs: patches {patches.shape}, patch_mask {mask.shape}, spatial_shapes {shapes.shape}; "
                f"need [B, N, {self.patch * self.patch * 3}], [B, N], [B, 2]"
            )
        return patches, mask.astype(bool), shapes.astype(jnp.int32)

    def features(self, images):
        """(token features after the final LayerNorm [B, N, width] in the compute dtype, patch mask bool [B, N])."""
        patches, mask, shapes = self._inputs(images)
        x = self.patch_embed(patches)
        pos = resize_pos_embedding(self.pos_embedding[...], shapes, mask.shape[1])
        x = x + pos.astype(self.dtype)
        return self.encoder(x, mask[:, None, None, :]), mask

    def __call__(self, images):
        x, mask = self.features(images)
        return self.map_head(x, mask).astype(jnp.float32)
