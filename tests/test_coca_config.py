"""CoCa configs: the B/16 config compiles its FSDP train step from abstract shapes (nothing allocated), and CoCa
settings that cannot work are one-line config errors."""

import os
import re
import sys

import jax
import pytest

from clip_jax import config as config_lib
from clip_jax import config_checks, optim, sharding, train
from clip_jax.models import layers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import coca_b16  # noqa: E402
import coca_tiny  # noqa: E402


def test_coca_b16_compiles_its_train_step():
    cfg = coca_b16.get_config("16")
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    config_checks.validate(cfg, jax.device_count())
    mesh = sharding.make_mesh(cfg)
    opt = optim.make(cfg)
    graphdef, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    n_params = layers.param_count(abstract["params"])
    # ViT-B/16 (85.8M) + 12 unimodal + 12 multimodal width-768 decoder layers with a 49,408 x 768 embedding,
    # the two poolers and the image projection.
    assert abs(n_params / 1e6 - 328.0) < 1.0, n_params
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
        for k, v in train.abstract_batch(cfg).items()
    }
    compiled = train.compile_step(cfg, mesh, opt, graphdef, shardings).lower(state, batch).compile()
    mem = compiled.memory_analysis()
    full_state_bytes = 3 * 4 * n_params  # params + two Adam moments, fp32
    assert mem.argument_size_in_bytes < 0.5 * full_state_bytes, (mem.argument_size_in_bytes, full_state_bytes)
    # The caption logits exist only in chunks of 8 positions: per device [2 examples, 8, 49408], never all 76
    # positions at once (which at a real per-device batch would be the largest buffer of the step).
    shapes = set(re.findall(r"(?:f32|bf16)\[(\d+),(\d+),49408\]", compiled.as_text()))
    assert ("2", "8") in shapes, shapes
    assert all(int(length) <= 8 for _, length in shapes), shapes


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model.text.causal", False, "causal"),
        ("model.coca.num_queries", 0, "num_queries"),
        ("model.coca.caption_chunk", 0, "caption_chunk"),
        ("caption.beam_size", 0, "beam_size"),
        ("caption.max_len", 40, "caption.max_len"),
        ("evals.captioning.batch_size", 100, "evals.captioning.batch_size"),
    ],
)
def test_bad_coca_settings_are_config_errors(key, value, message):
    cfg = coca_tiny.get_config()
    node = cfg
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_checks.validate(cfg, 8)
