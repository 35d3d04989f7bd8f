"""A zero-shot benchmark: one checkpoint on a list of classification datasets in one command, written as a CSV and
a markdown table (dataset, split, classes, examples, top-1, top-5, mean per-class recall), the columns
CLIP_benchmark users compare (its acc1, acc5 and mean_per_class_recall, here in %).

    python -m clip_jax.main benchmark --checkpoint=WORKDIR --datasets=clip_shapes,clip_digits,cifar10@test

Any labelled tfds set prepared under data.data_dir works (a ClassLabel feature 'label', images under 'image');
`name@split` picks a split (default: test). Class names and templates are chosen per dataset
(templates.default_templates; the embedded sets use their own prompts). The model and its preprocessing come
from the config saved with the checkpoint, so nothing needs restating.
"""

import csv
import os
import re

import jax

from clip_jax import config as config_lib
from clip_jax import sharding
from clip_jax import state as run_state
from clip_jax.evaluate import suite
from clip_jax.input import pipeline

COLUMNS = ("dataset", "split", "classes", "examples", "top1", "top5", "mean_per_class")


def parse_datasets(text: str, default_split: str = "test") -> list[tuple[str, str]]:
    """'a,b@validation' -> [('a', 'test'), ('b', 'validation')]. Raises ConfigError on an empty list or name, or a
    (dataset, split) listed twice."""
    out = []
    for item in text.split(","):
        name, _, split = item.strip().partition("@")
        if not name:
            raise config_lib.ConfigError(f"--datasets={text!r} has an empty name; use e.g. clip_shapes,clip_digits")
        if (name, split or default_split) in out:
            raise config_lib.ConfigError(f"--datasets={text!r} lists {name}@{split or default_split} twice")
        out.append((name, split or default_split))
    return out


def benchmark_config(cfg, datasets, *, batch_size: int, max_examples: int):
    """(cfg with one zeroshot section per dataset and no other evaluator, the section names in `datasets` order)."""
    cfg = config_lib.from_dict(cfg.to_dict())
    for name in list(cfg.evals):
        del cfg.evals[name]
    names = []
    for dataset, split in datasets:
        names.append(re.sub(r"\W+", "_", f"{dataset}_{split}").strip("_"))
        cfg.evals[names[-1]] = config_lib.evaluator(
            "zeroshot", dataset=dataset, split=split, batch_size=batch_size, max_examples=max_examples
        )
    return cfg, names


def run(checkpoint: str, datasets, *, data_dir: str = "", batch_size: int = 256, max_examples: int = -1,
        out_dir: str = "") -> dict:  # fmt: skip
    """Evaluate the checkpoint (a workdir, its checkpoints/ or a step folder) zero-shot on every (dataset, split).

    Every dataset, its class names and prompts are checked before the checkpoint is read (one-line DataError /
    ConfigError). batch_size is rounded up to a multiple of the device count. Process 0 writes
    <out_dir>/zeroshot_step<N>.csv and .md (default out_dir: <workdir>/eval). Returns {'step', 'rows', 'csv',
    'markdown'}; rows are dicts with COLUMNS.
    """
    from clip_jax import config_checks

    saved, step = run_state.load_config(checkpoint)
    if data_dir:
        saved.data.data_dir = data_dir
    n = jax.device_count()
    cfg, names = benchmark_config(saved, datasets, batch_size=-(-batch_size // n) * n, max_examples=max_examples)
    # Evaluation needs no particular layout: keep the run's FSDP size where it fits these devices.
    cfg.mesh.data, cfg.mesh.fsdp = -1, cfg.mesh.fsdp if cfg.mesh.fsdp > 0 and n % cfg.mesh.fsdp == 0 else 1
    config_checks.validate(cfg, n)
    mesh = sharding.make_mesh(cfg)
    try:
        evals = suite.Suite(cfg, mesh)
    except (pipeline.DataError, config_lib.ConfigError) as e:  # name the dataset as the user wrote it
        text = str(e)
        for name, (dataset, split) in zip(names, datasets, strict=True):
            text = text.replace(f"evals.{name}.", f"--datasets {dataset}@{split}: ").replace(
                f"evals.{name}", f"--datasets {dataset}@{split}"
            )
        raise type(e)(text.replace("point --config.data.data_dir at", "point --data_dir at")) from None
    workdir, _ = run_state.resolve_checkpoint(checkpoint)
    _, params, graphdef, _ = run_state.restore_params(cfg, workdir, step=step, mesh=mesh)
    metrics = evals.run(params, graphdef)
    rows = []
    for name in names:  # the order the user listed them in
        section, m = cfg.evals[name], suite.section(metrics, name)
        rows.append({
            "dataset": section.dataset, "split": section.split, "classes": m["num_classes"],
            "examples": m["examples"], "top1": m["top1"], "top5": m["top5"], "mean_per_class": m["mean_per_class"],
        })  # fmt: skip
    out_dir = out_dir or os.path.join(workdir, "eval")
    paths = {"csv": os.path.join(out_dir, f"zeroshot_step{step}.csv"),
             "markdown": os.path.join(out_dir, f"zeroshot_step{step}.md")}  # fmt: skip
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_csv(paths["csv"], rows)
        with open(paths["markdown"], "w") as f:
            f.write(markdown(rows, f"{workdir} step {step}"))
    return {"step": step, "rows": rows, **paths}


def write_csv(path: str, rows: list[dict]) -> None:
    """rows -> CSV with COLUMNS; accuracies in % with 4 decimals (the exact counts are examples x accuracy)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})


def markdown(rows: list[dict], title: str) -> str:
    """A markdown table of the rows, with the unweighted mean over datasets as the last line (CLIP_benchmark's
    usual summary)."""
    lines = [
        f"Zero-shot classification, {title}",
        "",
        "| dataset | split | classes | examples | top-1 % | top-5 % | mean per-class % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['split']} | {r['classes']} | {r['examples']} | {r['top1']:.2f} | "
            f"{r['top5']:.2f} | {r['mean_per_class']:.2f} |"
        )
    if len(rows) > 1:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("top1", "top5", "mean_per_class")}
        lines.append(
            f"| mean of {len(rows)} |  |  |  | {mean['top1']:.2f} | {mean['top5']:.2f} | "
            f"{mean['mean_per_class']:.2f} |"
        )
    return "\n".join(lines) + "\n"
