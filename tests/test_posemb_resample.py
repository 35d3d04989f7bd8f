"""Changing resolution: a learned position table resampled to another patch grid equals open_clip's
resize_pos_embed (torch's antialiased bicubic interpolate, the call it makes), and a run warm-started at another
image size copies every parameter, resamples that one, and trains."""

import os
import sys

import jax
import numpy as np
import pytest

from clip_jax import checkpoint, optim, sharding, train, warm_start
from clip_jax import state as run_state
from clip_jax.models import vit

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny_cpu  # noqa: E402


def open_clip_resize(table, extra, grid):
    """open_clip's resize_pos_embed on a [extra + g*g, width] table (model.py: F.interpolate bicubic, antialias
    True, align_corners False, on the [1, width, g, g] layout; the extra rows kept in front)."""
    old = int(np.sqrt(len(table) - extra))
    x = torch.tensor(table[extra:]).reshape(1, old, old, -1).permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return np.concatenate([table[:extra], y.permute(0, 2, 3, 1).reshape(grid * grid, -1).numpy()])


@pytest.mark.parametrize("old,new,extra", [(14, 24, 1), (24, 14, 1), (7, 12, 0), (16, 9, 0), (4, 6, 1), (5, 5, 1)])
def test_resample_equals_open_clips_resize_pos_embed(old, new, extra):
    table = np.random.default_rng(old * new).normal(size=(extra + old * old, 32)).astype(np.float32)
    ours = vit.resample_pos_embedding(table, extra, new)
    assert ours.shape == (extra + new * new, 32)
    np.testing.assert_allclose(ours, open_clip_resize(table, extra, new), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours[:extra], table[:extra])
    with pytest.raises(ValueError, match="not 1 extra rows plus a square grid"):
        vit.resample_pos_embedding(table[:-1], 1, new)


def tiny(data_dir, image_size):
    cfg = tiny_cpu.get_config()
    cfg.data.data_dir, cfg.data.name, cfg.batch_size = str(data_dir), "clip_shapes/small", 16
    cfg.evals.zeroshot.dataset = ""
    cfg.model.image.posemb, cfg.model.image.pool, cfg.model.image.image_size = "learn", "cls", image_size
    cfg.model.image.depth = cfg.model.text.depth = 1
    cfg.total_steps, cfg.log_every, cfg.ckpt_every, cfg.optim.warmup_steps = 2, 1, 0, 1
    return cfg


def test_warm_start_at_another_image_size_resamples_and_trains(shapes_data_dir, tmp_path, caplog):
    """A 32 px model (4x4 patches of 8) warm-starts a 48 px one (6x6): as fine-tuning at 384 from 224 would."""
    src = tiny(shapes_data_dir, 32)
    mesh = sharding.make_mesh(src)
    _, state, _ = run_state.init_state(src, mesh, optim.make(src))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "src"), src)
    ckpt.save(5, state, {}, src, force=True)
    ckpt.close()
    cfg = tiny(shapes_data_dir, 48)
    cfg.init.workdir = str(tmp_path / "src")
    _, fresh, shardings = run_state.init_state(cfg, mesh, optim.make(cfg))
    with caplog.at_level("WARNING"):
        params, copied = warm_start.copy_params(cfg, fresh["params"], shardings["params"], mesh)
    assert "image/pos_embedding resampled from 4x4 to 6x6 patches" in caplog.text
    source = dict(zip(optim.param_paths(state["params"]), jax.tree.leaves(state["params"])))
    got = dict(zip(optim.param_paths(params), jax.tree.leaves(params)))
    assert copied == len(got)
    for path, value in got.items():
        if path == "image/pos_embedding":
            want = open_clip_resize(np.asarray(source[path]), 1, 6)
            np.testing.assert_allclose(np.asarray(value), want, rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(source[path]), err_msg=path)
    result = train.run(cfg, str(tmp_path / "finetune"))  # the new run trains at 48 px from the 32 px weights
    assert result["step"] == 2 and np.isfinite(result["loss"])
