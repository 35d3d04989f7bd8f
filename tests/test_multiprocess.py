"""Multi-host training, simulated: 2 local processes x 4 CPU devices (collectives over localhost via gloo) train
the same config and seed as 1 process x 8 devices, and end with the same loss, the same parameters and the same
zero-shot result (the evaluators run on every process).

The 2 processes are launched both ways the README shows: with the CLI's --coordinator_address/--num_processes/
--process_id flags, and (slow) with no launch flags, only the environment SLURM's `srun` gives each task, from
which JAX's own cluster detection finds the coordinator, the process count and each process's index.
"""

import os
import re
import sys

import jax
import numpy as np
import pytest
from test_train import small_config

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import optim, sharding, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_driver as md

STEPS = 6


def _overrides(cfg) -> list[str]:
    """The --config.* flags that turn configs/tiny_cpu.py into `cfg` (the keys small_config and this test set)."""
    keys = (
        "data.data_dir", "data.name", "evals.zeroshot.dataset", "batch_size", "total_steps", "model.image.depth",
        "model.text.depth", "log_every", "ckpt_every", "eval_every", "optim.warmup_steps", "data.train_crop",
        "data.flip", "evals.zeroshot.batch_size",
    )  # fmt: skip
    out = []
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node[part]
        out.append(f"--config.{key}={node}")
    return out


def _params(cfg, workdir):
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    _, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    ckpt = checkpoint_lib.Checkpointer(str(workdir), cfg)
    step, state, _ = ckpt.restore(abstract, shardings, cfg)
    ckpt.close()
    return step, jax.device_get(state["params"])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process x 8-device reference run (in this process); it also prepares the dataset the others read."""
    data_dir = tmp_path_factory.mktemp("tfds")
    # Random crops and flips are on, so the test also checks that augmentation does not depend on the host count.
    cfg = small_config(data_dir, total_steps=STEPS, log_every=2)
    cfg.data.train_crop, cfg.data.flip = "inception", True
    one = tmp_path_factory.mktemp("one_process")
    return cfg, one, train.run(cfg, str(one))


# How the 2 processes learn the job: the CLI's flags (the README's localhost lines) or SLURM's environment (srun).
LAUNCHES = {"flags": md.flag_launch, "slurm": md.slurm_launch}


@pytest.fixture(scope="module", params=["flags", pytest.param("slurm", marks=pytest.mark.slow)])
def runs(request, single, tmp_path_factory):
    cfg, one, result = single
    two = tmp_path_factory.mktemp(f"two_processes_{request.param}")
    logs = tmp_path_factory.mktemp(f"logs_{request.param}")
    args = ["-m", "clip_jax.main", "train", "--config=configs/tiny_cpu.py", f"--workdir={two}"] + _overrides(cfg)
    outs = md.run(LAUNCHES[request.param](args, md.base_env()), logs, timeout=600)
    return cfg, one, result, two, outs


def test_two_processes_equal_one(runs):
    cfg, one, single, two, outs = runs
    # Only process 0 prints the report; both processes trained and wrote their shards of one checkpoint.
    assert "clip_jax report" in outs[0] and "clip_jax report" not in outs[1]
    loss_two = float(re.search(r"final train loss ([0-9.]+)", outs[0]).group(1))
    assert abs(loss_two - single["loss"]) < 1e-4, (loss_two, single["loss"])
    # The evaluators ran on both processes' devices and agree with the single-process run.
    top1_two = re.search(r"top-1 ([0-9.]+)%", outs[0]).group(1)
    zs = single["sections"]["zeroshot"]
    assert top1_two == f"{zs['top1']:.1f}", (top1_two, zs)

    step1, p1 = _params(cfg, one)
    step2, p2 = _params(cfg, two)
    assert step1 == step2 == STEPS
    changed = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
        changed += 1
    assert changed > 10
    # Both processes wrote their own data position into the one final checkpoint: the job had 2 processes.
    assert md.host_data_files(two, STEPS) == ["process_0-of-2.json", "process_1-of-2.json"]
