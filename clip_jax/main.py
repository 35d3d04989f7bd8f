"""Command line: `python -m clip_jax.main {train,eval,caption} --config=configs/X.py[:arg] --workdir=DIR
--config.key=value`, `benchmark --checkpoint=DIR --datasets=a,b@split`, and `convert --from hf|open_clip
--model-dir DIR --workdir OUT` / `convert --to hf|open_clip --workdir OUT --model-dir DIR` (an open_clip weights
file also takes --model-config).

`eval` runs the configured evaluators (the evals.<name> sections) on the latest checkpoint of --workdir (or on
--checkpoint) and writes DIR/eval/step_<N>.json plus TensorBoard summaries in DIR/eval. `benchmark
--checkpoint=DIR --datasets=a,b@split` evaluates it zero-shot on each dataset with the config saved beside it and
writes DIR/eval/zeroshot_step<N>.csv and .md.

Only argument handling, multi-host start-up and the printed report live here; the work is in train.py and
evaluate/.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clip_jax import cli_checks, config_checks, console
from clip_jax import config as config_lib

if __name__ == "__main__":
    # config_flags applies --config.* overrides while the flag is being defined and dies with a traceback on an
    # unknown key; check the keys first so the user gets one line naming the key and the closest valid one.
    try:
        cli_checks.check_override_keys(sys.argv[1:], cli_checks.check_config_file(sys.argv[1:]))
    except config_lib.ConfigError as _e:
        print(f"error: {_e}", file=sys.stderr)
        sys.exit(2)

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny_cpu.py", "Config file (path[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and TensorBoard events go.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "eval, benchmark: the checkpoint (a workdir, its checkpoints/ or a step folder in it)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host run: call jax.distributed.initialize() (auto-detected on TPU pods and SLURM).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (where not auto-detected)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (where not auto-detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (where not auto-detected).")
_FROM = flags.DEFINE_enum(
    "from", None, ["hf", "open_clip"], "convert: import from this format (--model-dir -> --workdir)."
)
_TO = flags.DEFINE_enum(
    "to", None, ["hf", "open_clip"], "convert: export to this format (--workdir -> --model-dir)."
)
_MODEL_DIR = flags.DEFINE_string(
    "model-dir", None, "convert: the model directory (HF or open_clip), or an open_clip weights/checkpoint file."
)
_MODEL_CONFIG = flags.DEFINE_string(
    "model-config", None, "convert --from open_clip: a model config JSON or open_clip model name (e.g. ViT-B-32)."
)
_IMAGES = flags.DEFINE_list("images", [], "caption: image files to caption (comma-separated).")
_DATASETS = flags.DEFINE_string("datasets", "", "benchmark: zero-shot sets, comma-separated, name[@split].")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "benchmark: tfds data_dir (default: the checkpoint's data.data_dir).")
_OUT = flags.DEFINE_string("out", "", "benchmark: folder for the CSV and markdown table (default: WORKDIR/eval).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs (orbax, tfds, absl, jax, TF C++).")
MODES = ("train", "eval", "convert", "caption", "benchmark")


def report(result: dict, cfg) -> str:
    """The short human-readable summary printed at the end of `train` / `eval`."""
    data = cfg.data.shards.strip() or cfg.data.name
    lines = ["", "=" * 60, f"clip_jax report: {data}, loss={cfg.loss.kind}"]
    if "examples_seen" not in result and "step" in result:
        lines.append(f"  checkpoint at step {result['step']}")
    if "examples_seen" in result:
        lines.append(f"  steps {result['step']}, examples seen {result['examples_seen']:,}")
    if "loss" in result:
        lines.append(f"  final train loss {result['loss']:.4f} (temperature {result['temperature']:.2f})")
    if result.get("target"):
        lines.append(_target_line(result["target"], cfg))
    if result.get("data_issues"):
        issues = ", ".join(f"{k} {n}" for k, n in result["data_issues"].items())
        lines.append(f"  input records skipped or converted (this process, this run): {issues}")
    if "caption_loss" in result:
        lines.append(
            f"  contrastive loss {result['contrastive_loss']:.4f}, caption loss {result['caption_loss']:.4f} per token"
        )
    for name, metrics in result.get("sections", {}).items():
        section = cfg.evals[name]
        title = f"on {section.dataset}/{section.split}" + ("" if name == section.type else f" [evals.{name}]")
        lines += _SECTION_LINES[section.type](title, section, metrics)
    if "json" in result:
        lines.append(f"  written to {result['json']}")
    lines.append("=" * 60)
    return "\n".join(lines)


def _target_line(t: dict, cfg) -> str:
    """One line: where training stopped against config `target` (target.py)."""
    from clip_jax import target

    goal = f"{t['metric']} {'>=' if target.goal_of(cfg) == 'max' else '<='} {t['value']:g}"
    if t["reached"]:
        return (f"  target {goal} reached at step {t['step']} ({t['examples']:,} examples; {t['metric_value']:.4g}, "
                f"crossing ~step {t['crossing_step']:.1f}); the checkpoint of that step is kept")  # fmt: skip
    last = "no value seen" if t["metric_value"] is None else f"last value {t['metric_value']:.4g}"
    return f"  target {goal} not reached within total_steps ({last})"


def _zero_shot_lines(title, section, zs) -> list[str]:
    lines = [
        f"  zero-shot {title} ({zs['examples']} images, {zs['num_classes']} classes):",
        f"    top-1 {zs['top1']:.1f}%  (chance {zs['chance_top1']:.1f}%)",
        f"    top-5 {zs['top5']:.1f}%  (chance {zs['chance_top5']:.1f}%)",
        f"    mean per-class top-1 {zs['mean_per_class']:.1f}%",
    ]
    if "top1_unseen" in zs:
        lines.append(
            f"    top-1 on classes seen in training {zs['top1_seen']:.1f}% ({zs['examples_seen']} images), "
            f"never seen {zs['top1_unseen']:.1f}% ({zs['examples_unseen']} images)"
        )
    return lines


def _retrieval_lines(title, section, rt) -> list[str]:
    lines = [f"  retrieval {title} ({rt['images']} images, {rt['texts']} captions):"]
    for way, name in (("i2t", "image->text"), ("t2i", "text->image")):
        lines.append(f"    {name} R@1 {rt[way + '_r1']:.1f}%  R@5 {rt[way + '_r5']:.1f}%  R@10 {rt[way + '_r10']:.1f}%")
    if rt.get("images_without_captions") or rt.get("images_unreadable"):
        lines.append(
            f"    {rt['images_without_captions']} images without captions (image->text misses, as CLIP_benchmark "
            f"counts them); {rt['images_unreadable']} unreadable images left out"
        )
    return lines


def _probe_lines(title, section, pr) -> list[str]:
    counts = f"{pr['train_examples']} {section.train_split} / {pr['examples']} {section.split} images"
    return [f"  linear probe {title} ({counts}): top-1 {pr['top1']:.1f}%, mean per-class {pr['mean_per_class']:.1f}%"]


def _captioning_lines(title, section, cap) -> list[str]:
    scores = f"perplexity {cap['perplexity']:.2f}, CIDEr-D {cap['cider']:.3f}"
    return [f"  captioning {title} ({cap['examples']} images): {scores}"]


# Evaluator type -> its lines of the report (every type of evaluate/suite.py TYPES has one).
_SECTION_LINES = {
    "zeroshot": _zero_shot_lines,
    "retrieval": _retrieval_lines,
    "probe": _probe_lines,
    "captioning": _captioning_lines,
}


def _usage_error(message: str):
    """A command-line mistake: one `error:` line and exit status 2 (absl's UsageError would print every flag)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    if len(argv) != 2 or argv[1] not in MODES:
        _usage_error(f"usage: python -m clip_jax.main {{{'|'.join(MODES)}}} --config=... --workdir=DIR")
    if not _WORKDIR.value and not (argv[1] in ("eval", "benchmark") and _CHECKPOINT.value):
        _usage_error("--workdir is required (checkpoints and logs go there; re-running resumes)")
    if _CHECKPOINT.value and argv[1] not in ("eval", "benchmark"):
        _usage_error("--checkpoint is for `eval` and `benchmark`; `train` resumes from --workdir")
    console.setup(_VERBOSE.value)  # before jax starts its backends: their INFO lines are library chatter
    import jax

    if _DISTRIBUTED.value:
        # With no arguments JAX detects TPU pods, SLURM and Open MPI; the flags cover a plain cluster or localhost.
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )

    from clip_jax import train
    from clip_jax.checkpoint import CheckpointWriteError
    from clip_jax.evaluate.suite import evaluate_checkpoint

    if argv[1] == "convert":
        return convert()
    if argv[1] == "benchmark":
        return benchmark()
    cfg = _CONFIG.value
    try:
        config_checks.validate(cfg, jax.device_count())
        if argv[1] == "caption":
            from clip_jax.evaluate import captioning

            if not _IMAGES.value:
                _usage_error("caption needs --images=a.png,b.jpg")
            result = captioning.caption_files(cfg, _WORKDIR.value, _IMAGES.value)
        elif argv[1] == "train":
            result = train.run(cfg, _WORKDIR.value)
        else:
            result = evaluate_checkpoint(cfg, _WORKDIR.value or "", checkpoint=_CHECKPOINT.value)
    except train.USER_ERRORS as e:
        console.close_all()  # a progress bar on the terminal ends its line first
        print(f"error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, CheckpointWriteError):
            # A failed orbax save leaves non-daemon threads waiting (up to its 20-minute timeout) for a signal
            # that never comes, and a normal exit would wait for them. Nothing is left to save: leave now.
            logging.flush()
            os._exit(2)
        sys.exit(2)
    if jax.process_index() == 0 and "captions" in result:
        print(f"captions by the checkpoint at step {result['step']} (beam {cfg.caption.beam_size}):")
        for path, text, score in result["captions"]:
            print(f"{path}\t{text}\t(score {score:.3f})", flush=True)
    elif jax.process_index() == 0:
        print(report(result, cfg), flush=True)
        if result.get("preempted"):  # a preemption is a clean stop: exit 0 so schedulers simply re-run the command
            print(result["message"], flush=True)


def benchmark():
    """`benchmark --checkpoint=WORKDIR --datasets=a,b@split`: zero-shot on every dataset, one table."""
    import jax

    from clip_jax import train
    from clip_jax.evaluate import benchmark as benchmark_lib

    if not _DATASETS.value or not (_CHECKPOINT.value or _WORKDIR.value):
        _usage_error("benchmark needs --checkpoint (or --workdir) and --datasets=name[@split],...")
    if any(arg.startswith("--config") for arg in sys.argv[1:]):
        _usage_error(
            "benchmark takes the model, tokenizer and preprocessing from the checkpoint's saved config, so --config "
            "flags do not apply; --data_dir names the datasets' folder"
        )
    try:
        datasets = benchmark_lib.parse_datasets(_DATASETS.value)
        result = benchmark_lib.run(
            _CHECKPOINT.value or _WORKDIR.value, datasets, data_dir=_DATA_DIR.value, out_dir=_OUT.value
        )
    except train.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if jax.process_index() == 0:
        with open(result["markdown"]) as f:
            print(f.read(), end="", flush=True)
        print(f"written to {result['csv']} and {result['markdown']}", flush=True)


def convert():
    """`convert --from hf|open_clip --model-dir DIR --workdir OUT` or `convert --to hf|open_clip --workdir OUT
    --model-dir DIR`."""
    from clip_jax.convert import files, hf, hf_tokenizer

    if (_FROM.value is None) == (_TO.value is None) or not _MODEL_DIR.value:
        _usage_error("convert needs --model-dir and exactly one of --from=hf|open_clip or --to=hf|open_clip")
    if _MODEL_CONFIG.value and _FROM.value != "open_clip":
        _usage_error("--model-config is read only by convert --from=open_clip")
    try:
        if "open_clip" in (_FROM.value, _TO.value):
            _convert_open_clip()
        elif _FROM.value:
            cfg, params = files.import_model(_MODEL_DIR.value)
            files.write_checkpoint(cfg, params, _WORKDIR.value)
            if cfg.tokenizer.kind == "hashed_words":  # base()'s default: the import found no tokenizer
                print(files.NO_TOKENIZER.format(dir=_MODEL_DIR.value), flush=True)
            notes = files.preprocess_notes(_MODEL_DIR.value, cfg.model.image.image_size)
            _imported(notes + hf_tokenizer.notes(_MODEL_DIR.value, cfg))
        else:
            cfg, params = files.read_checkpoint(_WORKDIR.value)
            family = files.export_model(cfg, params, _MODEL_DIR.value)
            print(f"exported {_WORKDIR.value} as an HF {family} model to {_MODEL_DIR.value}", flush=True)
    except (hf.ConversionError, config_lib.ConfigError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _imported(notes: list[str]) -> None:
    """The import's notes, then where it went and how to evaluate it."""
    for note in notes:
        print(note, flush=True)
    print(
        f"imported {_MODEL_DIR.value} into {_WORKDIR.value} (evaluate with "
        f"--config=configs/imported.py:{_WORKDIR.value})",
        flush=True,
    )


def _convert_open_clip():
    """convert --from open_clip (a directory, or a weights file with --model-config) or --to open_clip."""
    from clip_jax.convert import files, open_clip

    if _FROM.value:
        cfg, params, notes = open_clip.import_model(_MODEL_DIR.value, _MODEL_CONFIG.value)
        files.write_checkpoint(cfg, params, _WORKDIR.value)
        _imported(notes)
    else:
        cfg, params = files.read_checkpoint(_WORKDIR.value)
        open_clip.export_model(cfg, params, _MODEL_DIR.value)
        print(f"exported {_WORKDIR.value} as an open_clip CLIP to {_MODEL_DIR.value}", flush=True)


if __name__ == "__main__":
    app.run(main)
