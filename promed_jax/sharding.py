"""Meshes and logical-axis rules: the model names its axes (embed, heads, ...); a mesh maps them to devices.

Parameters carry logical axis names (`out_sharding` metadata on each `nnx.Variable`). `LOGICAL_RULES` maps
each name to a mesh axis; a mesh axis the mesh does not have, or one that does not divide the dimension,
leaves that dimension replicated, so the same rules serve a data-only mesh on one CPU and an fsdp x tensor
mesh on accelerators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

LOGICAL_RULES: Mapping[str, str] = {
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "batch": "data",
}


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of `shape` (one -1 entry takes the remaining devices) with every axis `AxisType.Auto`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} and axis names {tuple(axis_names)} differ in length")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) > len(devices) or min(shape) < 1:
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices; {len(devices)} available")
    return jax.make_mesh(
        tuple(shape),
        tuple(axis_names),
        axis_types=(AxisType.Auto,) * len(shape),
        devices=devices[: math.prod(shape)],
    )


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str] = LOGICAL_RULES,
) -> PartitionSpec:
    """Logical axis names of one array -> its `PartitionSpec` on `mesh` (replicated where a rule cannot apply)."""
    spec, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        mesh_axis = rules.get(name) if name is not None else None
        ok = (
            mesh_axis is not None
            and mesh_axis in mesh.shape
            and mesh_axis not in used
            and dim % mesh.shape[mesh_axis] == 0
        )
        spec.append(mesh_axis if ok else None)
        if ok:
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Mapping[str, str] = LOGICAL_RULES) -> NamedSharding:
    """The sharding of one variable (concrete or abstract) from its logical axis names; replicated without."""
    shape = tuple(variable.shape)
    axes = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, str] = LOGICAL_RULES) -> nnx.State:
    """A `NamedSharding` for every variable of `state` (variables without axis names are replicated)."""
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str] = LOGICAL_RULES) -> None:
    """Place every array of `model` on `mesh` according to its logical axes (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
