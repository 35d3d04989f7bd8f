"""Linear probe: multinomial logistic regression (scikit-learn) on frozen image embeddings.

Images of the probe set's train and test splits are encoded over all devices; the embeddings (N x d, small next
to any score matrix) are gathered to every process, which fits the same deterministic L-BFGS model, so all get
the same numbers. Reported: top-1 and mean per-class accuracy (%) on the test split.
"""

import numpy as np

from clip_jax import sharding
from clip_jax.evaluate import common
from clip_jax.input import eval_data


def embed_split(cfg, section, split: str, mesh, encode_image) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, d] float32, labels [N]) of one split of a probe section's dataset, in split order, on every
    process."""
    embs, labels, masks = [], [], []
    for batch in eval_data.eval_batches(cfg, section, split=split, num_devices=mesh.devices.size):
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
            "the probe's train split has fewer than 2 classes; point the probe section at a labelled set"
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


class LinearProbe(common.Evaluator):
    """Linear-probe accuracies on one labelled set (an `evals.<name>` section of type 'probe'): fitted on its
    train_split, scored on its split."""

    def __init__(self, name, section, cfg, mesh):
        super().__init__(name, section, cfg, mesh)
        for split in (section.train_split, section.split):
            eval_data.check_section(cfg, section, self.key, split=split, label=True)

    def run(self, params, encoders, graphdef=None) -> dict:
        """-> top1, mean_per_class (%), train_examples, examples."""
        encode = lambda x: encoders.image(params, x)
        train_x, train_y = embed_split(self.cfg, self.section, self.section.train_split, self.mesh, encode)
        test_x, test_y = embed_split(self.cfg, self.section, self.section.split, self.mesh, encode)
        return fit_and_score(train_x, train_y, test_x, test_y, self.section.c)
