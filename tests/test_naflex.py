"""SigLIP 2 NaFlex pieces against their references: the per-image position-table resize against
torch.nn.functional.interpolate (bilinear, antialiased: what transformers' Siglip2VisionEmbeddings calls), and the
evaluation preprocessing against transformers' Siglip2ImageProcessor (PIL backend) on many aspect ratios.
The model's parity with Siglip2Model is tests/test_convert_naflex.py."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp
from flax import nnx
from PIL import Image
from transformers.models.siglip2 import image_processing_pil_siglip2 as hf_naflex

from clip_jax import config as config_lib
from clip_jax import config_checks
from clip_jax.config import ConfigError
from clip_jax.input import naflex
from clip_jax.models import naflex as naflex_model
from clip_jax.models import two_tower


def _torch_resize(table, h, w):
    """transformers' resize of a [G*G, D] table to h x w (torch's antialiased bilinear), as [h*w, D]."""
    g, d = int(np.sqrt(len(table))), table.shape[1]
    grid = torch.tensor(table.reshape(g, g, d)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0].reshape(d, h * w).T.numpy()


@pytest.mark.parametrize("grid", [4, 5, 16])
def test_pos_embedding_resize_matches_torch_interpolate(grid):
    """Every grid h x w from 1 to 2G+1 patches a side (up, down, mixed, identity), batched with padding rows."""
    table = np.random.default_rng(grid).normal(size=(grid * grid, 6)).astype(np.float32)
    sides = sorted({1, 2, 3, grid - 1, grid, grid + 1, 2 * grid + 1} - {0})
    shapes = [(h, w) for h in sides for w in sides]
    n = max(h * w for h, w in shapes) + 3
    got = np.asarray(naflex_model.resize_pos_embedding(jnp.asarray(table), jnp.asarray(shapes), n))
    assert got.shape == (len(shapes), n, 6) and got.dtype == np.float32
    worst = 0.0
    for b, (h, w) in enumerate(shapes):
        # torch's CPU kernel returns the first output row for every row when the output is one column wide and
        # the height changes (the rows are resized correctly for the transposed table), so a one-column grid is
        # compared with the transposed resize.
        if w == 1 and h != grid:
            want = _torch_resize(table.reshape(grid, grid, 6).transpose(1, 0, 2).reshape(grid * grid, 6), 1, h)
        else:
            want = _torch_resize(table, h, w)
        worst = max(worst, float(np.abs(got[b, : h * w] - want).max()))
        assert not got[b, h * w :].any()  # padding positions stay zero
    assert worst <= 1e-6, worst


def test_one_column_grid_agrees_with_pillow():
    """The one-column case against a second reference: Pillow's BILINEAR resize of each float32 channel (the filter
    torch's antialiased mode reproduces)."""
    grid = 5
    table = np.random.default_rng(0).normal(size=(grid * grid, 3)).astype(np.float32)
    for h in (2, 3, 7, 12):
        got = np.asarray(naflex_model.resize_pos_embedding(jnp.asarray(table), jnp.asarray([[h, 1]]), h))[0]
        chans = table.reshape(grid, grid, 3)
        want = [
            np.asarray(Image.fromarray(chans[..., c]).resize((1, h), Image.Resampling.BILINEAR)) for c in range(3)
        ]
        assert np.abs(got - np.stack(want, -1).reshape(h, 3)).max() <= 1e-5


def test_target_size_equals_the_processors_search():
    """Our sizes == transformers' get_image_size_for_max_num_patches over random sizes, patches and budgets,
    including 1-pixel images and sides far larger than the budget."""
    rng = np.random.default_rng(0)
    cases = [(1, 1, 16, 256), (1, 5000, 16, 256), (5000, 1, 14, 64), (16, 16, 16, 1), (255, 257, 16, 256)]
    for _ in range(300):
        h, w = (int(v) for v in np.exp(rng.uniform(0, np.log(6000), 2)))
        cases.append(
            (max(h, 1), max(w, 1), int(rng.choice([4, 14, 16])), int(rng.choice([1, 16, 24, 64, 256, 1024])))
        )
    for h, w, p, n in cases:
        want = hf_naflex.get_image_size_for_max_num_patches(h, w, p, n)
        got = naflex.target_size(h, w, p, n)
        assert got == want, (h, w, p, n)
        assert got[0] % p == got[1] % p == 0 and (got[0] // p) * (got[1] // p) <= n


# (height, width): 1:1, 3:1, 1:3, 5:4, 4:5, tiny, one patch wide, and large.
SIZES = [(32, 32), (20, 60), (60, 20), (40, 50), (50, 40), (1, 1), (3, 7), (2, 300), (900, 1700)]


@pytest.mark.parametrize("patch, budget", [(4, 24), (16, 256), (14, 64)])
def test_patches_equal_the_image_processor(patch, budget):
    """naflex.eval_patches == Siglip2ImageProcessorPil's pixel_values (1e-6), pixel_attention_mask and
    spatial_shapes, for every aspect ratio and the default bilinear filter (and bicubic with other statistics)."""
    rng = np.random.default_rng(patch)
    for k, (h, w) in enumerate(SIZES):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mean, std, resample = (
            ((0.5,) * 3, (0.5,) * 3, "bilinear") if k % 2 else ((0.4, 0.5, 0.6), (0.2, 0.3, 0.25), "bicubic")
        )
        processor = hf_naflex.Siglip2ImageProcessorPil(
            patch_size=patch, max_num_patches=budget, image_mean=list(mean), image_std=list(std),
            resample=int(getattr(Image.Resampling, resample.upper())),
        )  # fmt: skip
        ref = processor(images=[Image.fromarray(rgb)], return_tensors="np")
        ours = naflex.eval_patches(rgb, patch, budget, mean, std, resample)
        assert ours["patches"].shape == ref["pixel_values"][0].shape == (budget, patch * patch * 3)
        assert np.abs(ours["patches"] - ref["pixel_values"][0]).max() <= 1e-6, (h, w)
        assert ours["patch_mask"].tolist() == ref["pixel_attention_mask"][0].astype(bool).tolist(), (h, w)
        assert ours["spatial_shapes"].tolist() == ref["spatial_shapes"][0].tolist(), (h, w)
        assert ours["patch_mask"].sum() == np.prod(ours["spatial_shapes"])


def _naflex_cfg():
    cfg = config_lib.base()
    m = cfg.model
    m.image.variant, m.image.image_size, m.image.pool, m.image.proj = "mu/8", 32, "map", False
    m.embed_dim, m.image.naflex_max_patches = 32, 16
    return cfg


def test_naflex_config_checks():
    """A NaFlex tower is SigLIP 2's: other options are one-line errors naming the key, and training refuses it."""
    cfg = _naflex_cfg()
    config_checks._check_model(cfg)
    with pytest.raises(ConfigError, match="NaFlex models import and evaluate only"):
        config_checks.check_trainable(cfg)
    for key, value, match in (("pool", "cls", "model.image.pool='map'"), ("image_size", 36, "a multiple of the patch"),
                              ("pre_ln", True, "model.image.pre_ln=False")):  # fmt: skip
        bad = _naflex_cfg()
        bad.model.image[key] = value
        with pytest.raises(ConfigError, match=match):
            config_checks._check_model(bad)
    huge = _naflex_cfg()
    huge.model.image.naflex_max_patches = 1_000_000  # every eval batch is padded to it
    with pytest.raises(ConfigError, match="is over 16384; SigLIP 2's checkpoints use 256 to 1024"):
        config_checks._check_model(huge)
    cfg.model.image.naflex_max_patches = -1
    with pytest.raises(ConfigError, match="naflex_max_patches' must be >= 0"):
        config_checks.validate(cfg, 8, tokenizer=False)


def test_tower_refuses_square_images():
    """What training and the benchmark feed (square images) is a one-line error naming the inputs it takes."""
    cfg = _naflex_cfg()
    cfg.model.text.variant = "mu"
    model = two_tower.TwoTower(cfg.model, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=r"takes \{patches, patch_mask, spatial_shapes\}.*shape \(2, 32, 32, 3\)"):
        model.encode_image(np.zeros((2, 32, 32, 3), np.float32))
