"""Device mesh, the logical -> mesh axis rules, parameter and batch shardings.

One mesh with axes ('data', 'fsdp', 'model') (size-1 axes allowed). Every parameter of `models.T5`
carries logical axis names; `LOGICAL_RULES` is the one table that maps them onto mesh axes:
the frozen base is sharded over 'fsdp' (embed) and 'model' (heads, mlp, vocab), the small adapter
and routing state is replicated, and the batch is split over ('data', 'fsdp').
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes). flax assigns rules in order and never uses a mesh axis twice in one
# array, so e.g. an (embed, mlp) kernel becomes P('fsdp', 'model').
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("activation_batch", BATCH_AXES),
    ("vocab", "model"),
    ("mlp", "model"),
    ("joined_kv", "model"),
    ("heads", "model"),
    ("embed", "fsdp"),
    ("relpos_buckets", None),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "model"),
    ("activation_kv", None),
    ("activation_mlp", "model"),
    ("activation_vocab", "model"),
    # Adapter and routing state is small: replicated, so its update needs no communication.
    ("adapter_splits", None),
    ("adapter_skills", None),
    ("adapter_in", None),
    ("adapter_out", None),
    ("adapter_rank", None),
    ("adapter_tasks", None),
    ("routing_tasks", None),
    # The leading axis of scanned layer stacks (T5Config.scan_layers): every device holds every layer.
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; exactly one may be -1, meaning "all remaining devices"."""
  data: int = -1
  fsdp: int = 1
  model: int = 1

  def resolve(self, n_devices: int) -> tuple[int, int, int]:
    """Axis sizes (data, fsdp, model) for `n_devices` devices; ValueError when they do not fit."""
    sizes = {"data": self.data, "fsdp": self.fsdp, "model": self.model}
    for name, size in sizes.items():
      if size == 0 or size < -1:
        raise ValueError(f"MeshConfig.{name}={size}: must be a positive size or -1 (the rest)")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
      raise ValueError(f"MeshConfig: only one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
      if n_devices % fixed:
        raise ValueError(
            f"MeshConfig {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
            f"{n_devices} devices; choose MeshConfig.data/fsdp/model so that it does")
      sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
      raise ValueError(
          f"MeshConfig {sizes}: data*fsdp*model = {fixed} but there are {n_devices} devices; "
          f"set one of MeshConfig.data/fsdp/model to -1 or make the product {n_devices}")
    return sizes["data"], sizes["fsdp"], sizes["model"]


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh with Auto axis types over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_cfg.resolve(len(devices))
  if len(devices) == len(jax.devices()):
    # Topology-aware device order (ICI rings on TPU) for the full slice.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def describe(mesh: Mesh) -> str:
  """One log line: mesh shape, process index/count, local and global device counts."""
  shape = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
  return (f"mesh ({shape}); process {jax.process_index()}/{jax.process_count()}; "
          f"devices: {jax.local_device_count()} local, {jax.device_count()} global "
          f"({jax.devices()[0].platform})")


def _spec_for(names, shape, mesh: Mesh, rules) -> P:
  """Mesh PartitionSpec for one array; dims that the mesh axes do not divide stay replicated."""
  axes = nn.logical_to_mesh_axes(tuple(names), rules)
  fixed = []
  for dim, axis in zip(shape, axes):
    group = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    size = math.prod(mesh.shape[a] for a in group)
    fixed.append(axis if size > 1 and dim % size == 0 else None)
  return P(*fixed)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for every parameter, from its logical axis names.

  Args:
    abstract_boxed_params: the params tree as `model.init` returns it (leaves
      `nn.LogicallyPartitioned` around arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape`); unboxed leaves are replicated.
  Returns:
    The unboxed tree structure with a `NamedSharding` per leaf. A dimension that its mesh axes do
    not divide is replicated rather than failing, so odd vocabularies still load.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, _spec_for(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_boxed_params,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def constrain_batch(batch: Mapping[str, jax.Array], mesh: Mesh) -> dict[str, jax.Array]:
  """Inside jit: per-example ids (rank-1 leaves: task_ids, labels) replicated, the other leaves
  split over ('data', 'fsdp') on their batch dimension.

  Replicating the (B,) ids costs nothing and keeps every gather indexed by them (routing rows,
  private adapters, gold answers) off the batch-sharded path: with batch-sharded ids, jax 0.10.2's
  SPMD partitioner produced wrong routed-adapter outputs on a (data=2, fsdp=2, model=2) mesh.
  """
  def one(x):
    spec = P() if x.ndim == 1 else P(BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return {key: one(value) for key, value in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax.Arrays split over ('data', 'fsdp').

  Args:
    batch: dict of arrays with a leading local batch dimension (B_local, ...); each process passes
      its own shard (DataConfig shard_index/num_shards = process index/count).
  Returns:
    dict of jax.Arrays of global shape (B_local * process_count, ...).
  """
  sharding = batch_sharding(mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_size = value.shape[0] * jax.process_count()
    if global_size % shards:
      raise ValueError(
          f"global batch size {global_size} (batch '{key}') is not divisible by the "
          f"{shards} data shards (MeshConfig.data x MeshConfig.fsdp = {mesh.shape['data']} x "
          f"{mesh.shape['fsdp']}); change DataConfig.batch_size or the mesh")
    out[key] = jax.make_array_from_process_local_data(
        sharding, value, (global_size,) + value.shape[1:])
  return out
