"""CoCa's own layers: cross-attention, attentional poolers and the multimodal (cross-attending) decoder.

Built from layers.py's pieces with the same conventions (float32 parameters with logical axis names, compute in
`dtype`, LayerNorm statistics and softmax in float32).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from clip_jax.models import layers


class CrossAttention(layers.Attention):
    """layers.Attention whose keys and values come from a sequence of another width (d_kv) than the queries.

    Only the key/value kernels' input dim differs; projection, masking and softmax are the parent's.
    """

    def __init__(self, width, kv_width, num_heads, *, dtype, rngs):
        super().__init__(width, num_heads, dtype=dtype, rngs=rngs)
        if kv_width != width:
            shape = (kv_width, num_heads, self.head_dim)
            init = nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
            self.key_kernel = layers.param(rngs, init, shape, ("embed", "heads", "kv"))
            self.value_kernel = layers.param(rngs, init, shape, ("embed", "heads", "kv"))


class AttentionalPooler(nnx.Module):
    """`num_queries` learned queries attend over the tokens (one multi-head attention layer), then a LayerNorm:
    [B, P, kv_width] -> [B, num_queries, width]. The CoCa paper's task-specific pooler."""

    def __init__(self, num_queries, width, kv_width, num_heads, *, dtype, rngs):
        self.queries = layers.param(rngs, nnx.initializers.normal(0.02), (num_queries, width), (None, "embed"))
        self.attn = CrossAttention(width, kv_width, num_heads, dtype=dtype, rngs=rngs)
        self.ln = layers.LayerNorm(width, dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        q = jnp.broadcast_to(self.queries[...], (tokens.shape[0], *self.queries.shape)).astype(tokens.dtype)
        return self.ln(self.attn(q, tokens))


class CrossBlock(nnx.Module):
    """Pre-LN decoder block: x + causal self-attention, x + cross-attention to `memory`, x + MLP."""

    def __init__(self, width, mlp_dim, num_heads, *, dtype, rngs):
        self.ln1 = layers.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.self_attn = layers.Attention(width, num_heads, dtype=dtype, rngs=rngs)
        self.ln2 = layers.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.cross_attn = layers.Attention(width, num_heads, dtype=dtype, rngs=rngs)
        self.ln3 = layers.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.mlp = layers.Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, memory, mask):
        y = self.ln1(x)
        x = x + self.self_attn(y, y, mask)
        x = x + self.cross_attn(self.ln2(x), memory)
        return x + self.mlp(self.ln3(x))


class MultimodalDecoder(nnx.Module):
    """`depth` causal CrossBlocks over the unimodal decoder's outputs, then a final LayerNorm.

    Like layers.Encoder: block parameters stacked on a leading layer axis and applied with lax.scan (one compiled
    block), optionally rematerialised.
    """

    def __init__(self, width, depth, mlp_dim, num_heads, *, dtype, remat, rngs):
        self.remat = {True: "full", False: "none"}.get(remat, remat)  # a name from layers.REMAT_POLICIES
        make = nnx.vmap(
            lambda key: CrossBlock(width, mlp_dim, num_heads, dtype=dtype, rngs=layers.KeyStream(key)),
            in_axes=0,
            out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: None},
        )
        self.blocks = make(jax.random.split(rngs.params(), depth))
        self.ln_final = layers.LayerNorm(width, dtype=dtype, rngs=rngs)

    def __call__(self, x, memory):
        """x [B,T,width] (position t sees positions <= t only), memory [B,N,width] -> [B,T,width]."""
        length = x.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        graphdef, stacked = nnx.split(self.blocks)

        def step(x, layer):
            return nnx.merge(graphdef, layer)(x, memory, mask), None

        if layers.REMAT_POLICIES[self.remat] is not None:
            step = jax.checkpoint(step, policy=layers.REMAT_POLICIES[self.remat])
        x, _ = jax.lax.scan(step, x, stacked)
        return self.ln_final(x)
