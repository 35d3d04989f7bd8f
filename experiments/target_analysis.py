"""Analysis of a steps-to-target sweep (experiments/steps_to_target.py) from its CSVs alone:

    python experiments/target_analysis.py --workdir workdirs/target   # reads runs.csv, curves.csv, noise.csv

Per (loss, init, B) the best run is the one that reached the target in the fewest steps (its interpolated crossing,
target.py); per (loss, init) the steps/examples trade-off S = S_min (1 + B_crit / B) is fitted to those points
(batch_fit.py, bootstrap intervals). Writes summary.md (the table, the fits, the noise scale beside B_crit and the
softmax/sigmoid comparison), tradeoff.png (S against E with the fitted curve, B_crit marked), curves.png (the
target metric against examples per B) and noise.png (B_simple against step, with B_crit).
"""

import argparse
import csv
import json
import math
import os
import sys

import batch_fit

COLUMNS = {
    "runs": ("name", "kind", "loss", "init", "batch_size", "lr_factor", "lr", "budget_steps", "eval_every",
             "reached", "steps", "crossing_steps", "crossing_examples", "final_step", "final_metric", "wall_s"),
    "curves": ("name", "kind", "loss", "init", "batch_size", "lr_factor", "step", "examples", "value"),
    "noise": ("name", "loss", "init", "batch_size", "step", "examples", "noise_scale", "grad_sq", "trace_sigma"),
}  # fmt: skip


def rows_of(spec: dict, report: dict) -> dict:
    """{'runs': [1 row], 'curves': [a row per evaluation], 'noise': [a row per log]} for one finished run:
    spec is its point.json, report its train_report.json."""
    name = f"{'noise_' if spec['kind'] == 'noise' else ''}{spec['loss']}_{spec['init']}_b{spec['batch_size']}_lr{spec['lr_factor']:g}x"
    head = {"name": name, **{k: spec[k] for k in ("kind", "loss", "init", "batch_size", "lr_factor")}}
    target = report.get("target") or {}
    metric = spec["target_metric"]
    curves = [{**head, "step": e["step"], "examples": e["examples_seen"], "value": e["metrics"][metric]}
              for e in report.get("eval_history", []) if metric in e["metrics"]]  # fmt: skip
    run = {**head, "lr": spec["lr"], "budget_steps": spec["budget_steps"], "eval_every": spec["eval_every"],
           "reached": int(bool(target.get("reached"))), "steps": target.get("step", ""),
           "crossing_steps": target.get("crossing_step", ""), "crossing_examples": target.get("crossing_examples", ""),
           "final_step": report["step"], "final_metric": target.get("metric_value", ""), "wall_s": report.get("wall_s", "")}  # fmt: skip
    for key in ("loss", "temperature", "bias"):
        if key in report:
            run[f"final_{key}"] = report[key]
    noise = [{"name": name, "loss": spec["loss"], "init": spec["init"], "batch_size": spec["batch_size"],
              "step": h["step"], "examples": h["step"] * spec["batch_size"],
              **{k: h.get(k, "") for k in COLUMNS["noise"][6:]}}
             for h in report.get("history", []) if "noise_scale" in h]  # fmt: skip
    return {"runs": [run], "curves": curves, "noise": noise}


def collect(workdir: str, report_name: str, accept=lambda spec: True) -> tuple[dict, list]:
    """({'runs', 'curves', 'noise'}: the CSV rows of every finished run folder in workdir (point.json + report)
    whose spec `accept` takes, [names of the finished folders it refused])."""
    from etils import epath

    tables, refused = {"runs": [], "curves": [], "noise": []}, []
    for folder in sorted(epath.Path(workdir).iterdir()):
        paths = [folder / f for f in ("point.json", report_name)]
        if all(p.exists() for p in paths):
            spec, report = (json.loads(p.read_text()) for p in paths)
            if not accept(spec):
                refused.append(folder.name)
                continue
            for table, rows in rows_of(spec, report).items():
                tables[table] += rows
    return tables, refused


def read_csv(path: str) -> list[dict]:
    """Rows with numbers as floats ('' stays '')."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k, v in row.items():
            try:
                row[k] = float(v) if v != "" else ""
            except ValueError:
                pass
    return rows


def _rank(row: dict) -> tuple:
    """Sort key: reached first, then fewer crossing steps; among runs that did not reach, the higher final metric."""
    if row["reached"]:
        return (0, row["crossing_steps"])
    return (1, -row["final_metric"] if row["final_metric"] != "" else math.inf)


def best_points(runs: list[dict]) -> dict:
    """{(loss, init): {B: best row}}: of the lr and control runs, the fewest crossing steps per (loss, init, B)
    (a B where none reached keeps its run with the best final metric, reached = 0)."""
    out = {}
    for row in runs:
        if row["kind"] != "noise":
            points = out.setdefault((row["loss"], row["init"]), {})
            b = int(row["batch_size"])
            if b not in points or _rank(row) < _rank(points[b]):
                points[b] = row
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def edge_points(runs: list[dict], best: dict) -> set:
    """{(loss, init, B)} whose best lr factor is the smallest or largest one tried there: the lr grid did not
    bracket the optimum (a better lr may exist past it)."""
    out = set()
    for (loss, init), points in best.items():
        for b, p in points.items():
            tried = [r["lr_factor"] for r in runs if (r["loss"], r["init"], int(r["batch_size"])) == (loss, init, b)
                     and r["kind"] == "lr"]  # fmt: skip
            if len(tried) > 1 and p["lr_factor"] in (min(tried), max(tried)):
                out.add((loss, init, b))
    return out


def fits(best: dict) -> dict:
    """{(loss, init): TradeoffFit or the one-line reason it cannot be fitted}."""
    out = {}
    for key, points in best.items():
        batches = list(points)
        steps = [p["crossing_steps"] if p["reached"] else None for p in points.values()]
        try:
            out[key] = batch_fit.fit_tradeoff(batches, steps)
        except ValueError as e:
            out[key] = str(e)
    return out


def noise_summary(noise: list[dict]) -> dict:
    """{(loss, init, B): (median B_simple over the second half of the run's logs, its last value, logs)}."""
    out = {}
    for key in sorted({(r["loss"], r["init"], int(r["batch_size"])) for r in noise}):
        values = [r["noise_scale"] for r in noise if (r["loss"], r["init"], int(r["batch_size"])) == key]
        values = [v for v in values if v != "" and math.isfinite(v)]
        if values:
            half = sorted(values[len(values) // 2 :])
            out[key] = (half[len(half) // 2], values[-1], len(values))
    return out


def _fmt(x, digits=3) -> str:
    return "" if x == "" else f"{x:.{digits}g}" if isinstance(x, float) and x != int(x) else f"{int(x):,}"


def summary(title: str, best: dict, fitted: dict, noise: dict, edges: set = frozenset()) -> list[str]:
    """summary.md's lines: per B the best run of every (loss, init), the fits, and the noise scale. edges: the
    points whose best lr is at the edge of the factors tried (marked *)."""
    keys = list(best)
    batches = sorted({b for points in best.values() for b in points})
    intro = ("Per batch B and (loss, init): the best lr factor (* = the smallest or largest tried: not bracketed), "
             "the steps S and examples E to the target (interpolated crossing), or the metric at the end of the "
             "budget. The control (paper init) runs at the prior init's best lr only.")
    lines = [f"# Steps to target: {title}", "", intro, ""]
    lines.append("| B | " + " | ".join(f"{l} ({i}): lr x, S, E" for l, i in keys) + " |")
    lines.append("|---" * (len(keys) + 1) + "|")
    for b in batches:
        cells = []
        for key in keys:
            p = best[key].get(b)
            if p is None:
                cells.append("")
            elif p["reached"]:
                star = "*" if (*key, b) in edges else ""
                cells.append(f"{p['lr_factor']:g}{star}, {p['crossing_steps']:.0f}, {p['crossing_examples']:,.0f}")
            else:
                cells.append(f"{p['lr_factor']:g}, not in {p['final_step']:.0f} (last {_fmt(p['final_metric'])})")
        lines.append(f"| {b:,} | " + " | ".join(cells) + " |")
    lines += ["", "Fit S = S_min (1 + B_crit / B) per (loss, init) (experiments/batch_fit.py; 95% bootstrap):", ""]
    for key, fit in fitted.items():
        text = fit if isinstance(fit, str) else fit.summary() + f"; rms log residual {fit.rms_log_residual:.2f}"
        lines.append(f"- {key[0]} ({key[1]}): {text}")
    lines += compare_losses(best)
    if noise:
        intro = ("Gradient noise scale B_simple (noise runs; median over the second half of training, last value) "
                 "beside the fitted B_crit:")
        header = "| loss (init) | B | B_simple (median, 2nd half) | last | logs | B_crit [95%] |"
        lines += ["", intro, "", header, "|---|---|---|---|---|---|"]
        for (loss, init, b), (median, last, n) in noise.items():
            fit = fitted.get((loss, init))
            fit = None if isinstance(fit, str) else fit
            crit = f"{fit.b_crit:.3g} [{fit.intervals['b_crit'][0]:.3g}, {fit.intervals['b_crit'][1]:.3g}]" if fit else "-"
            lines.append(f"| {loss} ({init}) | {b:,} | {median:.3g} | {last:.3g} | {n} | {crit} |")
    return lines


def compare_losses(best: dict) -> list[str]:
    """Softmax vs sigmoid per B, each at its best lr and init: steps to the target and their ratio."""
    by_loss = {}
    for (loss, init), points in best.items():
        for b, p in points.items():
            old = by_loss.setdefault(loss, {}).get(b)
            if old is None or _rank(p) < _rank(old):
                by_loss[loss][b] = p
    if not {"softmax", "sigmoid"} <= set(by_loss):
        return []
    intro = ("Softmax vs sigmoid, each at its best lr and init (steps to target; 'not' = not reached within the "
             "budget, with the metric it ended at):")
    lines = ["", intro, "", "| B | softmax | sigmoid (init) | sigmoid / softmax |", "|---|---|---|---|"]

    def cell(p):
        return f"{p['crossing_steps']:.0f}" if p["reached"] else f"not ({_fmt(p['final_metric'])})"

    for b in sorted(set(by_loss["softmax"]) & set(by_loss["sigmoid"])):
        soft, sig = by_loss["softmax"][b], by_loss["sigmoid"][b]
        ratio = f"{sig['crossing_steps'] / soft['crossing_steps']:.2f}" if soft["reached"] and sig["reached"] else "-"
        lines.append(f"| {b:,} | {cell(soft)} | {cell(sig)} ({sig['init']}) | {ratio} |")
    return lines


def plot(workdir: str, best: dict, fitted: dict, curves: list[dict], noise: list[dict], target: float) -> list[str]:
    """tradeoff.png, curves.png and noise.png in workdir; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for (loss, init), points in best.items():
        reached = [p for p in points.values() if p["reached"]]
        line = ax.loglog([p["crossing_examples"] for p in reached], [p["crossing_steps"] for p in reached], "o",
                         label=f"{loss} ({init})")[0]  # fmt: skip
        for p in reached:
            ax.annotate(f"{int(p['batch_size'])}", (p["crossing_examples"], p["crossing_steps"]), fontsize=7)
        fit = fitted.get((loss, init))
        if not isinstance(fit, batch_fit.TradeoffFit):
            continue
        grid = [min(points) / 4 * (max(points) * 16 / min(points)) ** (i / 99) for i in range(100)]
        s = batch_fit.predicted_steps(grid, fit.s_min, fit.b_crit)
        ax.loglog(s * grid, s, "-", color=line.get_color(), lw=1)
        ax.plot([2 * fit.e_min], [2 * fit.s_min], "*", ms=12, color=line.get_color(),
                label=f"B_crit {fit.b_crit:.3g} ({loss}, {init})")  # fmt: skip
    ax.set_xlabel("examples to target E")
    ax.set_ylabel("steps to target S")
    ax.legend(fontsize=7)
    written.append(_save(fig, os.path.join(workdir, "tradeoff.png")))

    fig, axes = plt.subplots(1, max(1, len(best)), figsize=(5 * max(1, len(best)), 4), squeeze=False)
    for ax, ((loss, init), points) in zip(axes[0], best.items()):
        for b, p in points.items():
            pts = [(r["examples"], r["value"]) for r in curves if r["name"] == p["name"]]
            ax.semilogx([x for x, _ in pts], [y for _, y in pts], ".-", label=f"B={b} lr x{p['lr_factor']:g}")
        if target is not None:
            ax.axhline(target, color="k", ls=":", lw=1)
        ax.set_title(f"{loss} ({init})")
        ax.set_xlabel("examples")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("target metric")
    written.append(_save(fig, os.path.join(workdir, "curves.png")))

    if noise:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in sorted({r["name"] for r in noise}):
            rows = [r for r in noise if r["name"] == name and r["noise_scale"] != ""]
            line = ax.semilogy([r["step"] for r in rows], [r["noise_scale"] for r in rows], label=name)[0]
            fit = fitted.get((rows[0]["loss"], rows[0]["init"]))
            if isinstance(fit, batch_fit.TradeoffFit):
                ax.axhline(fit.b_crit, color=line.get_color(), ls="--", lw=1, label=f"B_crit {rows[0]['loss']}")
        ax.set_xlabel("step")
        ax.set_ylabel("B_simple (examples)")
        ax.legend(fontsize=7)
        written.append(_save(fig, os.path.join(workdir, "noise.png")))
    return written


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def analyse(workdir: str, title: str, target: float | None = None) -> list[str]:
    """Read the CSVs in workdir, write summary.md and the PNGs; returns the summary's fit and noise lines."""
    runs, curves, noise = (read_csv(os.path.join(workdir, f"{t}.csv")) for t in ("runs", "curves", "noise"))
    best = best_points(runs)
    fitted = fits(best)
    lines = summary(title, best, fitted, noise_summary(noise), edge_points(runs, best))
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        plot(workdir, best, fitted, curves, noise, target)
    except ImportError:
        lines.append("(no plots: matplotlib is not installed; pip install -e .[bench])")
    return [line for line in lines if line.startswith(("- ", "| "))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the sweep's folder (runs.csv, curves.csv, noise.csv)")
    p.add_argument("--target-value", type=float, default=None, help="drawn as a line on curves.png")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.workdir, "runs.csv")):
        print(f"error: no runs.csv in {args.workdir}; run steps_to_target.py (or its --collect) first", file=sys.stderr)
        return 2
    try:
        if not read_csv(os.path.join(args.workdir, "runs.csv")):
            raise ValueError("it has no runs")
        lines = analyse(args.workdir, os.path.basename(os.path.abspath(args.workdir)), args.target_value)
    except (KeyError, TypeError, ValueError, csv.Error) as e:
        print(f"error: {args.workdir}/runs.csv is not a steps_to_target.py table ({type(e).__name__}: {e}); "
              "rebuild it with steps_to_target.py --collect", file=sys.stderr)  # fmt: skip
        return 2
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
