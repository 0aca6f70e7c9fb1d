"""Which parameters train: labels by path regex, trainable / frozen split, parameter counts.

Labels are one group name per leaf of the (unboxed) params tree, as `optim.make_optimizer` and
the train step read them (GROUPS: frozen, adapters, routing, base; see `adapters.methods`).
A rule set is an ordered list of (regex, group); a leaf takes the group of the first regex that
fully matches its '/'-joined path, e.g. "encoder/block_0/self_attention/q/routing/logits".
`default_rules(method)` gives the rules of a method of the method table (`adapters.methods`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from mhr_jax.adapters import methods
from mhr_jax.adapters.config import AdapterConfig
# The method table and its groups, re-exported: `params.METHOD_TABLE` and friends keep working.
from mhr_jax.adapters.methods import (ADAPTER_RE, GROUPS, IA3_RE, LORA_RE, METHOD_TABLE, METHODS,  # noqa: F401
                                      ROUTING_AND_ADAPTERS, ROUTING_RE, TRAINED, Method, Rules,
                                      canonical_method)


def default_rules(method: str) -> list[tuple[str, str]]:
  """The (regex, group) rules of `method` (one of METHODS; '_' and '-' are interchangeable)."""
  return list(methods.get(method).rules)


def _paths(tree) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(dict(tree))


def param_labels(params, rules: Rules | str, require_trainable: bool = True) -> dict:
  """Group name of every leaf of `params` (nested dict), by the first fully matching rule.

  Args:
    params: unboxed params tree (arrays or ShapeDtypeStructs).
    rules: ordered (regex, group) pairs, or a method name for `default_rules`.
    require_trainable: raise when no leaf lands in a trained group (a method / kind mismatch).
  Returns:
    nested dict like `params` with group-name leaves.
  Raises:
    ValueError: a group outside GROUPS, a leaf no rule matches, or (require_trainable) no trained
      leaf at all.
  """
  if isinstance(rules, str):
    rules = default_rules(rules)
  compiled = []
  for regex, group in rules:
    if group not in GROUPS:
      raise ValueError(f"label rule ({regex!r}, {group!r}): group must be one of {GROUPS}")
    compiled.append((re.compile(regex), group))
  labels = {}
  for path in _paths(params):
    name = "/".join(path)
    group = next((g for r, g in compiled if r.fullmatch(name)), None)
    if group is None:
      raise ValueError(f"no label rule matches parameter {name}; end the rules with ('.*', 'frozen')")
    labels[path] = group
  if require_trainable and not any(g in TRAINED for g in labels.values()):
    raise ValueError("label rules select no trainable parameter (does the method match "
                     "adapter.kind?)")
  return traverse_util.unflatten_dict(labels)


def partition(params, labels) -> tuple[dict, dict]:
  """Splits params into (trainable, frozen) nested dicts holding only their own leaves."""
  flat, flat_labels = _paths(params), _paths(labels)
  if set(flat) != set(flat_labels):
    diff = sorted("/".join(p) for p in set(flat) ^ set(flat_labels))
    raise ValueError(f"labels and params differ at {diff[:5]}")
  trainable = {p: v for p, v in flat.items() if flat_labels[p] != "frozen"}
  frozen = {p: v for p, v in flat.items() if flat_labels[p] == "frozen"}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(*trees) -> dict:
  """Merges disjoint nested dicts (the inverse of `partition`)."""
  merged = {}
  for tree in trees:
    for path, leaf in _paths(tree).items():
      if path in merged:
        raise ValueError(f"combine: parameter {'/'.join(path)} is in more than one tree")
      merged[path] = leaf
  return traverse_util.unflatten_dict(merged)


def routing_row_mask(params, rows: Sequence[int]) -> dict:
  """MHR-z update mask: 1.0 on the routing rows `rows` (task ids), 0.0 on every other row.

  Every routing-logits leaf (T, S, K) gets a (T, 1, 1) float32 array (broadcasts against the
  leaf); use it to multiply gradients and optimizer updates (`optim.make_optimizer(update_mask=)`)
  so that only the new tasks' rows move. Works on arrays or ShapeDtypeStructs.
  """
  out = {}
  for path, leaf in _paths(params).items():
    if path[-2:] != ("routing", "logits"):
      continue
    # (T, S, K), or (L, T, S, K) in the scanned layout: the task axis is third from last, and a
    # (T, 1, 1) mask broadcasts against both.
    n_tasks = leaf.shape[-3]
    mask = np.zeros((n_tasks, 1, 1), np.float32)
    for t in rows:
      if not 0 <= int(t) < n_tasks:
        raise ValueError(f"routing_row_mask: row {t} outside [0, {n_tasks}) of {'/'.join(path)}")
      mask[int(t)] = 1.0
    out[path] = mask
  if not out:
    raise ValueError("routing_row_mask: params have no routing logits")
  return traverse_util.unflatten_dict(out)


def abstract_params(model_cfg) -> dict:
  """Unboxed params tree of `models.T5(model_cfg)` as ShapeDtypeStructs (nothing allocated)."""
  import flax.linen as nn
  import jax.numpy as jnp

  from mhr_jax import models

  model = models.T5(model_cfg)
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
  from mhr_jax.models import layout  # pylint: disable=g-import-not-at-top  (models imports this package)
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
