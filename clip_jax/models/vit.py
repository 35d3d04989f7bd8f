"""ViT image tower: patches -> position embeddings -> (optional LayerNorm) -> pre-LN encoder -> pooling ->
optional projection."""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from clip_jax.models import layers

POOLS = ("cls", "gap", "map")
POSEMBS = ("learn", "sincos2d")


class ViT(nnx.Module):
    """Maps float32 images [B,H,W,3] to unnormalised features [B, embed_dim] (float32).

    cfg is the `model.image` ConfigDict; embed_dim, dtype, remat and scan come from `model`.
    """

    def __init__(self, cfg, *, embed_dim, dtype, remat, rngs, scan=True):
        dims = layers.tower_dims(cfg, with_patch=True)
        if cfg.pool not in POOLS:
            raise ValueError(f"model.image.pool={cfg.pool!r}; valid: {list(POOLS)}")
        if cfg.posemb not in POSEMBS:
            raise ValueError(f"model.image.posemb={cfg.posemb!r}; valid: {list(POSEMBS)}")
        width, patch = dims["width"], dims["patch_size"]
        if cfg.image_size < patch:
            raise ValueError(f"model.image.image_size={cfg.image_size} is smaller than the patch size {patch}")
        if not cfg.proj and width != embed_dim:
            raise ValueError(f"model.image.proj=False needs width == embed_dim, got {width} != {embed_dim}")
        self.dtype, self.width, self.patch = dtype, width, patch
        self.image_size, self.pool, self.posemb = cfg.image_size, cfg.pool, cfg.posemb
        # An image size that is not a multiple of the patch (SigLIP so400m-patch14-384: 27 x 14 = 378 of 384 pixels)
        # leaves its last rows and columns unseen, as the reference's stride-p, unpadded convolution does.
        self.grid = cfg.image_size // patch
        # Options that imported models need (HF CLIP / SigLIP); .get keeps sub-configs written before them working.
        ln_eps, act = cfg.get("ln_eps", 1e-6), cfg.get("act", "gelu_tanh")
        # A stride-p conv with a p x p kernel is exactly a Dense on flattened (row, col, channel) patches.
        self.patch_embed = layers.Dense(
            patch * patch * 3,
            width,
            ("patch", "embed"),
            dtype=dtype,
            rngs=rngs,
            init=nnx.initializers.lecun_normal(),
            use_bias=cfg.get("patch_bias", True),
        )
        with_cls = cfg.pool == "cls"
        normal = nnx.initializers.normal(0.02)
        self.cls = layers.param(rngs, normal, (width,), ("embed",)) if with_cls else None
        n_pos = self.grid * self.grid + with_cls
        self.pos_embedding = (
            layers.param(rngs, normal, (n_pos, width), ("pos", "embed")) if cfg.posemb == "learn" else None
        )
        # OpenAI CLIP normalises the embedded tokens before the first block (its ln_pre / HF's pre_layrnorm).
        self.ln_pre = (
            layers.LayerNorm(width, dtype=dtype, rngs=rngs, eps=ln_eps) if cfg.get("pre_ln", False) else None
        )
        self.encoder = layers.Encoder(
            width,
            dims["depth"],
            dims["mlp_dim"],
            dims["num_heads"],
            dtype=dtype,
            remat=remat,
            rngs=rngs,
            scan=scan,
            ln_eps=ln_eps,
            act=act,
        )
        self.map_head = (
            layers.MAPHead(
                width, dims["mlp_dim"], dims["num_heads"], dtype=dtype, rngs=rngs, ln_eps=ln_eps, act=act
            )
            if cfg.pool == "map"
            else None
        )
        # With a bias by default (as big_vision's heads); OpenAI CLIP's projection has none (proj_bias=False).
        self.proj = (
            layers.Dense(
                width,
                embed_dim,
                ("embed", "joint"),
                dtype=dtype,
                rngs=rngs,
                init=nnx.initializers.lecun_normal(),
                use_bias=cfg.get("proj_bias", True),
            )
            if cfg.proj
            else None
        )

    def _patchify(self, images):
        b, h, w, c = images.shape
        if (h, w, c) != (self.image_size, self.image_size, 3):
            raise ValueError(f"images must be [B,{self.image_size},{self.image_size},3], got {images.shape}")
        g, p = self.grid, self.patch
        x = images[:, : g * p, : g * p].reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * g, p * p * c)

    def features(self, images):
        """Token features after the final LayerNorm: [B, N(+1 with cls), width] in the compute dtype."""
        x = self.patch_embed(self._patchify(images))
        if self.posemb == "sincos2d":
            # Fixed embeddings cover the patches only; the cls token (if any) gets none.
            x = x + jnp.asarray(layers.posemb_sincos_2d(self.grid, self.grid, self.width), self.dtype)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding[...].astype(self.dtype)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return self.encoder(x)

    def __call__(self, images):
        x = self.features(images)
        if self.pool == "cls":
            x = x[:, 0]
        elif self.pool == "gap":
            x = x.astype(jnp.float32).mean(axis=1).astype(self.dtype)
        else:
            x = self.map_head(x)
        if self.proj is not None:
            x = self.proj(x)
        return x.astype(jnp.float32)


def resample_pos_embedding(table: np.ndarray, extra_tokens: int, grid: int) -> np.ndarray:
    """A learned position-embedding table at another patch grid, for a model run at another image size.

    table: [extra_tokens + g * g, width] (the cls token's row first, when there is one), g the old grid side.
    Returns float32 [extra_tokens + grid * grid, width]: the extra rows unchanged, the g x g grid of each channel
    resized to grid x grid with Pillow's bicubic filter, which is what open_clip's resize_pos_embed computes
    (torch.nn.functional.interpolate, mode='bicubic', antialias=True, align_corners=False: the antialiased path
    reproduces Pillow's filter). Raises ValueError when the rows do not form a square grid.
    """
    table = np.asarray(table, np.float32)
    side = math.isqrt(len(table) - extra_tokens)
    if side * side != len(table) - extra_tokens:
        raise ValueError(f"{len(table)} position rows are not {extra_tokens} extra rows plus a square grid")
    patches = table[extra_tokens:].reshape(side, side, -1)
    out = np.stack(
        [
            np.asarray(Image.fromarray(patches[:, :, c]).resize((grid, grid), Image.Resampling.BICUBIC))
            for c in range(patches.shape[-1])
        ],
        axis=-1,
    )
    return np.concatenate([table[:extra_tokens], out.reshape(grid * grid, -1)])

