"""Mesh creation and the mapping from logical parameter axes to mesh axes.

Parameters are annotated where they are created with logical names ('embed', 'mlp', ...). One rules table in the
config (cfg.sharding) maps each name to a mesh axis; everything here is derived from that table, so changing the
parallelism is a config change, never a model change.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import config as config_lib

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both axes jointly; the loss ring runs over the same tuple


def make_mesh(cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config_lib.mesh_shape(cfg, len(devices))
    # Auto axes: XLA propagates the FSDP parameter shardings; JAX 0.10 would default to Explicit.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_to_mesh(logical: P, shape, rules: dict, mesh: Mesh) -> P:
    """Map one logical PartitionSpec to mesh axes; a dim that the mesh axis does not divide stays replicated."""
    out, used = [], set()
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axis = rules.get(name) if name else None
        if axis and axis not in used and dim % mesh.shape[axis] == 0:
            out.append(axis)
            used.add(axis)  # a mesh axis may shard only one dim of an array
        else:
            out.append(None)
    return P(*out)


def param_shardings(abstract_params, logical_specs, cfg, mesh: Mesh):
    """NamedSharding for every parameter (pure dicts of ShapeDtypeStruct and of logical PartitionSpecs)."""
    rules = {k: v for k, v in cfg.sharding.items() if v}
    for name, axis in rules.items():
        if axis not in mesh.axis_names:
            raise config_lib.ConfigError(
                f"sharding.{name}='{axis}' is not a mesh axis; use one of {mesh.axis_names}"
            )
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, logical_to_mesh(spec, x.shape, rules, mesh)),
        abstract_params,
        logical_specs,
        is_leaf=lambda s: isinstance(s, P),
    )


def logical_specs(state: nnx.State):
    """Pure dict of logical PartitionSpecs (P() for an unannotated variable)."""
    return nnx.to_pure_dict(nnx.get_partition_spec(state))


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> one global array per key (per leaf of a nested dict, e.g. a NaFlex model's
    images), sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), batch)
