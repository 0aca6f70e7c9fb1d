"""Which parameters train: labels by path regex, trainable / frozen split, parameter counts.

Labels are one group name per leaf of the (unboxed) params tree, as `optim.make_optimizer` and
the train step read them:
  frozen    never updated
  adapters  LoRA A / B, (IA)^3 scales
  routing   routing logits (T, S, K)
  base      base-model weights that train (full fine-tuning)
A rule set is an ordered list of (regex, group); a leaf takes the group of the first regex that
fully matches its '/'-joined path, e.g. "encoder/block_0/self_attention/q/routing/logits".
`default_rules(method)` gives the rules of each method of the paper.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from mhr_jax.adapters.config import AdapterConfig

GROUPS = ("frozen", "adapters", "routing", "base")
TRAINED = ("adapters", "routing", "base")

ROUTING_RE = r"(.*/)?routing/logits"
LORA_RE = r".*/(lora_a|lora_b)"
IA3_RE = r".*/ia3_scale"
ADAPTER_RE = r".*/(lora_a|lora_b|ia3_scale)"

Rules = Sequence[tuple[str, str]]

_PRETRAIN = ((ROUTING_RE, "routing"), (ADAPTER_RE, "adapters"), (".*", "frozen"))
_ROUTING_ONLY = ((ROUTING_RE, "routing"), (".*", "frozen"))
_LORA_ONLY = ((LORA_RE, "adapters"), (".*", "frozen"))
_FULL = ((ROUTING_RE, "routing"), (ADAPTER_RE, "adapters"), (".*", "base"))
_ROUTED = ("poly", "mhr")


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method of the paper (METHODS.md), the one table every stage reads.

  Attributes:
    rules: which parameters train ((regex, group) pairs, see `param_labels`).
    kind: the AdapterConfig.kind that pre-training for this method produces ("none" for full
      fine-tuning): the experiment pre-trains this kind, then adapts with the method.
    starts_from: the pre-trained adapter kinds few-shot adaptation with this method accepts. "none"
      means a fresh adapter on a plain base model: the no-pre-training control.
    new_task: adaptation gives the new task a fresh routing row (or private adapter).
    mu: adaptation first averages the skills into one plain LoRA (transforms.to_mu).
  """
  rules: Rules
  kind: str
  starts_from: tuple[str, ...]
  new_task: bool = False
  mu: bool = False


METHOD_TABLE: dict[str, Method] = {
    # Poly / MHR: pre-training, and few-shot adaptation with a fresh routing row for the new task,
    # routing and inventory training (from a pre-trained inventory, or a fresh one on the base).
    "poly": Method(_PRETRAIN, "poly", (*_ROUTED, "none"), new_task=True),
    "mhr": Method(_PRETRAIN, "mhr", (*_ROUTED, "none"), new_task=True),
    # Poly-z / MHR-z: only routing trains; `routing_row_mask` or row selection keeps it to the new row.
    "poly-z": Method(_ROUTING_ONLY, "poly", _ROUTED, new_task=True),
    "mhr-z": Method(_ROUTING_ONLY, "mhr", _ROUTED, new_task=True),
    # Poly-mu / MHR-mu: the skill-averaged inventory becomes one plain LoRA, which trains.
    "poly-mu": Method(_LORA_ONLY, "poly", _ROUTED, mu=True),
    "mhr-mu": Method(_LORA_ONLY, "mhr", _ROUTED, mu=True),
    # Baselines: shared LoRA, private LoRA (one per task), (IA)^3, full fine-tuning.
    "lora": Method(_LORA_ONLY, "lora", ("lora", "none")),
    "private_lora": Method(_LORA_ONLY, "private_lora", ("private_lora", "none"), new_task=True),
    "ia3": Method(((IA3_RE, "adapters"), (".*", "frozen")), "ia3", ("ia3", "none")),
    "full": Method(_FULL, "none", ("none", "lora", "ia3", "private_lora", *_ROUTED)),
}
METHODS = tuple(METHOD_TABLE)


def canonical_method(method: str) -> str:
  """`method` as METHOD_TABLE spells it ('_' and '-' are interchangeable; case is ignored)."""
  key = method.lower().replace("_", "-")
  key = "private_lora" if key == "private-lora" else key
  if key not in METHOD_TABLE:
    raise ValueError(f"method={method!r}: expected one of {METHODS}")
  return key


def method_info(method: str) -> Method:
  return METHOD_TABLE[canonical_method(method)]


def pretraining_method(kind: str) -> str:
  """The method whose rules pre-train an adapter of AdapterConfig.kind `kind`."""
  return "full" if kind == "none" else canonical_method(kind)


def default_rules(method: str) -> list[tuple[str, str]]:
  """The (regex, group) rules of `method` (one of METHODS; '_' and '-' are interchangeable)."""
  return list(method_info(method).rules)


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
  labels = _paths(param_labels(params, rules if rules is not None else _PRETRAIN,
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


def paper_methods(rank: int = 1, n_skills: int = 8, n_splits: int = 8,
                  n_tasks: int = 1) -> list[tuple[str, str, AdapterConfig]]:
  """(row name, method, AdapterConfig) of the paper's T0-setting methods, for `method_report`."""
  routed = dict(rank=rank, n_skills=n_skills, n_tasks=n_tasks)
  return [
      ("LoRA", "lora", AdapterConfig(kind="lora", rank=rank)),
      ("(IA)^3", "ia3", AdapterConfig(kind="ia3")),
      ("Poly", "poly", AdapterConfig(kind="poly", **routed)),
      (f"MHR (S={n_splits})", "mhr", AdapterConfig(kind="mhr", n_splits=n_splits, **routed)),
      ("Poly-z", "poly-z", AdapterConfig(kind="poly", **routed)),
      (f"MHR-z (S={n_splits})", "mhr-z", AdapterConfig(kind="mhr", n_splits=n_splits, **routed)),
      ("MHR-mu", "mhr-mu", AdapterConfig(kind="lora", rank=rank)),
      ("Full fine-tuning", "full", AdapterConfig()),
  ]


def method_report(model_cfg, entries: Sequence[tuple[str, str, AdapterConfig]] | None = None,
                  new_tasks: int = 1) -> str:
  """A text table of parameter counts per method on the architecture of `model_cfg`.

  Args:
    model_cfg: `models.T5Config`; its adapter field is replaced by each entry's.
    entries: (row name, method for `default_rules`, AdapterConfig); default `paper_methods()`.
    new_tasks: for "-z" methods, trainable = the routing rows of this many new tasks.
  Returns:
    Columns: method, adapted layers, adapter weights (inventory), routing logits, trainable, total.
  """
  entries = paper_methods() if entries is None else entries
  header = ("method", "layers", "adapter", "routing", "trainable", "total")
  rows = []
  for name, method, acfg in entries:
    params = abstract_params(model_cfg.replace(adapter=acfg))
    mask = None
    if method.replace("_", "-").endswith("-z"):
      # The last `new_tasks` rows play the new tasks (add_task_rows appends them).
      mask = routing_row_mask(params, range(max(0, acfg.n_tasks - new_tasks), acfg.n_tasks))
    c = count_params(params, method, mask)
    inventory = count_params(params, _PRETRAIN)
    rows.append((name, c["adapted_layers"], inventory.get("adapters", 0),
                 inventory.get("routing", 0), c["trainable"], c["total"]))
  cells = [list(header)] + [[r[0]] + [f"{v:,}" for v in r[1:]] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  return "\n".join("  ".join([row[0].ljust(widths[0])] +
                             [v.rjust(w) for v, w in zip(row[1:], widths[1:])])
                   for row in cells)
