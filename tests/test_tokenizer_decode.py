"""decode() inverts encode() for every tokenizer: the caption command and CIDEr read generated ids as text."""

from clip_jax.input import clip_bpe, tokenizer


def test_clip_bpe_decode_round_trip():
    tok = clip_bpe.ClipBPE(24)
    ids = tok.encode("a photo of a goldfish.")
    assert list(ids[:8]) == [49406, 320, 1125, 539, 320, 40293, 269, 49407]  # CLIP's published ids
    assert tok.decode(ids) == "a photo of a goldfish ."  # BPE marks word ends, so punctuation stands apart
    assert tok.decode(tok.encode("Wörld 3 cats!")) == "wörld 3 cats !"  # bytes back to UTF-8; id 0 ('!') kept


def test_hashed_words_decode_learned_words_and_marks_unknown_ids():
    tok = tokenizer.HashedWords(512, 12)
    tok.learn_words(["a red circle on the left"])
    ids = tok.encode("a red square on the left")
    assert tok.decode(ids) == f"a red <{tok.word_id('square')}> on the left"
    ids[3] = tok.eos_id  # decoding stops at the first end token
    assert tok.decode(ids) == "a red"
