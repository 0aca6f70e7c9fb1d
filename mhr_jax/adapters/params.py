"""Which parameters train: labels by path regex, the trainable / frozen split.

Labels are one group name per leaf of the (unboxed) params tree, as `optim.make_optimizer` and
the train step read them (GROUPS: frozen, adapters, routing, base; see `adapters.methods`).
A rule set is an ordered list of (regex, group); a leaf takes the group of the first regex that
fully matches its '/'-joined path, e.g. "encoder/block_0/self_attention/q/routing/logits".
`default_rules(method)` gives the rules of a method of the method table (`adapters.methods`).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
from flax import traverse_util

from mhr_jax.adapters import methods
from mhr_jax.adapters.methods import GROUPS, TRAINED, Rules


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
