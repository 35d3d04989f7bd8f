"""Multi-host training, simulated: 2 local processes x 4 CPU devices (collectives over localhost via gloo) train
the same config and seed as 1 process x 8 devices, and end with the same loss, the same parameters and the same
zero-shot result (the evaluators run on every process)."""

import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import small_config

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import optim, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _params(cfg, workdir):
    mesh, opt = sharding.make_mesh(cfg), optim.make(cfg)
    _, abstract, shardings = train.state_shardings(cfg, mesh, opt)
    ckpt = checkpoint_lib.Checkpointer(str(workdir), cfg)
    step, state, _ = ckpt.restore(abstract, shardings, cfg)
    ckpt.close()
    return step, jax.device_get(state["params"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    # Random crops and flips are on, so the test also checks that augmentation does not depend on the host count.
    cfg = small_config(data_dir, total_steps=STEPS, log_every=2)
    cfg.data.train_crop, cfg.data.flip = "inception", True
    one = tmp_path_factory.mktemp("one_process")
    single = train.run(cfg, str(one))  # also prepares the dataset the subprocesses read

    two = tmp_path_factory.mktemp("two_processes")
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "clip_jax.main", "train", "--config=configs/tiny_cpu.py", f"--workdir={two}"]
    cmd += _overrides(cfg) + ["--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [
        subprocess.Popen(
            cmd + [f"--process_id={i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so cleanup reaches grain/orbax children too
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:  # on a timeout or any failure: no process outlives the test
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return cfg, one, single, two, outs


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
