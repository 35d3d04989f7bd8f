"""Test driver for tests/test_multihost_resume.py: the `clip_jax.main` CLI, with every process appending, for each
train step, the token rows of the host-local batch it fed to `$RECORD_DIR/process_<i>.jsonl`. Only the test
installs the recorder (by wrapping train.compile_step); clip_jax itself is unchanged."""

import json
import os

import jax
import numpy as np

from clip_jax import train


def local_rows(array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order its host-local batch had them."""
    shards = {}
    for s in array.addressable_shards:
        shards.setdefault(s.index[0].start or 0, np.asarray(s.data))  # replicas of one block appear once
    return np.concatenate([shards[k] for k in sorted(shards)])


def install_recorder(record_dir: str) -> None:
    """Wrap train.compile_step so each step appends {'step': the step it trains, 'tokens': local rows}."""
    compile_step = train.compile_step

    def recording_compile(*args, **kwargs):
        step_fn = compile_step(*args, **kwargs)
        path = os.path.join(record_dir, f"process_{jax.process_index()}.jsonl")

        def step(state, batch):
            done = int(np.asarray(state["step"].addressable_data(0)))  # read before the state is donated
            with open(path, "a") as f:
                f.write(json.dumps({"step": done + 1, "tokens": local_rows(batch["tokens"]).tolist()}) + "\n")
            return step_fn(state, batch)

        return step

    train.compile_step = recording_compile


if __name__ == "__main__":
    from absl import app

    from clip_jax import main

    install_recorder(os.environ["RECORD_DIR"])
    app.run(main.main)
