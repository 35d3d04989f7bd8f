"""SentencePiece model files as caption tokenizers (`tokenizer.path` names the .model file).

`sentencepiece`: [BOS, ids..., EOS, PAD...] with the model's own start and end ids; padding is the model's pad id,
or 0 when it defines none (most models, e.g. mistral-common's `tokenizer.model.v1`, put <unk> at 0: a causal tower
pooled at the end token never looks past the end, so what fills the tail does not matter).

`siglip_sentencepiece`: SigLIP's layout, as transformers' SiglipTokenizer produces it with
`padding='max_length', truncation=True`: the text canonicalised (lower-cased, ASCII punctuation removed,
whitespace collapsed), no start token, [ids..., EOS, EOS...]. SigLIP pads with its end piece and its text tower
attends to the padding and pools the last position, so the pad id is part of the embedding, not filler.
A caption holding the literal strings '</s>' or '<unk>' differs: HF reads them as special tokens, we as text.

`gemma_sentencepiece`: SigLIP 2's layout (Gemma's 256k-piece tokenizer.model), as big_vision's SigLIP 2 demo
tokenizes, `lower(key="text")|tok(length=64, model="gemma", bos="no", eos="sticky")`: the text with its ASCII
letters A-Z lower-cased (big_vision's `lower` op is `tf.strings.lower` without an encoding, which leaves every
other character as it is: 'École' stays 'École', 'ΣΑΣ' stays 'ΣΑΣ'; whitespace and punctuation are kept), no
start token, [ids..., EOS, PAD...] with Gemma's <eos> (1) and <pad> (0). HF's GemmaTokenizer does not lower-case;
transformers' Siglip2Tokenizer and open_clip lower-case every script (open_clip also strips punctuation), so on
text with capitals outside A-Z their ids differ from big_vision's and ours.

All three truncate keeping the end token in the last slot, and report no start id (bos_id -1) unless they write
one (captioning decodes from the start id).
"""

import os
import string

import numpy as np

from clip_jax.input.caption_ids import body_ids

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class SentencePiece:
    """text -> int32 [max_len]: [BOS, ids..., EOS, PAD...]; pickled by path so grain workers reload the model."""

    kind, start = "sentencepiece", True

    def __init__(self, max_len: int, path: str):
        if max_len < (2 if self.start else 1):
            raise ValueError(
                f"model.text.max_len={max_len} cannot hold the {self.kind} tokenizer's special tokens"
            )
        if not path or not os.path.isfile(path):
            raise ValueError(f"tokenizer.kind={self.kind!r} needs tokenizer.path=<a .model file>, got {path!r}")
        self.max_len, self.path = max_len, path
        self._setup()

    def _setup(self):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(f"tokenizer.kind={self.kind!r} needs `pip install sentencepiece==0.2.1`") from None
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if (self.start and self.bos_id < 0) or self.eos_id < 0:
            raise ValueError(f"{self.path} defines no start or end piece (bos {self.bos_id}, eos {self.eos_id})")
        self.bos_id = self.bos_id if self.start else -1  # the start id this layout writes
        self.pad_id = max(self.sp.pad_id(), 0)

    def __getstate__(self):
        return {"max_len": self.max_len, "path": self.path}

    def __setstate__(self, state):
        self.max_len, self.path = state["max_len"], state["path"]
        self._setup()

    def clean(self, text: str) -> str:
        return " ".join(text.split())

    def encode(self, text: str) -> np.ndarray:
        start = [self.bos_id] if self.start else []
        body = self.sp.encode(self.clean(text))[: self.max_len - len(start) - 1]
        ids = [*start, *body, self.eos_id]
        out = np.full((self.max_len,), self.pad_id, np.int32)
        out[: len(ids)] = ids
        return out

    def __call__(self, texts) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts]) if len(texts) else np.zeros((0, self.max_len), np.int32)

    def decode(self, ids) -> str:
        """Ids -> text, up to the end token."""

        return self.sp.decode(body_ids(ids, self))


class SiglipSentencePiece(SentencePiece):
    """text -> int32 [max_len]: [ids..., EOS, EOS...] of the canonical text (SigLIP's spiece.model)."""

    kind, start = "siglip_sentencepiece", False

    def _setup(self):
        super()._setup()
        self.pad_id = self.eos_id  # SiglipTokenizer's pad token is '</s>', the end piece (id 1 in SigLIP's)

    def clean(self, text: str) -> str:
        # SiglipTokenizer.canonicalize_text (from big_vision's prompt engineering), after it has turned the
        # SentencePiece word marker into a space. str.split() and its r"\s+" agree on what whitespace is.
        text = text.replace("\u2581", " ").lower().translate(_NO_PUNCTUATION)
        return " ".join(text.split())


class GemmaSentencePiece(SentencePiece):
    """text -> int32 [max_len]: [ids..., EOS, PAD...] of the text with A-Z lower-cased (SigLIP 2's tokenizer.model,
    Gemma's: <pad> 0, <eos> 1; big_vision's `lower|tok(bos="no", eos="sticky")`, see the module docstring)."""

    kind, start = "gemma_sentencepiece", False

    def clean(self, text: str) -> str:
        # tf.strings.lower(text) with its default encoding '' (ASCII), what big_vision's `lower` op runs.
        return text.translate(_ASCII_LOWER)


KINDS = {cls.kind: cls for cls in (SentencePiece, SiglipSentencePiece, GemmaSentencePiece)}
