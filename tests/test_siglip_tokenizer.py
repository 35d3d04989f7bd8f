"""tokenizer.kind='siglip_sentencepiece' against transformers' SiglipTokenizer, and SigLIP imports that set it.

The reference is HF's own tokenizer read from the same spiece.model (a small SentencePiece model trained here with
SigLIP's special ids: pad 0, end 1, unk 2, no start piece), and a random-initialised SiglipModel saved beside it,
so the whole zero-shot text path (caption -> ids -> embedding) is checked against independent code.
"""

import os
import pickle
import shutil

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub name would fail instead of downloading
spm = pytest.importorskip("sentencepiece")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from test_input_tokenizers import CAPTIONS  # noqa: E402

from clip_jax.convert import files  # noqa: E402
from clip_jax.input import sentencepiece_tok, tokenizer  # noqa: E402
from clip_jax.models import two_tower  # noqa: E402

MAX_LEN = 64  # SigLIP's: its text_config.max_position_embeddings and SiglipTokenizer's model_max_length
# Beyond the shared caption list: leading/trailing punctuation and whitespace, text that canonicalises to
# nothing, SentencePiece's own word marker, unicode spaces and case rules, and captions longer than 64 ids.
EXTRA = [
    "A  Photo\tof\nCATS!!",
    " a photo",
    "- a photo -",
    "...",
    " -- ",
    "a \u2581 b",
    "\u2581\u2581",
    "\u3000full width space\u3000",
    "(a)b.c",
    "ΣΑΣ İstanbul ǅ",
    "A photo of a " + "very " * 70 + "long caption.",
    "Sale!!! " * 40,
]
TEXTS = CAPTIONS + EXTRA


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """(directory, HF model): spiece.model + tokenizer files (save_pretrained of HF's tokenizer) + the model."""
    path = tmp_path_factory.mktemp("siglip_hf")
    text = [c for c in TEXTS if c.strip()] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(path / "spiece"),
        vocab_size=300,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    os.remove(path / "spiece.vocab")
    transformers.SiglipTokenizer(str(path / "spiece.model")).save_pretrained(path)
    vocab = spm.SentencePieceProcessor(model_file=str(path / "spiece.model")).get_piece_size()
    tower = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    text_cfg = {"vocab_size": vocab, "hidden_size": 32, "max_position_embeddings": MAX_LEN, "projection_size": 48}
    text_cfg.update(eos_token_id=1, pad_token_id=1, bos_token_id=None, **tower)
    vision = {"hidden_size": 48, "image_size": 32, "patch_size": 8, **tower}
    torch.manual_seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text_cfg, vision_config=vision))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # off HF's ones/zeros initialisation, so no LayerNorm or bias can hide
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval().save_pretrained(path)
    return str(path), model


def _hf_ids(path, texts):
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    return np.asarray(hf_tok(texts, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"])


def test_import_sets_the_siglip_tokenizer(siglip_dir):
    path, _ = siglip_dir
    cfg, _ = files.import_model(path)
    assert cfg.tokenizer.kind == "siglip_sentencepiece"
    assert cfg.tokenizer.path == os.path.abspath(os.path.join(path, "spiece.model"))
    assert cfg.model.text.max_len == MAX_LEN and cfg.model.text.pad_id == 1
    assert (cfg.model.text.pool, cfg.model.text.mask_padding) == ("last", False)
    tok = tokenizer.make(cfg)  # the config's checks (vocabulary, pad id) pass
    assert isinstance(tok, sentencepiece_tok.SiglipSentencePiece) and tok.max_len == MAX_LEN


def test_ids_equal_transformers_token_for_token(siglip_dir):
    path, _ = siglip_dir
    cfg, _ = files.import_model(path)
    ours, ref = tokenizer.make(cfg)(TEXTS), _hf_ids(path, TEXTS)
    assert ours.shape == ref.shape == (len(TEXTS), MAX_LEN) and ours.dtype == np.int32
    for text, a, b in zip(TEXTS, ours, ref):
        assert a.tolist() == b.tolist(), text
    # What the comparison covered: no start id, end id 1 then padding with 1, long captions cut keeping the end.
    lengths = (ours != 1).sum(axis=1)
    assert lengths.max() == MAX_LEN - 1 and lengths.min() == 0 and (ours[:, -1] == 1).all()
    assert (ours[np.arange(len(TEXTS)), lengths] == 1).all()


def test_layout_pickle_and_decode(siglip_dir):
    path, _ = siglip_dir
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "spiece.model"))
    tok = sentencepiece_tok.SiglipSentencePiece(8, os.path.join(path, "spiece.model"))
    body = sp.encode("a photo of cats")
    assert tok.encode("A photo,  of CATS!").tolist() == [*body, 1] + [1] * (7 - len(body))
    long = tok.encode("a photo of a dog " * 10)
    assert long.tolist() == [*sp.encode("a photo of a dog " * 10)[:7], 1]
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again.encode("a cat"), tok.encode("a cat"))
    assert tok.decode(tok.encode("A cat!")) == "a cat"
    with pytest.raises(ValueError, match="tokenizer.path"):
        sentencepiece_tok.SiglipSentencePiece(8, path + "/missing.model")


def test_text_embeddings_match_transformers_end_to_end(siglip_dir):
    """Caption -> our ids -> our imported tower == caption -> HF's ids -> HF's SiglipModel, given ids only."""
    path, model = siglip_dir
    cfg, params = files.import_model(path)
    captions = ["a photo of a goldfish.", "Two dogs playing with a frisbee in the park", TEXTS[-2]]
    graphdef, _ = nnx.split(two_tower.abstract(cfg.model))
    ours = nnx.merge(graphdef, params)
    images = np.random.default_rng(0).normal(size=(len(captions), 32, 32, 3)).astype(np.float32)
    out = ours(images, tokenizer.make(cfg)(captions))
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(_hf_ids(path, captions), dtype=torch.long),
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
        )
    diff = np.abs(np.asarray(out["txt"]) - ref.text_embeds.numpy()).max()
    print(f"text embedding max diff {diff:.2e}")
    assert diff <= 1e-4
    assert np.abs(np.asarray(out["txt"])[0] - np.asarray(out["txt"])[1]).max() > 1e-2  # captions matter


def test_no_usable_spiece_leaves_the_tokenizer_unset(siglip_dir, tmp_path):
    path, model = siglip_dir
    model.save_pretrained(tmp_path)  # weights and config only
    assert files.find_spiece(str(tmp_path)) is None
    assert files.import_model(str(tmp_path))[0].tokenizer.kind == "hashed_words"  # base(): main.py prints the note
    shutil.copy(os.path.join(path, "spiece.model"), tmp_path)
    assert files.find_spiece(str(tmp_path)) == str(tmp_path / "spiece.model")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    assert files.find_spiece(str(tmp_path)) is None  # we always lower-case, so this one would not match


def test_coca_refuses_a_tokenizer_without_a_start_id(siglip_dir):
    from clip_jax import config, config_checks

    path, _ = siglip_dir
    cfg = config.base()
    cfg.model.family, cfg.tokenizer.kind = "coca", "siglip_sentencepiece"
    cfg.tokenizer.path, cfg.model.text.pad_id = os.path.join(path, "spiece.model"), 1
    cfg.model.text.eos_id, cfg.model.text.vocab_size = 1, 280  # fits the text tower: only the start id is missing
    with pytest.raises(config.ConfigError, match="model.family='coca' decodes from a start token, and the "):
        config_checks._check_tokenizer(cfg)  # validate()'s tokenizer step: the family table says coca captions
