"""Captioning evaluation (CoCa): perplexity of the reference captions and CIDEr-D of generated ones.

- Perplexity = exp(total NLL / total tokens) of every reference caption of every image, teacher-forced (each
  caption's end token counts, its start token does not), computed batch-sharded on all devices.
- CIDEr-D (Vedantam et al. 2015, the variant of the COCO caption server): for n = 1..4, TF-IDF vectors of the
  n-grams of a caption, with document frequencies counted over the images' reference sets; a candidate's n-gram
  counts are clipped to the reference's, the cosine-like similarity is damped by exp(-(len_c - len_r)^2 / 2
  sigma^2) with sigma = 6, averaged over n and over the references, and scaled by 10. Words are the lower-cased
  letter/digit runs (punctuation dropped, as the PTB tokenizer of the caption server drops it).
"""

import collections
import functools
import logging
import math
import re

import jax
import numpy as np
from flax import nnx

from clip_jax import sharding
from clip_jax import state as run_state
from clip_jax.config import ConfigError
from clip_jax.evaluate import common
from clip_jax.input import decode, eval_data, pipeline
from clip_jax.input import tokenizer as tokenizer_lib
from clip_jax.models import generate
from clip_jax.models.families import FAMILIES
from clip_jax.models.families import captioning as captioning_families

_WORD = re.compile(r"[a-z0-9]+")
log = logging.getLogger(__name__)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n_max: int) -> list[collections.Counter]:
    """Per n = 1..n_max, the counts of the caption's n-grams."""
    return [
        collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        for n in range(1, n_max + 1)
    ]


def cider_d(candidates: list[str], references: list[list[str]], *, n_max: int = 4, sigma: float = 6.0):
    """(mean CIDEr-D, per-image scores) of candidates[i] against references[i] (one or more strings each)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    refs = [[_ngrams(words(r), n_max) for r in rs] for rs in references]
    ref_lens = [[len(words(r)) for r in rs] for rs in references]
    # Document frequency: in how many images' reference sets an n-gram occurs (once per image).
    df = collections.Counter()
    for image_refs in refs:
        df.update({g for grams in image_refs for counts in grams for g in counts})
    log_n = math.log(float(len(references)))

    def tfidf(grams):
        vecs = [{g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in counts.items()} for counts in grams]
        return vecs, [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]

    scores = []
    for cand, image_refs, lens in zip(candidates, refs, ref_lens, strict=True):
        c_vecs, c_norms = tfidf(_ngrams(words(cand), n_max))
        c_len, total = len(words(cand)), 0.0
        for grams, r_len in zip(image_refs, lens, strict=True):
            r_vecs, r_norms = tfidf(grams)
            damp = math.exp(-((c_len - r_len) ** 2) / (2 * sigma**2))
            sims = []
            for cv, rv, cn, rn in zip(c_vecs, r_vecs, c_norms, r_norms, strict=True):
                dot = sum(min(v, rv[g]) * rv[g] for g, v in cv.items() if g in rv)
                sims.append(damp * dot / (cn * rn) if cn > 0 and rn > 0 else 0.0)
            total += sum(sims) / n_max
        scores.append(10.0 * total / len(image_refs))
    return float(np.mean(scores)) if scores else 0.0, scores


def perplexity(nll_sum: float, tokens: float) -> float:
    return math.exp(nll_sum / max(tokens, 1.0))


def _texts(value) -> list[str]:
    """A stored caption field (bytes, str, or a list/array of them) -> its non-empty captions."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    out = [v.decode("utf-8", errors="replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in values]
    return [t for t in out if t.strip()]


def load_examples(cfg, dataset: str, split: str, limit: int, *, image_key="image", text_key="caption",
                  with_images: bool = True):  # fmt: skip
    """(images [n,S,S,3] float32 or None, references: list of lists of str) of the first `limit` examples with a
    readable image (eval_data.eval_image) and at least one caption."""
    source = pipeline.open_source(dataset, split, cfg.data.data_dir)
    total = len(source) if limit < 0 else min(len(source), limit)
    images, refs = [], []
    for i in range(total):
        record = source[i]
        texts = _texts(pipeline.field(record, text_key))
        if not texts:
            continue
        if with_images:
            image, bits = eval_data.eval_image(cfg, pipeline.field(record, image_key))
            if image is None:
                log.warning("captioning eval: image %d skipped: %s", i, ", ".join(decode.issue_names(bits)))
                continue
            images.append(image)
        refs.append(texts)
    return (np.stack(images) if with_images and images else None), refs


def decoder(cfg, texts=None):
    """The config's tokenizer, able to decode. A hashed-words tokenizer learns its words from `texts`, or from
    the captions of the first 5,000 training examples (a hash cannot be inverted without them)."""
    tok = tokenizer_lib.make(cfg)
    if hasattr(tok, "learn_words"):
        if texts is None:
            d = cfg.data
            _, refs = load_examples(cfg, d.name, d.train_split, 5000, text_key=d.text_key, with_images=False)
            texts = [t for rs in refs for t in rs]
        tok.learn_words(texts)
    return tok


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(graphdef, search: tuple, params, images):
    return generate.caption(nnx.merge(graphdef, params), images, **dict(search))


@functools.partial(jax.jit, static_argnums=0)
def _caption_loss(graphdef, params, images, tokens):
    return nnx.merge(graphdef, params).caption_loss(images, tokens)


def caption_fn(cfg, graphdef, tok):
    """(params, images [B,S,S,3]) -> (tokens [B, max_len], scores [B]) with the config's search settings (caption.*).
    The jitted function is module-level (graphdef and settings static): built once per process and shape."""
    max_len = cfg.caption.max_len if cfg.caption.max_len > 0 else cfg.model.text.max_len
    search = dict(
        beam_size=cfg.caption.beam_size,
        max_len=max_len,
        bos=tok.bos_id,
        eos=cfg.model.text.eos_id,
        pad=cfg.model.text.pad_id,
        length_penalty=cfg.caption.length_penalty,
    )
    return functools.partial(_generate, graphdef, tuple(sorted(search.items())))


def _gather(x) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _pad(x: np.ndarray, rows: int, value=0) -> np.ndarray:
    """x padded with `value` rows to `rows`: every batch has one shape, so one compilation serves all."""
    if len(x) >= rows:
        return x
    return np.concatenate([x, np.full((rows - len(x), *x.shape[1:]), value, x.dtype)])


class Captioning(common.Evaluator):
    """Perplexity of the references and CIDEr-D of generated captions on one captioned set (an `evals.<name>`
    section of type 'captioning'; families that caption). The references and the tokenizer (which learns its words
    from them, see decoder) are read once, when the evaluator is built.

    Metrics: perplexity, nll (per token), cider, examples. Every host runs every batch (the arrays are global);
    the host-side n-gram scoring is cheap and identical on all.
    """

    def __init__(self, name, section, cfg, mesh):
        super().__init__(name, section, cfg, mesh)
        if not FAMILIES[cfg.model.family].captions:
            raise ConfigError(
                f"{self.key} is a captioning evaluator but model.family={cfg.model.family!r} does not caption; set "
                f"--config.{self.key}.dataset='' or train a family that captions ({', '.join(captioning_families())})"
            )
        eval_data.check_section(cfg, section, self.key, text_key="text_key")
        _, self.refs = load_examples(
            cfg, section.dataset, section.split, section.max_examples, text_key=section.text_key, with_images=False
        )
        if not self.refs:
            raise pipeline.DataError(f"{self.key}: no captioned examples in {section.dataset}/{section.split}")
        self.tok = decoder(cfg, [t for rs in self.refs for t in rs])

    def run(self, params, encoders, graphdef) -> dict:
        cfg, section, mesh, tok = self.cfg, self.section, self.mesh, self.tok
        images, refs = load_examples(
            cfg, section.dataset, section.split, section.max_examples, image_key=section.image_key,
            text_key=section.text_key,
        )  # fmt: skip
        if images is None:
            raise pipeline.DataError(f"{self.key}: no captioned images in {section.dataset}/{section.split}")
        bs = section.batch_size
        # The global batch is assembled from every host's identical copy: each host contributes its own rows.
        pc, pi = jax.process_count(), jax.process_index()
        local = bs // pc
        run_caption = caption_fn(cfg, graphdef, tok)
        generated, nll, count = [], 0.0, 0.0
        mine = slice(pi * local, (pi + 1) * local)  # this host's rows of every global batch
        for start in range(0, len(images), bs):
            stop = min(start + bs, len(images))
            dev_images = sharding.put_batch({"x": _pad(images[start:stop], bs)[mine]}, mesh)["x"]
            tokens, _ = run_caption(params, dev_images)
            generated.extend(tok.decode(row) for row in _gather(tokens)[: stop - start])
            for r in range(max(len(rs) for rs in refs[start:stop])):
                # Reference r of each image; images with fewer references get an all-padding row (scores nothing).
                texts = [rs[r] if r < len(rs) else None for rs in refs[start:stop]]
                toks = np.stack(
                    [tok.encode(t) if t is not None else np.full(tok.max_len, tok.pad_id, np.int32) for t in texts]
                )
                dev_tokens = sharding.put_batch({"t": _pad(toks, bs, tok.pad_id)[mine]}, mesh)["t"]
                s, c = _caption_loss(graphdef, params, dev_images, dev_tokens)
                nll, count = nll + float(s), count + float(c)
        cider, _ = cider_d(generated, refs)
        for cand, rs in list(zip(generated, refs))[:5]:
            log.info("caption: %r  (reference: %r)", cand, rs[0])
        return {"perplexity": perplexity(nll, count), "nll": nll / max(count, 1.0), "cider": cider,
                "examples": len(images)}  # fmt: skip


def read_images(cfg, paths: list[str]) -> list[np.ndarray]:
    """The caption CLI's image files as the model sees them (eval_data.eval_image); DataError names a bad file."""
    images = []
    for path in paths:
        with open(path, "rb") as f:
            image, bits = eval_data.eval_image(cfg, f.read())
        if image is None:
            raise pipeline.DataError(f"cannot read image {path}: {', '.join(decode.issue_names(bits))}")
        images.append(image)
    return images


def caption_files(cfg, workdir: str, paths: list[str]) -> dict:
    """Captions of image files by the latest checkpoint in workdir: {'step', 'captions': [(path, text, score)]}."""
    if not FAMILIES[cfg.model.family].captions:
        raise pipeline.DataError(
            f"model.family={cfg.model.family!r} does not caption; train a family that captions "
            f"({', '.join(captioning_families())})"
        )
    images = read_images(cfg, paths)
    step, params, graphdef, mesh = run_state.restore_params(cfg, workdir)
    tok = decoder(cfg)
    rows = -(-len(images) // mesh.devices.size) * mesh.devices.size
    dev = sharding.put_batch({"x": _pad(np.stack(images), rows)}, mesh)["x"]
    tokens, scores = caption_fn(cfg, graphdef, tok)(params, dev)
    tokens, scores = _gather(tokens), _gather(scores)
    out = [(p, tok.decode(t), float(s)) for p, t, s in zip(paths, tokens, scores)]
    return {"step": step, "captions": out}
