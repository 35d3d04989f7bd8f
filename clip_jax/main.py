"""Command line: `python -m clip_jax.main {train,eval} --config=configs/X.py[:arg] --workdir=DIR --config.key=value`.

Only argument handling, multi-host start-up and the printed report live here; the work is in train.py and
evaluate/.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clip_jax import config as config_lib

if __name__ == "__main__":
    # config_flags applies --config.* overrides while the flag is being defined and dies with a traceback on an
    # unknown key; check the keys first so the user gets one line naming the key and the closest valid one.
    try:
        config_lib.check_override_keys(sys.argv[1:])
        config_lib.check_config_file(sys.argv[1:])
    except config_lib.ConfigError as _e:
        print(f"error: {_e}", file=sys.stderr)
        sys.exit(2)

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny_cpu.py", "Config file (path[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and TensorBoard events go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
_IMAGES = flags.DEFINE_list("images", [], "caption: image files to caption (comma-separated).")
MODES = ("train", "eval", "caption")


def report(result: dict, cfg) -> str:
    """The short human-readable summary printed at the end of `train` / `eval`."""
    lines = ["", "=" * 60, f"clip_jax report: {cfg.data.name}, loss={cfg.loss.kind}"]
    if "examples_seen" not in result and "step" in result:
        lines.append(f"  checkpoint at step {result['step']}")
    if "examples_seen" in result:
        lines.append(f"  steps {result['step']}, examples seen {result['examples_seen']:,}")
    if "loss" in result:
        lines.append(f"  final train loss {result['loss']:.4f} (temperature {result['temperature']:.2f})")
    if "caption_loss" in result:
        lines.append(
            f"  contrastive loss {result['contrastive_loss']:.4f}, caption loss {result['caption_loss']:.4f} per token"
        )
    zs = result.get("zero_shot")
    if zs:
        lines.append(
            f"  zero-shot on {cfg.eval.dataset}/{cfg.eval.split} ({zs['examples']} images, "
            f"{zs['num_classes']} classes):"
        )
        lines.append(f"    top-1 {zs['top1']:.1f}%  (chance {zs['chance_top1']:.1f}%)")
        lines.append(f"    top-5 {zs['top5']:.1f}%  (chance {zs['chance_top5']:.1f}%)")
        if "top1_unseen" in zs:
            lines.append(
                f"    top-1 on classes seen in training {zs['top1_seen']:.1f}% ({zs['examples_seen']} images), "
                f"never seen {zs['top1_unseen']:.1f}% ({zs['examples_unseen']} images)"
            )
    lines.append("=" * 60)
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(f"usage: python -m clip_jax.main {{{'|'.join(MODES)}}} --config=... --workdir=DIR")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (checkpoints and logs go there; re-running resumes)")
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize()
    import jax

    from clip_jax import train
    from clip_jax.checkpoint import CheckpointWriteError
    from clip_jax.evaluate import evaluate_checkpoint

    cfg = _CONFIG.value
    try:
        config_lib.validate(cfg, jax.device_count())
        if argv[1] == "caption":
            from clip_jax.evaluate import captioning

            if not _IMAGES.value:
                raise app.UsageError("caption needs --images=a.png,b.jpg")
            result = captioning.caption_files(cfg, _WORKDIR.value, _IMAGES.value)
        elif argv[1] == "train":
            result = train.run(cfg, _WORKDIR.value)
        else:
            result = evaluate_checkpoint(cfg, _WORKDIR.value)
    except train.USER_ERRORS as e:
        logging.error("%s", e)
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


if __name__ == "__main__":
    app.run(main)
