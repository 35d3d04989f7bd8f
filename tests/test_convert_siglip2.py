"""SigLIP 2 fixed-resolution import: a SiglipModel with Gemma's tokenizer.model, checked against transformers.

The references are independent code: a tiny SentencePiece BPE model trained here with Gemma's settings and special
ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4: transformers' GemmaTokenizer defaults), read back by
transformers' own GemmaTokenizer from the saved directory; a random-initialised SiglipModel with that vocabulary
and 64 positions saved beside it; transformers' Siglip2Tokenizer (which lower-cases by itself); and for the
lower-casing rule, TensorFlow's tf.strings.lower, which is big_vision's `lower` op.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub name would fail instead of downloading
spm = pytest.importorskip("sentencepiece")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from clip_jax import config as config_lib  # noqa: E402
from clip_jax import config_checks  # noqa: E402
from clip_jax.convert import files, hf, hf_config, hf_tokenizer  # noqa: E402
from clip_jax.input import sentencepiece_tok, tokenizer  # noqa: E402
from clip_jax.models import two_tower  # noqa: E402

MAX_LEN, IMAGE, TOL = 64, 32, 1e-5
# Mixed case, punctuation, whitespace runs, tabs and newlines, digits, caseless or lower-case unicode, an empty
# caption, and captions longer than 64 ids (cut keeping <eos> last). Capitals outside A-Z: UNICODE_CAPITALS.
CAPTIONS = [
    "A photo of a Cat.",
    "a photo of a cat",
    "Two DOGS playing with a Frisbee in the park!",
    "A  Photo\tof\nCATS!!",
    " leading and trailing spaces ",
    "(a)b.c -- e.g. 12345, 3.14; #tag @user",
    "un café très naïve, 日本語のテキスト 🐈",
    "",
    "A photo of a " + "very " * 70 + "long caption.",
    "Sale!!! " * 40,
]
UNICODE_CAPITALS = ["ÉCOLE Ünïcode Über", "ΣΑΣ ΟΔΟΣ", "İstanbul", "Кошка и СОБАКА", "ǅ Ǆ ǆ"]  # not A-Z
TOWER = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _train_gemma_like(path):
    """A SentencePiece BPE model with Gemma's special ids and normalisation (none: identity, no dummy prefix,
    whitespace kept), byte fallback and split digits, trained on mixed-case text so 'Cat' and 'cat' differ."""
    corpus = [c for c in CAPTIONS + UNICODE_CAPITALS if c.strip()]
    corpus += [c.lower() for c in corpus] + [c.upper() for c in corpus]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 10),
        model_prefix=str(path / "tokenizer"),
        vocab_size=500,
        model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>"],
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    os.remove(path / "tokenizer.vocab")
    return spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))


# A second shape: one text layer wider than the image tower, 2 heads, an odd patch grid, LayerNorm eps 1e-5.
OTHER = {
    "text": {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "layer_norm_eps": 1e-5},
    "vision": {"hidden_size": 32, "image_size": 28, "patch_size": 7, "intermediate_size": 96},
}


def _siglip(vocab, seed=2, text=None, vision=None):
    """A random SiglipModel; config.json as SigLIP 2's leaves text pad/bos/eos at SiglipTextConfig's defaults."""
    vision = {"hidden_size": 48, "image_size": IMAGE, "patch_size": 8, **TOWER, **(vision or {})}
    text = {"vocab_size": vocab, "hidden_size": 32, "max_position_embeddings": MAX_LEN, **TOWER, **(text or {})}
    text["projection_size"] = vision["hidden_size"]  # SigLIP's text head maps to the image width
    torch.manual_seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off HF's ones/zeros initialisation, so no LayerNorm or bias can hide
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    """(directory, HF model): tokenizer.model, transformers' GemmaTokenizer saved from it (tokenizer.json and
    tokenizer_config.json, SigLIP 2's layout: no <bos>, <eos> added, padding on the right) and the model."""
    path = tmp_path_factory.mktemp("siglip2_hf")
    sp = _train_gemma_like(path)
    defaults = transformers.GemmaTokenizer()  # its default special ids are the ones we trained with
    special = [sp.id_to_piece(i) for i in range(5)]
    assert special == defaults.convert_ids_to_tokens([0, 1, 2, 3, 4])
    assert special == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    layout = {"add_bos_token": False, "add_eos_token": True, "padding_side": "right"}
    transformers.GemmaTokenizer.from_pretrained(path, **layout).save_pretrained(path)
    model = _siglip(sp.get_piece_size())
    model.save_pretrained(path)
    return str(path), model


def _reference(path):
    """transformers' tokenizer read from the directory, padding and cutting to 64 as SigLIP 2's model card says."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert type(tok).__name__ == "GemmaTokenizer"

    def ids(texts):
        return np.asarray(tok(texts, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"])

    return ids


def _ours(cfg, params):
    graphdef, _ = nnx.split(two_tower.abstract(cfg.model))
    return nnx.merge(graphdef, params)


def test_import_sets_the_gemma_tokenizer(siglip2_dir):
    path, _ = siglip2_dir
    cfg, _ = files.import_model(path)
    assert cfg.tokenizer.kind == "gemma_sentencepiece"
    assert cfg.tokenizer.path == os.path.join(path, "tokenizer.model")
    m = cfg.model
    # The tokenizer's ids win over config.json's defaults (pad 1, eos 49407): Gemma pads with 0 and ends with 1.
    assert (m.text.max_len, m.text.pad_id, m.text.eos_id) == (MAX_LEN, 0, 1)
    assert (m.text.pool, m.text.mask_padding, m.image.pool, cfg.loss.kind) == ("last", False, "map", "sigmoid")
    tok = tokenizer.make(cfg)  # the config's checks (vocabulary, pad id) pass
    assert isinstance(tok, sentencepiece_tok.GemmaSentencePiece) and tok.bos_id == -1
    notes = hf_tokenizer.notes(path, cfg)
    assert len(notes) == 1 and "lower-cased" in notes[0] and "gemma_sentencepiece" in notes[0]


def test_ids_equal_gemma_tokenizer_on_lower_cased_text(siglip2_dir):
    """Ours on the caption == transformers' GemmaTokenizer on the lower-cased caption, and == Siglip2Tokenizer
    (which lower-cases itself) on the caption: no <bos>, <eos> then <pad> 0, long captions cut keeping <eos>."""
    path, _ = siglip2_dir
    cfg, _ = files.import_model(path)
    # Every capital here is A-Z, where every lower-casing rule agrees (UNICODE_CAPITALS tests the others).
    assert all(ch.lower() == ch for c in CAPTIONS for ch in c if not ch.isascii())
    ours, ref = tokenizer.make(cfg)(CAPTIONS), _reference(path)([c.lower() for c in CAPTIONS])
    siglip2 = transformers.Siglip2Tokenizer.from_pretrained(path)
    ref2 = np.asarray(siglip2(CAPTIONS, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"])
    assert ours.shape == ref.shape == (len(CAPTIONS), MAX_LEN) and ours.dtype == np.int32
    for text, a, b, c in zip(CAPTIONS, ours, ref, ref2):
        assert a.tolist() == b.tolist() == c.tolist(), text
    # What the comparison covered: ends at 1, then 0s; a full row ends in 1; the empty caption is [1, 0, ...].
    lengths = (ours != 0).sum(axis=1)
    assert (ours[np.arange(len(ours)), lengths - 1] == 1).all() and (ours[:, 0] != 2).all()
    assert lengths.max() == MAX_LEN and ours[CAPTIONS.index("")].tolist() == [1] + [0] * (MAX_LEN - 1)


def test_lower_casing_rule(siglip2_dir):
    """Our ids for 'A Cat' are the reference's for 'a cat', not for 'A Cat' (the vocabulary tells them apart)."""
    path, _ = siglip2_dir
    cfg, _ = files.import_model(path)
    ours, ref = tokenizer.make(cfg), _reference(path)
    sp = spm.SentencePieceProcessor(model_file=cfg.tokenizer.path)
    assert sp.encode("A Cat") != sp.encode("a cat")
    assert ours(["A Cat"]).tolist() == ref(["a cat"]).tolist()
    assert ours(["A Cat"]).tolist() != ref(["A Cat"]).tolist()
    assert ours(["A CAT"]).tolist() == ours(["a cat"]).tolist() == ours(["a Cat"]).tolist()


def test_lower_casing_matches_big_vision_outside_ascii(siglip2_dir):
    """big_vision's SigLIP 2 pipeline lower-cases with tf.strings.lower(text) (encoding '': ASCII only), so
    capitals outside A-Z stay; transformers' Siglip2Tokenizer lower-cases every script, and differs there."""
    tf = pytest.importorskip("tensorflow")
    path, _ = siglip2_dir
    cfg, _ = files.import_model(path)
    tok = tokenizer.make(cfg)
    big_vision = [tf.strings.lower(c).numpy().decode() for c in UNICODE_CAPITALS]
    assert [tok.clean(c) for c in UNICODE_CAPITALS] == big_vision
    assert tok(UNICODE_CAPITALS).tolist() == _reference(path)(big_vision).tolist()
    siglip2 = transformers.Siglip2Tokenizer.from_pretrained(path)
    ref2 = siglip2(UNICODE_CAPITALS, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
    differ = [c for c, a, b in zip(UNICODE_CAPITALS, tok(UNICODE_CAPITALS).tolist(), ref2) if a != b]
    assert differ == UNICODE_CAPITALS, differ  # every one has a capital outside A-Z


@pytest.mark.parametrize("shape", ["base", "other"])
def test_embeddings_match_transformers_end_to_end(siglip2_dir, shape, tmp_path):
    """Caption -> our ids -> our imported towers == lower-cased caption -> GemmaTokenizer -> SiglipModel's
    get_text_features (ids only, as big_vision: no attention mask), and the image features, to 1e-5."""
    path, model = siglip2_dir
    if shape == "other":  # the same tokenizer files beside a model of another shape
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(path, name), tmp_path)
        model = _siglip(model.config.text_config.vocab_size, seed=5, **OTHER)
        model.save_pretrained(tmp_path)
        path = str(tmp_path)
    cfg, params = files.import_model(path)
    ours = _ours(cfg, params)
    size = model.config.vision_config.image_size
    images = np.random.default_rng(0).normal(size=(4, size, size, 3)).astype(np.float32)
    captions = CAPTIONS[:4] + CAPTIONS[-2:]
    with torch.no_grad():
        ids = torch.tensor(_reference(path)([c.lower() for c in captions]), dtype=torch.long)
        ref_txt = model.get_text_features(input_ids=ids).pooler_output.numpy()
        ref_img = model.get_image_features(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).pooler_output
    got_txt, got_img = np.asarray(ours.text(tokenizer.make(cfg)(captions))), np.asarray(ours.image(images))
    diffs = {"text": np.abs(got_txt - ref_txt).max(), "image": np.abs(got_img - ref_img.numpy()).max()}
    print({k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs
    assert np.abs(got_txt[0] - got_txt[1]).max() > 1e-2  # 'A photo of a Cat.' and 'a photo of a cat' differ ('.')


def test_round_trip_writes_the_tokenizer_back(siglip2_dir, tmp_path):
    """HF -> clip_jax -> HF: every tensor equal, tokenizer.model and a tokenizer_config.json that transformers
    reads with SigLIP 2's layout, and the exported directory re-imports to the same config. (The checkpoint in
    between is test_convert_hf.py's round trip; here the config passes the checks a checkpoint's must.)"""
    path, model = siglip2_dir
    cfg, params = files.import_model(path)
    config_checks.validate(cfg, 8)  # the new tokenizer.kind, and the tokenizer against the text tower
    out = str(tmp_path / "out")
    files.export_model(cfg, params, out)
    assert Path(out, "tokenizer.model").read_bytes() == Path(path, "tokenizer.model").read_bytes()
    loaded, info = transformers.SiglipModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert _reference(out)([c.lower() for c in CAPTIONS]).tolist() == tokenizer.make(cfg)(CAPTIONS).tolist()
    cfg3, _ = files.import_model(out)
    assert cfg3.tokenizer.path == os.path.join(out, "tokenizer.model")
    cfg3.tokenizer.path = cfg.tokenizer.path
    assert cfg3.to_dict() == cfg.to_dict()


def test_siglip_export_writes_its_spiece_model(tmp_path):
    """SigLIP 1 too: spiece.model and a SiglipTokenizer config, which transformers reads to our ids."""
    text = [c for c in CAPTIONS if c.strip()] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(tmp_path / "spiece"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    src = tmp_path / "src"
    transformers.SiglipTokenizer(str(tmp_path / "spiece.model")).save_pretrained(src)
    vocab = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model")).get_piece_size()
    _siglip(vocab).save_pretrained(src)
    cfg, params = files.import_model(str(src))
    assert cfg.tokenizer.kind == "siglip_sentencepiece" and cfg.model.text.pad_id == cfg.model.text.eos_id == 1
    files.export_model(cfg, params, str(tmp_path / "out"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert type(ref).__name__ == "SiglipTokenizer"
    ids = ref(CAPTIONS, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
    assert np.asarray(ids).tolist() == tokenizer.make(cfg)(CAPTIONS).tolist()
    assert files.import_model(str(tmp_path / "out"))[0].tokenizer.kind == "siglip_sentencepiece"


def test_which_directories_get_the_gemma_tokenizer(siglip2_dir, tmp_path):
    """tokenizer.model counts only with a Gemma / Siglip2 tokenizer_class; settings that differ from SigLIP 2's
    training layout are noted; a tokenizer larger than the text tower is refused."""
    path, _ = siglip2_dir
    model_file = os.path.join(path, "tokenizer.model")
    os.symlink(model_file, tmp_path / "tokenizer.model")
    assert hf_tokenizer.find(str(tmp_path)) is None  # no tokenizer_config.json: whose tokenizer is it?
    for cls, found in (("LlamaTokenizer", False), ("GemmaTokenizerFast", True), ("Siglip2Tokenizer", True)):
        settings = {"tokenizer_class": cls, "add_bos_token": True}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
        assert (hf_tokenizer.find(str(tmp_path)) is not None) == found, cls
    cfg = config_lib.base()
    cfg.tokenizer.kind = "gemma_sentencepiece"
    notes = hf_tokenizer.notes(str(tmp_path), cfg)
    assert len(notes) == 2 and "{'add_bos_token': True}" in notes[1]
    hf_cfg = transformers.SiglipConfig(text_config={"vocab_size": 100, **TOWER}, vision_config=TOWER).to_dict()
    with pytest.raises(hf.ConversionError, match="more than the text tower's vocab_size 100"):
        hf_config.config_from_hf(hf_cfg, None, ("gemma_sentencepiece", model_file))


@pytest.mark.slow
def test_cli_import_notes_the_rule_and_export_writes_the_tokenizer(siglip2_dir, tmp_path):
    path, _ = siglip2_dir
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = lambda *a: subprocess.run([sys.executable, "-m", "clip_jax.main", *a], capture_output=True, text=True,
                                    env=env, timeout=600, check=False)  # fmt: skip
    work = str(tmp_path / "work")
    r = run("convert", "--from=hf", f"--model-dir={path}", f"--workdir={work}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokenizer.kind=gemma_sentencepiece" in r.stdout and "A-Z lower-cased" in r.stdout, r.stdout
    r = run("convert", "--to=hf", f"--workdir={work}", f"--model-dir={tmp_path / 'back'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "back"))
