"""Logical-axis rules for T5X's partitioner: T5X's standard table plus the project's own names.

T5X's mesh has two axes, ('data', 'model'). Its standard rules cover the base model's parameter
names (vocab, embed, mlp, heads, joined_kv, relpos_buckets, layers), which `models.T5` shares with
T5X. The adapter, routing and activation names are the project's; flax leaves a name without a rule
unsharded without any error, so they are added here, translated from the one table of the project
(`mhr_jax.partitioning.LOGICAL_RULES`, mesh ('data', 'fsdp', 'model')):
  ('data', 'fsdp') -> 'data'   the batch
  'fsdp'           -> 'data'   T5X's 2-D parameter sharding also puts parameters on 'data'
  'model'          -> 'model'
  None             -> None     replicated (adapters and routing: small, no communication)
"""
from __future__ import annotations

from typing import Any

from t5x import partitioning as t5x_partitioning

from mhr_jax import partitioning

Rules = tuple[tuple[str, Any], ...]


def _to_t5x_mesh(axes):
  if axes is None:
    return None
  group = axes if isinstance(axes, tuple) else (axes,)
  mapped = tuple(dict.fromkeys("data" if a in ("data", "fsdp") else a for a in group))
  return mapped[0] if len(mapped) == 1 else mapped


def project_rules(known: set[str] = frozenset()) -> Rules:
  """The project's rules for the names not in `known`, mapped onto T5X's ('data', 'model') mesh."""
  return tuple((name, _to_t5x_mesh(axes)) for name, axes in partitioning.LOGICAL_RULES
               if name not in known)


def logical_axis_rules(activation_partitioning_dims: int = 1, parameter_partitioning_dims: int = 1,
                       additional_rules: Rules = ()) -> Rules:
  """`t5x.partitioning.standard_logical_axis_rules` with the project's adapter and activation names.

  For gin: `partitioning.PjitPartitioner.logical_axis_rules = @bridge_partitioning.logical_axis_rules()`.
  `additional_rules` come first, so they override both tables.
  """
  standard = t5x_partitioning.standard_logical_axis_rules(
      activation_partitioning_dims=activation_partitioning_dims,
      parameter_partitioning_dims=parameter_partitioning_dims)
  known = {name for name, _ in standard} | {name for name, _ in additional_rules}
  return tuple(additional_rules) + tuple(standard) + project_rules(known)
