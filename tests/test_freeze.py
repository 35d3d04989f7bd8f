"""LiT and partial freezing (optim.freeze) and starting from another run's parameters (init.*)."""

import os

import jax
import numpy as np
import pytest
from test_train import small_config

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import config as config_lib
from clip_jax import config_checks, optim, sharding, train


def _restore(cfg, workdir):
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    _, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    ckpt = checkpoint_lib.Checkpointer(str(workdir), cfg)
    out = ckpt.restore(abstract, shardings, cfg)
    ckpt.close()
    return jax.device_get(out[1])


def _by_path(tree):
    return dict(zip(optim.param_paths(tree), jax.tree.leaves(tree)))


def test_split_and_merge_are_inverse():
    tree = {"image": {"a": 1, "b": {"c": 2}}, "text": {"d": 3}, "log_t": 4}
    train_part, frozen = optim.split(tree, {"image/b/c", "log_t"})
    assert train_part == {"image": {"a": 1}, "text": {"d": 3}}
    assert frozen == {"image": {"b": {"c": 2}}, "log_t": 4}
    assert optim.merge(train_part, frozen) == tree


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    base = small_config(data_dir, total_steps=4, **{"evals.zeroshot.dataset": ""})
    pre = tmp_path_factory.mktemp("pretrained")
    train.run(base, str(pre))
    lit = small_config(data_dir, total_steps=4, **{"evals.zeroshot.dataset": "", "optim.freeze": "^image/"})
    lit.init.workdir, lit.init.params = str(pre), "^image/"
    work = tmp_path_factory.mktemp("lit")
    result = train.run(lit, str(work))
    return base, pre, lit, work, result


def test_locked_tower_is_copied_and_stays_bit_identical(runs):
    base, pre, lit, work, result = runs
    before, after = _by_path(_restore(base, pre)["params"]), _by_path(_restore(lit, work)["params"])
    image = [p for p in after if p.startswith("image/")]
    assert image and len(image) < len(after)
    for p in image:  # copied from the pretrained run, then never touched by 4 LiT steps
        np.testing.assert_array_equal(after[p], before[p], err_msg=p)
    # The text tower trained (and started from its own random init, not the pretrained run's text tower).
    changed = [p for p in after if p.startswith("text/") and not np.array_equal(after[p], before[p])]
    assert len(changed) == len([p for p in after if p.startswith("text/")])
    assert result["loss"] < np.log(lit.batch_size)


def test_locked_tower_has_no_optimizer_state_and_is_saved_once(runs):
    _, _, lit, work, _ = runs
    state = _restore(lit, work)
    moments = [p for p in optim.param_paths(state["opt_state"])]
    assert moments and not any("image" in p for p in moments), moments[:5]
    assert any("text" in p for p in moments)
    # The step checkpoint holds only the trainable parameters; the frozen ones are written once beside it.
    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().metadata(os.path.join(work, "checkpoints", "4", "state")).item_metadata
    frozen = ocp.StandardCheckpointer().metadata(os.path.join(work, "frozen_params")).item_metadata
    assert "image" not in saved["params"] and "text" in saved["params"]
    assert set(frozen) == {"image"}


def test_freeze_mistakes_are_config_errors(tmp_path):
    cfg = small_config(tmp_path)
    mesh, opt = sharding.make_mesh(cfg), None
    for pattern, message in (("^imgae/", "matches no parameter"), ("([", "not a valid regex"), (".", "every")):
        cfg.optim.freeze = pattern
        with pytest.raises(config_lib.ConfigError, match=message):
            train.state_shardings(cfg, mesh, optim.make(cfg))
    cfg.optim.freeze, cfg.init.workdir = "", str(tmp_path / "nothing")
    with pytest.raises(config_lib.ConfigError, match="holds no checkpoint"):
        train.run(cfg, str(tmp_path / "w"))
    del opt


def test_lit_config_locks_the_image_encoder_but_not_its_projection():
    import importlib

    from flax import nnx

    from clip_jax.models import two_tower

    lit_b16 = importlib.import_module("configs.lit_b16")
    cfg = lit_b16.get_config("/some/pretrained/run")
    config_checks.validate(cfg, 8)
    params = nnx.to_pure_dict(nnx.state(two_tower.abstract(cfg.model), nnx.Param))
    frozen = optim.frozen_paths(cfg, params)
    image = [p for p in optim.param_paths(params) if p.startswith("image/")]
    assert {p for p in image if not p.startswith("image/proj/")} == frozen
    assert any(p.startswith("image/proj/") for p in image)
    with pytest.raises(ValueError, match="needs the pretrained run"):
        lit_b16.get_config()
