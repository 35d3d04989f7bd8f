"""FLIP patch dropout (model.image.patch_dropout): which tokens the image tower sees in training, and that the
train step, GradCache and the batch sharding treat the per-example masks as part of the batch."""

import ast
import functools
import importlib.util
import os
import re

import model_utils  # first: it sets the flax flag the model tests run with
import run_configs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import small_config

from clip_jax import config as config_lib
from clip_jax import config_checks, grad_cache, optim, sharding, train
from clip_jax.evaluate import common
from clip_jax.models import vit


def _keys(n, seed=0):
    """Per-example keys as the train step makes them: raw uint32 [n, 2]."""
    return jax.random.split(jax.random.PRNGKey(seed), n)


def _run(tower, method, *args):
    return np.asarray(tower._run(tower.state, method, *args))


# --- the tower ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pool,posemb,pre_ln", [("cls", "learn", True), ("gap", "sincos2d", False), ("map", "learn", False)]
)
def test_the_tower_runs_on_the_kept_tokens_only(pool, posemb, pre_ln):
    """Output with p = 0.5 == the blocks and pooling run on a numpy gather of the position-embedded tokens."""
    tower = model_utils.image_tower(
        **{"image.pool": pool, "image.posemb": posemb, "image.pre_ln": pre_ln, "image.patch_dropout": 0.5}
    )
    images, keys = model_utils.images(n=4), _keys(4)
    idx = _run(tower, "kept_patches", keys)
    n, keep = tower.module.grid**2, 8  # 4 x 4 patches of the 16-pixel images; max(1, int(16 * 0.5))
    assert idx.shape == (4, keep) and idx.dtype == np.int32
    assert np.all(np.diff(idx, axis=1) > 0) and idx.min() >= 0 and idx.max() < n  # distinct, in order, in range
    assert len({tuple(r) for r in idx}) == 4  # each example draws its own subset

    tokens = _run(tower, "embed", images)  # [B, cls + N, width], position embeddings added
    n_cls = int(pool == "cls")
    kept = np.stack([np.concatenate([t[:n_cls], t[n_cls:][i]]) for t, i in zip(tokens, idx)])
    want = _run(tower, "head", _run(tower, "blocks", kept))
    np.testing.assert_allclose(np.asarray(tower(images, keys)), want, rtol=1e-5, atol=1e-6)
    features = tower.features(images, keys)
    assert features.shape == (4, n_cls + keep, tower.module.width)
    # The dropout really changes what the tower computes (the comparison above is not between equal things).
    assert np.abs(np.asarray(tower(images)) - want).max() > 1e-3


def _open_clip_patch_dropout():
    """open_clip's PatchDropout class, taken unmodified from the installed transformer.py (its package imports
    torchvision, see reference_libs.py, so the class alone is compiled from the file's syntax tree)."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (make test installs it)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "transformer.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PatchDropout")
    namespace = {"torch": torch, "nn": torch.nn}
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
    return namespace["PatchDropout"], torch


@pytest.mark.parametrize("grid", [4, 14, 27])  # 16 patches; ViT-B/16 at 224; so400m/14 at 384
def test_kept_count_and_class_token_follow_open_clip(grid):
    patch_dropout, torch = _open_clip_patch_dropout()
    for p in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        cfg = model_utils.make_cfg(**{"image.image_size": 4 * grid, "image.patch_dropout": p})
        tower = nnx.eval_shape(  # no parameters are needed to draw the masks
            lambda: vit.ViT(cfg.image, embed_dim=16, dtype=jnp.float32, remat="none", rngs=nnx.Rngs(params=0))
        )
        ours = tower.kept_patches(_keys(2)).shape[1]
        ref = patch_dropout(p).train()
        x = torch.arange(2 * (grid * grid + 1), dtype=torch.float32).reshape(2, grid * grid + 1, 1)
        out = ref(x)
        assert torch.equal(out[:, 0], x[:, 0])  # its class token is kept, first
        assert ours == out.shape[1] - 1, (grid, p)


def test_masks_are_uniform_subsets_that_depend_on_each_examples_key_only():
    tower = model_utils.image_tower(**{"image.patch_dropout": 0.75})
    keys = _keys(4000, seed=3)
    idx = _run(tower, "kept_patches", keys)
    assert idx.shape == (4000, 4)
    freq = np.bincount(idx.ravel(), minlength=16) / 4000  # each patch kept with probability 4/16
    np.testing.assert_allclose(freq, 0.25, atol=0.03)
    # A GradCache micro-batch (any subset of rows) draws the same masks as the whole batch.
    np.testing.assert_array_equal(_run(tower, "kept_patches", keys[5:9]), idx[5:9])


def test_no_dropout_and_evaluation_see_every_patch():
    """p = 0 is today's model exactly; with p > 0 only the train step's keys drop anything: the evaluators'
    encoder (evaluate/common.py) gives the same embeddings whatever p is."""
    images, keys = model_utils.images(n=4), _keys(4)
    plain = model_utils.image_tower()
    zero = model_utils.image_tower(**{"image.patch_dropout": 0.0})
    np.testing.assert_array_equal(np.asarray(zero(images, keys)), np.asarray(plain(images)))

    encoders = {}
    for p in (0.0, 0.5):
        graphdef, params = nnx.split(model_utils.build(model_utils.make_cfg(**{"image.patch_dropout": p})).module)
        encoders[p] = np.asarray(common.ModelEncoders(graphdef).image(params, images))
    np.testing.assert_array_equal(encoders[0.5], encoders[0.0])
    cfg = small_config("unused", **{"model.image.patch_dropout": 0.0})
    batch = {"image": images, "tokens": jnp.zeros((4, 3), jnp.int32)}
    assert grad_cache.with_patch_keys(batch, jax.random.PRNGKey(0), cfg, None) is batch  # the step is unchanged


# --- the train step -------------------------------------------------------------------------------------------
def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    s, n, L = cfg.model.image.image_size, cfg.batch_size, cfg.model.text.max_len
    tokens = rng.integers(1, cfg.model.text.vocab_size, size=(n, L)).astype(np.int32)
    tokens[:, -3:] = 0
    return {"image": rng.uniform(-1, 1, size=(n, s, s, 3)).astype(np.float32), "tokens": tokens}


def config_lib_copy(cfg, **overrides):
    return run_configs.set_keys(cfg.copy_and_resolve_references(), overrides)


def _grad_fn(cfg):
    """(rng, batch) -> (loss, grads) at the initial parameters: the train step's first lines (its patch keys, then
    GradCache or plain autodiff), jitted once."""
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, state, _ = train.init_state(cfg, mesh, opt)
    fn = grad_cache.make(cfg, mesh, graphdef, functools.partial(train.total_loss, cfg=cfg, mesh=mesh))
    step = jax.jit(lambda params, rng, batch: fn(params, {}, grad_cache.with_patch_keys(batch, rng, cfg, mesh)))

    def run(rng, batch):
        (loss, _), grads = step(state["params"], rng, sharding.put_batch(batch, mesh))
        return float(loss), jax.device_get(grads)

    return run


def test_grad_cache_drops_the_same_patches_in_both_passes(tmp_path):
    """accum_steps 2 == the full-batch step with p = 0.5: each micro-batch's embedding pass and its vjp pass draw
    the same masks as the full batch does (with different keys in the two passes the gradient is wrong)."""
    cfg = small_config(tmp_path, batch_size=32, **{"model.image.patch_dropout": 0.5})
    batch, rng = _batch(cfg), jax.random.PRNGKey(7)
    full = _grad_fn(cfg)
    loss1, g1 = full(rng, batch)
    loss2, g2 = _grad_fn(config_lib_copy(cfg, accum_steps=2))(rng, batch)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    flat1, flat2 = jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)
    scale = max(float(np.abs(g).max()) for _, g in flat1)
    for (path, a), b in zip(flat1, flat2):
        np.testing.assert_allclose(b, a, atol=1e-5 * scale, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    # The masks matter: other keys give the same batch another loss and other image-tower gradients.
    loss3, g3 = full(jax.random.PRNGKey(8), batch)
    assert abs(loss3 - loss1) > 1e-3
    kernel = lambda g: np.asarray(g["image"]["patch_embed"]["kernel"])
    assert np.abs(kernel(g3) - kernel(g1)).max() > 100 * 1e-5 * scale


def test_train_step_on_a_2x4_mesh_draws_its_masks_from_the_state_rng(tmp_path):
    cfg = small_config(tmp_path, batch_size=32, **{"model.image.patch_dropout": 0.5, "mesh.data": 2})
    cfg.mesh.fsdp = 4
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    graphdef, state, _ = train.init_state(cfg, mesh, opt)
    batch = sharding.put_batch(_batch(cfg, seed=4), mesh)
    step = functools.partial(train.train_step, graphdef=graphdef, opt=opt, cfg=cfg, mesh=mesh)
    compiled = jax.jit(step).lower(state, batch).compile()
    # Patch dropout gathers on each device's own rows: nothing it adds moves activations between devices (the
    # backward pass's scatter may gather its int32 indices, [B / data, keep]: no pixel or feature values).
    hlo = compiled.as_text().splitlines()
    assert any("patch_dropout" in line for line in hlo)  # its named scope reaches the compiled program
    ops = [(re.search(r"= (\S+) all-gather(-start)?\(", line), line) for line in hlo]
    gathered = [m.group(1) for m, line in ops if m and "patch_dropout" in line]
    assert all(shape.startswith(("s32", "u32", "pred")) for shape in gathered), gathered
    losses = [float(compiled(state, batch)[1]["loss"]) for _ in range(2)]
    other = {**state, "rng": jax.random.fold_in(state["rng"], 5)}
    new_state, metrics = compiled(other, batch)
    # Deterministic: the same state drops the same patches (a resumed run repeats the run it continues).
    assert np.isfinite(losses[0]) and losses[0] == losses[1]
    assert abs(float(metrics["loss"]) - losses[0]) > 1e-4  # another rng drops other patches
    assert not np.array_equal(np.asarray(new_state["rng"]), np.asarray(other["rng"]))  # a new rng every step


# --- the config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_patch_dropout_outside_0_1_is_refused_in_one_line(tmp_path, p):
    cfg = small_config(tmp_path, **{"model.image.patch_dropout": p})
    with pytest.raises(config_lib.ConfigError, match=r"'model.image.patch_dropout' must be in \[0, 1\)") as e:
        config_checks.validate(cfg, 8)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="patch_dropout"):
        vit.ViT(cfg.model.image, embed_dim=8, dtype=jnp.float32, remat="none", rngs=nnx.Rngs(params=0))


def test_patch_dropout_in_range_validates(tmp_path):
    config_checks.validate(small_config(tmp_path, **{"model.image.patch_dropout": 0.75}), 8)


@pytest.mark.slow
def test_a_resumed_run_with_patch_dropout_repeats_the_uninterrupted_one(tmp_path):
    """The masks come from the checkpointed rng: stopping after step 3 and resuming gives the same final state."""
    cfg = small_config(
        tmp_path / "tfds",
        total_steps=6,
        ckpt_every=3,
        **{"evals.zeroshot.dataset": "", "model.image.patch_dropout": 0.5, "log_every": 3},
    )
    straight = train.run(cfg, str(tmp_path / "straight"))
    train.run(cfg, str(tmp_path / "resumed"), stop_after=3)
    resumed = train.run(cfg, str(tmp_path / "resumed"))
    assert resumed["history"][0]["step"] == 6
    np.testing.assert_allclose(resumed["history"][-1]["loss"], straight["history"][-1]["loss"], rtol=1e-6)
