"""The CLIP BPE tokenizer token for token against open_clip's (OpenAI's CLIP tokenizer), on scraped-caption
oddities (tests/caption_mix.py), and its pre-tokenizer against open_clip's pattern on every Unicode code point."""

import random
import sys
import unicodedata

import caption_mix
import ftfy
import numpy as np
import pytest
from reference_libs import open_clip_module

from clip_jax.input import clip_bpe, tokenizer

CAPTIONS = caption_mix.captions(400, seed=13)
# Every code point but the surrogates (which a Python str can hold but UTF-8 text cannot).
ALL_CHARS = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)


@pytest.fixture(scope="module")
def ref():
    return open_clip_module("tokenizer")


@pytest.fixture(scope="module")
def plain_ref(ref):
    """open_clip's SimpleTokenizer without its two special-token alternatives (its own pattern, the first two
    alternatives dropped): what it does with "<end_of_text>" read as text."""
    tok = ref.SimpleTokenizer()
    specials, pattern = "<start_of_text>|<end_of_text>|", tok.pat.pattern
    assert pattern.startswith(specials)
    tok.pat = ref.re.compile(pattern[len(specials) :], tok.pat.flags)
    tok.cache = {}
    return tok


def _first_mismatch(texts, ours, theirs) -> str:
    rows = np.flatnonzero((np.asarray(ours) != np.asarray(theirs)).any(axis=1))
    if not len(rows):
        return ""
    i = rows[0]
    return f"{len(rows)} rows differ, first {texts[i]!r}:\n ours {ours[i].tolist()}\n ref  {theirs[i].tolist()}"


def _cfg(max_len):
    from clip_jax import config

    c = config.base()
    c.tokenizer.kind = "clip_bpe"
    c.model.text.max_len, c.model.text.vocab_size = max_len, 49408
    c.model.text.eos_id, c.model.text.pad_id = 49407, 0
    return c


def test_known_ids(ref):
    tok = clip_bpe.ClipBPE(max_len=16)
    for text, want in [
        ("a photo of a goldfish.", [49406, 320, 1125, 539, 320, 40293, 269, 49407]),  # CLIP's published ids
        ("don\u2019t", [49406, 847, 713, 49407]),  # curly apostrophe: ftfy makes it "don't"
    ]:
        assert tok.encode(text).tolist() == want + [0] * (16 - len(want))
        assert ref.tokenize(text, context_length=16)[0].tolist() == want + [0] * (16 - len(want))


@pytest.mark.parametrize("max_len", [77, 16])
def test_matches_open_clip_token_for_token(ref, max_len):
    cfg = _cfg(max_len)
    ours = tokenizer.make(cfg)(CAPTIONS)  # the one entry point of training, zero-shot and retrieval
    theirs = ref.tokenize(CAPTIONS, context_length=max_len).numpy()
    assert ours.dtype == np.int32 and ours.shape == theirs.shape == (len(CAPTIONS), max_len)
    assert not _first_mismatch(CAPTIONS, ours, theirs), _first_mismatch(CAPTIONS, ours, theirs)
    # The mix exercises what it is meant to: truncated rows (end token in the last slot), blank captions.
    truncated = (theirs[:, -1] == clip_bpe.EOS).sum()
    blank = ((theirs[:, 1] == clip_bpe.EOS) & (theirs[:, 2:] == 0).all(axis=1)).sum()
    assert truncated >= 20 and blank >= 10, (truncated, blank)


def test_untruncated_ids_and_decode_match_open_clip(ref):
    tok = clip_bpe.ClipBPE(max_len=77)
    assert sum(ftfy.fix_text(c) != c for c in CAPTIONS) > len(CAPTIONS) // 3  # ftfy has work to do here
    for text in CAPTIONS:
        want = ref._tokenizer.encode(text)
        assert tok.ids(text) == want, text
        # decode(): the kept ids' text, as open_clip's decode spells it (less its trailing space).
        assert tok.decode(tok.encode(text)) == " ".join(ref._tokenizer.decode(want[:75]).split()), text


def test_special_token_text_is_the_only_departure(ref, plain_ref):
    texts = ["see <end_of_text> here", "<start_of_text>a dog", "x<END_OF_TEXT>.", "cat<end_of_text><end_of_text>"]
    tok = clip_bpe.ClipBPE(max_len=24)
    for text in texts:
        ids = tok.encode(text)
        assert (ids == clip_bpe.EOS).sum() == 1 and (ids == clip_bpe.BOS).sum() == 1, text
        assert tok.ids(text) == plain_ref.encode(text), text  # text as open_clip reads it without the specials
        theirs = ref._tokenizer.encode(text)
        assert clip_bpe.EOS in theirs or clip_bpe.BOS in theirs, text  # open_clip: a special token mid-caption


def test_pre_tokenizer_matches_open_clip_pattern(ref, plain_ref):
    """split_pieces against open_clip's pattern on every code point (but surrogates) in random runs, with
    apostrophes, contraction letters and every character that folds to one of them."""
    flags = plain_ref.pat.flags
    lowered = "".join(set(ALL_CHARS.lower()))  # what can reach the pattern after cleaning
    folds = set(ref.re.findall("[strevmld]", lowered, flags)) - set("strevmld")
    assigned = [c for c in ALL_CHARS if unicodedata.category(c) != "Cs"]
    rng = random.Random(0)
    rng.shuffle(assigned)
    assert folds == {"\u017f"}  # long s, the one lower-case letter that folds to a contraction letter
    glue = ["'", " ", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", *("'" + f for f in folds)]
    text = "".join(c + (rng.choice(glue) if rng.random() < 0.3 else "") for c in assigned)
    text = " ".join(text.split()).lower()  # the pre-tokenizer sees cleaned text
    ours, theirs = clip_bpe.split_pieces(text), plain_ref.pat.findall(text)
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    assert ours == theirs, (k, ours[k - 2 : k + 3], theirs[k - 2 : k + 3])


def test_bytes_caption_is_a_clear_error():
    with pytest.raises(TypeError, match="decode bytes to str first"):
        clip_bpe.ClipBPE(max_len=8).encode(b"a cat")
