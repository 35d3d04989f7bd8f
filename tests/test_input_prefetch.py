"""prefetch_to_device: the same batches in the same order, already sharded over the batch axes, with `size`
more transferred ahead, and a resumable position that is the consumer's, not the prefetcher's."""

import os
import sys

import jax
import numpy as np
import pytest

from clip_jax import sharding
from clip_jax.input import pipeline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny_cpu  # after the sys.path line


class Counting:
    """Batch i: image rows filled with i*100 + row, tokens likewise; counts how many batches were pulled.
    get_state/set_state like the pipeline's iterators (the state is a dict, mutated in place as it advances,
    which is the case a careless prefetcher gets wrong)."""

    def __init__(self, n, rows=16):
        self.n, self.rows, self.pulled, self.state = n, rows, 0, {"next": 0}

    def __iter__(self):
        return self

    def __next__(self):
        i = self.state["next"]
        if i >= self.n:
            raise StopIteration
        self.state["next"] += 1
        self.pulled += 1
        values = i * 100 + np.arange(self.rows)
        return {
            "image": np.broadcast_to(values[:, None, None, None], (self.rows, 4, 4, 3)).astype(np.float32),
            "tokens": np.broadcast_to(values[:, None], (self.rows, 5)).astype(np.int32),
        }

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = dict(state)


@pytest.fixture(scope="module")
def mesh():
    cfg = tiny_cpu.get_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    return sharding.make_mesh(cfg)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_same_batches_in_order_sharded_over_the_batch_axes(mesh, size):
    source = Counting(6)
    out = list(pipeline.prefetch_to_device(source, size, mesh))
    assert len(out) == 6
    want = sharding.batch_sharding(mesh)
    for i, batch in enumerate(out):
        assert isinstance(batch["image"], jax.Array)
        assert batch["image"].sharding == want and batch["tokens"].sharding == want
        np.testing.assert_array_equal(np.asarray(batch["tokens"])[:, 0], i * 100 + np.arange(16))
        # Device k of the mesh (row-major over ('data', 'fsdp')) holds rows 2k and 2k+1, and only those.
        shards = sorted(batch["tokens"].addressable_shards, key=lambda s: s.index[0].start)
        assert [s.device for s in shards] == list(mesh.devices.flat)
        for k, shard in enumerate(shards):
            np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], i * 100 + np.array([2 * k, 2 * k + 1]))


def test_keeps_exactly_size_batches_ahead(mesh):
    source = Counting(10)
    it = pipeline.prefetch_to_device(source, 3, mesh)
    next(it)
    assert source.pulled == 4  # the one returned plus three on the devices
    next(it)
    assert source.pulled == 5


def test_state_is_the_consumers_position_and_resume_is_exact(mesh):
    it = pipeline.prefetch_to_device(Counting(10), 2, mesh)
    assert it.get_state() == {"next": 0}
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state == {"next": 3}  # not 5: two prefetched batches were not consumed
    rest = [int(np.asarray(b["tokens"])[0, 0]) for b in it]
    resumed = pipeline.prefetch_to_device(Counting(10), 2, mesh)
    resumed.set_state(state)
    assert [int(np.asarray(b["tokens"])[0, 0]) for b in resumed] == rest == [300, 400, 500, 600, 700, 800, 900]


def test_wraps_the_real_train_iterator(tmp_path, mesh):
    cfg = tiny_cpu.get_config()
    cfg.data.data_dir, cfg.data.name, cfg.batch_size = str(tmp_path), "clip_shapes/small", 16
    plain = pipeline.train_iterator(cfg)
    want = [next(plain) for _ in range(3)]
    it = pipeline.prefetch_to_device(pipeline.train_iterator(cfg), 2, mesh)
    for w in want:
        got = next(it)
        np.testing.assert_array_equal(np.asarray(got["image"]), w["image"])
        np.testing.assert_array_equal(np.asarray(got["tokens"]), w["tokens"])
    resumed = pipeline.prefetch_to_device(pipeline.train_iterator(cfg), 2, mesh)
    resumed.set_state(it.get_state())
    np.testing.assert_array_equal(np.asarray(next(resumed)["tokens"]), next(plain)["tokens"])


def test_negative_size_is_refused(mesh):
    with pytest.raises(ValueError, match="prefetch size must be >= 0"):
        pipeline.prefetch_to_device(Counting(1), -1, mesh)
