"""Tokenizer, image conversion, and the grain pipeline's determinism and resumability."""

import os
import sys

import numpy as np
import pytest

from clip_jax.input import eval_data, pipeline, tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny_cpu


def test_hashed_words_layout_and_truncation():
    tok = tokenizer.HashedWords(vocab_size=4096, max_len=6)
    ids = tok.encode("A  small RED circle!")
    words = [tok.word_id(w) for w in ("a", "small", "red", "circle")]
    assert ids.tolist() == [tokenizer.BOS, *words, tokenizer.EOS]
    long = tok.encode("one two three four five six seven")
    assert long[-1] == tokenizer.EOS and long[0] == tokenizer.BOS  # truncation keeps the end token
    assert tok.encode("").tolist() == [tokenizer.BOS, tokenizer.EOS, 0, 0, 0, 0]
    assert all(3 <= i < 4096 for i in words)
    # CRC32, not Python's salted hash(): ids are the same in every process and machine.
    import zlib

    assert tok.word_id("circle") == 3 + zlib.crc32(b"circle") % 4093


def test_tokenizer_must_agree_with_the_text_tower():
    cfg = tiny_cpu.get_config()
    cfg.model.text.eos_id = 49407
    with pytest.raises(ValueError, match="set --config.model.text.eos_id=2"):
        tokenizer.make(cfg)


@pytest.mark.parametrize("shape", [(20, 20), (20, 20, 1), (20, 20, 4), (32, 32, 3)])
def test_load_image_converts_any_layout(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = eval_data.load_image(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert -1.0 <= out.min() and out.max() <= 1.0
    if shape == (32, 32, 3):
        np.testing.assert_allclose(out, img / 127.5 - 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = tiny_cpu.get_config()
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.data.name = c.evals.zeroshot.dataset = "clip_shapes/small"
    c.batch_size = 32
    return c


def test_iterator_state_restores_the_exact_next_batches(cfg):
    it = pipeline.train_iterator(cfg)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = pipeline.train_iterator(cfg)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        np.testing.assert_array_equal(got["image"], want["image"])


def test_order_depends_on_the_seed_and_epochs_reshuffle(cfg):
    a = next(pipeline.train_iterator(cfg))["tokens"]
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.seed = 1
    b = next(pipeline.train_iterator(cfg2))["tokens"]
    assert not np.array_equal(a, b)


def test_eval_batches_pad_and_mask(cfg):
    cfg.evals.zeroshot.batch_size = 128
    batches = list(eval_data.eval_batches(cfg, cfg.evals.zeroshot, num_devices=8))
    assert len(batches) == 4  # 400 test images in batches of 128
    assert sum(b["mask"].sum() for b in batches) == 400
    assert all(b["image"].shape == (128, 32, 32, 3) for b in batches)
    assert batches[-1]["mask"][16:].sum() == 0  # 400 - 3*128 = 16 real rows in the last batch
    assert eval_data.class_names(cfg.evals.zeroshot, cfg.data.data_dir)[0] == "red circle"


def test_missing_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(
        pipeline.DataError, match=r"tfds dataset 'imagenet2012' is not prepared in .*; prepare it there first"
    ):
        pipeline.open_source("imagenet2012", "validation", str(tmp_path))
