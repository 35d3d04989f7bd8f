"""Results of a batch-size sweep: flattened report metrics, the CSV, log2-batch trend fits and the plot.

Used by experiments/batch_size_sweep.py; kept apart so the driver reads as the plan-and-run loop it is.
"""

import math
import os
import textwrap


def flat_metrics(report: dict, prefix: str = "") -> dict:
    """Every numeric value of a train report, nested dicts flattened to 'eval/zeroshot/top1', 'eval/retrieval/...'.
    The per-interval history and non-numbers (messages, lists) are left out."""
    out = {}
    for key, value in report.items():
        if key in ("history", "sections"):  # sections repeats the flat eval metrics per evaluator
            continue
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            out[prefix + key] = float(value) if isinstance(value, float) else value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / jax scalars
            out[prefix + key] = value.item()
    return out


def retrieval_r1_columns(columns) -> list[str]:
    """The metrics that are retrieval recall@1 (e.g. 'eval/retrieval/i2t_r1', 'retrieval/t2i_recall@1')."""
    ends = ("_r1", "r@1", "recall@1", "_recall1", "/r1")
    return sorted(c for c in columns if "retrieval" in c and c.lower().endswith(ends))


def plot_columns(columns) -> list[str]:
    """What to plot: zero-shot top-1, then each retrieval recall@1. A metric the report carries twice (in its flat
    'eval' dict and in a per-evaluator section such as 'retrieval') is plotted once."""
    top1 = [c for c in ("zero_shot/top1", "eval/zeroshot/top1") if c in columns][:1]
    r1 = retrieval_r1_columns(columns)
    return top1 + [c for c in r1 if not (c.startswith("eval/") and c[len("eval/") :] in r1)]


def fit_trend(batches, values) -> tuple[float, float]:
    """Least squares value = intercept + slope * log2(batch): slope is the change per doubling of the batch."""
    x = [math.log2(b) for b in batches]
    n = len(x)
    if n < 2 or len(set(x)) < 2:
        raise ValueError("a trend needs at least two distinct batch sizes")
    mx, my = sum(x) / n, sum(values) / n
    slope = sum((a - mx) * (b - my) for a, b in zip(x, values)) / sum((a - mx) ** 2 for a in x)
    return slope, my - slope * mx


def write_csv(path: str, rows: list, first_columns) -> None:
    """One row per point: first_columns (the plan) then every metric any row has, sorted."""
    import csv

    metrics = sorted({k for r in rows for k in r} - set(first_columns))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(first_columns) + metrics)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def trends(rows: list, metric: str) -> dict:
    """{loss: (slope, intercept)} of metric vs log2 batch, for every loss with two or more batch sizes."""
    out = {}
    for loss in sorted({r["loss"] for r in rows}):
        pts = [(r["batch_size"], r[metric]) for r in rows if r["loss"] == loss and r.get(metric) is not None]
        if len({b for b, _ in pts}) >= 2:
            out[loss] = fit_trend([b for b, _ in pts], [v for _, v in pts])
    return out


def plot(rows: list, path: str, title: str) -> list[str]:
    """One panel per metric (zero-shot top-1, then each retrieval R@1 present): metric vs batch on a log2 axis,
    one curve per loss with its least-squares trend dashed. Returns the printed trend lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {k for r in rows for k in r}
    metrics = plot_columns(columns)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    lines = []
    for ax, metric in zip(axes[0], metrics):
        fits = trends(rows, metric)
        for i, loss in enumerate(sorted({r["loss"] for r in rows})):
            pts = sorted((r["batch_size"], r[metric]) for r in rows if r["loss"] == loss and metric in r)
            colour = f"C{i}"
            label = loss
            if loss in fits:
                slope, intercept = fits[loss]
                xs = [pts[0][0], pts[-1][0]]
                ax.plot(xs, [intercept + slope * math.log2(x) for x in xs], "--", color=colour, alpha=0.6)
                label += f" (trend {slope:+.2f} per doubling)"
                lines.append(f"{metric} {loss}: {intercept:.2f} {slope:+.3f} * log2(batch)")
            ax.plot([b for b, _ in pts], [v for _, v in pts], "o-", color=colour, label=label)
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("global batch size")
        ax.set_ylabel(metric + (" (%)" if "top" in metric or "r1" in metric.lower() else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 60 * len(metrics)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return lines
