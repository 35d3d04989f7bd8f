"""Transformer building blocks shared by the image and text towers.

Conventions:
- Parameters are always float32 and carry logical axis names (DESIGN.md §3) from this vocabulary:
  "embed" (model width), "mlp", "heads", "kv" (per-head dim), "vocab", "patch" (flattened patch input),
  "pos" (positions), "joint" (embedding dim); None for tiny dims; () for scalars.
- Activations and matmuls run in the compute `dtype`; LayerNorm statistics and the attention softmax in
  float32, because those are where bf16 loses the most precision.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clip_jax.models import attend

AXIS_NAMES = ("embed", "mlp", "heads", "kv", "vocab", "patch", "pos", "joint", None)

# name -> (width, depth, mlp_dim, num_heads), the standard ViT presets.
SIZES = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of gelu; its weights were trained with it, so imports must keep it."""
    return x * jax.nn.sigmoid(1.702 * x)


# MLP activations by config name. gelu_tanh is jax.nn.gelu's default (HF calls it gelu_pytorch_tanh / gelu_new,
# SigLIP's); gelu is the exact erf form (HF "gelu", LAION CLIPs); quick_gelu is OpenAI CLIP's.
ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": quick_gelu,
}


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def compute_dtype(name):
    """Maps the config's dtype name to a jnp dtype."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def tower_dims(cfg, with_patch):
    """Resolves width/depth/mlp_dim/num_heads (and patch_size) from a variant plus >0 overrides."""
    size, _, patch = cfg.variant.partition("/")
    if size not in SIZES:
        raise ValueError(f"variant={cfg.variant!r}: size {size!r} not in {list(SIZES)}")
    if patch and not with_patch:
        raise ValueError(f"variant={cfg.variant!r}: the text tower takes a size without a patch")
    width, depth, mlp_dim, num_heads = SIZES[size]
    dims = {"width": width, "depth": depth, "mlp_dim": mlp_dim, "num_heads": num_heads}
    if with_patch:
        if patch and not patch.isdigit():
            raise ValueError(f"variant={cfg.variant!r}: patch must be an integer, e.g. 'B/16'")
        dims["patch_size"] = int(patch) if patch else -1
    for key in dims:
        if cfg[key] > 0:
            dims[key] = cfg[key]
    if with_patch and dims["patch_size"] <= 0:
        raise ValueError(f"variant={cfg.variant!r} has no patch size and patch_size is not set")
    if dims["width"] % dims["num_heads"]:
        raise ValueError(f"width {dims['width']} is not divisible by num_heads {dims['num_heads']}")
    return dims


class KeyStream:
    """Hands out parameter keys as fold_in(key, i) with a Python counter.

    Drop-in for `rngs` in the constructors here (they only call `rngs.params()`). nnx.Rngs keeps its counter in a
    Variable, and under tracing (jax.eval_shape, a jitted init) each update costs time proportional to the trace so
    far: about 6 s to trace a ViT-B/16 CLIP init, against well under a second with this.
    """

    def __init__(self, key):
        self.key, self.count = key, 0

    def params(self):
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def param(rngs, init, shape, names):
    """A float32 parameter whose logical axis names are recorded as sharding metadata."""
    assert len(names) == len(shape), (shape, names)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), sharding_names=tuple(names))


def zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def rows_matmul(x, w):
    """x [..., i] @ w [i, o] -> [..., o] as ONE 2-D product of the flattened rows [N, i] (N = prod of the leading
    dims), in the operands' dtype. Same sums as einsum('...i,io->...o'), but XLA:CPU then differentiates a plain
    [N, i] x [i, o] product: with the leading dims kept, it computed the weight gradient against a transposed copy of
    the output gradient (e.g. [768, 16640] per MLP layer) in a mixed-layout dot; flattened, both operands contract
    their row dimension in place. Issue 18's CLIP step: ~1.1x (experiments/results/step_breakdown.md)."""
    y = _matmul_2d(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


@jax.custom_vjp
def _matmul_2d(x, w):
    return jnp.dot(x, w)


def _matmul_2d_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _weight_grad(x, dy):
    """x^T @ dy for x [N, i], dy [N, o]. XLA:CPU runs this row-contracting product in Eigen, which is up to 2x
    slower when i > o than the same product computed transposed (measured on this project's CPU box: [16640, 768]
    by [16640, 192] 82 against 105 GFLOP/s, [8192, 512] by [8192, 128] 54 against 99). So on CPU, for i > o, it
    computes (dy^T @ x)^T; the optimization barrier keeps XLA from folding the transpose back into the product.
    Other backends get the plain product."""
    plain = lambda x, dy: jnp.dot(x.T, dy)
    if x.shape[1] <= dy.shape[1]:
        return plain(x, dy)
    transposed = lambda x, dy: jax.lax.optimization_barrier(jnp.dot(dy.T, x)).T
    return jax.lax.platform_dependent(x, dy, cpu=transposed, default=plain)


def _matmul_2d_bwd(res, dy):
    x, w = res
    return jnp.dot(dy, w.T).astype(x.dtype), _weight_grad(x, dy).astype(w.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), computed in `dtype`. use_bias=False has no bias parameter at all (OpenAI CLIP's
    projections and patch embedding), so an imported model holds exactly the source's weights."""

    def __init__(self, d_in, d_out, names, *, dtype, rngs, init=nnx.initializers.xavier_uniform(), use_bias=True):
        self.dtype = dtype
        self.kernel = param(rngs, init, (d_in, d_out), names)
        self.bias = param(rngs, zeros, (d_out,), names[1:]) if use_bias else None

    def __call__(self, x):
        y = rows_matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics whatever the compute dtype; returns `dtype`."""

    def __init__(self, width, *, dtype, rngs, eps=1e-6):
        self.dtype, self.eps = dtype, eps
        self.scale = param(rngs, ones, (width,), ("embed",))
        self.bias = param(rngs, zeros, (width,), ("embed",))

    @jax.named_scope("layernorm")
    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Mlp(nnx.Module):
    """Dense(width->mlp) -> activation (see ACTIVATIONS) -> Dense(mlp->width)."""

    def __init__(self, width, mlp_dim, *, dtype, rngs, act="gelu_tanh"):
        activation(act)  # fails here, at build time, on an unknown name
        self.act = act  # the name, not the function: static module attributes stay plain data
        self.fc1 = Dense(width, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(mlp_dim, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    @jax.named_scope("mlp")
    def __call__(self, x):
        h = self.fc1(x)
        with jax.named_scope("activation"):
            h = ACTIVATIONS[self.act](h)
        return self.fc2(h)


class Attention(nnx.Module):
    """Multi-head attention with explicit [heads, kv] parameter axes (so heads can be sharded)."""

    def __init__(self, width, num_heads, *, dtype, rngs):
        self.dtype, self.head_dim = dtype, width // num_heads
        shape = (width, num_heads, self.head_dim)
        # fan_in is the model width, fan_out the concatenated heads, as for a width x width Dense.
        in_init = nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        out_init = nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_kernel", param(rngs, in_init, shape, ("embed", "heads", "kv")))
            setattr(self, f"{name}_bias", param(rngs, zeros, shape[1:], ("heads", "kv")))
        self.out_kernel = param(rngs, out_init, shape[1:] + shape[:1], ("heads", "kv", "embed"))
        self.out_bias = param(rngs, zeros, (width,), ("embed",))

    def _project(self, x, names):
        """x [B, L, D] -> one [B, L, heads, kv] per name in `names`, from ONE 2-D product of the flattened rows
        (see rows_matmul) with the named kernels interleaved per head: [D, heads, len(names), kv] viewed as
        [D, heads * len(names) * kv]. Heads stay the major output axis, so a heads-sharded kernel stays sharded
        the same way.

        Why one product: on XLA:CPU the einsum over [D, heads, kv] reduced each bias gradient with a reduce-window
        and transposed the weight gradients' operands, and separate q/k/v products need three input gradients
        added up; issue 18's CLIP step used ~5% less CPU time this way (experiments/results/step_breakdown.md).
        The parameters stay separate [D, heads, kv] kernels, so checkpoints and imported weights are unchanged.
        """
        kernels = jnp.stack([getattr(self, f"{n}_kernel")[...] for n in names], axis=2).astype(self.dtype)
        biases = jnp.stack([getattr(self, f"{n}_bias")[...] for n in names], axis=1).astype(self.dtype)
        d_in, heads, n, kv = kernels.shape
        y = rows_matmul(x.astype(self.dtype), kernels.reshape(d_in, -1)) + biases.reshape(-1)
        y = y.reshape(*x.shape[:-1], heads, n, kv)
        return [y[..., i, :] for i in range(n)]

    @jax.named_scope("attention")
    def __call__(self, x_q, x_kv, mask=None):
        """x_q [B,Q,D], x_kv [B,K,D], mask bool broadcastable to [B,heads,Q,K] (True = may attend).

        Self-attention (x_kv is x_q, the same array) projects q, k and v in one product; otherwise q in one and
        k, v in another."""
        if x_kv is x_q:
            q, k, v = self._project(x_q, ("query", "key", "value"))
        else:
            (q,), (k, v) = self._project(x_q, ("query",)), self._project(x_kv, ("key", "value"))
        # Scale q before the product so bf16 logits stay small.
        q = q * jnp.asarray(self.head_dim**-0.5, self.dtype)
        out = attend.attention(q, k, v, mask)  # softmax in float32; batch chunks in the CPU step (attend.py)
        w_out = self.out_kernel[...].astype(self.dtype)
        y = rows_matmul(out.reshape(*out.shape[:2], -1), w_out.reshape(-1, w_out.shape[-1]))
        return y + self.out_bias[...].astype(self.dtype)


class Block(nnx.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, mlp_dim, num_heads, *, dtype, rngs, ln_eps=1e-6, act="gelu_tanh"):
        self.ln1 = LayerNorm(width, dtype=dtype, rngs=rngs, eps=ln_eps)
        self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
        self.ln2 = LayerNorm(width, dtype=dtype, rngs=rngs, eps=ln_eps)
        self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs, act=act)

    def __call__(self, x, mask=None):
        y = self.ln1(x)
        x = x + self.attn(y, y, mask)
        return x + self.mlp(self.ln2(x))


# Remat policy name -> what jax.checkpoint may keep from the forward pass (None: no checkpointing, keep all).
# 'dots' keeps the outputs of the weight matmuls (no batch dims) and recomputes the cheap elementwise work and
# the attention scores; 'full' keeps only each block's input.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Encoder(nnx.Module):
    """`depth` blocks then a final LayerNorm.

    The blocks' parameters are stacked on a leading layer axis (logical name None) and applied with lax.scan, so
    XLA compiles one block instead of `depth` copies: a ViT-B/16 CLIP train step compiles several times faster.
    `scan=False` unrolls the same stacked parameters into a Python loop (XLA may then schedule across layers).
    `remat` is a policy from REMAT_POLICIES (True/False mean 'full'/'none'): what each block keeps for the
    backward pass; the rest is recomputed.
    """

    def __init__(
        self, width, depth, mlp_dim, num_heads, *, dtype, remat, rngs, scan=True, ln_eps=1e-6, act="gelu_tanh"
    ):
        self.remat = {True: "full", False: "none"}.get(remat, remat)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {remat!r}; choose one of {list(REMAT_POLICIES)}")
        self.scan, self.depth = scan, depth
        make = nnx.vmap(
            lambda key: Block(width, mlp_dim, num_heads, dtype=dtype, rngs=KeyStream(key), ln_eps=ln_eps, act=act),
            in_axes=0,
            out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: None},
        )
        self.blocks = make(jax.random.split(rngs.params(), depth))
        self.ln_final = LayerNorm(width, dtype=dtype, rngs=rngs, eps=ln_eps)

    def __call__(self, x, mask=None):
        graphdef, stacked = nnx.split(self.blocks)

        def step(x, layer):
            return nnx.merge(graphdef, layer)(x, mask), None

        if REMAT_POLICIES[self.remat] is not None:
            step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat])
        if self.scan:
            x, _ = jax.lax.scan(step, x, stacked)
        else:
            for i in range(self.depth):
                x, _ = step(x, jax.tree.map(lambda a: a[i], stacked))
        return self.ln_final(x)


class MAPHead(nnx.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens, then a residual MLP."""

    def __init__(self, width, mlp_dim, num_heads, *, dtype, rngs, ln_eps=1e-6, act="gelu_tanh"):
        self.probe = param(rngs, nnx.initializers.normal(0.02), (width,), ("embed",))
        self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
        self.ln = LayerNorm(width, dtype=dtype, rngs=rngs, eps=ln_eps)
        self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs, act=act)

    def __call__(self, x):
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1]))
        y = self.attn(probe, x)
        y = y + self.mlp(self.ln(y))
        return y[:, 0]


def l2_normalize(x, eps=1e-6):
    """Float32 unit vectors along the last axis; eps keeps an all-zero row finite."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
    """Fixed 2-D sin-cos position embeddings [h*w, width]: a quarter of the channels each for sin/cos of x/y."""
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need width divisible by 4, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / max(width // 4 - 1, 1)
    omega = 1.0 / temperature**omega
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def param_count(tree):
    """Number of parameters in a module or state (concrete or abstract, e.g. from nnx.eval_shape)."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
