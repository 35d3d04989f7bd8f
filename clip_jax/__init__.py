"""clip_jax: large-batch image-text pretraining (CLIP, SigLIP, CoCa) in JAX."""

import flax

# Parameters carry logical axis names; we place them ourselves (sharding.py) with jit out_shardings, so flax must
# not try to shard each variable eagerly when a module is built.
flax.config.update("flax_always_shard_variable", False)
