"""config_checks: every choice-valued key is validated against the vocabulary of the module that implements it
(the same object, so a copy would fail here), every string key is accounted for, and values that used to fail
only later (the tokenizer against the text tower, dataset keys, config file arguments) fail up front in one line.
The list of bad values and their messages is tests/test_reliability.py's BROKEN."""

import os
import sys

import ml_collections
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import config_checks, losses, nan_policy, sharding, train
from clip_jax.evaluate import suite
from clip_jax.input import ops, pipeline, preflight, tokenizer
from clip_jax.models import layers, text, vit
from clip_jax.models.families import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import clip_b16
import tiny_cpu

# Where each choice-valued key's vocabulary must come from: the module whose code acts on the value.
IMPLEMENTED_BY = {
    "nan_policy": nan_policy.POLICIES,
    "data.train_crop": ops.TRAIN_CROPS,
    "data.eval_crop": ops.EVAL_CROPS,
    "data.resample": ops.RESAMPLE,
    "tokenizer.kind": tokenizer.KINDS,
    "model.family": FAMILIES,
    "model.dtype": layers.DTYPES,
    "model.remat": layers.REMAT_POLICIES,
    "model.image.pool": vit.POOLS,
    "model.image.posemb": vit.POSEMBS,
    "model.image.act": layers.ACTIVATIONS,
    "model.text.pool": text.POOLS,
    "model.text.act": layers.ACTIVATIONS,
    "loss.kind": losses.KINDS,
    "loss.impl": losses.IMPLS,
}


def _set(cfg, key, value):
    if isinstance(value, dict):  # a new evals.<name> section: {'type': ..., key: value}
        *_, name = key.split(".")
        cfg.evals[name] = config_lib.evaluator(value.pop("type"), **value)
        return cfg
    node = cfg
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    return cfg


def test_each_vocabulary_is_the_implementing_modules_own_object():
    assert set(config_checks.CHOICES) == set(IMPLEMENTED_BY)
    for key, vocabulary in IMPLEMENTED_BY.items():
        assert config_checks.CHOICES[key] is vocabulary, f"{key}: a copy, not the implementing module's vocabulary"
    for key in ("model.image.remat", "model.text.remat"):
        assert config_checks.CHOICES_OR_EMPTY[key] is layers.REMAT_POLICIES


def test_each_crop_name_selects_its_own_geometry():
    # A name the implementing code did not act on would fall through to the default and give the same pixels.
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # landscape: crops differ
    views = [ops.eval_view(image, 16, crop) for crop in ops.EVAL_CROPS]
    assert all(v.shape == (16, 16, 3) for v in views) and not np.allclose(views[0], views[1])
    rng = np.random.default_rng
    views = [ops.train_image(image, 16, 1, rng(1), crop, 0.3, False)[0] for crop in ops.TRAIN_CROPS]
    assert all(v.shape == (16, 16, 3) for v in views) and not np.allclose(views[0], views[1])


def test_train_applies_every_nan_policy():
    class Averager:
        def nonfinite_steps(self):
            return [3]

    class Checkpoints:
        directory = "/ckpt"

        def wait(self):
            pass

        def latest_step(self):
            return 2

    assert set(nan_policy.POLICIES) == {nan_policy.STOP, nan_policy.SKIP}
    stop, skip = (ml_collections.ConfigDict({"nan_policy": p}) for p in (nan_policy.STOP, nan_policy.SKIP))
    with pytest.raises(train.TrainingError, match="NaN/Inf at step 3 .*last good checkpoint is step 2"):
        train._check_nonfinite(stop, Averager(), Checkpoints(), [])
    skipped = []
    train._check_nonfinite(skip, Averager(), Checkpoints(), skipped)
    assert skipped == [3]


def test_every_string_key_is_validated_or_accounted_for():
    cfg = config_lib.base()
    flat = config_lib._flatten(cfg)
    covered = (
        set(config_checks.CHOICES)
        | set(config_checks.CHOICES_OR_EMPTY)
        | set(config_checks.sharding_keys(cfg))
        | set(config_checks.OTHER_STRINGS)
    )
    strings = {key for key, value in flat.items() if isinstance(value, str) and not key.startswith("evals.")}
    assert strings - covered == set(), "string keys that nothing validates: add them to config_checks"
    assert covered - strings == set(), "config_checks names keys that base() does not have"
    from clip_jax.evaluate import sections

    section_strings = {k for keys in sections.TYPES.values() for k, v in keys.items() if isinstance(v, str)}
    assert section_strings == set(config_checks.SECTION_STRINGS)


def test_the_hf_conversion_speaks_the_same_vocabularies():
    from clip_jax.convert import hf, hf_config

    assert set(hf_config.ACT_TO_HF) == set(layers.ACTIVATIONS)  # every activation exports
    assert set(hf_config.ACT_FROM_HF.values()) <= set(layers.ACTIVATIONS)
    assert {crop for _, _, crop, _ in hf.PREPROCESS.values()} <= set(ops.EVAL_CROPS)
    assert {resample for *_, resample in hf.PREPROCESS.values()} <= set(ops.RESAMPLE)


def test_sharding_rules_name_every_logical_axis_the_models_use():
    assert set(config_lib.base().sharding) == {name for name in layers.AXIS_NAMES if name}
    assert sharding.MESH_AXES == ("data", "fsdp")


@pytest.mark.parametrize("key", sorted(IMPLEMENTED_BY))
def test_misspelt_choice_names_the_key_and_the_closest_value(key):
    valid = tuple(IMPLEMENTED_BY[key])
    typo = valid[-1] + "z"  # one letter more than the last valid value
    with pytest.raises(config_lib.ConfigError) as e:
        config_checks.validate(_set(tiny_cpu.get_config(), key, typo), 8)
    message = str(e.value)
    assert f"config key '{key}' is {typo!r}; choose one of " in message and "\n" not in message
    assert all(repr(v) in message for v in valid)
    assert f"did you mean {valid[-1]!r}?" in message


@pytest.mark.parametrize("key", sorted(IMPLEMENTED_BY))
def test_every_implemented_value_passes_its_choice_check(key):
    for value in IMPLEMENTED_BY[key]:
        try:
            config_checks.validate(_set(tiny_cpu.get_config(), key, value), 8)
        except config_lib.ConfigError as e:  # another key may have to change with it, never this one's check
            assert f"config key '{key}' is" not in str(e), str(e)


def test_switching_tokenizer_names_every_text_tower_key_to_change():
    cfg = tiny_cpu.get_config()
    cfg.tokenizer.kind = "clip_bpe"
    with pytest.raises(config_lib.ConfigError) as e:
        config_checks.validate(cfg, 8)
    fixes = "--config.model.text.vocab_size=49408 (is 4096), --config.model.text.eos_id=49407 (is 2)"
    assert fixes in str(e.value)
    config_checks.validate(cfg, 8, tokenizer=False)  # the HF import stores weights whatever the tokenizer
    cfg.model.text.vocab_size, cfg.model.text.eos_id = 49408, 49407
    config_checks.validate(cfg, 8)  # what the message asked for is enough


def test_finite_numbers_and_the_temperature_cap_exception():
    cfg = ml_collections.ConfigDict(tiny_cpu.get_config().to_dict())
    cfg.optim.lr = float("inf")
    with pytest.raises(config_lib.ConfigError, match="'optim.lr' is inf; use a finite number"):
        config_checks.validate(cfg, 8)
    assert "model.max_log_t" in config_checks._MAY_BE_INFINITE  # +inf disables the cap (issue 13 item 1)


@pytest.mark.parametrize("arg", ["abc", "0", "-16", "1.5"])
def test_config_file_integer_argument(arg):
    with pytest.raises(config_lib.ConfigError, match=rf"config argument '{arg}' must be a positive integer"):
        clip_b16.get_config(arg)
    assert clip_b16.get_config("64").batch_size == 64


def _data_cfg(data_dir, **overrides):
    cfg = tiny_cpu.get_config()
    base = {"data.data_dir": data_dir, "data.name": "clip_shapes/small", "evals.zeroshot.dataset": "clip_shapes/small"}
    for key, value in {**base, **overrides}.items():
        _set(cfg, key, value)
    return cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"data.text_key": "words"}, "clip_shapes/small has no feature data.text_key='words'"),
        ({"evals.zeroshot.dataset": "no_such_set"}, "evals.zeroshot: cannot find tfds dataset 'no_such_set'"),
        ({"evals.zeroshot.split": "dev"}, "evals.zeroshot: cannot read 'clip_shapes/small' split 'dev'"),
        ({"evals.zeroshot.label_key": "class"}, "evals.zeroshot.label_key='class': clip_shapes/small (split 'test') has"),
        ({"evals.zeroshot.image_key": "img"}, "evals.zeroshot.image_key='img': clip_shapes/small (split 'test') has no"),
        ({"evals.zeroshot.image_key": "label"}, "evals.zeroshot.image_key='label': the first record of clip_shapes"),
        (
            {"evals.coco": {"type": "retrieval", "dataset": "clip_shapes_captions/small", "text_key": "image"}},
            "evals.coco.text_key='image': clip_shapes_captions/small (split 'test') holds no text there",
        ),
        (
            {"evals.probe": {"type": "probe", "dataset": "clip_shapes/small", "label_key": "caption"}},
            "evals.probe.label_key='caption' of clip_shapes/small is not a ClassLabel feature",
        ),
        (
            {"evals.zeroshot.class_names": "cifar10"},
            "evals.zeroshot.class_names: 'cifar10' lists 10 classes but clip_shapes/small has 40",
        ),
        ({"evals.zeroshot.templates": "clip_digits"}, "evals.zeroshot.templates='clip_digits' are that dataset's"),
        (
            {"evals.coco": {"type": "retrieval", "dataset": "clip_shapes_captions/small", "text_key": "caption"}},
            "evals.coco.text_key='caption': clip_shapes_captions/small (split 'test') has no such feature",
        ),
        (
            {"evals.probe": {"type": "probe", "dataset": "clip_shapes/small", "label_key": "y"}},
            "evals.probe.label_key='y': clip_shapes/small (split 'train') has no such feature",
        ),
    ],
)
def test_dataset_keys_fail_before_the_run_starts(shapes_data_dir, overrides, message):
    cfg = _data_cfg(shapes_data_dir, **overrides)
    config_checks.validate(cfg, 8)  # names and keys of datasets need the data: checked when a run starts
    with pytest.raises((pipeline.DataError, config_lib.ConfigError)) as e:
        preflight.check_train_sources(cfg)
        suite.Suite(cfg, sharding.make_mesh(cfg))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_datasets_pass_the_source_checks(shapes_data_dir):
    more = {"type": "retrieval", "dataset": "clip_shapes_captions/small", "batch_size": 256}
    cfg = _data_cfg(shapes_data_dir, **{"evals.retrieval": more})
    preflight.check_train_sources(cfg)
    evals = suite.Suite(cfg, sharding.make_mesh(cfg))
    assert list(evals.evaluators) == ["retrieval", "zeroshot"]


def test_every_evaluator_type_has_its_keys_and_its_class():
    from clip_jax.evaluate import sections

    assert set(suite.TYPES) == set(sections.TYPES)
    for kind, keys in sections.TYPES.items():
        assert set(sections.COMMON) <= set(keys), kind
