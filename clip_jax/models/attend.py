"""The attention core, softmax(q k^T) v, and a form of it computed in batch chunks, for the CPU train step.

Why chunks on CPU: XLA:CPU runs a batched product such as the scores [B*H, Q, hd] x [B*H, hd, S] on ONE thread,
in YNNPACK and in Eigen alike (issue 18's CLIP, [768, 65, 64] x [768, 64, 65] on the project's 2-core box: 8.9 ms
at 1.02 cores busy, while a 2-D product keeps 1.97 busy). Independent slices of the batch are independent ops,
and XLA's thunk executor runs independent ops at the same time when the step is compiled with the
concurrency-optimised scheduler. `train.compile_step` asks for both together, on a one-device CPU step without
remat (`with batch_chunks(n):` around the step's tracing): 1.04x on that step, 1.14x on
configs/tiny_cpu.py (experiments/results/step_breakdown.md). Under the default memory-minimising scheduler the
chunks run one after another and cost ~4% (issue 18's step with remat 'dots'), so everything else runs one
plain `attend`.
"""

import contextlib
import contextvars
import os

import jax
import jax.numpy as jnp


def attend(q, k, v, mask=None):
    """Scaled dot-product attention without the scaling (scale q first).

    q [B, Q, H, hd], k and v [B, S, H, hd], mask bool broadcastable to [B, H, Q, S] (True = may attend) or None
    -> [B, Q, H, hd] in v's dtype. Logits and softmax in float32. A masked logit gets float32's most negative
    finite value, not -inf, so a fully masked row gives a uniform average, never NaN.
    """
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", probs, v)


def cpu_cores():
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def attend_in_batch_chunks(q, k, v, mask=None, chunks=None):
    """`attend` computed as `chunks` independent ops over interleaved slices of the batch (example i goes to
    chunk i % chunks), reassembled in order: the same values (see the module docstring for why).

    chunks defaults to cpu_cores(); it drops to the largest divisor of B not above it, and 1 means one plain
    `attend`. A mask whose leading axis is the batch (4-D, [B, ...]) is split with the batch; any other mask is
    shared. Interleaving would keep a batch sharded over devices sharded when each device's share divides by
    `chunks` (the slices index a new minor axis), but the train step chunks only on one device.
    Raises ValueError for chunks < 1.
    """
    if chunks is not None and chunks < 1:
        raise ValueError(f"attention batch chunks = {chunks}; use 1 (no chunks) or more")
    b = q.shape[0]
    n = max(1, min(chunks or cpu_cores(), b))
    while b % n:
        n -= 1
    if n == 1:
        return attend(q, k, v, mask)

    def chunk(x, i):
        return None if x is None else x.reshape(b // n, n, *x.shape[1:])[:, i]

    per_example_mask = mask is not None and mask.ndim == 4 and mask.shape[0] == b
    masks = [chunk(mask, i) if per_example_mask else mask for i in range(n)]
    outs = [attend(chunk(q, i), chunk(k, i), chunk(v, i), masks[i]) for i in range(n)]
    return jnp.stack(outs, axis=1).reshape(b, *outs[0].shape[1:])


_CHUNKS = contextvars.ContextVar("attention_batch_chunks", default=1)


@contextlib.contextmanager
def batch_chunks(n: int):
    """Within this context, `attention` traces as attend_in_batch_chunks(..., chunks=n); n=1 is the plain core.
    Raises ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"attention batch chunks = {n}; use 1 (no chunks) or more")
    token = _CHUNKS.set(n)
    try:
        yield
    finally:
        _CHUNKS.reset(token)


def attention(q, k, v, mask=None):
    """The layers' attention core: `attend`, or attend_in_batch_chunks inside `batch_chunks(n > 1)`."""
    n = _CHUNKS.get()
    return attend(q, k, v, mask) if n == 1 else attend_in_batch_chunks(q, k, v, mask, chunks=n)
