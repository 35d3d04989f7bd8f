"""The paper-size configs (ViT-B/16 CLIP and SigLIP) build and compile their sharded train step on CPU.

Nothing is allocated: the state and batch are abstract (ShapeDtypeStruct with shardings); XLA compiles the real
step for an (2, 4) data x fsdp mesh at a batch of 16, which is what a pod would run with a larger batch.
"""

import os
import sys

import jax
import pytest

from clip_jax import config_checks, optim, sharding, train
from clip_jax.models import two_tower

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import clip_b16  # noqa: E402
import siglip_b16  # noqa: E402


@pytest.mark.parametrize("module,kind,params_m", [(clip_b16, "softmax", 149.6), (siglip_b16, "sigmoid", 203.2)])
def test_paper_config_compiles_its_train_step(module, kind, params_m):
    cfg = module.get_config("16")
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    config_checks.validate(cfg, jax.device_count())
    assert cfg.loss.kind == kind
    mesh = sharding.make_mesh(cfg)
    opt = optim.make(cfg)
    graphdef, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    n_params = two_tower.param_count(abstract["params"])
    assert abs(n_params / 1e6 - params_m) < 1.0, n_params
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
        for k, v in train.abstract_batch(cfg).items()
    }
    compiled = train.compile_step(cfg, mesh, opt, graphdef, shardings).lower(state, batch).compile()
    mem = compiled.memory_analysis()
    # FSDP over 4 devices: the arguments held per device are well below one full fp32 copy of params + moments.
    full_state_bytes = 3 * 4 * n_params
    assert mem.argument_size_in_bytes < 0.5 * full_state_bytes, (mem.argument_size_in_bytes, full_state_bytes)
