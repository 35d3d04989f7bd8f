"""Evaluators: zero-shot accuracies and retrieval recall against numpy on known embeddings, hand-built encoders
through the real data path, the shipped class names / templates, and `clip_jax.main eval` end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import datasets, sharding, train
from clip_jax.datasets import shapes, shapes_captions
from clip_jax.evaluate import common, retrieval, suite, templates, zero_shot
from clip_jax.input import eval_data, pipeline, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_cpu
from run_configs import TINIEST
from test_retrieval import dense_ranks

TINY = {  # the smallest model: the end-to-end test is mostly import and compile time
    **TINIEST,
    "evals.zeroshot.dataset": "clip_shapes/small",
    "evals.zeroshot.batch_size": 64,
    "evals.retrieval.dataset": "clip_shapes_captions/small",  # tiny_cpu.py:retrieval adds this section
    "evals.retrieval.batch_size": 64,
    "evals.retrieval.tile": 48,
    "total_steps": 6,
    "ckpt_every": 3,
    "eval_every": 0,
    "log_every": 3,
}


def config(data_dir, **overrides):
    cfg = tiny_cpu.get_config("retrieval")
    for key, value in {**TINY, "data.data_dir": str(data_dir), **overrides}.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


class HandBuilt:
    """Hand-built encoders in the evaluators' interface: (params, device batch) -> embeddings."""

    def __init__(self, encode_image, encode_text):
        self.image = lambda params, x: encode_image(x)
        self.text = lambda params, x: encode_text(x)


def run_suite(cfg, encoders):
    return suite.Suite(cfg, sharding.make_mesh(cfg), encoders=HandBuilt(*encoders)).run(None, None)


# ----------------------------------------------------------------------------------------------- zero-shot


def numpy_zero_shot(img, cls, labels, k):
    logits = img.astype(np.float64) @ cls.astype(np.float64).T
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # ties: lower class first
    hit1 = order[:, 0] == labels
    hitk = (order == labels[:, None]).any(axis=1)
    per_class = [hit1[labels == c].mean() for c in np.unique(labels)]
    return 100 * hit1.mean(), 100 * hitk.mean(), 100 * np.mean(per_class)


def test_zero_shot_accuracies_match_numpy():
    """Known embeddings (integers: exact scores, with ties), unbalanced classes, batches with padding rows."""
    mesh = sharding.make_mesh(config("unused"))
    rng = np.random.default_rng(0)
    n, c, d = 203, 12, 5
    img = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    cls = rng.integers(-2, 3, size=(c, d)).astype(np.float32)
    labels = np.minimum(rng.geometric(0.25, size=n) - 1, c - 2).astype(np.int32)  # class c-1 has no images
    unseen = (labels % 3 == 0).astype(np.float32)
    batches = []
    for start in range(0, n, 64):  # the last batch is padded, as eval_batches pads
        part = slice(start, min(start + 64, n))
        rows = {"image": img[part], "label": labels[part], "mask": np.ones(len(labels[part]), np.float32)}
        rows["unseen"] = unseen[part]
        batches.append({k: common.pad_rows(v, 64) for k, v in rows.items()})
    counts = zero_shot.score(lambda x: x, jax.device_put(cls, sharding.replicated(mesh)), batches, mesh, k=5)
    got = zero_shot.metrics(counts, 5)
    for suffix, sel in (("", np.ones(n, bool)), ("_seen", unseen == 0), ("_unseen", unseen == 1)):
        top1, top5, mean_pc = numpy_zero_shot(img[sel], cls, labels[sel], 5)
        assert got[f"top1{suffix}"] == pytest.approx(top1)
        assert got[f"top5{suffix}"] == pytest.approx(top5)
        assert got[f"mean_per_class{suffix}"] == pytest.approx(mean_pc)
        assert got[f"examples{suffix}"] == sel.sum()
    assert got["top1"] != pytest.approx(got["mean_per_class"])  # unbalanced: the two differ
    assert got["num_classes"] == c and got["chance_top5"] == pytest.approx(500 / c)


def words_model(cfg, class_names):
    """Hand-built encoders. Text: one-hot of the class whose colour and shape words both occur in the prompt.
    Image: always the same vector, favouring class 7 then classes 27 and 12 (the rest tie at 0)."""
    tok = tokenizer.make(cfg)
    ids = np.array([[tok.word_id(w) for w in name.split()] for name in class_names])  # [C, 2]

    @jax.jit
    def encode_text(tokens):
        has = (tokens[:, :, None, None] == ids[None, None]).any(axis=1)  # [N, C, 2]
        return has.all(axis=-1).astype(jnp.float32)

    v = np.zeros(len(class_names), np.float32)
    v[[7, 27, 12]] = [1.0, 0.5, 0.25]
    encode_image = jax.jit(lambda images: jnp.broadcast_to(jnp.asarray(v), (images.shape[0], len(v))))
    return encode_image, encode_text


def test_zero_shot_of_a_hand_built_model_gives_the_known_answer(shapes_data_dir):
    """Every image is classified as class 7 (top-5: 7, 27, 12, then the ties 0, 1 by index). The small test
    split has 10 images per class, so top-1 = 10/400, top-5 = 50/400 and mean per-class = 1/40."""
    cfg = config(shapes_data_dir, **{"evals.retrieval.dataset": ""})
    metrics = run_suite(cfg, words_model(cfg, shapes.CLASS_NAMES))
    assert metrics["zeroshot/examples"] == 400
    assert metrics["zeroshot/top1"] == pytest.approx(2.5)
    assert metrics["zeroshot/top5"] == pytest.approx(12.5)
    assert metrics["zeroshot/mean_per_class"] == pytest.approx(2.5)
    predicted = [7, 27, 12, 0, 1]  # classes 0, 1, 7, 12 are seen in training, 27 ("orange triangle") is not
    assert [shapes.CLASS_NAMES[c] in shapes.UNSEEN for c in predicted] == [False, True, False, False, False]
    assert metrics["zeroshot/top1_seen"] == pytest.approx(100 * 10 / 320)
    assert metrics["zeroshot/top5_seen"] == pytest.approx(100 * 40 / 320)
    assert metrics["zeroshot/top5_unseen"] == pytest.approx(100 * 10 / 80)
    assert not any(k.startswith("retrieval/") for k in metrics)


# ----------------------------------------------------------------------------------------------- retrieval


def integer_encoders(cfg, d=12):
    """Hand-built encoders with small-integer outputs, so every score is exact in fp32 and duplicate captions
    tie exactly: image = 12 pixels (2x2 positions x RGB) rounded to multiples of 1/3, x3; text = a fixed integer
    bag of words. Every step is the same float32 operation in numpy and JAX, so both get the same integers."""
    table = np.random.default_rng(1).integers(-1, 2, size=(cfg.model.text.vocab_size, d)).astype(np.float32)
    table[tokenizer.PAD] = 0

    def image_np(images):
        return np.round(np.float32(3) * images[:, 8::16, 8::16, :]).reshape(images.shape[0], d)

    def image_jax(images):
        return jnp.round(jnp.float32(3) * images[:, 8::16, 8::16, :]).reshape(images.shape[0], d)

    return (jax.jit(image_jax), jax.jit(lambda t: jnp.asarray(table)[t].sum(axis=1))), image_np, table


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_retrieval_of_hand_built_encoders_matches_dense_numpy(shapes_data_dir, mesh_shape):
    overrides = {"evals.zeroshot.dataset": "", "mesh.data": mesh_shape[0], "mesh.fsdp": mesh_shape[1]}
    cfg = config(shapes_data_dir, **overrides)
    encoders, image_np, table = integer_encoders(cfg)
    got = run_suite(cfg, encoders)
    # Reference: read the split in numpy, score the full matrix densely.
    source = pipeline.open_source("clip_shapes_captions/small", "test", shapes_data_dir)
    tok = tokenizer.make(cfg)
    img, txt, owner, txt_id = [], [], [], []
    for i in range(len(source)):
        record = source[i]
        img.append(image_np(eval_data.load_image(record["image"], 32)[None])[0])
        caps = [c.decode() for c in record["captions"]]
        txt += [table[tok.encode(c)].sum(axis=0) for c in caps]
        owner += [i] * len(caps)
        txt_id += [i * 5 + p for p in range(len(caps))]
    img_idx = np.arange(len(img))
    rank_i, rank_t = dense_ranks(np.array(img), img_idx, np.array(txt), np.array(txt_id), np.array(owner))
    assert got["retrieval/images"] == 200 and got["retrieval/texts"] == 1000
    for k in (1, 5, 10):
        assert got[f"retrieval/i2t_r{k}"] == pytest.approx(100 * np.mean(rank_i < k))
        assert got[f"retrieval/t2i_r{k}"] == pytest.approx(100 * np.mean(rank_t < k))
    assert 0 < got["retrieval/t2i_r10"] < 100


def test_captions_dataset_is_clip_shapes_test_with_all_its_phrasings():
    ours = shapes_captions.make_examples(shapes_captions.CaptionsConfig(name="t", num_images=12))
    theirs = shapes.make_examples("test", 12, shapes.ShapesConfig(name="t"))
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert b["caption"] in a["captions"] and len(set(a["captions"])) == len(shapes.SINGLE_TEMPLATES)
        assert all(shapes.CLASS_NAMES[b["label"]].split()[1] in c for c in a["captions"])


def test_captions_of_reads_one_or_several():
    assert retrieval.captions_of(b"a cat", 16) == ["a cat"]
    assert retrieval.captions_of(np.array([b"a", b"", b"b c"], object), 16) == ["a", "b c"]
    assert retrieval.captions_of(["x"], 16) == ["x"]


def test_missing_caption_key_is_one_line(shapes_data_dir):
    cfg = config(shapes_data_dir, **{"evals.zeroshot.dataset": "", "evals.retrieval.text_key": "caption"})
    with pytest.raises(pipeline.DataError, match="evals.retrieval.text_key='caption': .* has no such feature; its"):
        run_suite(cfg, integer_encoders(cfg)[0])


# ----------------------------------------------------------------------------------------- names and prompts


def test_shipped_class_names_and_templates():
    names, sets = templates.names_files(), templates.template_sets()
    assert len(names["imagenet2012"]) == 1000 and len(set(names["imagenet2012"])) >= 998
    assert names["imagenet2012"][:2] == ("tench", "goldfish")
    assert len(names["cifar10"]) == 10 and len(set(names["cifar100"])) == 100
    assert names["clip_shapes"] == shapes.CLASS_NAMES and list(names["clip_digits"]) == list(
        datasets.class_names("clip_digits")
    )
    assert len(sets["clip_imagenet"]) == 80 and len(sets["clip_cifar"]) == 18
    assert all(t.count("{}") == 1 for ts in sets.values() for t in ts)
    assert set(sets) >= {"plain", "imagenet_short", "clip_shapes", "clip_digits"}


def test_class_name_choice():
    label = [f"n{i:08d}" for i in range(1000)]
    assert templates.class_names("", "imagenet2012:5.1.0", label)[0] == "tench"  # names file wins
    assert templates.class_names("", "imagenet_v2/matched-frequency", label)[0] == "tench"
    assert templates.class_names("label", "imagenet2012", label) == label
    assert templates.class_names("", "some_dataset", ["a", "b"]) == ["a", "b"]  # no file: ClassLabel
    with pytest.raises(ValueError, match="lists 10 classes but cifar100 has 100.*class_names='label'"):
        templates.class_names("cifar10", "cifar100", label[:100])
    with pytest.raises(ValueError, match="class_names='cifar1000' is not in"):
        templates.class_names("cifar1000", "x", label[:10])
    prompts = templates.class_prompts("clip_cifar", ["cat", "dog"])
    assert len(prompts) == 2 and prompts[1][0] == "a photo of a dog."


# ------------------------------------------------------------------------------------------------ end to end


def test_train_then_cli_eval_writes_json_and_summaries(shapes_data_dir, tmp_path):
    """The trainer runs both evaluators at the end; `main eval` on the checkpoint gives the same numbers."""
    cfg = config(shapes_data_dir)
    workdir = str(tmp_path / "run")
    result = train.run(cfg, workdir)
    assert set(result["eval"]) >= {
        "zeroshot/top1",
        "zeroshot/mean_per_class",
        "retrieval/i2t_r1",
        "retrieval/t2i_r10",
    }
    assert result["sections"]["retrieval"]["texts"] == 1000 and result["sections"]["zeroshot"]["examples"] == 400
    overrides = [f"--config.{k}={v}" for k, v in {**TINY, "data.data_dir": shapes_data_dir}.items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "clip_jax.main", "eval", "--config=configs/tiny_cpu.py:retrieval"]
    cmd += [f"--checkpoint={workdir}/checkpoints/6", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retrieval on clip_shapes_captions/small" in proc.stdout and "mean per-class" in proc.stdout
    with open(os.path.join(workdir, "eval", "step_6.json")) as f:
        record = json.load(f)
    assert record["step"] == 6
    for key, value in result["eval"].items():
        assert record["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "eval")))
    # A step that does not exist is a one-line user error, naming the steps there are.
    with pytest.raises(train.TrainingError, match=r"no checkpoint at step 5 in .*; it has steps \[3, 6\]"):
        suite.evaluate_checkpoint(cfg, "", checkpoint=f"{workdir}/checkpoints/5")


# ----------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_equals_scikit_learn_on_the_same_features(shapes_data_dir):
    """The probe's plumbing (both splits encoded over the devices, padding dropped, labels kept in order) gives
    exactly what scikit-learn gives on features computed here in numpy; colour pixels make it beat chance."""
    from sklearn.linear_model import LogisticRegression

    cfg = config(shapes_data_dir, **{"evals.zeroshot.dataset": "", "evals.retrieval.dataset": ""})
    cfg.evals.probe = config_lib.evaluator("probe", dataset="clip_shapes/small", max_examples=300, c=0.5, batch_size=64)
    encoders, image_np, _ = integer_encoders(cfg)
    got = run_suite(cfg, encoders)
    features = {}
    for split in ("train", "test"):
        source = pipeline.open_source("clip_shapes/small", split, shapes_data_dir)
        records = [source[i] for i in range(300)]
        x = image_np(np.stack([eval_data.load_image(r["image"], 32) for r in records]))
        features[split] = (x, np.array([r["label"] for r in records]))
    pred = LogisticRegression(C=0.5, max_iter=1000).fit(*features["train"]).predict(features["test"][0])
    hit = pred == features["test"][1]
    assert got["probe/examples"] == got["probe/train_examples"] == 300
    assert got["probe/top1"] == pytest.approx(100 * hit.mean())
    per_class = [hit[features["test"][1] == c].mean() for c in np.unique(features["test"][1])]
    assert got["probe/mean_per_class"] == pytest.approx(100 * np.mean(per_class))
    assert got["probe/top1"] > 2 * 100 / 40
