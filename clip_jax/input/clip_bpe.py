"""OpenAI CLIP's byte-level BPE tokenizer (49,408 ids), read from the merge list vendored beside this file.

Matches open_clip's `SimpleTokenizer` / `open_clip.tokenize` (OpenAI's CLIP tokenizer, renamed special tokens)
token for token, tested on scraped-caption oddities in tests/test_clip_bpe_reference.py. Its steps, in order:
`ftfy.fix_text` (mojibake, curly quotes, full-width letters, ligatures, NFC, ...), HTML entities unescaped twice
more, whitespace runs to one space and trimmed, lower case; then the pre-tokenizer pattern
's|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+ (case-insensitive), each piece's UTF-8 bytes spelled
with 256 printable stand-in characters and merged by rank, "</w>" marking a word's end.
Ids: 49406 start, 49407 end, 0 padding (CLIP's layout; 0 is also the id of "!", which is harmless for causal
towers pooled at the end token, the layout CLIP trains). Truncation keeps the end token in the last slot; a blank
caption is [49406, 49407, 0, ...].

One departure, on purpose: open_clip reads the literal text "<start_of_text>" / "<end_of_text>" in a caption
as the special tokens; here it is text, so no caption can end itself early (the text tower pools at the first
end token). The pattern runs on the `regex` package, as the references' does, so its Unicode classes (\\p{L},
\\p{N}, case folding) are the same tables, not Python's older `unicodedata`.
Note: transformers' `CLIPTokenizer` runs neither ftfy nor the HTML unescaping, so on such text its ids differ
from these (and from the ids the OpenAI and open_clip models were trained with).
"""

import functools
import gzip
import html
import itertools
import os

import ftfy
import numpy as np
import regex

from clip_jax.input.caption_ids import body_ids

VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges: 256 bytes + 256 word-final bytes + merges + 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2
BOS, EOS, PAD = 49406, 49407, 0
_WORD_END = "</w>"
# CLIP's pre-tokenizer without its two special-token alternatives (see above); case-insensitive, as the references
# compile it (so "'S" is a contraction, and "'ſ" too: long s folds to s).
_PIECES = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
_CACHE_LIMIT = 1 << 17  # words; the cache is dropped when full so a long run's memory stays bounded


def byte_symbols() -> tuple[list[str], list[int]]:
    """(stand-in characters, their byte values), in CLIP's vocabulary order (ids 0..255).

    Printable Latin-1 bytes stand for themselves and come first; the other 68 bytes (controls, space, soft
    hyphen) get the characters 256, 257, ... so no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = sorted(set(range(256)) - set(printable))
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(rest))], printable + rest


def clean(text: str) -> str:
    """CLIP's text cleaning, step for step as OpenAI's and open_clip's tokenizers do it: `ftfy.fix_text` (repairs
    mojibake, uncurls quotes, folds full-width letters and ligatures, drops control characters, NFC), HTML
    entities unescaped twice more ("&amp;amp;amp;" is common in scraped alt text), whitespace runs to one space
    with none at the ends, lower case. Raises TypeError if `text` is not a str (bytes: decode them first)."""
    if not isinstance(text, str):
        raise TypeError(f"CLIP BPE tokenizes str captions, got {type(text).__name__}; decode bytes to str first")
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def split_pieces(text: str) -> list[str]:
    """CLIP's pre-tokenizer on cleaned text: contractions, letter runs, single digits, runs of other symbols
    ('s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+, case-insensitive), left to right; a list
    of non-empty str pieces. Characters that no alternative matches (whitespace, and the combining mark U+0345,
    which folds to a letter yet is none) are skipped, as in the references."""
    return _PIECES.findall(text)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, dict]:
    """(symbol -> id, merge pair -> rank), shared by every tokenizer of this process that reads `path`."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]  # line 0 is a version header
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not CLIP's BPE merge list ({len(merges)} merges, expected {_NUM_MERGES})")
    symbols, _ = byte_symbols()
    vocab = symbols + [s + _WORD_END for s in symbols] + [a + b for a, b in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    return {s: i for i, s in enumerate(vocab)}, {m: r for r, m in enumerate(merges)}


class ClipBPE:
    """text -> int32 [max_len]: [BOS, ids..., EOS, PAD...]; picklable by path, so grain workers reload it."""

    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, max_len: int, path: str = ""):
        if max_len < 2:
            raise ValueError(f"model.text.max_len must hold at least the start and end tokens, got {max_len}")
        self.max_len, self.path = max_len, path or VOCAB_FILE
        self._setup()

    def _setup(self):
        self.encoder, self.ranks = _load(self.path)
        symbols, order = byte_symbols()
        self._byte_char = [""] * 256
        for byte, symbol in zip(order, symbols):
            self._byte_char[byte] = symbol
        self._cache = {}
        self._symbols = None  # id -> symbol, built on the first decode()

    def __getstate__(self):
        return {"max_len": self.max_len, "path": self.path}

    def __setstate__(self, state):
        self.max_len, self.path = state["max_len"], state["path"]
        self._setup()

    def _merge(self, word: str) -> list[str]:
        """Byte-level BPE of one piece: repeatedly merge the lowest-ranked adjacent pair, every occurrence of it
        left to right, until no adjacent pair has a rank."""
        parts = list(word[:-1]) + [word[-1] + _WORD_END]
        while len(parts) > 1:
            ranks = [self.ranks.get(pair, _NUM_MERGES) for pair in itertools.pairwise(parts)]
            best = min(ranks)
            if best == _NUM_MERGES:
                break
            first, second = parts[ranks.index(best)], parts[ranks.index(best) + 1]
            merged, k = [], 0
            while k < len(parts):
                if k + 1 < len(parts) and parts[k] == first and parts[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        return parts

    def piece_ids(self, piece: str) -> list[int]:
        """Ids of one pre-tokenizer piece, from the word cache when it was seen before."""
        ids = self._cache.get(piece)
        if ids is None:
            word = "".join(self._byte_char[b] for b in piece.encode("utf-8"))
            ids = [self.encoder[p] for p in self._merge(word)]
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def ids(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text` without start/end; stops once `limit` ids exist (long captions are cut anyway)."""
        out = []
        for piece in split_pieces(clean(text)):
            out.extend(self.piece_ids(piece))
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    def encode(self, text: str) -> np.ndarray:
        """int32 [max_len]: [BOS, ids..., EOS, PAD...]; a long caption keeps its first max_len - 2 ids."""
        body = self.ids(text, limit=self.max_len - 2)  # room for start and end: truncation keeps the end token
        out = np.full((self.max_len,), PAD, np.int32)
        out[: len(body) + 2] = [BOS, *body, EOS]
        return out

    def __call__(self, texts) -> np.ndarray:
        """A sequence of n str -> int32 [n, max_len], one encode() row each."""
        return np.stack([self.encode(t) for t in texts]) if len(texts) else np.zeros((0, self.max_len), np.int32)

    def decode(self, ids) -> str:
        """Ids -> text up to the end token: symbols joined, '</w>' read as a space, stand-ins mapped back to bytes.
        Gives the cleaned text (lower case, single spaces). Id 0 before the end token is "!", not padding."""

        if self._symbols is None:
            self._symbols = {i: s for s, i in self.encoder.items()}
            self._char_byte = dict(zip(*byte_symbols()))
        spelled = "".join(self._symbols[i] for i in body_ids(ids, self, drop=(BOS,)))
        words = spelled.replace(_WORD_END, " ").split()
        return " ".join(bytes(self._char_byte[c] for c in w).decode("utf-8", errors="replace") for w in words)
