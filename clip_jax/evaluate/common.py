"""What every evaluator shares: the base class, the model's encoders (jitted once per process), and host<->device
transfers that work on several hosts."""

import functools

import jax
import numpy as np
from flax import nnx

from clip_jax import sharding


@functools.partial(jax.jit, static_argnums=0)
def _encode_image(graphdef, params, images):
    return nnx.merge(graphdef, params).encode_image(images)


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(graphdef, params, tokens):
    return nnx.merge(graphdef, params).encode_text(tokens)


class ModelEncoders:
    """The model's encoders as functions of (params, device batch) -> unit-norm [B, d] float32 embeddings.

    The jitted functions are module-level with the graphdef as a static argument, so every evaluator, every
    evaluation and every Suite of a process share one compilation per (model, batch shape): a periodic evaluation
    compiles nothing after the first. Parameters are arguments, never closed over.
    """

    def __init__(self, graphdef):
        self.graphdef = graphdef

    def image(self, params, images):
        """images: [B, S, S, 3] float32, normalised as eval_data.eval_image does; for a NaFlex model the dict
        {'patches' [B, N, p*p*3] float32, 'patch_mask' [B, N] bool, 'spatial_shapes' [B, 2] int32} it makes."""
        return _encode_image(self.graphdef, params, images)

    def text(self, params, tokens):
        """tokens: [B, L] int32, as the config's tokenizer makes them."""
        return _encode_text(self.graphdef, params, tokens)


class Evaluator:
    """One `evals.<name>` config section (evaluate/sections.py), built once per run.

    The constructor reads what does not depend on the model (class names, prompts, the split's size) and so checks
    the section's dataset, split and features up front (pipeline.DataError / config.ConfigError, one line naming
    the key); run(params, encoders, graphdef) -> {metric: value} evaluates one set of parameters.
    """

    def __init__(self, name: str, section, cfg, mesh):
        self.name, self.section, self.cfg, self.mesh = name, section, cfg, mesh

    @property
    def key(self) -> str:
        """The config key of this evaluator's section, for messages: 'evals.<name>'."""
        return f"evals.{self.name}"

    def run(self, params, encoders, graphdef) -> dict:
        raise NotImplementedError


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
