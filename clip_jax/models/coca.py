"""CoCa, the contrastive captioner (Yu et al. 2022): one image tower, one text decoder, two losses.

- Image: a ViT without its own pooling gives patch tokens. Two attentional poolers read them: one query for the
  contrastive image embedding (then a projection to embed_dim), `model.coca.num_queries` queries for the
  decoder's cross-attention.
- Text: the unimodal decoder (`model.text`, causal self-attention only) gives the contrastive text embedding at
  the end token, as CLIP's text tower does; the multimodal decoder (`model.coca.decoder_depth` layers of causal
  self-attention + cross-attention to the pooled image tokens) continues from its outputs and predicts the next
  token through the vocabulary head (by default the token embedding table, transposed).
- One causal pass of the unimodal decoder over the full caption serves both losses: position t depends only on
  tokens <= t, so its first L-1 outputs are exactly what teacher forcing on tokens[:, :-1] would give.

Captioning targets are tokens[:, 1:]; a target is scored when it is a real token: up to and including the first
end token (padding is what follows it, the text tower's rule), so the model learns to stop and never to pad.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from clip_jax.losses import captioning
from clip_jax.models import coca_layers, layers, text, two_tower, vit


def _image_cfg(image_cfg):
    """The ViT config with its own pooling and projection switched off: CoCa's poolers replace them."""
    cfg = ml_collections.ConfigDict(image_cfg.to_dict())
    cfg.pool, cfg.proj = "gap", False  # 'gap' creates no parameters; features() never pools
    return cfg


class CoCa(nnx.Module):
    """cfg is the `model` ConfigDict (embed_dim, dtype, log_t_init, bias_init, remat, image.*, text.*, coca.*)."""

    def __init__(self, cfg, *, rngs):
        if not cfg.text.causal:
            raise ValueError("CoCa's text tower is a decoder: model.text.causal must be True")
        dtype = layers.compute_dtype(cfg.dtype)
        keys = layers.KeyStream(rngs.params())  # one key from rngs; see KeyStream for why
        img = layers.tower_dims(cfg.image, with_patch=True)
        txt = layers.tower_dims(cfg.text, with_patch=False)
        self.dtype, self.chunk = dtype, cfg.coca.caption_chunk
        self.eos_id, self.pad_id = cfg.text.eos_id, cfg.text.pad_id
        self.image = vit.ViT(
            _image_cfg(cfg.image),
            embed_dim=img["width"],
            dtype=dtype,
            remat=two_tower.tower_remat(cfg, "image"),
            rngs=keys,
            scan=cfg.scan_layers,
        )
        self.text = text.TextTransformer(
            cfg.text,
            embed_dim=cfg.embed_dim,
            dtype=dtype,
            remat=two_tower.tower_remat(cfg, "text"),
            rngs=keys,
            scan=cfg.scan_layers,
        )
        heads = cfg.coca.pooler_heads if cfg.coca.pooler_heads > 0 else img["num_heads"]
        pooler = dict(num_heads=heads, dtype=dtype, rngs=keys)
        self.contrastive_pooler = coca_layers.AttentionalPooler(1, img["width"], img["width"], **pooler)
        self.image_proj = layers.Dense(
            img["width"],
            cfg.embed_dim,
            ("embed", "joint"),
            dtype=dtype,
            rngs=keys,
            init=nnx.initializers.lecun_normal(),
        )
        self.caption_pooler = coca_layers.AttentionalPooler(
            cfg.coca.num_queries, txt["width"], img["width"], **pooler
        )
        depth = cfg.coca.decoder_depth if cfg.coca.decoder_depth > 0 else txt["depth"]
        self.decoder = coca_layers.MultimodalDecoder(
            txt["width"],
            depth,
            txt["mlp_dim"],
            txt["num_heads"],
            dtype=dtype,
            remat=two_tower.tower_remat(cfg, "text"),
            rngs=keys,
        )
        self.head_kernel = (
            None
            if cfg.coca.tie_embedding
            else layers.param(
                keys, nnx.initializers.normal(0.02), (cfg.text.vocab_size, txt["width"]), ("vocab", "embed")
            )
        )
        self.log_t = nnx.Param(jnp.asarray(cfg.log_t_init, jnp.float32), sharding_names=())
        self.bias = nnx.Param(jnp.asarray(cfg.bias_init, jnp.float32), sharding_names=())

    # --- the pieces -------------------------------------------------------------------------------------------
    def _head(self):
        """[V, width]: logits = hidden @ head.T."""
        return (self.text.token_embedding if self.head_kernel is None else self.head_kernel)[...]

    def _image_embedding(self, patches):
        return layers.l2_normalize(self.image_proj(self.contrastive_pooler(patches)[:, 0]))

    def _text_embedding(self, unimodal, tokens):
        # The text tower's own pooling (at the end token) and projection, on features we already have.
        x = self.text._pool(unimodal, tokens)
        return layers.l2_normalize(x if self.text.proj is None else self.text.proj(x))

    def caption_memory(self, images):
        """[B,H,W,3] -> the pooled image tokens the multimodal decoder cross-attends to, [B, num_queries, width]."""
        return self.caption_pooler(self.image.features(images))

    def decode(self, memory, tokens):
        """Teacher-forced decoder outputs [B, L, width] (after the final LayerNorm) for tokens [B, L]."""
        return self.decoder(self.text.features(tokens), memory)

    def logits(self, memory, tokens):
        """[B, L, V] float32 next-token logits: position t predicts token t+1. For tests and small inputs only;
        training never builds them (see losses/captioning.py)."""
        h = self.decode(memory, tokens)
        return jnp.einsum("blw,vw->blv", h, self._head().astype(h.dtype), preferred_element_type=jnp.float32)

    def next_token_logprobs(self, memory, tokens, t):
        """log p(token t+1 | tokens <= t, image) [B, V] float32. Tokens after t may hold anything (the decoder is
        causal). Generation calls this once per position, recomputing the prefix (no KV cache)."""
        h = jax.lax.dynamic_index_in_dim(self.decode(memory, tokens), t, axis=1, keepdims=False)
        logits = jnp.einsum("bw,vw->bv", h, self._head().astype(h.dtype), preferred_element_type=jnp.float32)
        return jax.nn.log_softmax(logits, axis=-1)

    def caption_targets(self, tokens):
        """(targets [B, L-1], weights [B, L-1] bool): tokens[:, 1:], scored up to and including the end token."""
        return tokens[:, 1:], self.text._valid(tokens)[:, 1:]

    def _caption_nll(self, memory, unimodal, tokens):
        h = self.decoder(unimodal[:, :-1], memory)
        targets, weights = self.caption_targets(tokens)
        return captioning.caption_nll(h, self._head(), targets, weights, chunk=self.chunk)

    def caption_loss(self, images, tokens):
        """(sum of token NLLs, tokens scored) of the captions `tokens` given `images`, teacher-forced. A row of
        padding only scores nothing (the evaluator pads with such rows)."""
        return self._caption_nll(self.caption_memory(images), self.text.features(tokens), tokens)

    # --- the trainer's interface --------------------------------------------------------------------------------
    def encode_image(self, images):
        """float32 [B,H,W,3] -> float32 [B, embed_dim], unit norm."""
        return self._image_embedding(self.image.features(images))

    def encode_text(self, tokens):
        """int32 [B,L] -> float32 [B, embed_dim], unit norm."""
        return self._text_embedding(self.text.features(tokens), tokens)

    def __call__(self, images, tokens, patch_keys=None):
        """img, txt [B, embed_dim] (unit norm), log_t, bias, caption_nll (sum over scored tokens), caption_tokens.
        patch_keys: FLIP patch dropout's per-example keys (vit.ViT.features); both poolers read the kept tokens."""
        patches = self.image.features(images, patch_keys)
        unimodal = self.text.features(tokens)
        nll, count = self._caption_nll(self.caption_pooler(patches), unimodal, tokens)
        return {
            "img": self._image_embedding(patches),
            "txt": self._text_embedding(unimodal, tokens),
            "log_t": self.log_t[...],
            "bias": self.bias[...],
            "caption_nll": nll,
            "caption_tokens": count,
        }


def abstract(cfg):
    """The model with ShapeDtypeStruct parameters: shapes and counts without allocating memory."""
    return nnx.eval_shape(lambda: CoCa(cfg, rngs=nnx.Rngs(params=0)))
