"""Text tower: token + position embeddings -> pre-LN encoder (causal or bidirectional) -> pooling."""

import jax.numpy as jnp
from flax import nnx

from clip_jax.models import layers

# argmax: the position of the largest token id, HF CLIPs' legacy EOS rule (their end token is the largest id).
POOLS = ("eos", "last", "first", "mean", "argmax")


class TextTransformer(nnx.Module):
    """Maps int32 tokens [B,L] (L <= max_len) to unnormalised features [B, embed_dim] (float32).

    cfg is the `model.text` ConfigDict; embed_dim, dtype, remat and scan come from `model`.
    """

    def __init__(self, cfg, *, embed_dim, dtype, remat, rngs, scan=True):
        dims = layers.tower_dims(cfg, with_patch=False)
        if cfg.pool not in POOLS:
            raise ValueError(f"model.text.pool={cfg.pool!r}; valid: {list(POOLS)}")
        width = dims["width"]
        if not cfg.proj and width != embed_dim:
            raise ValueError(f"model.text.proj=False needs width == embed_dim, got {width} != {embed_dim}")
        self.dtype, self.max_len, self.causal, self.pool = dtype, cfg.max_len, cfg.causal, cfg.pool
        self.eos_id, self.pad_id = cfg.eos_id, cfg.pad_id
        # SigLIP's text tower was trained attending to its padding (big_vision and HF pass no mask), so its
        # weights need mask_padding=False to give the same embeddings.
        self.mask_padding = cfg.get("mask_padding", True)
        ln_eps, act = cfg.get("ln_eps", 1e-6), cfg.get("act", "gelu_tanh")
        # CLIP's initialisation: std 0.02 for tokens, 0.01 for positions.
        self.token_embedding = layers.param(
            rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, width), ("vocab", "embed")
        )
        self.pos_embedding = layers.param(
            rngs, nnx.initializers.normal(0.01), (cfg.max_len, width), ("pos", "embed")
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
        # With a bias by default (as SigLIP's text head); OpenAI CLIP's projection has none (proj_bias=False).
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

    def _mask(self, tokens):
        length = tokens.shape[1]
        if self.causal:
            return jnp.tril(jnp.ones((length, length), bool))[None, None]
        if not self.mask_padding:
            return None
        # Bidirectional: nobody attends to padding, so extra trailing pads change nothing.
        return self._valid(tokens)[:, None, None, :]

    def _valid(self, tokens):
        """Real positions: everything up to and including the first end token; padding is what follows it.
        Matching the pad id instead would also drop real tokens that share it (CLIP's BPE pads with 0, which is
        also the id of "!"). A row without an end token (cut short) falls back to `tokens != pad_id`."""
        is_eos = tokens == self.eos_id
        after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
        return jnp.where(is_eos.any(axis=1, keepdims=True), ~after_eos, tokens != self.pad_id)

    def features(self, tokens):
        """Token features after the final LayerNorm: [B, L, width] in the compute dtype."""
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must be [B, L<={self.max_len}], got {tokens.shape}")
        x = jnp.take(self.token_embedding[...], tokens, axis=0)
        x = (x + self.pos_embedding[: tokens.shape[1]]).astype(self.dtype)
        return self.encoder(x, self._mask(tokens))

    def _pool(self, x, tokens):
        if self.pool == "first":
            return x[:, 0]
        if self.pool == "last":
            return x[:, -1]
        if self.pool == "argmax":
            idx = jnp.argmax(tokens, axis=1)  # the first position holding the largest id, as torch.argmax
            return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        if self.pool == "mean":
            keep = self._valid(tokens)[..., None].astype(jnp.float32)
            total = jnp.sum(x.astype(jnp.float32) * keep, axis=1)
            return (total / jnp.maximum(keep.sum(axis=1), 1.0)).astype(self.dtype)
        is_eos = tokens == self.eos_id
        # A sequence truncated before its EOS falls back to its last position.
        idx = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), tokens.shape[1] - 1)
        return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]

    def __call__(self, tokens):
        x = self._pool(self.features(tokens), tokens)
        if self.proj is not None:
            x = self.proj(x)
        return x.astype(jnp.float32)
