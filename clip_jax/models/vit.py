"""ViT image tower: patches -> position embeddings -> (training: FLIP patch dropout) -> (optional LayerNorm) ->
pre-LN encoder -> pooling -> optional projection."""

import math

import jax
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
        # FLIP (Li et al. 2023): a random fraction of the patch tokens is dropped in training (see features()).
        self.patch_dropout = cfg.get("patch_dropout", 0.0)
        if not 0 <= self.patch_dropout < 1:
            raise ValueError(f"model.image.patch_dropout={self.patch_dropout} must be in [0, 1)")
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

    def kept_patches(self, patch_keys):
        """The patches FLIP patch dropout keeps: int32 [B, keep] indices into the N = grid * grid patches
        (row-major, the class token not counted), ascending, keep = max(1, int(N * (1 - patch_dropout)))
        (open_clip's PatchDropout count). Example b keeps the `keep` patches of lowest uniform noise drawn with
        patch_keys[b]: a uniformly random subset that depends on that example's key only, not on its batch.

        patch_keys: uint32 [B, 2], one PRNG key per example (raw jax.random key data)."""
        n = self.grid * self.grid
        keep = max(1, int(n * (1 - self.patch_dropout)))
        noise = jax.vmap(lambda key: jax.random.uniform(key, (n,)))(patch_keys)
        return jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1)

    def _drop_patches(self, x, patch_keys):
        """x [B, cls + N, width] (position embeddings added) -> [B, cls + keep, width]: the class token, then the
        kept patches in their original order (any order gives the same outputs: attention is permutation-
        equivariant once the position embeddings are added, and every pooling is permutation-invariant)."""
        n_cls = int(self.cls is not None)
        with jax.named_scope("patch_dropout"):  # names its ops in the compiled program (tests read them)
            idx = self.kept_patches(patch_keys)
            patches = jnp.take_along_axis(x[:, n_cls:], idx[:, :, None], axis=1, mode="promise_in_bounds")
            return jnp.concatenate([x[:, :n_cls], patches], axis=1)

    def embed(self, images):
        """Patch embeddings plus position embeddings, the class token (if any) first: float32 images [B,H,W,3] ->
        [B, N(+1), width] in the compute dtype: what the blocks (or, in training, patch dropout) take."""
        x = self.patch_embed(self._patchify(images))
        if self.posemb == "sincos2d":
            # Fixed embeddings cover the patches only; the cls token (if any) gets none.
            x = x + jnp.asarray(layers.posemb_sincos_2d(self.grid, self.grid, self.width), self.dtype)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding[...].astype(self.dtype)
        return x

    def blocks(self, x):
        """ln_pre (if any) and the encoder: embedded tokens [B, T, width] -> features after the final LayerNorm,
        same shape and dtype. Any number of tokens T."""
        return self.encoder(x if self.ln_pre is None else self.ln_pre(x))

    def head(self, x):
        """Pooling ('cls': the first token, 'gap': the mean over tokens, 'map': attention probe) and projection:
        features [B, T, width] -> float32 [B, embed_dim]."""
        if self.pool == "cls":
            x = x[:, 0]
        elif self.pool == "gap":
            x = x.astype(jnp.float32).mean(axis=1).astype(self.dtype)
        else:
            x = self.map_head(x)
        if self.proj is not None:
            x = self.proj(x)
        return x.astype(jnp.float32)

    def features(self, images, patch_keys=None):
        """Token features after the final LayerNorm: [B, T, width] in the compute dtype, T = N (+1 with cls).

        patch_keys: None (evaluation, conversion: every patch is seen), or uint32 [B, 2] per-example PRNG keys
        from the train step: with model.image.patch_dropout > 0 only the patches kept_patches() picks go on, and
        T = keep (+1). They are dropped after the position embeddings are added and before ln_pre, as open_clip's
        PatchDropout does (FLIP, Li et al. 2023); the class token is always kept."""
        x = self.embed(images)
        if patch_keys is not None and self.patch_dropout > 0:
            x = self._drop_patches(x, patch_keys)
        return self.blocks(x)

    def __call__(self, images, patch_keys=None):
        """float32 [B, embed_dim] features; patch_keys as in features() ('gap' then averages the kept tokens)."""
        return self.head(self.features(images, patch_keys))


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

