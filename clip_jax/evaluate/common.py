"""Helpers shared by the evaluators: the model's encoders, host<->device transfers that work on several hosts."""

import jax
import numpy as np
from flax import nnx

from clip_jax import sharding


def encoders(params, graphdef):
    """(encode_image, encode_text): jitted functions of a device batch, each returning unit-norm [B, d] fp32."""
    image = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
    text = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_text(x))
    return (lambda x: image(params, x)), (lambda x: text(params, x))


def to_host(x) -> np.ndarray:
    """A device array -> numpy, the same on every process.

    A replicated array is read from a local copy; a sharded one is gathered with process_allgather, since
    device_get cannot read shards that live on another host's devices.
    """
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def pad_rows(x: np.ndarray, multiple: int, fill=0) -> np.ndarray:
    pad = (-len(x)) % multiple
    return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)]) if pad else x


def encode_all(encode, rows: np.ndarray, mesh, chunk: int) -> np.ndarray:
    """Encode rows that every process holds in full (e.g. prompt tokens), `chunk` at a time over all devices;
    every process gets all the embeddings back in order."""
    n_dev, pc, pi = mesh.devices.size, jax.process_count(), jax.process_index()
    step = max(n_dev, chunk - chunk % n_dev)
    outs = []
    for start in range(0, len(rows), step):
        part = pad_rows(rows[start : start + step], n_dev)
        local = len(part) // pc  # this process's slice of the global batch
        emb = encode(sharding.put_batch({"x": part[pi * local : (pi + 1) * local]}, mesh)["x"])
        outs.append(to_host(emb)[: min(step, len(rows) - start)])
    return np.concatenate(outs)
