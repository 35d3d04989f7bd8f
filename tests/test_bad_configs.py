"""Bad configs: every mistake a user can make in a config is one line naming the key, in Python (ConfigError) and
on the command line (one `error:` line, exit code 2, no workdir written)."""

import os
import subprocess
import sys

import ml_collections
import pytest
from test_reliability import ROOT, TIMEOUT, _env

from clip_jax import config as config_lib
from clip_jax import config_checks

sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny_cpu


def _broken(path_value_pairs):
    cfg = ml_collections.ConfigDict(tiny_cpu.get_config().to_dict(), type_safe=False)
    for key, value in path_value_pairs:
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        if isinstance(value, tuple) and path == ["evals"]:  # a new section: (type, dataset)
            node[last] = config_lib.evaluator(value[0], dataset=value[1])
        else:
            node[last] = value
    return cfg


BROKEN = [  # (overrides, what the one-line error must say)
    ([("optim.learning_rate", 0.1)], r"unknown config key 'optim.learning_rate'; did you mean"),
    ([("batch_size", "many")], r"'batch_size' must be int"),
    ([("total_steps", True)], r"'total_steps' must be int"),
    ([("model.remat", True)], r"'model.remat' must be str"),
    ([("model.remat", "yes")], r"'model.remat' is 'yes'; choose one of 'none', 'dots', 'full'"),
    ([("total_steps", -5)], r"'total_steps' must be positive, got -5"),
    ([("ckpt_every", -1)], r"'ckpt_every' must be >= 0"),
    ([("keep_ckpts", 0)], r"'keep_ckpts' must be positive"),
    ([("optim.lr", 0.0)], r"'optim.lr' must be positive"),
    ([("optim.b2", 1.0)], r"'optim.b2' must be in \[0, 1\)"),
    ([("mesh.fsdp", 3)], r"mesh axis size 3 does not divide the 8 devices"),
    ([("mesh.data", -1), ("mesh.fsdp", -1)], r"both -1"),
    ([("mesh.data", 2), ("mesh.fsdp", 2)], r"mesh.data \* mesh.fsdp = 2\*2 != 8"),
    ([("batch_size", 100)], r"batch_size=100 does not divide over the 8 devices"),
    ([("loss.tile", 5)], r"loss.tile=5 does not divide the per-device batch 16"),
    ([("data.name", "")], r"'data.name' is empty"),
    ([("loss.kind", "softmx")], r"'loss.kind' is 'softmx'"),
    ([("nan_policy", "ignore")], r"'nan_policy' is 'ignore'; choose one of 'stop', 'skip'"),
    ([("model.image.image_size", 6)], r"image_size=6 is smaller than the patch size 8 .*; use at least 8"),
    ([("model.text.eos_id", 5000)], r"'model.text.eos_id' is 5000, outside the vocabulary"),
    ([("model.image.num_heads", 5)], r"model.image.\*: width 96 is not divisible by num_heads 5"),
    ([("model.image.variant", "B16")], r"'model.image.variant' is 'B16'"),
    ([("debug.poison_step", -3)], r"'debug.poison_step' is -3"),
    # Choice-valued keys (vocabularies of the implementing modules; the closest valid value is suggested).
    ([("data.eval_crop", "center")], r"'data.eval_crop' is 'center'; choose one of 'resize', 'centre'; did you"),
    ([("data.train_crop", "random")], r"'data.train_crop' is 'random'; choose one of 'resize', 'inception'"),
    ([("tokenizer.kind", "bpe")], r"'tokenizer.kind' is 'bpe'; .*did you mean 'clip_bpe'\?"),
    ([("model.family", "clip")], r"'model.family' is 'clip'; choose one of 'two_tower', 'coca'"),
    ([("model.dtype", "fp16")], r"'model.dtype' is 'fp16'; .*did you mean 'bfloat16'\?"),
    ([("model.image.remat", "dot")], r"'model.image.remat' is 'dot'; .*did you mean 'dots'\?"),
    ([("model.text.remat", "all")], r"'model.text.remat' is 'all'; choose one of 'none', 'dots', 'full', ''"),
    ([("model.image.pool", "mean")], r"'model.image.pool' is 'mean'; choose one of 'cls', 'gap', 'map'"),
    ([("model.text.pool", "avg")], r"'model.text.pool' is 'avg'; choose one of 'eos', 'last'"),
    ([("model.image.posemb", "sincos")], r"'model.image.posemb' is 'sincos'; .*did you mean 'sincos2d'\?"),
    ([("model.image.act", "relu")], r"'model.image.act' is 'relu'; choose one of 'gelu_tanh', 'gelu', 'quick_"),
    ([("model.text.act", "swish")], r"'model.text.act' is 'swish'"),
    ([("loss.impl", "ring2")], r"'loss.impl' is 'ring2'; .*did you mean 'ring'\?"),
    ([("sharding.embed", "model")], r"'sharding.embed' is 'model'; choose one of 'data', 'fsdp', ''"),
    ([("model.text.variant", "mu/8")], r"'model.text.variant' is 'mu/8'; .*did you mean 'mu'\?"),
    ([("model.image.variant", "mu/0")], r"'model.image.variant' is 'mu/0'; use '<size>/<patch>'"),
    ([("evals.zeroshot.templates", "imagenet")], r"'evals.zeroshot.templates' is 'imagenet'; .*did you mean 'clip_ima"),
    ([("evals.zeroshot.class_names", "cifar")], r"'evals.zeroshot.class_names' is 'cifar'; choose one of '', 'label'"),
    # Values that used to fail only later: the tokenizer against the text tower, shapes, regexes, datasets.
    ([("tokenizer.kind", "clip_bpe")], r"set --config.model.text.vocab_size=49408 \(is 4096\), --config.model"),
    ([("tokenizer.kind", "sentencepiece")], r"tokenizer.kind='sentencepiece' needs tokenizer.path"),
    ([("tokenizer.path", "/no/such.model")], r"'tokenizer.path' is '/no/such.model' but .*'hashed_words' reads"),
    ([("tokenizer.kind", "sentencepiece"), ("tokenizer.path", "/no/such.model")], r"'/no/such.model': no such"),
    ([("tokenizer.kind", "siglip_sentencepiece"), ("tokenizer.path", __file__)], r"tokenizer.path.* cannot read"),
    ([("model.text.max_len", 1)], r"model.text.max_len must hold at least the start and end tokens"),
    ([("model.image.width", 0)], r"'model.image.width' must be positive, or -1 for the default; got 0"),
    ([("model.text.depth", -3)], r"'model.text.depth' must be positive, or -1"),
    ([("model.image.width", 90), ("model.image.num_heads", 3)], r"posemb='sincos2d' needs a width divisible by 4"),
    ([("model.embed_dim", 64), ("model.image.proj", False)], r"model.image.proj=False needs model.image.width =="),
    ([("model.coca.pooler_heads", 0)], r"'model.coca.pooler_heads' must be positive, or -1"),
    ([("loss.tile", 0)], r"'loss.tile' must be positive, or -1"),
    ([("data.mixture", "clip_shapes")], r"'data.mixture' is 'clip_shapes': .* is not 'name:weight'"),
    ([("data.mixture", "clip_shapes:0")], r"'data.mixture' is 'clip_shapes:0'"),
    ([("data.crop_min_area", 0.0)], r"'data.crop_min_area' must be in \(0, 1\], got 0.0"),
    ([("data.crop_min_area", 1.5)], r"'data.crop_min_area' must be in \(0, 1\]"),
    ([("data.min_image_size", 0)], r"'data.min_image_size' must be positive"),
    ([("data.image_std", (0.5, 0.0, 0.5))], r"'data.image_std' is \(0.5, 0.0, 0.5\); use 3 finite numbers"),
    ([("data.image_mean", (0.5, 0.5))], r"'data.image_mean' is \(0.5, 0.5\); use 3 finite numbers"),
    ([("optim.freeze", "[")], r"'optim.freeze' is not a valid regex"),
    ([("init.params", "^image/")], r"'init.params' is '\^image/' but init.workdir is empty"),
    ([("optim.lr", float("nan"))], r"'optim.lr' is nan; use a finite number"),
    ([("model.log_t_init", float("inf"))], r"'model.log_t_init' is inf; use a finite number"),
    ([("evals.cap", ("captioning", "clip_shapes"))], r"evals.cap is a captioning evaluator but model.family='two_tower'"),
    ([("evals.zeroshot.batch_size", 12)], r"evals.zeroshot.batch_size=12 does not divide over the 8 devices"),
    ([("evals.zeroshot.max_examples", 0)], r"'evals.zeroshot.max_examples' is 0; use a positive number or -1"),
    ([("evals.zeroshot.type", "zero_shot")], r"evals.zeroshot.type: unknown evaluator type 'zero_shot'"),
    ([("evals.zeroshot.datset", "x")], r"unknown config key 'evals.zeroshot.datset'; did you mean 'evals.zeroshot.dataset'"),
    (
        [("evals.zeroshot.type", "retrieval")],
        r"unknown config key 'evals.zeroshot.class_names' \(evals.zeroshot is a 'retrieval' evaluator; its keys: ",
    ),
    ([("caption.length_penalty", -1.0)], r"'caption.length_penalty' must be >= 0"),
]


@pytest.mark.parametrize("overrides,message", BROKEN, ids=[str(o[0][0]) for o in BROKEN])
def test_broken_config_is_one_line(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message) as e:
        config_checks.validate(_broken(overrides), 8)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.total_steps=1.5"], "error: config key 'total_steps' must be int, got '1.5'"),
        (["--config=configs/no_such.py"], "error: config file 'configs/no_such.py' does not exist"),
        (["--config=configs/tiny_cpu.py:bogus"], "error: config configs/tiny_cpu.py:bogus failed: ValueError"),
        (["--config.data.name=no_such_set"], "error: cannot find tfds dataset 'no_such_set'"),
        (
            ["--config.data.name=clip_shapes/small", "--config.evals.zeroshot.dataset=no_such_set"],
            "error: evals.zeroshot: cannot find tfds dataset 'no_such_set'",
        ),
        (
            ["--config.evals.zeroshot.datset=x"],
            "error: unknown config key 'evals.zeroshot.datset' in --config.evals.zeroshot.datset=x; did you mean",
        ),
    ],
)
def test_broken_cli_is_one_line_exit_2(shapes_data_dir, tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "clip_jax.main", "train", f"--workdir={tmp_path}/w",
         f"--config.data.data_dir={shapes_data_dir}", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w")  # caught before the run writes anything
