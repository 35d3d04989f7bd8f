"""How train.compile_step compiles the train step for its backend: XLA compiler options, and the attention's batch
chunks that go with them (models/attend.py)."""

from clip_jax.models import attend, two_tower

CONCURRENCY = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}


def compiler_options(cfg, mesh) -> dict:
    """XLA options for the train step: the concurrency-optimised scheduler on a one-device CPU step without remat,
    else none (XLA's defaults, with the memory-minimising CPU scheduler clip_jax/__init__.py sets per process).

    Why: XLA:CPU's thunk executor runs independent ops of a step at the same time only when the schedule leaves
    them independent, and train.compile_step then traces the attention in batch chunks for exactly that
    (models/attend.py): 1.04x on issue 18's CLIP step, 1.14x on configs/tiny_cpu.py (paired A/B,
    experiments/results/step_breakdown.md). The schedule also holds more buffers at once (that step's temporary
    buffer: 1.64 -> 2.01 GiB), so it is not used where memory was asked for (any remat policy), nor with more than
    one device, where two collectives of one step could start in different orders on different devices and
    deadlock (clip_jax/__init__.py).

    cfg: the run config (model.remat, model.image.remat, model.text.remat); mesh: the step's jax Mesh. Returns a
    dict for jax.jit's compiler_options (empty: XLA's defaults).
    """
    remat = {two_tower.tower_remat(cfg.model, tower) for tower in ("image", "text")}
    if mesh.devices.size != 1 or mesh.devices.flat[0].platform != "cpu" or remat != {"none"}:
        return {}
    return dict(CONCURRENCY)


def attention_chunks(options: dict) -> int:
    """Batch chunks for the step's attention: one per CPU core under the concurrency-optimised scheduler (which runs
    them side by side), else 1 (under the memory-minimising one they would run in turn, ~4% slower)."""
    return attend.cpu_cores() if options == CONCURRENCY else 1
