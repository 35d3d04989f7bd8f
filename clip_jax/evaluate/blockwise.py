"""Ranks of the positives in image<->text retrieval, computed blockwise over a device ring.

Order: for a query, candidates are sorted by score (descending), ties broken by the candidate's global index
(ascending), which is what a stable sort or `lax.top_k` would do. For image->text, the rank of an image is the
rank of its best caption (highest score, then lowest index); recall@k is the fraction with rank < k. So

    rank(image i) = #{valid texts j != j*: s_ij > s*  or  (s_ij == s* and j < j*)}    (j*, s*: its best caption)
    rank(text j)  = #{valid images i != o: s_ij > s_oj or (s_ij == s_oj and i < o)}   (o: the image it describes)

Under that one total order, "the best caption ranks < k" is the same event as "some caption of the image is
among the k first texts", which is how CLIP_benchmark scores a multi-caption image (see CONVENTIONS).
A valid query without any positive (an image without captions; a text whose image is not among the valid
images) gets rank NO_RANK: never a hit, but counted by `recall`, as CLIP_benchmark counts it. Padding gets -1.

Image rows stay on their device; text blocks travel around the batch-axes ring and are scored in tiles, so a
device never holds more than [n_images_local, tile] scores. Two passes: the first finds every positive score,
the second counts what ranks above it. Both compute each tile's scores with the same matmul, so a positive's
score is bit-for-bit the value it is compared with (no recomputation in another order can move it by an ulp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.losses import _ring

NO_INDEX = np.iinfo(np.int32).max  # "no caption" for an image; also the index of a padding text
NO_RANK = np.iinfo(np.int32).max  # the rank of a valid query without any positive: a miss at every k
# One line a report can print beside the numbers (tests/test_clip_benchmark_metrics.py checks each claim).
CONVENTIONS = (
    "recall@k as CLIP_benchmark (zeroshot_retrieval.py): i2t = per image, hit if any of its captions is in the "
    "top k texts; t2i = per caption, hit if its image is in the top k images; an image without captions is an i2t "
    "miss, counted in the denominator; exact score ties go to the earlier item in dataset order (CLIP_benchmark's "
    "torch.topk leaves their order unspecified, so the two can differ on exact ties only)"
)


def _scores(x, y_tile):
    return lax.dot_general(x, y_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tiles(tree, tile):
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // tile, tile) + a.shape[1:]), tree)


def _pad_texts(y, idx, owner, ok, tile):
    """Pad the local text block to a multiple of `tile` with rows that match nothing and count nowhere."""
    pad = (-y.shape[0]) % tile
    if not pad:
        return y, idx, owner, ok
    return (
        jnp.pad(y, ((0, pad), (0, 0))),
        jnp.pad(idx, (0, pad), constant_values=NO_INDEX),
        jnp.pad(owner, (0, pad), constant_values=-1),
        jnp.pad(ok, (0, pad)),
    )


def _ranks_local(x, img_idx, img_ok, y, txt_idx, owner, txt_ok, *, spec, tile):
    """Per device: (rank of each local image's best caption, rank of each local text's image)."""
    n_txt = y.shape[0]
    y, txt_idx, owner, txt_ok = _pad_texts(y, txt_idx, owner, txt_ok, tile)
    img_ok = img_ok & (img_idx >= 0)
    vary = functools.partial(_ring.varying, axes=spec.axes)

    def first_step(local, block, diagonal):
        """Pass 1 on one visiting block: best caption of each local image; positive score of each text and
        whether it has one (its image is a valid local image)."""
        y_b, j_b, o_b, ok_b, pos_b, has_b = block

        def tile_fn(carry, inputs):
            best_s, best_j = carry
            y_t, j_t, o_t, ok_t = inputs
            s = _scores(x, y_t)
            mine = (img_idx[:, None] == o_t[None, :]) & ok_t[None, :] & img_ok[:, None]
            pos_t = jnp.sum(jnp.where(mine, s, 0.0), axis=0)  # one True per column at most: exact
            tile_s = jnp.max(jnp.where(mine, s, -jnp.inf), axis=1)
            tile_j = jnp.min(jnp.where(mine & (s == tile_s[:, None]), j_t[None, :], NO_INDEX), axis=1)
            take = (tile_s > best_s) | ((tile_s == best_s) & (tile_j < best_j))
            has_t = jnp.any(mine, axis=0)
            return (jnp.where(take, tile_s, best_s), jnp.where(take, tile_j, best_j)), (pos_t, has_t)

        local, (pos, has) = lax.scan(tile_fn, local, _tiles((y_b, j_b, o_b, ok_b), tile))
        return local, (y_b, j_b, o_b, ok_b, pos_b + pos.reshape(-1), has_b | has.reshape(-1))

    def second_step(local, block, diagonal):
        """Pass 2: count, for each local image and each visiting text, the candidates ranked above its positive."""
        best_s, best_j, count_i = local
        y_b, j_b, o_b, ok_b, pos_b, count_b = block

        def tile_fn(count_i, inputs):
            y_t, j_t, o_t, ok_t, pos_t = inputs
            s = _scores(x, y_t)
            above_i = (s > best_s[:, None]) | ((s == best_s[:, None]) & (j_t[None, :] < best_j[:, None]))
            above_i &= ok_t[None, :] & (j_t[None, :] != best_j[:, None])
            above_t = (s > pos_t[None, :]) | ((s == pos_t[None, :]) & (img_idx[:, None] < o_t[None, :]))
            above_t &= img_ok[:, None] & (img_idx[:, None] != o_t[None, :])
            count_i = count_i + jnp.sum(above_i, axis=1, dtype=jnp.int32)
            return count_i, jnp.sum(above_t, axis=0, dtype=jnp.int32)

        count_i, count_t = lax.scan(tile_fn, count_i, _tiles((y_b, j_b, o_b, ok_b, pos_b), tile))
        return (best_s, best_j, count_i), (y_b, j_b, o_b, ok_b, pos_b, count_b + count_t.reshape(-1))

    n_img, n_pad = x.shape[0], y.shape[0]
    best = (vary(jnp.full((n_img,), -jnp.inf, jnp.float32)), vary(jnp.full((n_img,), NO_INDEX, jnp.int32)))
    zeros_t, none_t = vary(jnp.zeros((n_pad,), jnp.float32)), vary(jnp.zeros((n_pad,), bool))
    best, (*_, pos, has) = _ring.run_ring(first_step, best, (y, txt_idx, owner, txt_ok, zeros_t, none_t), spec)
    if spec.size > 1:
        pos, has = _ring.shift((pos, has), spec)  # the positive scores of our own texts come home
    local = (*best, vary(jnp.zeros((n_img,), jnp.int32)))
    block = (y, txt_idx, owner, txt_ok, pos, vary(jnp.zeros((n_pad,), jnp.int32)))
    (_, best_j, count_i), (*_, count_t) = _ring.run_ring(second_step, local, block, spec)
    if spec.size > 1:
        count_t = _ring.shift(count_t, spec)
    # A valid query without a positive (an image without captions) is a miss at every k; padding has no rank.
    rank_i = jnp.where(img_ok, jnp.where(best_j != NO_INDEX, count_i, NO_RANK), -1)
    rank_t = jnp.where(txt_ok, jnp.where(has, count_t, NO_RANK), -1)
    return rank_i, rank_t[:n_txt]


def ring_spec(mesh, axes, n_rows: int) -> _ring.RingSpec:
    return _ring.RingSpec(mesh=mesh, axes=tuple(axes), size=_ring.ring_size(mesh, axes), tile=0, batch=n_rows)


def ranks(img, img_idx, img_ok, txt, txt_idx, owner, txt_ok, *, mesh, axes, tile: int):
    """Global arrays sharded over `axes` on dim 0 -> (rank_i [N_img], rank_t [N_txt]), sharded the same way.

    img [N_img, d], img_idx [N_img] (unique ids; the tie-break order), img_ok [N_img] bool (padding False);
    txt [N_txt, d], txt_idx [N_txt] (unique ids), owner [N_txt] (the img_idx of the image each text describes),
    txt_ok [N_txt]. All ids int32, embeddings any float dtype (scores are fp32). Ranks are int32: NO_RANK for a
    valid item without any positive (an image with no caption; a text whose owner is not a valid image): a miss,
    counted by `recall`; -1 for padding (img_ok / txt_ok False, or img_idx < 0), left out of recall.
    Raises ValueError if N_img or N_txt does not split over the devices of `axes`, or if tile <= 0.
    """
    spec = ring_spec(mesh, axes, img.shape[0])
    for name, n in (("images", img.shape[0]), ("texts", txt.shape[0])):
        if n % spec.size:
            raise ValueError(f"{n} {name} do not split over the {spec.size} devices of {axes}; pad them first")
    if tile <= 0:
        raise ValueError(f"retrieval tile must be positive, got {tile}")
    tile = min(tile, txt.shape[0] // spec.size)
    row = P(spec.axes)
    fn = jax.shard_map(
        functools.partial(_ranks_local, spec=spec, tile=tile),
        mesh=mesh,
        in_specs=(P(spec.axes, None), row, row, P(spec.axes, None), row, row, row),
        out_specs=(row, row),
    )
    return fn(img, img_idx, img_ok, txt, txt_idx, owner, txt_ok)


def recall(rank, ks) -> tuple[jax.Array, jax.Array]:
    """Hit counts of ranks from `ranks` -> (hits, counts), on-device int32.

    hits [len(ks)] = #{0 <= rank < k}; counts [2] = (#{rank >= 0}: the denominator of recall@k, every valid
    query including those without a positive; #{rank == NO_RANK}: those, misses at every k). recall@k =
    hits / counts[0], as CLIP_benchmark's (recall_at_k(...) > 0).mean() over all images (i2t) or texts (t2i).
    """
    valid = rank >= 0
    hits = jnp.stack([jnp.sum(valid & (rank < k), dtype=jnp.int32) for k in ks])
    counts = jnp.stack([jnp.sum(valid, dtype=jnp.int32), jnp.sum(rank == NO_RANK, dtype=jnp.int32)])
    return hits, counts


def concat_sharded(parts: list, mesh, axes) -> jax.Array:
    """Concatenate arrays sharded on dim 0 over `axes` without moving data between devices.

    Each device's piece of the result is the concatenation of its pieces of the parts, so the global row order
    is device-major (not part-major); callers keep ids in arrays concatenated the same way, which makes any
    order correct. A jnp.concatenate would instead reshuffle every row across devices.
    """
    sharding = NamedSharding(mesh, P(tuple(axes)))
    first = parts[0]
    per_device = {}
    for part in parts:
        for shard in part.addressable_shards:
            per_device.setdefault(shard.device, []).append(shard.data)
    pieces = [jnp.concatenate(per_device[d]) if len(parts) > 1 else per_device[d][0] for d in per_device]
    shape = (sum(p.shape[0] for p in parts),) + first.shape[1:]
    arrays = [jax.device_put(p, d) for p, d in zip(pieces, per_device)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
