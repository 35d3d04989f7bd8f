"""Checkpoints with orbax: async, atomic, keep the last K; each holds the train state, every process's data
iterator state and the config, so re-running the same command in the same workdir resumes exactly where it stopped.
"""

import contextlib
import dataclasses
import json
import os
import re

import jax
import orbax.checkpoint as ocp
from etils import epath

from clip_jax import config as config_lib
from clip_jax import optim


class CheckpointMismatch(RuntimeError):
    """The workdir holds a checkpoint this run cannot resume: another model (the message names the differing keys)
    or, in training, data positions saved by another number of processes (train._restart_data)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable workdir); the previous one is still valid."""


# One file per process inside the step's 'host_data' item, named as grain's own orbax handler names them
# (grain/_src/python/checkpoint/handler.py), each holding that process's iterator state as JSON.
_HOST_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _host_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


class HostDataHandler(ocp.handlers.AsyncCheckpointHandler):
    """Orbax handler: every process writes its own data-iterator state (process_<i>-of-<n>.json) into the step's
    item directory. The write is a commit future, so orbax waits for it on every process before the step's
    temporary folder is renamed: a half-written step is never picked up. restore() returns
    {'process_count': n of the files found, 'state': this process's state, or None when n differs}."""

    async def async_save(self, directory: epath.Path, args: "HostDataSave"):
        text = json.dumps(_jsonable(args.state))  # captured now: the iterator moves on while the write runs
        path = directory / _host_file(jax.process_index(), jax.process_count())

        async def write():
            path.write_text(text)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="host_data_save")]

    def save(self, directory: epath.Path, args: "HostDataSave"):
        (directory / _host_file(jax.process_index(), jax.process_count())).write_text(
            json.dumps(_jsonable(args.state))
        )

    def restore(self, directory: epath.Path, args: "HostDataRestore" = None) -> dict:
        counts = {int(m.group(2)) for p in directory.iterdir() if (m := _HOST_FILE.fullmatch(p.name))}
        if len(counts) != 1:
            raise CheckpointMismatch(f"{directory} holds data states of {sorted(counts) or 'no'} process counts")
        (count,) = counts
        if count != jax.process_count():
            return {"process_count": count, "state": None}
        path = directory / _host_file(jax.process_index(), count)
        if not path.exists():
            raise CheckpointMismatch(f"{path} is missing: the checkpoint lacks this process's data state")
        return {"process_count": count, "state": from_jsonable(json.loads(path.read_text()))}


@ocp.args.register_with_handler(HostDataHandler, for_save=True)
@dataclasses.dataclass
class HostDataSave(ocp.args.CheckpointArgs):
    state: object  # this process's iterator state: a JSON-able dict (or JSON bytes)


@ocp.args.register_with_handler(HostDataHandler, for_restore=True)
@dataclasses.dataclass
class HostDataRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    def __init__(self, workdir: str, cfg):
        # A URL (gs://bucket/run: a pod's hosts must all see the workdir) is used as given; a local path absolute.
        root = workdir if "://" in workdir else os.path.abspath(workdir)
        self.directory = os.path.join(root, "checkpoints")
        # Frozen parameters (optim.freeze) never change: written once here, not into every step's checkpoint.
        self.frozen_directory = os.path.join(root, "frozen_params")
        self.saved_process_count = None  # processes that wrote the data states of the step last restored
        self._attempted = []  # steps whose save was started: a failure is named by the first one not on disk
        # Orbax writes into a temporary folder and renames it when complete, so a crash mid-save (even kill -9)
        # leaves the previous checkpoint as the latest valid one; leftover temporary folders are removed here.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_ckpts, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "host_data", "data", "config")
            )
        except OSError as e:
            raise CheckpointWriteError(f"cannot use {self.directory} for checkpoints: {_one_line(e)}") from None

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_state, cfg, *, force: bool = False) -> bool:
        trainable, frozen = optim.split(state["params"], optim.frozen_paths(cfg, state["params"]))
        if frozen and not epath.Path(self.frozen_directory).exists():
            with self._write_errors():
                writer = ocp.StandardCheckpointer()
                writer.save(self.frozen_directory, frozen)
                writer.wait_until_finished()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave({**state, "params": trainable}),
            host_data=HostDataSave(data_state),  # every process its own (the 'data' item of old checkpoints)
            config=ocp.args.JsonSave(cfg.to_dict()),
        )
        self._attempted.append(step)
        with self._write_errors():  # an earlier async save's failure surfaces here too
            return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, shardings, cfg, step=None):
        """(step, state, data_state) from the latest (or given) step, placed with `shardings`; None if none exists.

        data_state is this process's own data-iterator state (a JSON-able dict), or None when the checkpoint's
        states were written by another number of processes (`saved_process_count` then says how many). A
        checkpoint from before per-process states holds one state and counts as written by 1 process. Raises
        CheckpointMismatch when the saved model config differs from cfg's."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        saved_cfg = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        check_compatible(saved_cfg, cfg, self.directory)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        target_trainable, target_frozen = optim.split(target["params"], optim.frozen_paths(cfg, target["params"]))
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore({**target, "params": target_trainable}))
        )
        state = out["state"]
        if target_frozen:
            frozen = ocp.StandardCheckpointer().restore(self.frozen_directory, target_frozen)
            state = {**state, "params": optim.merge(state["params"], frozen)}
        return step, state, self._restore_data(step)

    def _restore_data(self, step: int):
        """This process's data-iterator state at `step`, or None when the checkpoint's states were written by
        another number of processes (then `self.saved_process_count` says how many)."""
        if (epath.Path(self.directory) / str(step) / "host_data").exists():
            out = self.manager.restore(step, args=ocp.args.Composite(host_data=HostDataRestore()))["host_data"]
            self.saved_process_count = out["process_count"]
            return out["state"]
        # Written before per-process states: one state, the first process's, valid for a 1-process run only.
        self.saved_process_count = 1
        if jax.process_count() != 1:
            return None
        return from_jsonable(
            self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        )

    def wait(self):
        with self._write_errors():
            self.manager.wait_until_finished()

    def close(self):
        with self._write_errors():
            self.manager.close()

    @contextlib.contextmanager
    def _write_errors(self):
        """Turn a failed write (raised now, or by the background thread of an async save) into one line that
        says which checkpoint is still good. Orbax never renamed the failed save's temporary folder, so the
        previous checkpoint is the latest one a restart sees."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  (OSError, or orbax/tensorstore wrapping one)
            with contextlib.suppress(Exception):
                self.manager.reload()  # forget the failed step: the latest complete checkpoint is on disk
            good = self.manager.latest_step()
            step = min((s for s in self._attempted if good is None or s > good), default=None)
            kept = "no checkpoint exists" if good is None else f"the previous checkpoint (step {good}) is intact"
            raise CheckpointWriteError(
                f"cannot write the checkpoint at step {step} to {self.directory}: {_one_line(e)}; {kept}. Free "
                "disk space or fix the permissions, then re-run the same command to resume"
            ) from None


def check_compatible(saved: dict, cfg, where: str) -> None:
    """A checkpoint can be resumed only by a config whose model (shapes) matches; say which keys differ. A key the
    saved config lacks (written before the key existed) counts as base()'s default."""
    ours = config_lib.model_fingerprint(cfg)
    theirs = config_lib.model_fingerprint(config_lib.from_dict(saved, strict=False))
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs config {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise CheckpointMismatch(
            f"the checkpoint in {where} was written by a different model config ({'; '.join(diff[:4])}); "
            "use a new --workdir, or restore the original config values"
        )


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _jsonable(data_state):
    """Grain iterator states are dicts of ints/strings, or JSON bytes; store them as JSON objects either way."""
    if isinstance(data_state, (bytes, bytearray)):
        return {"__json_bytes__": json.loads(data_state.decode())}
    return data_state


def from_jsonable(data_state):
    if isinstance(data_state, dict) and "__json_bytes__" in data_state:
        return json.dumps(data_state["__json_bytes__"]).encode()
    return data_state
