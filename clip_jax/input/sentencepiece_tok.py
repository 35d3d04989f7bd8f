"""A SentencePiece model file as a caption tokenizer (`tokenizer.kind = 'sentencepiece'`, `tokenizer.path`).

Start and end ids are the model's own; padding is the model's pad id, or 0 when it defines none (most models,
e.g. mistral-common's `tokenizer.model.v1`, put <unk> at 0: a causal tower pooled at the end token never looks
past the end, so what fills the tail does not matter). Truncation keeps the end token in the last slot.
"""

import os

import numpy as np


class SentencePiece:
    """text -> int32 [max_len]: [BOS, ids..., EOS, PAD...]; pickled by path so grain workers reload the model."""

    def __init__(self, max_len: int, path: str):
        if max_len < 2:
            raise ValueError(f"model.text.max_len must hold at least the start and end tokens, got {max_len}")
        if not path or not os.path.isfile(path):
            raise ValueError(f"tokenizer.kind='sentencepiece' needs tokenizer.path=<a .model file>, got {path!r}")
        self.max_len, self.path = max_len, path
        self._setup()

    def _setup(self):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError("tokenizer.kind='sentencepiece' needs `pip install sentencepiece==0.2.1`") from None
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path} defines no start or end piece (bos {self.bos_id}, eos {self.eos_id})")
        self.pad_id = max(self.sp.pad_id(), 0)

    def __getstate__(self):
        return {"max_len": self.max_len, "path": self.path}

    def __setstate__(self, state):
        self.max_len, self.path = state["max_len"], state["path"]
        self._setup()

    def encode(self, text: str) -> np.ndarray:
        body = self.sp.encode(" ".join(text.split()))[: self.max_len - 2]
        out = np.full((self.max_len,), self.pad_id, np.int32)
        out[: len(body) + 2] = [self.bos_id, *body, self.eos_id]
        return out

    def __call__(self, texts) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts]) if len(texts) else np.zeros((0, self.max_len), np.int32)

    def decode(self, ids) -> str:
        """Ids -> text, up to the end token."""
        from clip_jax.input.tokenizer import body_ids

        return self.sp.decode(body_ids(ids, self))
