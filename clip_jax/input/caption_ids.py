"""The rule every tokenizer's decode() shares for where a caption's own ids are in a padded id row (a leaf module:
tokenizer.py imports the tokenizer modules, and they import this, so no import goes in a circle)."""

import numpy as np


def body_ids(ids, tok, drop=None) -> list[int]:
    """The caption's own ids: everything before the first end token, without the ids in `drop` (default: start
    and pad; CLIP's BPE keeps its pad id 0, which is also "!"). `tok` gives bos_id, pad_id and eos_id."""
    drop = (tok.bos_id, tok.pad_id) if drop is None else drop
    out = []
    for i in np.asarray(ids).tolist():
        if i == tok.eos_id:
            break
        if i not in drop:
            out.append(i)
    return out
