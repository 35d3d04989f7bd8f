"""End-to-end training on the embedded shapes data, checkpoints and exact resume, on 8 simulated devices."""

import functools
import os
import sys

import jax
import numpy as np
import pytest

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import optim, sharding, step_options, train
from clip_jax.models import attend
from clip_jax import state as run_state

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import coca_tiny  # noqa: E402
import tiny_cpu
from run_configs import set_keys


def small_config(data_dir, **overrides):
    """tiny_cpu on the 4k-example 'small' shapes set, shrunk further so a test compiles and runs in seconds."""
    cfg = tiny_cpu.get_config()
    cfg.data.data_dir = str(data_dir)
    cfg.data.name = cfg.evals.zeroshot.dataset = "clip_shapes/small"
    cfg.batch_size, cfg.evals.zeroshot.batch_size = 64, 128
    cfg.model.image.depth = cfg.model.text.depth = 1
    cfg.log_every, cfg.ckpt_every, cfg.eval_every = 10, 0, 0
    cfg.optim.warmup_steps = 10
    return set_keys(cfg, overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    cfg = small_config(data_dir, total_steps=120)
    workdir = tmp_path_factory.mktemp("run")
    return cfg, workdir, train.run(cfg, str(workdir))


def test_training_lowers_the_loss_and_beats_chance(trained):
    cfg, workdir, result = trained
    first, last = result["history"][0]["loss"], result["history"][-1]["loss"]
    assert first > 0.8 * np.log(cfg.batch_size)  # starts near log(B): embeddings carry no information yet
    assert last < 0.6 * first, [h["loss"] for h in result["history"]]
    zs = result["sections"]["zeroshot"]
    assert zs["examples"] == 400 and zs["num_classes"] == 40
    assert zs["top1"] > 3 * zs["chance_top1"], zs
    assert zs["top5"] > 2 * zs["chance_top5"], zs
    assert result["examples_seen"] == 120 * 64
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))  # TensorBoard summaries


def test_resume_continues_and_matches_an_uninterrupted_run(data_dir, tmp_path):
    cfg = small_config(data_dir, total_steps=12, ckpt_every=4, **{"evals.zeroshot.dataset": ""})
    straight = train.run(cfg, str(tmp_path / "straight"))
    first = train.run(cfg, str(tmp_path / "resumed"), stop_after=6)  # "preempted" after step 6 (saves at 6)
    assert first["step"] == 6
    second = train.run(cfg, str(tmp_path / "resumed"))
    assert second["history"][0]["step"] == 10  # continued from step 6, not from 0
    assert second["step"] == 12
    # Same batches in the same order and the same updates: the loss curves agree.
    np.testing.assert_allclose(straight["history"][-1]["loss"], second["history"][-1]["loss"], rtol=1e-5)
    mesh = sharding.make_mesh(cfg)
    opt = optim.make(cfg)
    _, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    a = checkpoint_lib.Checkpointer(str(tmp_path / "straight"), cfg).restore(abstract, shardings, cfg)
    b = checkpoint_lib.Checkpointer(str(tmp_path / "resumed"), cfg).restore(abstract, shardings, cfg)
    assert a[0] == b[0] == 12 and a[2] == b[2]  # same step, same data-iterator position
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_checkpoint_roundtrip_is_identical_and_keeps_shardings(tmp_path):
    cfg = small_config(tmp_path, keep_ckpts=2, **{"mesh.data": 2, "mesh.fsdp": 4})
    mesh = sharding.make_mesh(cfg)
    opt = optim.make(cfg)
    _, state, shardings = train.init_state(cfg, mesh, opt)
    _, abstract, _ = train.state_shardings(cfg, mesh, opt)
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "w"), cfg)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"next_index": step}, cfg)
    ckpt.wait()
    assert ckpt.manager.all_steps() == [2, 3]  # keep the last K
    step, restored, data_state = ckpt.restore(abstract, shardings, cfg)
    assert step == 3 and data_state == {"next_index": 3}
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding == y.sharding
    # FSDP: the 'embed' dim of a weight matrix is split over the 4-way fsdp axis.
    kernels = [x for x in jax.tree.leaves(restored["params"]) if x.ndim == 2 and x.shape[0] % 4 == 0]
    assert any("fsdp" in jax.tree.leaves(tuple(k.sharding.spec)) for k in kernels)
    ckpt.close()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = small_config(tmp_path)
    mesh = sharding.make_mesh(cfg)
    opt = optim.make(cfg)
    _, state, shardings = train.init_state(cfg, mesh, opt)
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "w"), cfg)
    ckpt.save(1, state, {}, cfg)
    ckpt.close()
    other = small_config(tmp_path, **{"model.image.width": 64})
    _, abstract, other_sh = train.state_shardings(other, mesh, optim.make(other))
    with pytest.raises(checkpoint_lib.CheckpointMismatch, match=r"model.image.width: checkpoint 96 vs config 64"):
        checkpoint_lib.Checkpointer(str(tmp_path / "w"), other).restore(abstract, other_sh, other)


def test_weight_decay_reaches_matrices_only():
    """Decay a zero-gradient model: kernels and embeddings shrink, LayerNorm/bias/temperature do not."""
    cfg = small_config("unused", **{"optim.weight_decay": 0.5, "optim.warmup_steps": 0, "optim.clip_norm": 0.0})
    opt = optim.make(cfg)
    params = jax.tree.map(
        lambda x: x + 1.0, jax.device_get(run_state._init_fn(cfg, opt, jax.random.PRNGKey(0))["params"])
    )
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    flat = {
        jax.tree_util.keystr(p): np.abs(np.asarray(u)).max()
        for p, u in jax.tree_util.tree_leaves_with_path(updates)
    }
    decayed = {k for k, v in flat.items() if v > 0}
    assert any("token_embedding" in k for k in decayed) and any("kernel" in k for k in decayed)
    for k in flat:
        if any(s in k for s in ("'log_t'", "'bias'", "scale", "norm")) and "kernel" not in k:
            assert k not in decayed, k


def test_one_device_cpu_step_alone_gets_the_concurrency_scheduler_and_computes_the_same(tmp_path):
    """step_options.compiler_options: XLA:CPU's concurrency-optimised scheduler only for a one-device CPU step
    without remat; that step (attention in batch chunks, models/attend.py) equals the 8-device step (memory-
    minimising scheduler, one plain attention, sharded batch)."""
    cfg = small_config(tmp_path)
    concurrency = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}  # XLA's own enum name
    meshes = {"one": sharding.make_mesh(cfg, jax.devices()[:1]), "eight": sharding.make_mesh(cfg)}
    assert step_options.compiler_options(cfg, meshes["one"]) == concurrency
    assert step_options.compiler_options(cfg, meshes["eight"]) == {}  # collectives: the memory scheduler
    for key in ("model.remat", "model.image.remat", "model.text.remat"):
        assert step_options.compiler_options(set_keys(small_config(tmp_path), {key: "dots"}), meshes["one"]) == {}
    assert step_options.attention_chunks(concurrency) == min(attend.cpu_cores(), step_options.MAX_CHUNKS)
    accum = set_keys(small_config(tmp_path), {"accum_steps": 2})  # GradCache asked for memory
    assert step_options.compiler_options(accum, meshes["one"]) == {}
    assert step_options.attention_chunks({}) == 1
    rng = np.random.default_rng(0)
    s, L = cfg.model.image.image_size, cfg.model.text.max_len
    batch = {
        "image": rng.uniform(-1, 1, (cfg.batch_size, s, s, 3)).astype(np.float32),
        "tokens": rng.integers(1, cfg.model.text.vocab_size, (cfg.batch_size, L)).astype(np.int32),
    }
    out = {}
    for name, mesh in meshes.items():
        opt = optim.make(cfg)
        graphdef, state, shardings = train.init_state(cfg, mesh, opt)
        step = train.compile_step(cfg, mesh, opt, graphdef, shardings)
        new, metrics = step(state, sharding.put_batch(batch, mesh))
        out[name] = jax.device_get((metrics["loss"], metrics["grad_norm"], new["params"]))
    for a, b in zip(jax.tree.leaves(out["one"]), jax.tree.leaves(out["eight"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["coca", "siglip_map"])
def test_one_device_chunked_step_matches_the_plain_step_for_masks_and_poolers(family):
    """The one-device CPU step (attention in batch chunks) against the same step jitted without chunks or compiler
    options: CoCa (causal self-attention, cross-attention, attentional poolers) and a SigLIP tower pair with a MAP
    head and a per-example padding mask; batch 6, so each of 2 or 3 chunks holds several examples."""
    cfg = coca_tiny.get_config() if family == "coca" else tiny_cpu.get_config("sigmoid")
    if family == "siglip_map":
        cfg.model.image.pool, cfg.model.text.causal, cfg.model.text.pool = "map", False, "last"
    cfg.model.image.depth = cfg.model.text.depth = 1
    cfg.batch_size, cfg.optim.warmup_steps = 6, 2
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    rng = np.random.default_rng(1)
    s, L = cfg.model.image.image_size, cfg.model.text.max_len
    tokens = rng.integers(3, cfg.model.text.vocab_size, (6, L)).astype(np.int32)
    for row, n in zip(tokens, [2, 3, L, 4, 5, L - 1], strict=True):  # different padding per example
        row[n - 1], row[n:] = cfg.model.text.eos_id, cfg.model.text.pad_id
    batch = {"image": rng.integers(0, 256, (6, s, s, 3)).astype(np.uint8), "tokens": tokens}
    out = {}
    for name in ("chunked", "plain"):
        opt = optim.make(cfg)
        graphdef, state, shardings = train.init_state(cfg, mesh, opt)
        if name == "chunked":
            step = train.compile_step(cfg, mesh, opt, graphdef, shardings)
        else:
            step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, opt=opt, cfg=cfg, mesh=mesh))
        _, metrics = step(state, sharding.put_batch(batch, mesh))
        out[name] = jax.device_get((metrics["loss"], metrics["grad_norm"]))
    assert step_options.attention_chunks(step_options.compiler_options(cfg, mesh)) >= 2 or attend.cpu_cores() == 1
    np.testing.assert_allclose(out["chunked"], out["plain"], rtol=1e-5)


def test_bfloat16_train_step_matches_float32(tmp_path):
    """bf16 compute (fp32 parameters, fp32 loss): the same step on the same parameters and batch agrees with fp32
    to bf16 precision, and really runs in bf16 (the results are not bit-identical)."""
    rng = np.random.default_rng(0)
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small_config(tmp_path, **{"model.dtype": dtype, "mesh.data": 2, "mesh.fsdp": 4})
        cfg.optim.warmup_steps, cfg.optim.weight_decay = 0, 0.0  # the first step moves every weight by ~lr
        mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
        graphdef, state, shardings = train.init_state(cfg, mesh, opt)
        if not results:
            s, L = cfg.model.image.image_size, cfg.model.text.max_len
            batch = {
                "image": rng.uniform(-1, 1, (cfg.batch_size, s, s, 3)).astype(np.float32),
                "tokens": rng.integers(1, cfg.model.text.vocab_size, (cfg.batch_size, L)).astype(np.int32),
            }
        step = train.compile_step(cfg, mesh, opt, graphdef, shardings)
        old = jax.device_get(state["params"])
        new, metrics = step(state, sharding.put_batch(batch, mesh))
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(new["params"]))  # fp32 master weights
        delta = jax.tree.map(lambda a, b: np.asarray(a) - b, jax.device_get(new["params"]), old)
        results[dtype] = jax.device_get(metrics), delta
    (m32, p32), (m16, p16) = results["float32"], results["bfloat16"]
    assert m16["loss"].dtype == np.float32
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=1e-2)
    np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)
    assert m16["loss"] != m32["loss"]
    # Adam's first step moves each weight by about lr * sign(gradient): the bf16 step must move (almost) every
    # weight the same way as the fp32 step.
    d32 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(p32)])
    d16 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(p16)])
    moved = np.abs(d32) > 0.5 * cfg.optim.lr
    assert moved.mean() > 0.5
    assert np.mean(np.sign(d16[moved]) == np.sign(d32[moved])) > 0.9
