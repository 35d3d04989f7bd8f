"""What a person sees on the console: library INFO logs off unless asked for, and a training progress report.

`setup(verbose)` runs once in main.py before any work. `Progress` replaces clu's ReportProgress in the training
loop: a tqdm bar (loss, examples/s, ETA) when stdout and stderr are both terminals, otherwise one plain metrics
line per log interval (CI, a log file, a pipe). TensorBoard and the clu metric writers are not changed here: the
writer still receives every metric (its log lines are INFO, so they show with --verbose).
"""

import logging
import os
import sys
import time

from absl import logging as absl_logging
from tqdm import tqdm

_OPEN = []  # Progress objects with a bar on the terminal (closed by close_all before an error line is printed)

# Library warnings that need no action, dropped unless verbose: tfds recommends OpenCV in every run, while
# clip_jax decodes images with Pillow on purpose (input/decode.py; tests/test_image_fidelity.py holds it to Pillow).
ADVICE = ("OpenCV is not installed. We recommend using OpenCV",)

# Metrics shown in the one line per periodic evaluation (by the last part of their name; all if none match), and
# those among them that are percentages (the evaluators report accuracy and recall in %).
HEADLINE = ("top1", "top5", "mean_per_class", "i2t_r1", "t2i_r1", "perplexity", "cider")
PERCENT = ("top1", "top5", "mean_per_class", "i2t_r1", "t2i_r1")


def setup(verbose: bool) -> None:
    """Set the log levels of this process (and of the worker processes it starts) for a person at a console.

    verbose=False: Python and absl logging show WARNING and above, so the INFO chatter of orbax, tfds, grain, clu,
    absl and jax (e.g. its "Unable to initialize backend 'tpu'" line) is dropped while our warnings (skipped NaN
    steps, skipped images, preemption) still print, one line each; the ADVICE warnings are dropped too.
    TensorFlow's and XLA's C++ INFO lines are off: TF_CPP_MIN_LOG_LEVEL=1, read when their C++ first logs (so
    this runs before the first computation and before TensorFlow is imported). TensorFlow 2.21 prints "oneDNN
    custom operations are on" at import whatever that level is; TF_ENABLE_ONEDNN_OPTS=0, the switch that message
    names, turns those kernels and the message off. clip_jax runs no TensorFlow kernels that oneDNN would change
    (TF only writes TensorBoard events and backs tfds), and neither variable is changed if the environment sets it.
    Worker processes (grain) inherit both. Off a terminal, tfds's progress bars (preparing a dataset on first use)
    are off too: each redraw would be a line. verbose=True: INFO and above, as absl's default; nothing else changes.
    Call it after absl has parsed the flags (inside `app.run`'s main), where absl's handler is on the root logger.
    """
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        if not on_terminal():
            import tensorflow_datasets as tfds  # lazy: does not import TensorFlow

            tfds.display_progress_bar(False)
    absl_logging.set_verbosity(level)  # the root logger when absl's handler is installed, else absl's own
    logging.getLogger().setLevel(level)
    absl_logger = absl_logging.get_absl_logger()  # tfds, orbax, grain and clu log through it
    for f in [f for f in absl_logger.filters if isinstance(f, _DropAdvice)]:
        absl_logger.removeFilter(f)
    if not verbose:
        absl_logger.addFilter(_DropAdvice())


def on_terminal() -> bool:
    """Whether a person watches a terminal: stdout and stderr are both ttys (not CI, a log file or a pipe)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVICE)


def format_eval(step: int, metrics: dict) -> str:
    """One line for a periodic evaluation: 'eval at step 500: zeroshot top1 41.9%, top5 80.0% | retrieval ...'.

    metrics: flat {'<section>/<name>': float} as the evaluators return them. Only the HEADLINE names are shown
    when there are any (TensorBoard gets every metric); PERCENT ones with one decimal and '%', others with 4
    significant digits."""
    shown = {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] in HEADLINE} or metrics
    sections: dict[str, list[str]] = {}
    for key, value in shown.items():
        section, _, name = key.rpartition("/")
        shown_value = f"{value:.1f}%" if name in PERCENT else f"{value:.4g}"
        sections.setdefault(section, []).append(f"{name} {shown_value}")
    parts = [f"{section} {', '.join(items)}".strip() for section, items in sections.items()]
    return f"eval at step {step}: " + " | ".join(parts)


class Progress:
    """Training progress for a person, printed by process 0 only.

    total: the run's last step (cfg.total_steps); start: the step this run starts from (0, or the restored step);
    writer: a clu MetricWriter that receives 'steps_per_sec' and 'uptime' at each log interval, as clu's
    ReportProgress wrote them (None: no TensorBoard scalars); enabled: False on processes other than 0;
    interactive: a tqdm bar instead of plain lines (default: whether stdout and stderr are both terminals).
    Plain lines go to stdout: 'step 100/2000  loss 1.2345  temperature 14.29  812 examples/s  ETA 03:12'.
    The ETA assumes the rest of the run goes at the rate of the last log interval (steps per wall-clock second).
    """

    def __init__(self, total: int, start: int, *, writer=None, enabled: bool = True, interactive=None):
        self.total, self.writer, self.enabled = total, writer, enabled
        self.interactive = on_terminal() if interactive is None else interactive
        self._t0 = self._last_time = time.monotonic()
        self._last_step = start
        self._bar = None
        if not enabled:
            return
        if self.interactive:
            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
            _OPEN.append(self)
        else:
            first = "starting" if start == 0 else f"resuming after step {start}"
            print(f"training: {first}, {total} steps in all", flush=True)

    def step(self, step: int) -> None:
        """Called after every train step (cheap: the bar redraws at most ~10 times a second)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, metrics: dict) -> None:
        """Called at each log interval with the interval's averaged metrics (train._log's dict: 'loss',
        'temperature', 'examples_per_sec', ...): updates the bar's figures, or prints one plain line."""
        now = time.monotonic()
        steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        if self.writer is not None:
            self.writer.write_scalars(step, {"steps_per_sec": steps_per_sec, "uptime": now - self._t0})
        if not self.enabled:
            return
        if self._bar is not None:
            figures = {"loss": f"{metrics['loss']:.4f}", "examples/s": f"{metrics['examples_per_sec']:.0f}"}
            self._bar.set_postfix(figures)
            self._bar.update(step - self._bar.n)
            return
        eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else 0.0
        print(
            f"step {step}/{self.total}  loss {metrics['loss']:.4f}  temperature {metrics['temperature']:.2f}  "
            f"{metrics['examples_per_sec']:,.0f} examples/s  ETA {tqdm.format_interval(eta)}",
            flush=True,
        )

    def evaluated(self, step: int, metrics: dict) -> dict:
        """Print one line for a periodic evaluation's metrics (see format_eval) and return them unchanged."""
        if self.enabled:
            self._write(format_eval(step, metrics))
        return metrics

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)  # above the bar, which is redrawn below it
        else:
            print(line, flush=True)

    def close(self) -> None:
        """End the bar (leaving its last state on the terminal); plain lines need no closing."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            _OPEN.remove(self)


def close_all() -> None:
    """Close any progress bar still drawn (a run stopped by an error), so the next line starts on its own line."""
    while _OPEN:
        _OPEN[-1].close()  # removes itself
