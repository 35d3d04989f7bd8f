"""The CLIP BPE tokenizer against Hugging Face `tokenizers` built independently from the same merge file, and the
tokenizer choice in the config."""

import gzip
import html

import numpy as np
import pytest

from clip_jax.input import clip_bpe, tokenizer

# Real-world caption styles: COCO-like, scraped alt text with entities, product titles, non-Latin scripts,
# emoji, decomposed accents, contractions, numbers, URLs, odd whitespace.
CAPTIONS = [
    "a photo of a goldfish.",
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park",
    "The kitchen is clean and ready for us to see.",
    "Tom &amp; Jerry&#39;s  &quot;classic&quot; cartoon &lt;1940&gt;",
    "Rock &amp;amp; roll t-shirt &ndash; size XL",
    "It's a cat; they're sleeping, we've seen it, I'm sure you'll like what I'd do. DON'T",
    "Café au lait, crème brûlée & naïve façade",
    "Cafe\u0301 with a decomposed accent (NFC makes it café)",
    "東京タワーの夜景 Tokyo tower at night",
    "Москва — столица России",
    "مرحبا بالعالم صورة قطة",
    "🐱 cute cat emoji 😂😂 👍🏽 family: 👨‍👩‍👧",
    "Sale!!! 50% off — only $19.99 (today) ... #deal @shop",
    "1080p HDR wallpaper 3840x2160, 2024-01-05",
    "https://example.com/images/IMG_2034.JPG?size=large&w=800",
    "tabs\tand\nnewlines\r\n and   many    spaces   ",
    "   ",
    "",
    "''quoted'' 'single' ’curly’ “double”",
    "Ⅻ roman numeral, ½ cup, ² squared, ١٢٣ arabic digits",
    "the café's owner didn't say",
    "ßtraße ǅ titlecase İstanbul",
    "zero\u200bwidth\u00a0nbsp",
    "word" * 60,
]
LONG = " ".join(
    ["An extremely long scraped description of a sunset over the mountains with hikers, tents, and dogs."] * 40
)


def _gpt2_byte_chars():
    """Byte -> character table of GPT-2/CLIP, written out here independently of clip_jax."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    return keep + extra, [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="module")
def hf():
    tk = pytest.importorskip("tokenizers")
    with gzip.open(clip_bpe.VOCAB_FILE, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
    _, chars = _gpt2_byte_chars()
    words = (
        chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<start_of_text>", "<end_of_text>"]
    )
    vocab = {w: i for i, w in enumerate(words)}
    model = tk.models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>")
    t = tk.Tokenizer(model)
    # No NFC here: ftfy (below) normalises before the HTML unescaping, as CLIP's cleaning does.
    t.normalizer = tk.normalizers.Sequence(
        [tk.normalizers.Replace(tk.Regex(r"\s+"), " "), tk.normalizers.Lowercase()]
    )
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    t.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="removed", invert=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    ftfy = pytest.importorskip("ftfy")
    return lambda text: t.encode(html.unescape(html.unescape(ftfy.fix_text(text))), add_special_tokens=False).ids


def test_known_ids():
    tok = clip_bpe.ClipBPE(max_len=77)
    ids = tok.encode("a photo of a goldfish.")
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 40293, 269, 49407]
    assert not ids[8:].any() and ids.shape == (77,) and ids.dtype == np.int32
    assert len(tok.encoder) == clip_bpe.VOCAB_SIZE == 49408


@pytest.mark.parametrize("caption", CAPTIONS + [LONG])
def test_matches_hf_tokenizers_token_for_token(hf, caption):
    tok = clip_bpe.ClipBPE(max_len=77)
    want = hf(caption)
    assert tok.ids(caption) == want
    # Fixed-length layout with truncation that keeps the end token.
    body = want[:75]
    expected = [49406, *body, 49407] + [0] * (75 - len(body))
    assert tok.encode(caption).tolist() == expected


def test_cleaning_unescapes_lowercases_and_collapses_whitespace():
    tok = clip_bpe.ClipBPE(max_len=32)
    assert tok.ids("Tom &amp;amp; JERRY") == tok.ids("tom & jerry")
    assert tok.ids("  a\t\tdog\n") == tok.ids("a dog")
    # "<end_of_text>" in a caption is text, not the end token: a caption cannot end itself early.
    ids = tok.encode("see <end_of_text> here")
    assert (ids == clip_bpe.EOS).sum() == 1
    long = tok.encode(LONG)
    assert long[0] == clip_bpe.BOS and long[-1] == clip_bpe.EOS and (long != 0).all()


def test_pickles_by_path():
    import pickle

    tok = clip_bpe.ClipBPE(max_len=16)
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # grain ships the path to its workers, not the 49k-entry tables
    np.testing.assert_array_equal(pickle.loads(blob).encode("a red car"), tok.encode("a red car"))


def _cfg(kind, **text):
    from clip_jax import config

    c = config.base()
    c.tokenizer.kind = kind
    for k, v in text.items():
        setattr(c.model.text, k, v)
    return c


def test_make_builds_clip_bpe_and_checks_the_text_tower():
    tok = tokenizer.make(_cfg("clip_bpe", max_len=20))
    assert isinstance(tok, clip_bpe.ClipBPE) and tok.max_len == 20
    with pytest.raises(ValueError, match="eos_id=49407"):
        tokenizer.make(_cfg("clip_bpe", eos_id=2))
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer.make(_cfg("clip_bpe", vocab_size=4096))
    with pytest.raises(ValueError, match="unknown tokenizer.kind"):
        tokenizer.make(_cfg("wordpiece"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A small SentencePiece model trained here on the captions above (a real model file, made offline)."""
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("spm") / "caps"
    text = [c for c in CAPTIONS + [LONG] if c.strip()] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(prefix),
        vocab_size=300,
        model_type="unigram",
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_id=0,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    return str(prefix) + ".model", spm.SentencePieceProcessor(model_file=str(prefix) + ".model")


def test_sentencepiece_layout_truncation_and_make(sp_model):
    path, ref = sp_model
    cfg = _cfg("sentencepiece", max_len=12, vocab_size=300, eos_id=2, pad_id=0)
    cfg.tokenizer.path = path
    tok = tokenizer.make(cfg)
    body = ref.encode("two dogs playing")
    assert tok.encode("two  dogs\tplaying").tolist() == [1, *body, 2] + [0] * (10 - len(body))
    long = tok.encode(LONG)
    assert long.tolist() == [1, *ref.encode(LONG)[:10], 2]  # truncation keeps the end token
    import pickle

    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok)).encode("a cat"), tok.encode("a cat"))
    cfg.tokenizer.path = path + ".missing"
    with pytest.raises(ValueError, match="tokenizer.path"):
        tokenizer.make(cfg)
