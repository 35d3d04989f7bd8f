"""Tokenizers: text -> fixed-length int32 ids with start/end tokens, padded, truncation keeping the end token.

`hashed_words` needs no vocabulary file: lower-cased ASCII words (runs of a-z and 0-9; every other character,
accented letters and other scripts included, separates words and is dropped) are hashed with CRC32 into the
model's vocabulary. It suits small closed-vocabulary datasets (the embedded ones) and is identical on every
machine (Python's own hash() is salted per process, CRC32 is not). Ids: 0 pad, 1 start, 2 end, 3+ words.
`clip_bpe` (clip_bpe.py) is OpenAI CLIP's 49,408-token BPE; `sentencepiece` (sentencepiece_tok.py) reads a model
file, `siglip_sentencepiece` reads one the way SigLIP's tokenizer does and `gemma_sentencepiece` the way SigLIP 2's
does (Gemma's tokenizer.model, A-Z lower-cased). `make(cfg)` is the one entry point.
"""

import re
import zlib

import numpy as np

from clip_jax.input.caption_ids import body_ids

# tokenizer.kind: what make() builds
KINDS = ("hashed_words", "clip_bpe", "sentencepiece", "siglip_sentencepiece", "gemma_sentencepiece")
PAD, BOS, EOS = 0, 1, 2
_FIRST_WORD_ID = 3
_WORD = re.compile(r"[a-z0-9]+")


class HashedWords:
    def __init__(self, vocab_size: int, max_len: int):
        if vocab_size <= _FIRST_WORD_ID:
            raise ValueError(f"hashed_words needs model.text.vocab_size > {_FIRST_WORD_ID}, got {vocab_size}")
        if max_len < 2:
            raise ValueError(f"model.text.max_len must hold at least the start and end tokens, got {max_len}")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.words = {}  # id -> word, for decode(); filled by learn_words (a hash cannot be inverted)

    def word_id(self, word: str) -> int:
        return _FIRST_WORD_ID + zlib.crc32(word.encode()) % (self.vocab_size - _FIRST_WORD_ID)

    def encode(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())[: self.max_len - 2]  # keep room for start and end
        ids = [BOS] + [self.word_id(w) for w in words] + [EOS]
        out = np.full((self.max_len,), PAD, np.int32)
        out[: len(ids)] = ids
        return out

    def __call__(self, texts) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts]) if len(texts) else np.zeros((0, self.max_len), np.int32)

    def learn_words(self, texts) -> None:
        """Remember the words of `texts` so decode() can spell their ids (the first word seen wins a collision)."""
        for text in texts:
            for word in _WORD.findall(text.lower()):
                self.words.setdefault(self.word_id(word), word)

    def decode(self, ids) -> str:
        """Ids -> text, up to the end token; an id of no learned word is spelled '<id>'."""
        return " ".join(self.words.get(int(i), f"<{int(i)}>") for i in body_ids(ids, self))


def build(kind: str, max_len: int, path: str = "", vocab_size: int = 0):
    """The tokenizer of `kind` writing rows of max_len ids, not checked against a text tower (vocab_size:
    hashed_words' hash range). Raises ValueError for an unknown kind or a missing file, OSError or RuntimeError
    for a file the kind's library cannot read."""
    if kind == "hashed_words":
        return HashedWords(vocab_size, max_len)
    if kind == "clip_bpe":
        from clip_jax.input import clip_bpe  # reads the 1.4 MB merge list: only when chosen

        return clip_bpe.ClipBPE(max_len, path)
    if kind in KINDS:
        from clip_jax.input import sentencepiece_tok

        return sentencepiece_tok.KINDS[kind](max_len, path)
    raise ValueError(f"unknown tokenizer.kind {kind!r}; choose one of {', '.join(map(repr, KINDS))}")


def make(cfg):
    """The tokenizer the config names, checked against the text tower's vocabulary and special ids."""
    kind, text = cfg.tokenizer.kind, cfg.model.text
    tok = build(kind, text.max_len, cfg.tokenizer.path, text.vocab_size)
    # Every disagreement with the text tower at once, so a user switching tokenizers fixes them in one go.
    fixes = []
    if text.vocab_size < tok.vocab_size:  # a larger text vocabulary only has unused rows
        fixes.append(f"model.text.vocab_size={tok.vocab_size} (is {text.vocab_size})")
    if text.pool == "eos" and text.eos_id != tok.eos_id:  # eos_id matters only to the 'eos' pooling
        fixes.append(f"model.text.eos_id={tok.eos_id} (is {text.eos_id})")
    if text.pad_id != tok.pad_id:
        fixes.append(f"model.text.pad_id={tok.pad_id} (is {text.pad_id})")
    if fixes:
        raise ValueError(
            f"the {kind} tokenizer ({tok.vocab_size} ids, end {tok.eos_id}, padding {tok.pad_id}) does not fit "
            "the text tower; set " + ", ".join(f"--config.{fix}" for fix in fixes)
        )
    return tok
