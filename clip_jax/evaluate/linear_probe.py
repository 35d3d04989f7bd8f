"""Linear probe: multinomial logistic regression (scikit-learn) on frozen image embeddings.

Images of the probe set's train and test splits are encoded over all devices; the embeddings (N x d, small next
to any score matrix) are gathered to every process, which fits the same deterministic L-BFGS model, so all get
the same numbers. Reported: top-1 and mean per-class accuracy (%) on the test split.
"""

import ml_collections
import numpy as np

from clip_jax import sharding
from clip_jax.evaluate import common
from clip_jax.input import eval_data


def _split_cfg(cfg, split: str):
    """A copy of cfg whose eval.* keys point eval_batches at one split of the probe set."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.eval.dataset, c.eval.split = cfg.eval.probe_dataset, split
    c.eval.label_key, c.eval.max_examples = cfg.eval.probe_label_key, cfg.eval.probe_max_examples
    return c


def embed_split(cfg, split: str, mesh, encode_image) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, d] float32, labels [N]) of one split, in split order, on every process."""
    embs, labels, masks = [], [], []
    batches = eval_data.eval_batches(
        _split_cfg(cfg, split), batch_size=cfg.eval.batch_size, num_devices=mesh.devices.size
    )
    for batch in batches:
        dev = sharding.put_batch({"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}, mesh)
        embs.append(common.to_host(encode_image(dev["image"])))
        labels.append(common.to_host(dev["label"]))
        masks.append(common.to_host(dev["mask"]))
    keep = np.concatenate(masks) > 0  # padding rows and unreadable images are left out
    return np.concatenate(embs)[keep].astype(np.float32), np.concatenate(labels)[keep]


def fit_and_score(train_x, train_y, test_x, test_y, c: float) -> dict:
    """Fit on (train_x, train_y); accuracies (%) on the test set."""
    from sklearn.linear_model import LogisticRegression  # only when a probe is configured

    if len(np.unique(train_y)) < 2:
        raise ValueError(
            "the probe's train split has fewer than 2 classes; set eval.probe_dataset to a labelled set"
        )
    model = LogisticRegression(C=c, max_iter=1000)
    pred = model.fit(train_x, train_y).predict(test_x)
    hit = pred == test_y
    classes = np.unique(test_y)
    return {
        "top1": 100.0 * float(hit.mean()),
        "mean_per_class": 100.0 * float(np.mean([hit[test_y == k].mean() for k in classes])),
        "train_examples": len(train_y),
        "examples": len(test_y),
    }


def evaluate(cfg, params, graphdef, mesh, encoders=None) -> dict:
    """Linear-probe accuracies on cfg.eval.probe_dataset.

    encoders: (encode_image, encode_text) to use instead of the model's (tests pass hand-built ones).
    """
    encode_image, _ = encoders or common.encoders(params, graphdef)
    train_x, train_y = embed_split(cfg, cfg.eval.probe_train_split, mesh, encode_image)
    test_x, test_y = embed_split(cfg, cfg.eval.probe_test_split, mesh, encode_image)
    return fit_and_score(train_x, train_y, test_x, test_y, cfg.eval.probe_c)
