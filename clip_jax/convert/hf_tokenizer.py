"""An HF model directory's tokenizer files <-> clip_jax's tokenizer settings (tokenizer.kind and tokenizer.path).

SigLIP 1 and SigLIP 2 fixed-resolution checkpoints are the same architecture (`model_type: siglip`, the same
tensors; SigLIP 2 has Gemma's 256k vocabulary and 64 positions). What tells them apart is the tokenizer they ship:
- SigLIP 1: spiece.model (transformers' SiglipTokenizer) -> `siglip_sentencepiece`, unless tokenizer_config.json
  sets do_lower_case=false (ours always canonicalises the text, as SiglipTokenizer does by default).
- SigLIP 2: tokenizer.model, with tokenizer_config.json naming tokenizer_class GemmaTokenizer(Fast) (what Google's
  checkpoints ship) or Siglip2Tokenizer -> `gemma_sentencepiece`: A-Z lower-cased, no start token,
  [ids..., <eos>, <pad>...] (input/sentencepiece_tok.py says why and where the references differ).
A directory with neither gets no tokenizer, and main.py prints NO_TOKENIZER.

Export writes the model file back with a tokenizer_config.json that transformers loads, so an exported directory
re-imports with the same tokenizer. transformers' GemmaTokenizer does not lower-case: its users lower-case A-Z
first.
"""

import json
import os
import shutil

from clip_jax.input import tokenizer as tokenizer_lib

SPIECE, GEMMA = "spiece.model", "tokenizer.model"  # SigLIP 1's and SigLIP 2's file names
GEMMA_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer")
# SigLIP 2's training layout as GemmaTokenizer settings (big_vision: bos="no", eos="sticky", padding after).
GEMMA_LAYOUT = {"add_bos_token": False, "add_eos_token": True, "padding_side": "right"}

NO_TOKENIZER = (
    "note: no tokenizer set for {dir}: clip_jax recognises CLIP's 49,408-token BPE vocabulary, a SigLIP "
    "directory's spiece.model (lower-casing on) and a SigLIP 2 directory's Gemma tokenizer.model, and this "
    "directory has none of them. Image embeddings are exact; zero-shot evaluation needs --config.tokenizer.kind "
    "and --config.tokenizer.path naming this model's tokenizer"
)


def _settings(model_dir) -> dict:
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def find_spiece(model_dir):
    """The absolute path of DIR/spiece.model (SigLIP's tokenizer), or None when there is none or the directory's
    tokenizer_config.json turns off lower-casing (our siglip_sentencepiece always lower-cases, as HF's default)."""
    path = os.path.join(model_dir, SPIECE)
    if not os.path.isfile(path) or _settings(model_dir).get("do_lower_case", True) is False:
        return None
    return os.path.abspath(path)  # the workdir's config.json points at it from anywhere


def find(model_dir):
    """(tokenizer.kind, absolute path of its model file) of the directory's tokenizer, or None when clip_jax has
    no tokenizer that reproduces it (see the module docstring for the rule)."""
    gemma = os.path.join(model_dir, GEMMA)
    if _settings(model_dir).get("tokenizer_class") in GEMMA_CLASSES and os.path.isfile(gemma):
        return "gemma_sentencepiece", os.path.abspath(gemma)
    spiece = find_spiece(model_dir)
    return ("siglip_sentencepiece", spiece) if spiece else None


def notes(model_dir, cfg) -> list[str]:
    """Lines for main.py to print after an import: the SigLIP 2 text rule, and the directory's tokenizer settings
    that differ from it (HF's tokenizer would then give other ids than the model was trained on)."""
    if cfg.tokenizer.kind != "gemma_sentencepiece":
        return []
    lines = [
        (
            f"note: {model_dir}: SigLIP 2 text (Gemma tokenizer.model) -> tokenizer.kind=gemma_sentencepiece: "
            "captions have A-Z lower-cased, as in big_vision's SigLIP 2 pipeline (HF's GemmaTokenizer does not "
            f"lower-case), then [ids..., <eos>, <pad>...] to {cfg.model.text.max_len} ids"
        )
    ]
    settings = _settings(model_dir)
    differ = {k: settings[k] for k, want in GEMMA_LAYOUT.items() if k in settings and settings[k] != want}
    if differ:
        lines.append(
            f"note: {model_dir}: tokenizer_config.json sets {differ}; clip_jax keeps SigLIP 2's training layout "
            f"{GEMMA_LAYOUT}"
        )
    return lines


def write_files(cfg, model_dir) -> list[str]:
    """Copy the config's SentencePiece model into model_dir under the name transformers expects, beside a
    tokenizer_config.json with the same special pieces, layout and max length. Returns the file names written:
    none for tokenizer kinds without an HF SentencePiece counterpart (hashed_words, clip_bpe, sentencepiece)."""
    kind, max_len = cfg.tokenizer.kind, cfg.model.text.max_len
    if kind not in ("siglip_sentencepiece", "gemma_sentencepiece"):
        return []
    tok = tokenizer_lib.build(kind, max_len, cfg.tokenizer.path)
    sp = tok.sp
    settings = {"tokenizer_class": "SiglipTokenizer", "do_lower_case": True}  # its pad piece is its end piece
    if kind == "gemma_sentencepiece":
        settings = {"tokenizer_class": "GemmaTokenizer", **GEMMA_LAYOUT}
        if sp.bos_id() >= 0:
            settings["bos_token"] = sp.id_to_piece(sp.bos_id())
    for key, i in (("eos_token", tok.eos_id), ("pad_token", tok.pad_id), ("unk_token", sp.unk_id())):
        settings[key] = sp.id_to_piece(i)
    settings["model_max_length"] = max_len
    name = GEMMA if kind == "gemma_sentencepiece" else SPIECE
    target = os.path.join(model_dir, name)
    if not (os.path.exists(target) and os.path.samefile(cfg.tokenizer.path, target)):
        shutil.copyfile(cfg.tokenizer.path, target)
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump(settings, f, indent=2)
    return [name, "tokenizer_config.json"]
