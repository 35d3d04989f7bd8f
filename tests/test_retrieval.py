"""Blockwise retrieval ranks and recall@k against a dense numpy reference, on several meshes; compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.evaluate import blockwise

AXES = ("data", "fsdp")


def dense_ranks(img, img_idx, txt, txt_idx, owner):
    """Reference: sort every row of the full score matrix by (score desc, id asc); rank of the first positive
    (blockwise.NO_RANK, a miss at every k, for an image without captions)."""
    s = img.astype(np.float64) @ txt.astype(np.float64).T
    rank_i = np.full(len(img), blockwise.NO_RANK)
    for i in range(len(img)):
        order = np.lexsort((txt_idx, -s[i]))
        position = np.empty(len(order), int)
        position[order] = np.arange(len(order))
        positives = np.flatnonzero(owner == img_idx[i])
        if len(positives):
            rank_i[i] = position[positives].min()
    rank_t = np.empty(len(txt), int)
    for j in range(len(txt)):
        order = np.lexsort((img_idx, -s[:, j]))
        position = np.empty(len(order), int)
        position[order] = np.arange(len(order))
        rank_t[j] = position[np.flatnonzero(img_idx == owner[j])[0]]
    return rank_i, rank_t


def dense_recall(rank, k):
    valid = rank >= 0
    return float(np.mean(rank[valid] < k))


def problem(rng, n_img, max_caps, d, integer):
    """Images with 0..max_caps captions each (so some have none); ids shuffled so ties do not follow positions."""
    caps = rng.integers(0, max_caps + 1, size=n_img)
    img_idx = rng.permutation(n_img * 3)[:n_img].astype(np.int32)
    owner = np.repeat(img_idx, caps).astype(np.int32)
    n_txt = len(owner)
    txt_idx = rng.permutation(n_txt * 2)[:n_txt].astype(np.int32)
    if integer:  # small integers: every score is exact in fp32, and ties are everywhere
        img = rng.integers(-1, 2, size=(n_img, d)).astype(np.float32)
        txt = rng.integers(-1, 2, size=(n_txt, d)).astype(np.float32)
    else:
        img = rng.normal(size=(n_img, d)).astype(np.float32)
        txt = rng.normal(size=(n_txt, d)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, img_idx, txt, txt_idx, owner


def pad_to(multiple, *arrays_and_fill):
    out = []
    for a, fill in arrays_and_fill:
        pad = (-len(a)) % multiple
        out.append(np.concatenate([a, np.full((pad,) + a.shape[1:], fill, a.dtype)]))
    return out


def blockwise_ranks(mesh, img, img_idx, txt, txt_idx, owner, tile):
    d = mesh.devices.size
    n_img, n_txt = len(img), len(txt)
    img_p, idx_p, ok_i = pad_to(d, (img, 0), (img_idx, -1), (np.ones(n_img, bool), False))
    txt_p, tidx_p, own_p, ok_t = pad_to(d, (txt, 0), (txt_idx, -2), (owner, -1), (np.ones(n_txt, bool), False))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXES, *([None] * (a.ndim - 1)))))
    args = [put(a) for a in (img_p, idx_p, ok_i, txt_p, tidx_p, own_p, ok_t)]
    fn = jax.jit(lambda *a: blockwise.ranks(*a, mesh=mesh, axes=AXES, tile=tile))
    rank_i, rank_t = fn(*args)
    return np.asarray(rank_i)[:n_img], np.asarray(rank_t)[:n_txt]


def mesh_of(shape):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:n])


@pytest.mark.parametrize(
    "shape,tile,integer",
    [((8, 1), 3, True), ((2, 4), 16, True), ((1, 1), 5, True), ((1, 2), 64, False), ((4, 2), 7, False)],
)
def test_blockwise_ranks_equal_dense(shape, tile, integer):
    rng = np.random.default_rng(hash((shape, tile)) % 2**32)
    img, img_idx, txt, txt_idx, owner = problem(rng, n_img=37, max_caps=4, d=6 if integer else 16, integer=integer)
    want_i, want_t = dense_ranks(img, img_idx, txt, txt_idx, owner)
    got_i, got_t = blockwise_ranks(mesh_of(shape), img, img_idx, txt, txt_idx, owner, tile)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_t, want_t)
    # The case mix exercised: captionless images, misses.
    assert (want_i == blockwise.NO_RANK).any() and ((want_i > 0) & (want_i < blockwise.NO_RANK)).any()


def test_recall_counts_match_numpy():
    rank = np.array([0, 3, -1, 9, 10, 4, 0, -1, 1, blockwise.NO_RANK], np.int32)
    hits, counts = jax.jit(lambda r: blockwise.recall(r, (1, 5, 10)))(rank)
    np.testing.assert_array_equal(counts, [8, 1])  # padding (-1) left out; the positive-less query counted
    for k, h in zip((1, 5, 10), np.asarray(hits)):
        assert h / 8 == pytest.approx(dense_recall(rank, k))


def test_queries_without_positives_are_misses_and_padding_is_not_counted():
    """An image with no caption and a text whose image is padding both rank NO_RANK; padding ranks -1."""
    mesh = mesh_of((2, 4))
    rng = np.random.default_rng(3)
    img, txt = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)
    img_idx = np.arange(16, dtype=np.int32)
    img_ok = np.arange(16) < 14  # images 14, 15 are padding
    owner = np.array([0, 0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 1], np.int32)  # 4, 13 have no caption
    txt_ok = np.arange(16) < 15  # text 15 is padding
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXES, *([None] * (a.ndim - 1)))))
    args = [put(a) for a in (img, img_idx, img_ok, txt, np.arange(16, dtype=np.int32), owner, txt_ok)]
    fn = jax.jit(lambda *a: blockwise.ranks(*a, mesh=mesh, axes=AXES, tile=2))
    rank_i, rank_t = (np.asarray(r) for r in fn(*args))
    np.testing.assert_array_equal(np.flatnonzero(rank_i == blockwise.NO_RANK), [4, 13])
    np.testing.assert_array_equal(np.flatnonzero(rank_i == -1), [14, 15])
    np.testing.assert_array_equal(np.flatnonzero(rank_t == blockwise.NO_RANK), [13, 14])  # their image: padding
    np.testing.assert_array_equal(np.flatnonzero(rank_t == -1), [15])
    hits, counts = (np.asarray(a) for a in blockwise.recall(jnp.asarray(rank_i), (16,)))
    np.testing.assert_array_equal(counts, [14, 2])
    assert hits[0] == 12  # k = every text: each image with a caption is a hit, the two without are not


def test_all_ties_rank_by_id():
    """Identical embeddings everywhere: every score ties, so ranks are the id order among valid candidates."""
    mesh = mesh_of((2, 4))
    img = np.ones((8, 4), np.float32)
    txt = np.ones((16, 4), np.float32)
    img_idx = np.arange(8, dtype=np.int32)[::-1].copy()
    owner = np.repeat(img_idx, 2).astype(np.int32)
    txt_idx = np.arange(16, dtype=np.int32)
    got_i, got_t = blockwise_ranks(mesh, img, img_idx, txt, txt_idx, owner, tile=4)
    # Image with id m owns texts ids 2*(7-m) and 2*(7-m)+1: its best caption is the lower, at rank 2*(7-m).
    np.testing.assert_array_equal(got_i, 2 * (7 - img_idx))
    np.testing.assert_array_equal(got_t, owner)  # a text's image has id `owner`: that many ids come first


def test_compiled_block_never_holds_the_score_matrix():
    """Per-device temporaries stay far below one device's [n_img_local, n_txt] share of the scores, let alone
    the global [n_img, n_txt] matrix."""
    mesh = mesh_of((2, 4))
    n_img, n_txt, d, tile = 2048, 16384, 32, 128
    sh = lambda *s: NamedSharding(mesh, P(AXES, *([None] * (len(s) - 1))))
    abstract = [
        jax.ShapeDtypeStruct((n_img, d), jnp.float32, sharding=sh(n_img, d)),
        jax.ShapeDtypeStruct((n_img,), jnp.int32, sharding=sh(n_img)),
        jax.ShapeDtypeStruct((n_img,), jnp.bool_, sharding=sh(n_img)),
        jax.ShapeDtypeStruct((n_txt, d), jnp.float32, sharding=sh(n_txt, d)),
        jax.ShapeDtypeStruct((n_txt,), jnp.int32, sharding=sh(n_txt)),
        jax.ShapeDtypeStruct((n_txt,), jnp.int32, sharding=sh(n_txt)),
        jax.ShapeDtypeStruct((n_txt,), jnp.bool_, sharding=sh(n_txt)),
    ]
    fn = jax.jit(lambda *a: blockwise.ranks(*a, mesh=mesh, axes=AXES, tile=tile))
    lowered = fn.lower(*abstract)
    mem = lowered.compile().memory_analysis()
    local_block = (n_img // 8) * n_txt * 4  # one device's rows of the full matrix, fp32
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert mem.temp_size_in_bytes < local_block / 8, mem
    assert total < local_block, mem
    hlo = lowered.compile().as_text()
    for dims in (f"{n_img},{n_txt}", f"{n_img // 8},{n_txt}", f"{n_img // 8},{n_txt // 8}"):
        assert f"[{dims}]" not in hlo, dims


def test_bad_sizes_are_one_line_errors():
    mesh = mesh_of((2, 4))
    x = jnp.zeros((12, 4))
    i = jnp.zeros((12,), jnp.int32)
    ok = jnp.ones((12,), bool)
    with pytest.raises(ValueError, match="do not split over the 8 devices"):
        blockwise.ranks(x, i, ok, x, i, i, ok, mesh=mesh, axes=AXES, tile=4)


def test_concat_sharded_keeps_rows_with_their_ids():
    mesh = mesh_of((2, 4))
    sh = NamedSharding(mesh, P(AXES))
    parts = [jax.device_put(np.arange(16, dtype=np.int32) + 100 * k, sh) for k in range(3)]
    values = [jax.device_put((np.arange(16) + 100 * k).astype(np.float32) * 2, sh) for k in range(3)]
    ids = np.asarray(blockwise.concat_sharded(parts, mesh, AXES))
    vals = np.asarray(blockwise.concat_sharded(values, mesh, AXES))
    assert sorted(ids.tolist()) == sorted(np.concatenate([np.arange(16) + 100 * k for k in range(3)]).tolist())
    np.testing.assert_array_equal(vals, ids * 2.0)  # the same permutation for every array
    # No row left its device: device p's piece is the parts' p-th pieces in order.
    np.testing.assert_array_equal(ids[:6], [0, 1, 100, 101, 200, 201])
