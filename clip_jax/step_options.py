"""How train.compile_step compiles the train step for its backend: XLA compiler options, and the attention's batch
chunks that go with them (models/attend.py)."""

import jax

from clip_jax.models import attend, two_tower

CONCURRENCY = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}


def compiler_options(cfg, mesh) -> dict:
    """XLA options for the train step: the concurrency-optimised scheduler on a one-device CPU step without remat,
    else none (XLA's defaults, with the memory-minimising CPU scheduler clip_jax/__init__.py sets per process).

    Why: XLA:CPU's thunk executor runs independent ops of a step at the same time only when the schedule leaves
    them independent, and train.compile_step then traces the attention in batch chunks for exactly that
    (models/attend.py): 1.04x on issue 18's CLIP step, 1.14x on configs/tiny_cpu.py (paired A/B,
    experiments/results/step_breakdown.md). The schedule also holds more buffers at once (that step's temporary
    buffer: 1.64 -> 2.01 GiB), so it is not used where memory was asked for (any remat policy, or GradCache's
    accum_steps > 1), nor with more than one device, where two collectives of one step could start in different
    orders on different devices and deadlock (clip_jax/__init__.py).

    cfg: the run config (model.remat, model.image.remat, model.text.remat, accum_steps); mesh: the step's jax
    Mesh. Returns a dict for jax.jit's compiler_options (empty: XLA's defaults).
    """
    remat = {two_tower.tower_remat(cfg.model, tower) for tower in ("image", "text")}
    memory_asked = remat != {"none"} or cfg.accum_steps > 1
    if mesh.devices.size != 1 or mesh.devices.flat[0].platform != "cpu" or memory_asked:
        return {}
    return dict(CONCURRENCY)


MAX_CHUNKS = 8  # each chunk is one more copy of every attention op to compile: 64 chunks made tiny_cpu's step
# compile in 25 s against 7 s for 2 (measured by patching the core count on the 2-core box)


def attention_chunks(options: dict) -> int:
    """Batch chunks for the step's attention: one per CPU core, at most MAX_CHUNKS, under the concurrency-optimised
    scheduler (which runs them side by side), else 1 (under the memory-minimising one they would run in turn, ~4%
    slower). The speed-up was measured with 2 chunks on 2 cores only."""
    return min(attend.cpu_cores(), MAX_CHUNKS) if options == CONCURRENCY else 1


def jit(step, cfg, mesh, **jit_kwargs):
    """jax.jit(step, **jit_kwargs) with compiler_options(cfg, mesh), and the step traced inside
    attend.batch_chunks(attention_chunks(...)): with the concurrency-optimised scheduler the attention runs in one
    batch chunk per CPU core (at most MAX_CHUNKS), so the chunks' single-threaded products run side by side."""
    options = compiler_options(cfg, mesh)
    chunks = attention_chunks(options)

    def chunked(*args):
        with attend.batch_chunks(chunks):
            return step(*args)

    return jax.jit(chunked, compiler_options=options, **jit_kwargs)
