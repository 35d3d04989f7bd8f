"""FSDP layout of the paper-size model: every sizeable weight is split over 'fsdp', optimizer moments follow.

Abstract only (no memory): the shardings the jitted init would produce for CLIP ViT-B/16 on a (2, 4) mesh.
"""

import os
import sys

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from clip_jax import optim, sharding, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import clip_b16  # noqa: E402

MIB = 2**20


def _clip_b16_on_2x4():
    cfg = clip_b16.get_config("64")
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    mesh = sharding.make_mesh(cfg)
    opt = optim.make(cfg)
    return train.state_shardings(cfg, mesh, opt)


def test_no_large_weight_is_replicated_and_moments_follow_their_parameter():
    _, abstract, shardings = _clip_b16_on_2x4()
    params = jax.tree_util.tree_leaves_with_path(abstract["params"])
    specs = jax.tree.leaves(shardings["params"])
    lines, large = [], 0
    for (path, leaf), sh in zip(params, specs, strict=True):
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        lines.append(f"{jax.tree_util.keystr(path):70s} {str(leaf.shape):22s} {sh.spec}")
        if nbytes > MIB:
            large += 1
            assert "fsdp" in jax.tree.leaves(tuple(sh.spec)), (
                f"{jax.tree_util.keystr(path)} ({nbytes} B) is replicated"
            )
            # Per-device share is a quarter of the weight: only the fsdp axis (size 4) splits parameters.
            assert sh.shard_shape(leaf.shape) != leaf.shape
    print("\n".join(lines))  # the full table, visible with `pytest -s`
    assert large >= 12  # the check above really ran: stacked block kernels, embeddings, patch embedding
    # AdamW's mu and nu have the parameter tree's structure and exactly the parameter's sharding.
    adam = [
        s for s in jax.tree.leaves(shardings["opt_state"], is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
    ]
    assert len(adam) == 1
    for moment in (adam[0].mu, adam[0].nu):
        assert jax.tree.leaves(moment) == specs


def test_rules_table_drives_the_layout():
    """Mapping 'embed' to nothing replicates the weights: parallelism is a config change, not a model change."""
    cfg = clip_b16.get_config("64")
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.sharding.embed = ""
    mesh = sharding.make_mesh(cfg)
    _, _, shardings = train.state_shardings(cfg, mesh, optim.make(cfg))
    assert all(
        s.spec == P() or set(jax.tree.leaves(tuple(s.spec))) <= {None}
        for s in jax.tree.leaves(shardings["params"])
    )
