"""Two-process runs for the tests, in one place: 2 local processes x 4 CPU devices that join one jax.distributed
job over localhost, launched either with clip_jax's own flags (--coordinator_address/--num_processes/--process_id)
or with only the environment a SLURM `srun` gives each task (JAX's cluster detection reads it).

Run as a script, this is also the recording driver: the `clip_jax.main` CLI with every process appending, for each
train step, the token rows of the host-local batch it fed to `$RECORD_DIR/process_<i>.jsonl`. Only the tests
install the recorder (by wrapping train.compile_step); clip_jax itself is unchanged.
"""

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys

import jax
import numpy as np

from clip_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.abspath(__file__)
PROCESSES = 2
TIMEOUT = 300  # seconds for one 2-process run (a normal one takes well under a minute on 2 busy cores)
# Variables that would make jax.distributed.initialize() see a cluster the test did not set up.
_CLUSTER_VARS = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_SERVICE_HOST")
# jax/_src/clusters/slurm_cluster.py: the coordinator listens on SLURM_JOB_ID % 2**12 + this port.
_SLURM_FIRST_PORT = 65535 - 2**12 + 1


# -- launching ------------------------------------------------------------------------------------------------


def free_port(low: int | None = None, high: int | None = None) -> int:
    """A localhost TCP port that is free now: any (the OS picks) or one in [low, high]."""
    for _ in range(200):
        port = 0 if low is None else random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high}]")


def base_env(**extra) -> dict:
    """test_reliability's subprocess environment (CPU, shared compile cache, this checkout's clip_jax) with 4
    devices per process, no inherited cluster variables, and `extra`."""
    from test_reliability import _env  # lazily: the driver script itself needs none of the test modules

    env = {k: v for k, v in _env().items() if not k.startswith(_CLUSTER_VARS)}
    return {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", **extra}


def flag_launch(args: list[str], env: dict) -> list[tuple[list[str], dict]]:
    """(argv, env) of each process, told the job by the CLI's own flags (the README's localhost form)."""
    port = free_port()
    flags = ["--distributed", f"--coordinator_address=localhost:{port}", f"--num_processes={PROCESSES}"]
    return [(args + flags + [f"--process_id={i}"], env) for i in range(PROCESSES)]


def slurm_env(process: int, job_id: int) -> dict:
    """What `srun --nodes=1 --ntasks-per-node=2` sets for task `process` on node 'localhost' (the names JAX reads,
    SLURM_JOB_ID/STEP_NODELIST/NTASKS/PROCID/LOCALID, and the neighbours a real srun sets beside them)."""
    n = str(PROCESSES)
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOBID": str(job_id),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": n,
        "SLURM_NPROCS": n,
        "SLURM_STEP_NUM_TASKS": n,
        "SLURM_TASKS_PER_NODE": n,
        "SLURM_STEP_TASKS_PER_NODE": n,
        "SLURM_PROCID": str(process),
        "SLURM_LOCALID": str(process),
    }


def slurm_launch(args: list[str], env: dict) -> list[tuple[list[str], dict]]:
    """(argv, env) of each process with no launch flags beyond --distributed: only the SLURM environment. The job
    id is chosen so that the port JAX derives from it is free."""
    port = free_port(_SLURM_FIRST_PORT, 65535)
    job_id = 200 * 2**12 + port - _SLURM_FIRST_PORT  # a plausible job id; JAX's port is job_id % 2**12 + first
    return [(args + ["--distributed"], {**env, **slurm_env(i, job_id)}) for i in range(PROCESSES)]


def start(launch: list[tuple[list[str], dict]], log_dir) -> list[subprocess.Popen]:
    """Start each (argv, env) from the repository root, its stdout+stderr appended to log_dir/log_<i>.txt, each in
    its own process group (so kill() reaches grain and orbax children too)."""
    procs = []
    for i, (argv, env) in enumerate(launch):
        with open(log_path(log_dir, i), "a") as log:  # the child keeps its own handle
            cmd = [sys.executable] + argv
            procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    return procs


def log_path(log_dir, process: int) -> str:
    return os.path.join(log_dir, f"log_{process}.txt")


def log_text(log_dir, process: int) -> str:
    with open(log_path(log_dir, process)) as f:
        return f.read()


def kill(procs) -> None:
    """kill -9 every process still running, with its process group."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def finish(procs, log_dir, timeout: float = TIMEOUT) -> None:
    """Wait for every process (none outlives this call); raise with the logs' tails unless all exited 0."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # reported below with the logs
    finally:
        kill(procs)
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        tails = [log_text(log_dir, i)[-3000:] for i in range(len(procs))]
        raise AssertionError(f"return codes {codes} (a kill after {timeout} s is -9): {tails}")


def run(launch, log_dir, timeout: float = TIMEOUT) -> list[str]:
    """Start, wait for a clean exit of every process, and return their logs."""
    finish(start(launch, log_dir), log_dir, timeout)
    return [log_text(log_dir, i) for i in range(len(launch))]


# -- what a run left ------------------------------------------------------------------------------------------


def checkpoint_steps(workdir) -> list[int]:
    """The complete checkpoints in workdir (orbax's temporary folders are not digits)."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def host_data_files(workdir, step) -> list[str]:
    """The per-process data-state files of a checkpoint (process_<i>-of-<n>.json, grain's naming)."""
    folder = os.path.join(workdir, "checkpoints", str(step), "host_data")
    return sorted(n for n in os.listdir(folder) if n.endswith(".json"))


def host_states(workdir, step) -> list:
    folder = os.path.join(workdir, "checkpoints", str(step), "host_data")
    return [json.load(open(os.path.join(folder, f"process_{i}-of-{PROCESSES}.json"))) for i in range(PROCESSES)]


def recorded_lines(record_dir, process: int = 0) -> list[dict]:
    """A process's complete records so far, in the order written."""
    path = os.path.join(record_dir, f"process_{process}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def last_step(record_dir, process: int = 0) -> int:
    """The latest step a process has started to train (0 before its first)."""
    return max((row["step"] for row in recorded_lines(record_dir, process)), default=0)


def recorded(record_dir, process: int) -> list:
    """Token rows per step, the last record of a step winning (a killed run's steps are trained again)."""
    steps = {row["step"]: row["tokens"] for row in recorded_lines(record_dir, process)}
    return [row for s in sorted(steps) for row in steps[s]]


# -- the recording driver -------------------------------------------------------------------------------------


def local_rows(array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order its host-local batch had them."""
    shards = {}
    for s in array.addressable_shards:
        shards.setdefault(s.index[0].start or 0, np.asarray(s.data))  # replicas of one block appear once
    return np.concatenate([shards[k] for k in sorted(shards)])


def install_recorder(record_dir: str) -> None:
    """Wrap train.compile_step so each step appends {'step': the step it trains, 'tokens': local rows, 'images':
    the SHA-1 of the local image rows' bytes}."""
    compile_step = train.compile_step

    def recording_compile(*args, **kwargs):
        step_fn = compile_step(*args, **kwargs)
        path = os.path.join(record_dir, f"process_{jax.process_index()}.jsonl")

        def step(state, batch):
            done = int(np.asarray(state["step"].addressable_data(0)))  # read before the state is donated
            with open(path, "a") as f:
                tokens, images = local_rows(batch["tokens"]).tolist(), local_rows(batch["image"]).tobytes()
                row = {"step": done + 1, "tokens": tokens, "images": hashlib.sha1(images).hexdigest()}
                f.write(json.dumps(row) + "\n")
            return step_fn(state, batch)

        return step

    train.compile_step = recording_compile


if __name__ == "__main__":
    from absl import app

    from clip_jax import main

    install_recorder(os.environ["RECORD_DIR"])
    app.run(main.main)
