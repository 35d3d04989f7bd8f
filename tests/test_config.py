"""Config validation: every bad input gets one clear line naming the key, before anything is compiled."""

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from clip_jax import config as config_lib
from clip_jax import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import clip_b16  # noqa: E402
import siglip_b16  # noqa: E402
import tiny_cpu  # noqa: E402


def test_every_base_key_has_a_comment():
    source = open(os.path.join(ROOT, "clip_jax", "config.py")).read()
    for key in config_lib._flatten(config_lib.base()):
        if key.startswith("evals."):  # evaluator sections: their keys are commented in evaluate/sections.py
            continue
        line = re.search(rf"^\s+c\.{re.escape(key)} = .*$", source, flags=re.M)
        assert line, f"base() does not assign {key} on its own line"
        assert "#" in line.group(0), f"config key without a comment: {line.group(0).strip()}"
    sections = open(os.path.join(ROOT, "clip_jax", "evaluate", "sections.py")).read()
    from clip_jax.evaluate import sections as sections_lib

    for key in {k for keys in sections_lib.TYPES.values() for k in keys}:
        line = re.search(rf'^\s+"{key}": .*$', sections, flags=re.M)
        assert line and "#" in line.group(0), f"evaluator key {key} without a commented line in sections.py"


@pytest.mark.parametrize("module", [tiny_cpu, clip_b16, siglip_b16])
def test_shipped_configs_validate(module):
    config_checks.validate(module.get_config(), 8)


def test_unknown_key_in_a_config_file_is_refused_with_suggestion():
    cfg = config_lib.base()
    with pytest.raises((AttributeError, KeyError), match="batch_size"):
        cfg.batchsize = 3


def test_check_keys_names_the_key_and_closest():
    cfg = ml_collections.ConfigDict(config_lib.base().to_dict())
    cfg.optim.learning_rate = 0.1
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim.learning_rate'; did you mean"):
        config_lib.check_keys(cfg)


def test_wrong_type_is_refused():
    cfg = ml_collections.ConfigDict(config_lib.base().to_dict(), type_safe=False)
    cfg.batch_size = "many"
    with pytest.raises(config_lib.ConfigError, match="'batch_size' must be int"):
        config_lib.check_keys(cfg)


def test_batch_not_divisible_by_devices():
    cfg = tiny_cpu.get_config()
    cfg.batch_size = 100
    with pytest.raises(
        config_lib.ConfigError, match=r"batch_size=100 does not divide over the 8 devices.*96 or 104"
    ):
        config_checks.validate(cfg, 8)


def test_bad_choices_and_mesh():
    cfg = tiny_cpu.get_config()
    cfg.loss.kind = "softmx"
    with pytest.raises(config_lib.ConfigError, match="'loss.kind'.*'softmax', 'sigmoid'"):
        config_checks.validate(cfg, 8)
    cfg = tiny_cpu.get_config()
    cfg.mesh.fsdp = 3
    with pytest.raises(config_lib.ConfigError, match="does not divide the 8 devices"):
        config_checks.validate(cfg, 8)
    cfg = tiny_cpu.get_config()
    cfg.model.image.variant = "Q/16"
    with pytest.raises(config_lib.ConfigError, match="model.image.variant"):
        config_checks.validate(cfg, 8)


@pytest.mark.parametrize("data,fsdp,expect", [(-1, 1, (8, 1)), (2, -1, (2, 4)), (-1, 4, (2, 4)), (8, 1, (8, 1))])
def test_mesh_shape(data, fsdp, expect):
    cfg = config_lib.base()
    cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
    assert config_lib.mesh_shape(cfg, 8) == expect


def _cli(*args, mode="train"):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.main", mode, "--workdir=/nonexistent/never", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "mode,arg,message",
    [
        (
            "train",
            "--config.batchsize=3",
            "unknown config key 'batchsize' in --config.batchsize=3; did you mean 'batch_size'?",
        ),
        ("train", "--config.batch_size=100", "batch_size=100 does not divide over the 8 devices"),
        ("train", "--config.model.text.pool=avg", "config key 'model.text.pool' is 'avg'"),
        ("train", "--config.model.image=foo", "config key 'model.image' is a section; set its keys, e.g."),
        ("train", "--config.data.eval_crop=center", "config key 'data.eval_crop' is 'center'; choose one"),
        ("eval", "--config.data.eval_crop=center", "config key 'data.eval_crop' is 'center'; choose one"),
        ("train", "--config.tokenizer.kind=clip_bpe", "does not fit the text tower; set --config.model.text"),
        ("eval", "--config.tokenizer.kind=clip_bpe", "does not fit the text tower; set --config.model.text"),
        ("eval", "--config=configs/clip_b16.py:abc", "config argument 'abc' must be a positive integer"),
    ],
)
def test_cli_prints_one_line_and_exits_2(mode, arg, message):
    proc = _cli(arg, mode=mode)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists("/nonexistent/never")


def test_checkpoint_compatibility_ignores_input_only_keys_and_fills_keys_added_since():
    from clip_jax import checkpoint

    cfg = config_lib.base()
    saved = cfg.to_dict()
    del saved["model"]["image"]["patch_dropout"]  # a checkpoint written before the key existed
    del saved["model"]["image"]["naflex_max_patches"]
    checkpoint.check_compatible(saved, cfg, "W")
    tuned = config_lib.base()
    tuned.model.image.patch_dropout = 0.5  # FLIP's masked phase resumed unmasked, or the other way round
    checkpoint.check_compatible(saved, tuned, "W")
    wider = config_lib.base()
    wider.model.embed_dim = cfg.model.embed_dim * 2
    with pytest.raises(checkpoint.CheckpointMismatch, match="model.embed_dim: checkpoint"):
        checkpoint.check_compatible(saved, wider, "W")
