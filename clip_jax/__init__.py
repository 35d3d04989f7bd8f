"""clip_jax: large-batch image-text pretraining (CLIP, SigLIP, CoCa) in JAX."""

import os

# XLA:CPU's concurrency-optimised scheduler lets two independent collectives of one step (the loss ring's
# collective-permute and the gradient all-reduce) start in different orders on different devices of one process,
# and their rendezvous then deadlock (seen with CoCa on 8 simulated CPU devices: device 0 waits in the permute,
# the other 7 in the all-reduce, until XLA aborts after 40 s). Only the CPU backend reads this flag; it must be set
# before the backend starts, hence here.
_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER_FLAG}".strip()

import flax

# Parameters carry logical axis names; we place them ourselves (sharding.py) with jit out_shardings, so flax must
# not try to shard each variable eagerly when a module is built.
flax.config.update("flax_always_shard_variable", False)
