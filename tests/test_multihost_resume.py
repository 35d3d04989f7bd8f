"""Per-process data-iterator state in checkpoints (issue 15): each process saves and restores its own position, so
hosts that skip different bad records resume exactly; another process count is refused in one line unless
data.resume_reshuffle is set; checkpoints from before per-process states still resume on one process.

The slow test runs 2 real processes x 4 CPU devices (jax.distributed over localhost, as tests/test_multiprocess.py)
on a corpus whose bad records all lie in the second host's slice, and records the examples each host trains on
(tests/multihost_driver.py). The reference for which examples each host must see is grain's own shuffle of the
corpus, taken host by host with the known bad records left out.
"""

import io
import json
import os
import re
import shutil
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import datasets, optim, sharding, train
from clip_jax.input import pipeline
from clip_jax.input import tokenizer as tokenizer_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_driver as md
from test_reliability import TINY, tiny_config

N, STEPS, EVERY, BATCH = 160, 8, 2, 16  # corpus size, steps of a run, checkpoint interval, global batch
BAD_EVERY = 5  # one record in 5 of the second host's slice (within the first epoch) is undecodable


def _config(data_dir, **overrides):
    flat = {"data.name": "image_text_folder/dirty", "total_steps": STEPS, "ckpt_every": EVERY, "keep_ckpts": 10}
    return tiny_config(data_dir, **{**flat, **overrides})


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_corpus(folder, bad: set) -> None:
    """N images named im<i>.png with captions 'a<i> b<i>' (two words: hashed ids identify a row uniquely)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "captions.jsonl"), "w") as table:
        for i in range(N):
            data = b"\x00not an image" if f"im{i}.png" in bad else _png(i)
            with open(os.path.join(folder, f"im{i}.png"), "wb") as f:
                f.write(data)
            table.write(json.dumps({"file_name": f"im{i}.png", "caption": f"a{i} b{i}"}) + "\n")


def _keys(data_dir, name) -> list[str]:
    source = datasets.local_source("image_text_folder", name, "train", data_dir)
    return [r["key"].decode() if isinstance(r["key"], bytes) else r["key"] for r in source]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(data_dir, shuffled keys, bad keys): tfds orders records by a hash of their keys, so a clean corpus is
    prepared first to learn the order; the same keys are then prepared with the bad records in place."""
    root = tmp_path_factory.mktemp("corpus")
    data_dir = str(root / "tfds")
    _write_corpus(root / "clean", set())
    datasets.prepare_local("image_text_folder", str(root / "clean"), "clean", data_dir)
    keys = _keys(data_dir, "clean")
    seed = _config(data_dir).seed
    order = list(grain.MapDataset.source(list(range(N))).seed(seed).shuffle())  # the pipeline's shuffle
    shuffled = [keys[i] for i in order]
    # Global position p goes to host p % 2; the bad ones are every BAD_EVERY-th of host 1's.
    bad = {shuffled[p] for p in range(1, N, 2) if (p // 2) % BAD_EVERY == 2}
    _write_corpus(root / "dirty", bad)
    datasets.prepare_local("image_text_folder", str(root / "dirty"), "dirty", data_dir)
    assert _keys(data_dir, "dirty") == keys  # the same record order, so the bad ones sit where intended
    return data_dir, shuffled, bad


def _rows(cfg, keys) -> list[list[int]]:
    tok = tokenizer_lib.make(cfg)
    return [tok.encode(f"a{k[2:-4]} b{k[2:-4]}").tolist() for k in keys]


def _expected(cfg, shuffled, bad, hosts: int, start: int = 0, steps: int = STEPS) -> dict:
    """{host: [tokens of each example it trains on, in order]} for `steps` steps from batch `start` of its slice,
    counted as positions in the slice (bad records skipped, the batch filled from the records after them)."""
    local = BATCH // hosts
    out = {}
    for h in range(hosts):
        mine = shuffled[h::hosts][start * local :]
        out[h] = _rows(cfg, [k for k in mine if k not in bad][: steps * local])
    return out


# -- fast: one process, checkpoints written in-process ------------------------------------------------------


def _tiny_state():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"params": {"w": jax.device_put(jnp.arange(4.0), rep)}, "step": jax.device_put(jnp.int32(3), rep)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    return state, abstract, jax.tree.map(lambda _: rep, state)


def test_each_process_writes_its_own_state_file_and_restores_it(tmp_path):
    cfg = tiny_config(str(tmp_path))
    state, abstract, shardings = _tiny_state()
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), cfg)
    ckpt.save(3, state, {"chunk": {"next_index": 7}, "offset": 2}, cfg)
    ckpt.wait()
    folder = tmp_path / "checkpoints" / "3" / "host_data"
    assert [n for n in os.listdir(folder) if n.endswith(".json")] == ["process_0-of-1.json"]  # grain's name
    assert json.loads((folder / "process_0-of-1.json").read_text()) == {"chunk": {"next_index": 7}, "offset": 2}
    step, restored, data_state = ckpt.restore(abstract, shardings, cfg)
    ckpt.close()
    assert step == 3 and data_state == {"chunk": {"next_index": 7}, "offset": 2}
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0))


def test_a_checkpoint_with_the_old_single_data_item_resumes_on_one_process(tmp_path):
    cfg = tiny_config(str(tmp_path))
    state, abstract, shardings = _tiny_state()
    directory = tmp_path / "checkpoints"
    with ocp.CheckpointManager(directory, item_names=("state", "data", "config")) as manager:  # the old layout
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"next_index": 5}),
            config=ocp.args.JsonSave(cfg.to_dict()),
        )
        manager.save(3, args=args)
        manager.wait_until_finished()
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), cfg)
    step, _, data_state = ckpt.restore(abstract, shardings, cfg)
    ckpt.close()
    assert step == 3 and data_state == {"next_index": 5} and ckpt.saved_process_count == 1


def test_another_process_count_is_refused_in_one_line_unless_reshuffled(corpus, tmp_path, caplog):
    data_dir, shuffled, bad = corpus
    cfg = _config(data_dir, total_steps=EVERY)
    train.run(cfg, str(tmp_path))
    # Make it a checkpoint written by 2 processes: this process's file renamed, a second process's beside it.
    folder = tmp_path / "checkpoints" / str(EVERY) / "host_data"
    text = (folder / "process_0-of-1.json").read_text()
    (folder / "process_0-of-1.json").unlink()
    for i in range(2):
        (folder / f"process_{i}-of-2.json").write_text(text)
    longer = _config(data_dir, total_steps=2 * EVERY)
    with pytest.raises(checkpoint_lib.CheckpointMismatch) as e:
        train.run(longer, str(tmp_path))
    message = str(e.value)
    assert "\n" not in message
    assert re.search(r"written by 2 process\(es\) and this run has 1: .*data.resume_reshuffle=True", message)

    longer.data.resume_reshuffle = True
    record = tmp_path / "record"
    record.mkdir()
    original = train.compile_step
    try:
        md.install_recorder(str(record))
        result = train.run(longer, str(tmp_path))
    finally:
        train.compile_step = original
    assert result["step"] == 2 * EVERY
    assert any("resume_reshuffle" in r.getMessage() and "batch 2" in r.getMessage() for r in caplog.records)
    # One process now: its slice is the whole shuffled order, started at batch EVERY (bad records skipped).
    assert md.recorded(record, 0) == _expected(longer, shuffled, bad, hosts=1, start=EVERY, steps=EVERY)[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_start_at_places_the_slice_at_a_batch(corpus, workers):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags; main.py parses them
    data_dir, shuffled, bad = corpus
    cfg = _config(data_dir, **{"data.num_workers": workers})
    it = pipeline.train_iterator(cfg)
    next(it)  # somewhere else first: start_at must drop what was read or prefetched
    pipeline.start_at(it, 3)
    got = next(it)["tokens"].tolist() + next(it)["tokens"].tolist()
    assert got == _expected(cfg, shuffled, bad, hosts=1, start=3, steps=2)[0]


def test_start_at_with_several_workers_is_one_line(corpus):
    data_dir, _, _ = corpus
    it = pipeline.train_iterator(_config(data_dir, **{"data.num_workers": 2}))
    with pytest.raises(
        pipeline.DataError, match=r"needs data.num_workers 0 or 1; set --config.data.num_workers=1"
    ):
        pipeline.start_at(it, 3)


# -- slow: 2 real processes x 4 CPU devices -----------------------------------------------------------------


def _start(cfg_flags, workdir, record_dir, log_dir) -> list:
    """Both processes of a 2-process run of the recording driver (localhost flags)."""
    args = [md.DRIVER, "train", f"--workdir={workdir}", "--config=configs/tiny_cpu.py"] + cfg_flags
    return md.start(md.flag_launch(args, md.base_env(RECORD_DIR=str(record_dir))), log_dir)


def _flags(data_dir) -> list[str]:
    flat = {**TINY, "data.data_dir": data_dir, "data.name": "image_text_folder/dirty", "total_steps": STEPS}
    return [f"--config.{k}={v}" for k, v in {**flat, "ckpt_every": EVERY, "keep_ckpts": 10}.items()]


@pytest.mark.slow
def test_two_processes_killed_and_resumed_train_exactly_the_uninterrupted_examples(corpus, tmp_path):
    data_dir, shuffled, bad = corpus
    cfg = _config(data_dir)
    expected = _expected(cfg, shuffled, bad, hosts=2)
    assert len({tuple(r) for r in _rows(cfg, shuffled)}) == N  # each example's tokens identify it
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        (runs[name] / "record").mkdir(parents=True)
    md.finish(
        _start(_flags(data_dir), runs["straight"], runs["straight"] / "record", runs["straight"]), runs["straight"]
    )

    killed = runs["killed"]
    procs = _start(_flags(data_dir), killed, killed / "record", killed)
    try:
        deadline = time.monotonic() + md.TIMEOUT
        while not (md.checkpoint_steps(killed) and md.last_step(killed / "record") > EVERY + 1):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "run B never got going"
            time.sleep(0.05)
    finally:
        md.kill(procs)  # kill -9 of both processes (and their children), mid-run
    saved = md.checkpoint_steps(killed)
    assert saved and saved[-1] < STEPS, saved
    before = len(md.recorded_lines(killed / "record"))
    md.finish(_start(_flags(data_dir), killed, killed / "record", killed), killed)
    assert md.recorded_lines(killed / "record")[before]["step"] == saved[-1] + 1  # a resume, not a fresh start

    for h in range(2):  # every host trained on exactly the examples of the reference, in order, both times
        assert md.recorded(runs["straight"] / "record", h) == expected[h], f"host {h}, uninterrupted run"
        assert md.recorded(killed / "record", h) == expected[h], f"host {h}, killed and resumed run"
    straight_states = md.host_states(runs["straight"], STEPS)
    assert md.host_states(killed, STEPS) == straight_states
    assert straight_states[0] != straight_states[1]  # host 1 skipped records: the positions differ
    a, b = _final_params(cfg, runs["straight"]), _final_params(cfg, killed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-identical

    # The 2-process checkpoint on this 1 process: refused in one line, resumed with data.resume_reshuffle.
    one = tmp_path / "one"
    shutil.copytree(runs["straight"], one)
    longer = _config(data_dir, total_steps=STEPS + 2)
    with pytest.raises(checkpoint_lib.CheckpointMismatch, match=r"written by 2 process\(es\) and this run has 1"):
        train.run(longer, str(one))
    longer.data.resume_reshuffle = True
    assert train.run(longer, str(one))["step"] == STEPS + 2


def _final_params(cfg, workdir):
    mesh = sharding.make_mesh(cfg)
    _, abstract, shardings = train.state_shardings(cfg, mesh, optim.make(cfg))
    ckpt = checkpoint_lib.Checkpointer(str(workdir), cfg)
    try:
        return jax.device_get(ckpt.restore(abstract, shardings, cfg)[1])
    finally:
        ckpt.close()
