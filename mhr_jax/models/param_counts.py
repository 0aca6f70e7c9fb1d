"""Parameter counts by group for the models of every method (adapters.params labels the parameters; the
method table, adapters.methods, says which train), from abstract shapes: nothing is allocated."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from mhr_jax.adapters import methods
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.adapters.methods import ROUTING_AND_ADAPTERS, Rules
from mhr_jax.adapters.params import param_labels, routing_row_mask
from mhr_jax.models import layout


def _paths(tree):
  return traverse_util.flatten_dict(dict(tree))


def abstract_params(model_cfg) -> dict:
  """Unboxed params tree of `models.T5(model_cfg)` as ShapeDtypeStructs (nothing allocated)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mhr_jax.models.t5 import T5  # pylint: disable=g-import-not-at-top  (models/__init__ imports this module's package)

  model = T5(model_cfg)
  tokens = jnp.ones((1, 1), jnp.int32)
  task_ids = jnp.zeros((1,), jnp.int32) if model_cfg.adapter.uses_task_ids else None
  boxed = jax.eval_shape(
      lambda key: model.init({"params": key, "dropout": key}, tokens, tokens, tokens,
                             task_ids=task_ids, enable_dropout=False),
      jax.random.key(0))
  return nn.unbox(boxed)["params"]


def count_params(cfg_or_params, rules: Rules | str | None = None,
                 mask: Mapping | None = None) -> dict[str, int]:
  """Parameter counts by group.

  Args:
    cfg_or_params: a `models.T5Config` (counted through `abstract_params`, no allocation) or a
      params tree.
    rules: label rules or a method name; default: routing / adapters trained, the rest frozen.
    mask: optional `routing_row_mask`; masked leaves count only their unmasked entries.
  Returns:
    {"total", "trainable", and each group present: count}; "adapted_layers" counts the layers that
    carry adapter weights.
  """
  params = cfg_or_params
  if hasattr(cfg_or_params, "adapter"):
    params = abstract_params(cfg_or_params)
  flat = _paths(params)
  labels = _paths(param_labels(params, rules if rules is not None else ROUTING_AND_ADAPTERS,
                               require_trainable=False))
  flat_mask = _paths(mask) if mask is not None else {}
  counts = {"total": 0, "trainable": 0}
  for path, leaf in flat.items():
    size = int(np.prod(leaf.shape))
    counts["total"] += size
    group = labels[path]
    n = size
    if path in flat_mask:
      n = int(np.broadcast_to(flat_mask[path], leaf.shape).astype(bool).sum())
    counts[group] = counts.get(group, 0) + n
    if group != "frozen":
      counts["trainable"] += n
  # A scanned module (<stack>/layers/...) holds one adapted layer per entry of its leading axis.
  counts["adapted_layers"] = sum(
      {p[:-1]: leaf.shape[0] if layout.layer_axes(p) else 1 for p, leaf in flat.items()
       if p[-1] in ("lora_a", "lora_b", "ia3_scale")}.values())
  return counts


def paper_methods(rank: int = 1, n_skills: int = 8, n_splits: int = 8, n_tasks: int = 1,
                  names: Sequence[str] = ("lora", "ia3", "poly", "mhr", "poly-z", "mhr-z", "mhr-mu", "full")
                  ) -> list[tuple[str, str, AdapterConfig]]:
  """(row name, method, AdapterConfig of the model it trains) of `names` (default: the paper's T0-setting
  methods), from the method table, for `method_report`."""
  entries = []
  for name in names:
    method = methods.get(name)
    kind = method.adapted_kind(method.pretrain_kind)
    heads = n_splits if kind == "mhr" else 1
    acfg = AdapterConfig(kind=kind, rank=rank, n_skills=n_skills, n_splits=heads, n_tasks=n_tasks)
    entries.append((method.name + (f" (S={heads})" if kind == "mhr" else ""), method.name, acfg))
  return entries


def method_report(model_cfg, entries: Sequence[tuple[str, str, AdapterConfig]] | None = None,
                  new_tasks: int = 1) -> str:
  """A text table of parameter counts per method on the architecture of `model_cfg`.

  Args:
    model_cfg: `models.T5Config`; its adapter field is replaced by each entry's.
    entries: (row name, method for `default_rules`, AdapterConfig); default `paper_methods()`.
    new_tasks: for adapters with task ids, trainable = the routing rows (or private adapters) of this many
      new tasks, as few-shot adaptation trains them.
  Returns:
    Columns: method, adapted layers, adapter weights (inventory), routing logits, trainable, total.
  """
  entries = paper_methods() if entries is None else entries
  header = ("method", "layers", "adapter", "routing", "trainable", "total")
  rows = []
  for name, method, acfg in entries:
    params = abstract_params(model_cfg.replace(adapter=acfg))
    mask = None
    if acfg.routed:
      # The last `new_tasks` rows play the new tasks (add_task_rows appends them).
      mask = routing_row_mask(params, range(max(0, acfg.n_tasks - new_tasks), acfg.n_tasks))
    c = count_params(params, method, mask)
    inventory = count_params(params, ROUTING_AND_ADAPTERS)
    rows.append((name, c["adapted_layers"], inventory.get("adapters", 0),
                 inventory.get("routing", 0), c["trainable"], c["total"]))
  cells = [list(header)] + [[r[0]] + [f"{v:,}" for v in r[1:]] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  return "\n".join("  ".join([row[0].ljust(widths[0])] +
                             [v.rjust(w) for v, w in zip(row[1:], widths[1:])])
                   for row in cells)
