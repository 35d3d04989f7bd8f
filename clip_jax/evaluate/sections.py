"""The config vocabulary of the evaluators: every key of an `evals.<name>` section, per evaluator type, with its
default and meaning (as config.base() does for the rest of the config). Pure data: config.py builds sections from
it and config_checks validates them against it; evaluate/suite.py maps each type to the class that implements it.

A run has any number of sections, e.g. `evals.imagenet = config.evaluator("zeroshot", dataset="imagenet2012",
split="validation")` in a config file, or `--config.evals.zeroshot.dataset=clip_digits` on the command line. A
section whose `dataset` is '' is off.
"""

# Keys every evaluator type has.
COMMON = {
    "type": "",  # the evaluator: one of TYPES
    "dataset": "",  # tfds dataset under data.data_dir ('' = this evaluator is off)
    "split": "test",  # its split (the probe: the split it is scored on)
    "every": -1,  # steps between runs during training (-1 = the run's eval_every; 0 = only at the end)
    "batch_size": 512,  # images per evaluation step (a multiple of the device count)
    "max_examples": -1,  # cap on images read from the split (-1 = the whole split)
    "image_key": "image",  # its image feature
}

TYPES = {
    # Zero-shot classification: top-1, top-5 and mean per-class accuracy from prompt-ensembled class embeddings.
    "zeroshot": {
        **COMMON,
        "label_key": "label",  # the label feature (a ClassLabel: class names come from it)
        "templates": "",  # templates.json key or an embedded set's ('' = for the dataset: templates.default_templates)
        "class_names": "",  # '' = data/class_names.json entry if any, else the ClassLabel's; 'label'; or a key
    },
    # Image<->text retrieval: recall@1/5/10 both ways (CLIP_benchmark's conventions; see retrieval.py).
    "retrieval": {
        **COMMON,
        "text_key": "captions",  # caption(s) feature; 'a/b' = nested (coco_captions: 'captions/text')
        "tile": 1024,  # texts scored at once per device (live scores: images per device x tile, fp32)
    },
    # Linear probe: logistic regression (scikit-learn) on frozen image embeddings of train_split, scored on split.
    "probe": {
        **COMMON,
        "max_examples": 10_000,  # cap on images per split (-1 = the whole split)
        "train_split": "train",  # the split the probe is fitted on
        "label_key": "label",  # the label feature
        "c": 1.0,  # inverse L2 strength of the logistic regression (scikit-learn's C)
    },
    # Captioning (families that caption): perplexity of the references and CIDEr-D of generated captions (the
    # search settings are caption.*, shared with the `caption` command).
    "captioning": {
        **COMMON,
        "batch_size": 128,  # images per generation step
        "max_examples": 512,  # cap on images scored (-1 = the whole split)
        "text_key": "caption",  # the reference caption(s) feature
    },
}

# The metrics each type reports that a run can train towards (config `target.metric` = '<section>/<metric>'), and
# which way is better: 'max' (accuracies and recalls, %; CIDEr-D) or 'min' (perplexity, NLL). Zero-shot sets with
# held-out classes also report every accuracy with the suffixes '_seen' and '_unseen'.
_ZEROSHOT = {"top1": "max", "top5": "max", "mean_per_class": "max"}
METRICS = {
    "zeroshot": {f"{k}{s}": goal for k, goal in _ZEROSHOT.items() for s in ("", "_seen", "_unseen")},
    "retrieval": {f"{d}_r{k}": "max" for d in ("i2t", "t2i") for k in (1, 5, 10)},
    "probe": {"top1": "max", "mean_per_class": "max"},
    "captioning": {"cider": "max", "perplexity": "min", "nll": "min"},
}
