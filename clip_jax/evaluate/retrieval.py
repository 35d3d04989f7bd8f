"""Image<->text retrieval: recall@1/5/10 in both directions, for datasets with one or several captions per image.

A retrieval section (evals.<name>, type 'retrieval') names any tfds set with an image and a caption feature (a
single text, or a sequence of texts, possibly nested: coco_captions 'captions/text'); the embedded
`clip_shapes_captions` has five per image. Each process reads its share of every batch of images, encodes them over all devices and keeps the
embeddings there; its captions are then encoded the same way. The ranks come from blockwise.ranks (the full
similarity matrix never exists anywhere) and only the hit counts reach the host, identical on every process.

image->text: an image is a hit at k if any of its captions is among the k best texts for it.
text->image: a caption is a hit at k if its own image is among the k best images for it.

Conventions, checked against CLIP_benchmark 1.6.2 (clip_benchmark/metrics/zeroshot_retrieval.py, whose
"text_retrieval_recall@k" is our i2t_r<k> and "image_retrieval_recall@k" our t2i_r<k>, as fractions, not %) by
tests/test_clip_benchmark_metrics.py; `blockwise.CONVENTIONS` is the one-line summary a report prints:
- An image without any usable caption is an i2t miss at every k and counts in the i2t denominator (CLIP_benchmark:
  recall 0/0 = nan, and nan > 0 is False). `images` counts every readable image, `images_without_captions` these.
- A caption that is missing or blank (after UTF-8 decoding) is dropped: it is neither a t2i query nor an i2t
  candidate. CLIP_benchmark would encode a blank string like any other; only images with such captions differ.
- An unreadable image is left out with its captions (counted in `images_unreadable`). CLIP_benchmark has no such
  case: its data loader raises on the first image that does not decode.
- Exact score ties go to the earlier image / caption in dataset order (split index, then caption order), so the
  numbers are deterministic; CLIP_benchmark's torch.topk leaves the order of tied scores unspecified, so results
  can differ where a tie straddles the k-th place, and only there.
- k larger than the number of candidates counts every query with a positive as a hit (CLIP_benchmark raises).
"""

import functools
import logging

import jax
import numpy as np

from clip_jax import sharding
from clip_jax.evaluate import blockwise, common
from clip_jax.input import decode, eval_data, pipeline
from clip_jax.input import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)
KS = (1, 5, 10)


def captions_of(value, max_tokens: int) -> list[str]:
    """Every usable caption in a stored caption feature (one text or a sequence of them)."""
    several = isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0)
    out = []
    for item in value if several else [value]:
        text, _ = decode.caption(item, max_tokens)
        if text is not None:
            out.append(text)
    return out


def _records(source, idx):
    getitems = getattr(source, "__getitems__", None)
    return getitems(idx) if getitems and idx else [source[i] for i in idx]


def encode_images(cfg, section, mesh, encode_image):
    """Encode this process's share of the images of a retrieval section (dataset, split, image_key, text_key,
    batch_size, max_examples).

    Returns (device lists of embeddings, ids and valid flags, one entry per global batch; this process's captions;
    the id of each caption's image). An image's id is its index in the split; unreadable images are left out,
    with their captions.
    """
    e, pc, pi = section, jax.process_count(), jax.process_index()
    source = pipeline.open_source(e.dataset, e.split, cfg.data.data_dir)
    total = len(source) if e.max_examples < 0 else min(len(source), e.max_examples)
    local, max_len = e.batch_size // pc, cfg.model.text.max_len
    embs, ids, oks, captions, owners = [], [], [], [], []
    for start in range(0, total, e.batch_size):
        idx = list(range(start + pi * local, min(start + (pi + 1) * local, total)))
        images = eval_data.image_rows(cfg, local)
        img_id, ok = np.full((local,), -1, np.int32), np.zeros((local,), bool)
        for j, (i, record) in enumerate(zip(idx, _records(source, idx), strict=True)):
            value = pipeline.field(record, e.text_key)
            if value is None:
                raise pipeline.DataError(
                    f"{e.dataset} has no caption feature '{e.text_key}' (its features: {sorted(record)}); set the "
                    "retrieval section's text_key"
                )
            image, bits = eval_data.eval_image(cfg, pipeline.field(record, e.image_key))
            if image is None:
                log.warning("%s image %d skipped: %s", e.dataset, i, ", ".join(decode.issue_names(bits)))
                continue
            eval_data.set_image(images, j, image)
            img_id[j], ok[j] = i, True
            texts = captions_of(value, max_len)
            captions += texts
            owners += [i] * len(texts)
        dev = sharding.put_batch({"image": images, "id": img_id, "ok": ok}, mesh)
        embs.append(encode_image(dev["image"]))
        ids.append(dev["id"])
        oks.append(dev["ok"])
    if not embs:
        raise pipeline.DataError(f"{e.dataset} split '{e.split}' has no images")
    return (embs, ids, oks), captions, np.asarray(owners, np.int32)


def _text_ids(owners: np.ndarray) -> np.ndarray:
    """Unique caption ids, the same whatever the process layout: image id * (most captions per image) + position
    among its image's captions (they are listed together, in stored order)."""
    per_image = max(_global_max(int(np.unique(owners, return_counts=True)[1].max()) if len(owners) else 0), 1)
    if (_global_max(int(owners.max()) if len(owners) else 0) + 1) * per_image >= blockwise.NO_INDEX:
        raise ValueError("too many captions for int32 caption ids; set the retrieval section's max_examples lower")
    first = np.flatnonzero(np.r_[True, np.diff(owners) != 0]) if len(owners) else np.zeros(0, int)
    position = np.arange(len(owners)) - np.repeat(first, np.diff(np.r_[first, len(owners)]))
    return (owners.astype(np.int64) * per_image + position).astype(np.int32)


def _global_max(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def encode_texts(cfg, section, mesh, encode_text, captions: list[str], owners: np.ndarray, tok=None):
    """Encode this process's captions over all devices: device lists of embeddings, ids, image ids, valid flags.
    Every process runs the same number of steps (the most any process needs), padding with invalid rows."""
    local = section.batch_size // jax.process_count()
    steps = max(1, -(-_global_max(len(captions)) // local))
    tok, text_ids = tok or tokenizer_lib.make(cfg), _text_ids(owners)
    embs, ids, own, oks = [], [], [], []
    for s in range(steps):
        part = slice(s * local, (s + 1) * local)
        n = len(captions[part])
        batch = {
            "tokens": common.pad_rows(tok(captions[part]).reshape(n, -1), local, fill=tok.pad_id),
            "id": common.pad_rows(text_ids[part], local, fill=-1),
            "owner": common.pad_rows(owners[part], local, fill=-1),
            "ok": common.pad_rows(np.ones(n, bool), local, fill=False),
        }
        dev = sharding.put_batch(batch, mesh)
        embs.append(encode_text(dev["tokens"]))
        ids.append(dev["id"])
        own.append(dev["owner"])
        oks.append(dev["ok"])
    return embs, ids, own, oks


@functools.lru_cache(maxsize=8)
def _scorer(mesh, tile: int):
    """Jitted (image and text arrays) -> replicated ((i2t hits [3], counts [2]), (t2i hits [3], counts [2]))."""

    def score(img, img_id, img_ok, txt, txt_id, owner, txt_ok):
        rank_i, rank_t = blockwise.ranks(
            img, img_id, img_ok, txt, txt_id, owner, txt_ok, mesh=mesh, axes=sharding.BATCH_AXES, tile=tile
        )
        return blockwise.recall(rank_i, KS), blockwise.recall(rank_t, KS)

    return jax.jit(score, out_shardings=sharding.replicated(mesh))


class Retrieval(common.Evaluator):
    """Recall@1/5/10 (%) both ways on one captioned set (an `evals.<name>` section of type 'retrieval'), with the
    numbers of images and captions.

    run() returns {i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 (floats, %), images, images_without_captions,
    images_unreadable, texts (ints)}, by the conventions of the module docstring (CLIP_benchmark's: a captionless
    image is an i2t miss in the denominator; ties go to the earlier item in dataset order)."""

    def __init__(self, name, section, cfg, mesh):
        super().__init__(name, section, cfg, mesh)
        eval_data.check_section(cfg, section, self.key, text_key="text_key")
        source = pipeline.open_source(section.dataset, section.split, cfg.data.data_dir)
        self.read = len(source) if section.max_examples < 0 else min(len(source), section.max_examples)
        self.tokenizer = tokenizer_lib.make(cfg)

    def run(self, params, encoders, graphdef=None) -> dict:
        cfg, mesh, section = self.cfg, self.mesh, self.section
        (embs, ids, oks), captions, owners = encode_images(cfg, section, mesh, lambda x: encoders.image(params, x))
        text = lambda x: encoders.text(params, x)
        t_embs, t_ids, t_owner, t_oks = encode_texts(cfg, section, mesh, text, captions, owners, self.tokenizer)
        cat = functools.partial(blockwise.concat_sharded, mesh=mesh, axes=sharding.BATCH_AXES)
        args = [cat(p) for p in (embs, ids, oks, t_embs, t_ids, t_owner, t_oks)]
        (hits_i, n_i), (hits_t, n_t) = _scorer(mesh, section.tile)(*args)
        hits_i, hits_t, n_i, n_t = (common.to_host(x) for x in (hits_i, hits_t, n_i, n_t))
        out = {  # see the module docstring for the conventions (CLIP_benchmark's, except where it says)
            "images": int(n_i[0]),  # every readable image: the i2t denominator
            "images_without_captions": int(n_i[1]),  # i2t misses at every k
            "images_unreadable": self.read - int(n_i[0]),  # left out with their captions
            "texts": int(n_t[0]),  # usable captions: the t2i denominator
        }
        for k, hi, ht in zip(KS, hits_i, hits_t, strict=True):
            out[f"i2t_r{k}"] = 100.0 * float(hi) / max(int(n_i[0]), 1)
            out[f"t2i_r{k}"] = 100.0 * float(ht) / max(int(n_t[0]), 1)
        return out
