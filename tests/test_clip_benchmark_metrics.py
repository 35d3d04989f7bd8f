"""Our retrieval recall@k and zero-shot accuracies against CLIP_benchmark's own metric code (clip-benchmark 1.6.2:
clip_benchmark/metrics/zeroshot_retrieval.py and zeroshot_classification.py, unmodified, run on a fake model).

Equality is asserted on embeddings where no exact tie, nor a near tie that fp32 rounding could flip, decides a
top-k set: CLIP_benchmark ranks with torch.topk, which leaves the order of equal scores unspecified. Our tie rule
(the earlier item in dataset order wins) is checked on tie-heavy integer scores against a float64 numpy statement
of it, and for the mean per-class recall (CLIP_benchmark's argmax also takes the first maximum) against
CLIP_benchmark.
"""

import os
import sys
import warnings
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import sharding
from clip_jax.evaluate import blockwise, common, retrieval, zero_shot
from clip_jax.input import eval_data, pipeline
from clip_jax.input import tokenizer as tokenizer_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny_cpu
from reference_libs import clip_benchmark_module
from test_retrieval import blockwise_ranks, mesh_of

torch = pytest.importorskip("torch", reason="torch (the [hf] extra) runs CLIP_benchmark's metric code")
KS = (1, 5, 10)
MARGIN = 1e-5  # least score gap where a top-k set is decided: far above fp32 rounding of a 16-dim dot product


class NumPy2Tensor(torch.Tensor):
    """clip-benchmark 1.6.2's accuracy() calls float() on a 1-element array, which NumPy 2.4 refuses; this tensor
    type hands such an array over as 0-d. All arithmetic stays torch's and CLIP_benchmark's."""

    def numpy(self, *args, **kwargs):
        out = super().numpy(*args, **kwargs)
        return out.reshape(()) if out.shape == (1,) else out


class FakeModel:
    """What CLIP_benchmark's evaluators call: encode_image / encode_text, here lookups of fixed embeddings."""

    def __init__(self, images, texts):
        self.images, self.texts = torch.from_numpy(images), torch.from_numpy(texts)

    def encode_image(self, index):
        return self.images[index].as_subclass(NumPy2Tensor)

    def encode_text(self, index):
        return self.texts[index]


class Loader(list):
    """Batches, with the `dataset.classes` that CLIP_benchmark's zero-shot evaluate reads."""

    def __init__(self, batches, classes):
        super().__init__(batches)
        self.dataset = SimpleNamespace(classes=classes)


def index_tokenizer(texts):
    """The 'texts' are decimal row numbers of FakeModel.texts."""
    return torch.tensor([int(t) for t in texts], dtype=torch.long)


def unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def boundary_gaps(scores, ks):
    """Per row, the score gap between places k and k+1 for each k in ks: where a row's top-k set is decided."""
    s = -np.sort(-scores, axis=1)
    return np.stack([s[:, k - 1] - s[:, k] for k in ks if k < s.shape[1]])


# ----------------------------------------------------------------------------------------------- retrieval


def retrieval_problem(rng, n_img=37, max_caps=3, d=16, integer=False):
    """Images with 0..max_caps captions each (0: no caption), listed image by image as in CLIP_benchmark."""
    caps = rng.integers(0, max_caps + 1, size=n_img)
    owner = np.repeat(np.arange(n_img), caps).astype(np.int32)
    if integer:  # scores exact in fp32, ties everywhere
        img, txt = rng.integers(-1, 2, size=(n_img, d)), rng.integers(-1, 2, size=(len(owner), d))
        return img.astype(np.float32), txt.astype(np.float32), owner
    return unit(rng, n_img, d), unit(rng, len(owner), d), owner


def our_recall(img, txt, owner, mesh_shape, tile):
    """blockwise.ranks on the CPU mesh (ids = dataset order, as retrieval.py's), then blockwise.recall."""
    ids_i, ids_t = np.arange(len(img), dtype=np.int32), np.arange(len(txt), dtype=np.int32)
    rank_i, rank_t = blockwise_ranks(mesh_of(mesh_shape), img, ids_i, txt, ids_t, owner, tile)
    out = {}
    for way, rank in (("i2t", rank_i), ("t2i", rank_t)):
        hits, counts = (np.asarray(a) for a in jax.jit(lambda r: blockwise.recall(r, KS))(jnp.asarray(rank)))
        out.update({f"{way}_r{k}": h / counts[0] for k, h in zip(KS, hits, strict=True)})
        out[f"{way}_without_positive"] = int(counts[1])
    return out


def their_retrieval(img, txt, captions, batch=8):
    """CLIP_benchmark's zeroshot_retrieval.evaluate; captions[i]: the rows of `txt` that caption image i."""
    cb = clip_benchmark_module("zeroshot_retrieval")
    texts = [[str(j) for j in c] for c in captions]
    loader = [(torch.arange(s, min(s + batch, len(img))), texts[s : s + batch]) for s in range(0, len(img), batch)]
    return cb.evaluate(FakeModel(img, txt), loader, index_tokenizer, "cpu", amp=False, recall_k_list=list(KS))


def assert_same_recall(ours, theirs, scale=1.0):
    """CLIP_benchmark's 'text_retrieval' is image->text, its 'image_retrieval' text->image; fractions, not %."""
    for k in KS:
        assert ours[f"i2t_r{k}"] / scale == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-6), k
        assert ours[f"t2i_r{k}"] / scale == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-6), k


@pytest.mark.parametrize("seed,mesh_shape,tile", [(1, (2, 4), 3), (3, (8, 1), 16)])
def test_retrieval_recall_equals_clip_benchmark(seed, mesh_shape, tile):
    img, txt, owner = retrieval_problem(np.random.default_rng(seed))
    s = img.astype(np.float64) @ txt.astype(np.float64).T
    assert min(boundary_gaps(s, KS).min(), boundary_gaps(s.T, KS).min()) > MARGIN  # no tie decides a top-k set
    captionless = int(np.sum(np.bincount(owner, minlength=len(img)) == 0))
    ours = our_recall(img, txt, owner, mesh_shape, tile)
    theirs = their_retrieval(img, txt, [np.flatnonzero(owner == i) for i in range(len(img))])
    assert ours["i2t_without_positive"] == captionless > 0 and ours["t2i_without_positive"] == 0
    assert_same_recall(ours, theirs)
    assert 0 < theirs["text_retrieval_recall@10"] < 1 - captionless / len(img)  # misses of both kinds


def our_tie_rule(s, owner, order):
    """float64 numpy statement: candidates sorted by (score desc, index in `order`); an image is a hit at k if any
    of its captions is among its first k texts (none: a miss), a text if its image is among its first k images."""
    n_img, n_txt = s.shape
    first_t = [np.lexsort((order(n_txt), -row)) for row in s]
    first_i = [np.lexsort((order(n_img), -col)) for col in s.T]
    out = {}
    for k in KS:
        out[f"i2t_r{k}"] = np.mean(
            [np.isin(first_t[i][:k], np.flatnonzero(owner == i)).any() for i in range(n_img)]
        )
        out[f"t2i_r{k}"] = np.mean([owner[j] in first_i[j][:k] for j in range(n_txt)])
    return out


@pytest.mark.parametrize("seed,mesh_shape,tile", [(5, (2, 4), 4), (6, (8, 1), 2)])
def test_retrieval_ties_go_to_the_earlier_item(seed, mesh_shape, tile):
    """Integer scores, ties everywhere, several captions per image: the multi-caption i2t hit ("any caption in the
    top k") under our order equals the best caption's rank < k, which is what blockwise computes."""
    img, txt, owner = retrieval_problem(np.random.default_rng(seed), d=3, max_caps=4, integer=True)
    s = img.astype(np.float64) @ txt.astype(np.float64).T
    want = our_tie_rule(s, owner, np.arange)
    assert want != our_tie_rule(s, owner, lambda n: -np.arange(n))  # the tie rule decides some hits here
    ours = our_recall(img, txt, owner, mesh_shape, tile)
    for key, value in want.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def retrieval_records(rng):
    """24 stored examples: image 3 has no caption, image 7 only blank ones, image 11 does not decode, image 5 has a
    blank caption among good ones; the rest 1..3 captions of random words."""
    words = ["red", "blue", "green", "small", "large", "round", "square", "cat", "dog", "tree", "sky", "sea"]
    records = []
    for i in range(24):
        caps = [" ".join(rng.choice(words, size=4)) + f" {i}{c}" for c in range(rng.integers(1, 4))]
        caps = {3: [], 7: ["", "  "], 5: caps[:1] + [""] + caps[1:]}.get(i, caps)
        image = b"not an image" if i == 11 else rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        records.append({"image": image, "captions": np.array([c.encode() for c in caps], object)})
    return records


def run_retrieval_evaluator(cfg, encode_image, encode_text, batch_size=16, tile=4) -> dict:
    """The retrieval evaluator on the split that pipeline.open_source returns (monkeypatched), 8 devices."""
    section = config_lib.evaluator("retrieval", dataset="in_memory", batch_size=batch_size, tile=tile)
    encoders = SimpleNamespace(image=lambda p, x: encode_image(x), text=lambda p, x: encode_text(x))
    return retrieval.Retrieval("retrieval", section, cfg, sharding.make_mesh(cfg)).run(None, encoders)


def test_retrieval_evaluate_counts_and_recall_match_clip_benchmark(monkeypatch):
    """The retrieval evaluator end to end (data path, hand-built encoders, 8 devices) on a split with a captionless
    image, one with only blank captions and an unreadable one, against CLIP_benchmark given what our conventions
    keep: the readable images, each with its non-blank captions (it would stop at the unreadable image)."""
    rng = np.random.default_rng(3)
    records = retrieval_records(rng)
    monkeypatch.setattr(pipeline, "open_source", lambda name, split, data_dir: records)
    cfg = tiny_cpu.get_config()
    proj = rng.normal(size=(4 * 4 * 3, 16)).astype(np.float32)  # of every 8th pixel: short fp32 sums
    table = rng.normal(size=(cfg.model.text.vocab_size, 16)).astype(np.float32)
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    encode_image = jax.jit(lambda x: norm(x[:, ::8, ::8].reshape(len(x), -1) @ proj))
    got = run_retrieval_evaluator(cfg, encode_image, jax.jit(lambda t: norm(jnp.asarray(table)[t].sum(1))))
    # Reference inputs, built in float64 numpy from the same pixels and tokens.
    keep = [r for i, r in enumerate(records) if i != 11]
    pixels = np.stack([eval_data.eval_image(cfg, r["image"])[0][::8, ::8] for r in keep]).reshape(len(keep), -1)
    caps = [[c.decode() for c in r["captions"] if c.decode().strip()] for r in keep]
    tokens = tokenizer_lib.make(cfg)([c for cs in caps for c in cs])
    unit64 = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    img, txt = unit64(pixels.astype(np.float64) @ proj), unit64(table.astype(np.float64)[tokens].sum(1))
    s = img.astype(np.float64) @ txt.astype(np.float64).T
    assert min(boundary_gaps(s, KS).min(), boundary_gaps(s.T, KS).min()) > MARGIN
    first = np.cumsum([0] + [len(c) for c in caps])
    theirs = their_retrieval(img, txt, [range(first[i], first[i + 1]) for i in range(len(keep))])
    assert (got["images"], got["images_without_captions"], got["images_unreadable"]) == (23, 2, 1)
    assert got["texts"] == len(txt)
    assert_same_recall(got, theirs, scale=100.0)


# ----------------------------------------------------------------------------------------------- zero-shot


def zero_shot_problem(rng, n=60, classes=12, templates=3, d=16, tied_pairs=False):
    """Unit image embeddings, prompt embeddings [classes * templates, d]; the last class has no image. tied_pairs:
    classes 2m and 2m+1 get the same prompts, so every image's scores tie exactly between them, on both sides."""
    prompts = unit(rng, classes * templates, d).reshape(classes, templates, d)
    if tied_pairs:
        prompts[1::2] = prompts[0::2]
    return unit(rng, n, d), rng.integers(0, classes - 1, size=n), prompts.reshape(-1, d)


def our_zero_shot(images, labels, prompts, classes, batch=16):
    """zero_shot.class_embeddings, score (batches padded to the 8 devices, mask 0) and metrics on the CPU mesh."""
    mesh = mesh_of((2, 4))
    table = jnp.asarray(prompts)
    tokens = np.arange(len(prompts), dtype=np.int32).reshape(classes, -1, 1)
    class_emb = zero_shot.class_embeddings(jax.jit(lambda t: table[t[:, 0]]), tokens, mesh)
    batches = []
    for s in range(0, len(images), batch):
        n = len(images[s : s + batch])
        batches.append({
            "image": common.pad_rows(images[s : s + batch], batch),
            "label": common.pad_rows(labels[s : s + batch].astype(np.int32), batch),
            "mask": common.pad_rows(np.ones(n, bool), batch, fill=False),
        })  # fmt: skip
    k = min(5, classes)
    return zero_shot.metrics(zero_shot.score(jax.jit(lambda x: x), class_emb, batches, mesh, k), k), class_emb


def their_zero_shot(images, labels, prompts, classes, batch=16):
    """CLIP_benchmark's zeroshot_classification.evaluate and its class embeddings ([d, classes])."""
    cb = clip_benchmark_module("zeroshot_classification")
    names = [f"class{c}" for c in range(classes)]
    templates = [f"{{c}} {t}" for t in range(len(prompts) // classes)]
    row = {
        t.format(c=name): c * len(templates) + i for c, name in enumerate(names) for i, t in enumerate(templates)
    }
    tokenizer = lambda texts: torch.tensor([row[t] for t in texts], dtype=torch.long)
    model = FakeModel(images, prompts)
    batches = [(torch.arange(s, min(s + batch, len(images))), torch.from_numpy(labels[s : s + batch])) for s in
               range(0, len(images), batch)]  # fmt: skip
    loader = Loader(batches, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: "y_pred contains classes not in y_true" (the empty class)
        result = cb.evaluate(model, loader, tokenizer, names, templates, "cpu", amp=False)
    return result, cb.zero_shot_classifier(model, tokenizer, names, templates, "cpu", amp=False).numpy()


def test_zero_shot_metrics_equal_clip_benchmark():
    images, labels, prompts = zero_shot_problem(np.random.default_rng(0))
    ours, class_emb = our_zero_shot(images, labels, prompts, 12)
    theirs, their_emb = their_zero_shot(images, labels, prompts, 12)
    np.testing.assert_allclose(np.asarray(class_emb), their_emb.T, atol=1e-6)  # prompt ensemble: same formula
    assert boundary_gaps(images.astype(np.float64) @ their_emb.astype(np.float64), (1, 5)).min() > MARGIN
    assert ours["top1"] / 100 == pytest.approx(theirs["acc1"], abs=1e-9)
    assert ours["top5"] / 100 == pytest.approx(theirs["acc5"], abs=1e-9)
    assert ours["mean_per_class"] / 100 == pytest.approx(theirs["mean_per_class_recall"], abs=1e-9)
    assert ours["mean_per_class"] != pytest.approx(ours["top1"])  # unbalanced classes: the two differ


def test_zero_shot_ties_go_to_the_lower_class():
    """Classes 2m and 2m+1 tie exactly for every image. Top-1/top-5 against a float64 numpy statement of our rule
    (lower class index first); mean per-class recall against CLIP_benchmark, whose argmax also takes the first."""
    images, labels, prompts = zero_shot_problem(np.random.default_rng(1), tied_pairs=True)
    ours, _ = our_zero_shot(images, labels, prompts, 12)
    theirs, their_emb = their_zero_shot(images, labels, prompts, 12)
    scores = images.astype(np.float64) @ their_emb.astype(np.float64)  # pairs tie exactly: identical columns
    distinct = np.sort(scores[:, 0::2], axis=1)
    assert (distinct[:, -1] - distinct[:, -2]).min() > MARGIN  # only the pair ties decide the argmax
    order = np.stack([np.lexsort((np.arange(12), -row)) for row in scores])
    top1, top5 = order[:, 0] == labels, (order[:, :5] == labels[:, None]).any(axis=1)
    assert ours["top1"] / 100 == pytest.approx(top1.mean()) and ours["top5"] / 100 == pytest.approx(top5.mean())
    assert top1.mean() != (order[:, 1] == labels).mean()  # the tie rule decides some hits here
    per_class = [top1[labels == c].mean() for c in np.unique(labels)]
    assert ours["mean_per_class"] / 100 == pytest.approx(np.mean(per_class))
    assert ours["mean_per_class"] / 100 == pytest.approx(theirs["mean_per_class_recall"], abs=1e-9)
