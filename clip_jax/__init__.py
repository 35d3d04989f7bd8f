"""clip_jax: large-batch image-text pretraining (CLIP, SigLIP, CoCa) in JAX."""

import ctypes
import os
import sys

# XLA:CPU's concurrency-optimised scheduler lets two independent collectives of one step (the loss ring's
# collective-permute and the gradient all-reduce) start in different orders on different devices of one process,
# and their rendezvous then deadlock (seen with CoCa on 8 simulated CPU devices: device 0 waits in the permute,
# the other 7 in the all-reduce, until XLA aborts after 40 s). Only the CPU backend reads this flag; it must be set
# before the backend starts, hence here.
_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER_FLAG}".strip()


def _keep_freed_memory() -> None:
    """Lets glibc's malloc keep freed memory for reuse instead of handing it back to the kernel (Linux only).

    XLA:CPU allocates each execution's temporary buffer afresh (2.2 GB for issue 18's CLIP step at batch 256) and
    frees it at the end. By default glibc serves a block that large with its own mmap and munmaps it on free, so
    every step faults in and zeroes every page again (550k page faults and ~1 s of kernel time per step, measured
    with getrusage and strace). Here, before jax starts any thread: one malloc arena (threads' own arenas cannot hold
    such a block and fall back to mmap), no mmap for large blocks, and no trimming of the heap top, so a freed
    buffer is reused by the next step (mallopt(3)). Memory held by the process stays at its peak, as it would on an
    accelerator. Set CLIP_JAX_MALLOC=default to leave malloc as it is.
    """
    if os.environ.get("CLIP_JAX_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, -1)  # -1: never trim (mallopt(3))


_keep_freed_memory()

import flax  # noqa: E402

# Parameters carry logical axis names; we place them ourselves (sharding.py) with jit out_shardings, so flax must
# not try to shard each variable eagerly when a module is built.
flax.config.update("flax_always_shard_variable", False)
