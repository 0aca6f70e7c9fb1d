"""The paper's training methods, one record each: the single place that says what a method trains and at
which rate, what it starts from, and how its (task, seed) pairs run (docs/METHODS.md "Few-shot adaptation
variants" and "Baselines").

Every stage reads `METHOD_TABLE`: the train step's parameter groups (`rules`), few-shot adaptation's
starting points (`start_params`), the config checks and the experiment plan (`adapts`, `control`), the T5X
bridge and the benchmarks; PEFT export reads the adapter kind of the adapted model (`adapted_kind`, then
`KIND_TABLE`). Adding a method is one record here plus its math (a
new `start` or rule set) where it is not there yet.

Parameter groups (`rules`) are ordered (regex, group) pairs over '/'-joined parameter paths, the first full
match winning (`adapters.params.param_labels`); the groups are
  frozen    never updated
  adapters  LoRA A / B, (IA)^3 scales      (OptimizerConfig.adapter_lr)
  routing   routing logits (T, S, K)        (OptimizerConfig.routing_lr)
  base      base-model weights that train  (OptimizerConfig.base_lr)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from mhr_jax.adapters import transforms
from mhr_jax.adapters.config import KIND_TABLE, KINDS

GROUPS = ("frozen", "adapters", "routing", "base")
TRAINED = ("adapters", "routing", "base")

ROUTING_RE = r"(.*/)?routing/logits"
LORA_RE = r".*/(lora_a|lora_b)"
IA3_RE = r".*/ia3_scale"
ADAPTER_RE = r".*/(lora_a|lora_b|ia3_scale)"

Rules = Sequence[tuple[str, str]]

# What trains, by rule set.
ROUTING_AND_ADAPTERS = ((ROUTING_RE, "routing"), (ADAPTER_RE, "adapters"), (".*", "frozen"))
ROUTING_ONLY = ((ROUTING_RE, "routing"), (".*", "frozen"))
LORA_ONLY = ((LORA_RE, "adapters"), (".*", "frozen"))
IA3_ONLY = ((IA3_RE, "adapters"), (".*", "frozen"))
EVERYTHING = ((ROUTING_RE, "routing"), (ADAPTER_RE, "adapters"), (".*", "base"))

# How a pair's starting parameters are made from the pre-trained ones (`Method.start_params`).
#   new_task  the new task gets its own fresh routing row (Poly / MHR: U(-1e-3, 1e-3), a near-uniform mix) or
#             private adapter, and the adapted model keeps only that task (id 0); a kind without task ids
#             starts as pre-trained.
#   mean_row  as new_task, but the new routing row starts at the mean of the pre-trained tasks' rows (the
#             average routing) instead of near-uniform.
#   mu        the inventory's skills averaged into one plain LoRA (transforms.to_mu); routing is dropped.
STARTS = ("new_task", "mean_row", "mu")


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method of the paper.

  Attributes:
    name: AdaptConfig.method ("mhr-z"; '_' and '-' are interchangeable on input).
    summary: one line for tables and docs.
    rules: which parameters train, and in which learning-rate group (see the module docstring).
    adapts: the adapter kinds of the pre-training it starts from ("none": a plain base model); the first is
      the kind the experiment pre-trains for it.
    start: how a pair's starting parameters are made (STARTS).
    control: it may also start from a plain base with a freshly initialised adapter of its kind: the
      paper's no-pre-training control.
    vmapped: its pairs adapt as one vmapped program; False runs them one after another with the same
      compiled program (full fine-tuning: N copies of the base would not fit).
  """
  name: str
  summary: str
  rules: Rules
  adapts: tuple[str, ...]
  start: str = "new_task"
  control: bool = False
  vmapped: bool = True

  def __post_init__(self):
    unknown = [k for k in self.adapts if k not in KIND_TABLE]
    if not self.adapts or unknown or self.start not in STARTS:
      raise ValueError(f"method {self.name!r}: adapts={self.adapts} (kinds: {KINDS}), start={self.start!r} "
                       f"(expected one of {STARTS})")

  @property
  def pretrain_kind(self) -> str:
    """The adapter kind the experiment pre-trains for this method ("none": the base)."""
    return self.adapts[0]

  def adapted_kind(self, kind: str) -> str:
    """The adapter kind of the model that trains, starting from a pre-trained adapter of `kind`."""
    return "lora" if self.start == "mu" else kind

  @property
  def trains_base(self) -> bool:
    """Whether base-model weights train (full fine-tuning: the train step's FLOPs then include them)."""
    return any(group == "base" for _, group in self.rules)

  def accepts(self, kind: str) -> bool:
    """Whether an adaptation config with AdapterConfig.kind `kind` fits: the pre-trained kind, or a fresh
    adapter of its own kind for the no-pre-training control."""
    return kind in self.adapts

  def start_params(self, cfg, params, key: jax.Array):
    """(config, params) a pair starts from, given the pre-trained `cfg` (a models.T5Config) and unboxed
    `params`; `key` is the pair's PRNG key (fresh rows draw from fold_in(key, 0))."""
    if self.start == "mu":
      return transforms.to_mu(cfg, params)
    if cfg.adapter.uses_task_ids:
      init = "mean" if self.start == "mean_row" else "uniform"
      cfg, params = transforms.add_task_rows(cfg, params, 1, jax.random.fold_in(key, 0), init=init)
      return transforms.select_task_rows(cfg, params, [cfg.adapter.n_tasks - 1])
    return cfg, params

  def draws_per_pair(self, kind: str) -> bool:
    """Whether pairs start from different parameters (a fresh row or adapter drawn per pair)."""
    return self.start == "new_task" and KIND_TABLE[kind].task_ids


_ROUTED = ("poly", "mhr")
_ALL_KINDS = ("none", "lora", "private_lora", "ia3", *_ROUTED)

METHOD_TABLE: dict[str, Method] = {m.name: m for m in (
    Method("poly", "a fresh routing row for the new task; routing and the inventory train",
           ROUTING_AND_ADAPTERS, ("poly",), control=True),
    Method("mhr", "a fresh routing row for the new task; routing and the inventory train",
           ROUTING_AND_ADAPTERS, ("mhr",), control=True),
    Method("poly-z", "only the new task's routing row trains; the inventory is frozen", ROUTING_ONLY, ("poly",)),
    Method("mhr-z", "only the new task's routing row trains; the inventory is frozen", ROUTING_ONLY, ("mhr",)),
    Method("mhr-meanrow", "as mhr, the new task's routing row starting at the training tasks' mean row",
           ROUTING_AND_ADAPTERS, ("mhr",), start="mean_row"),
    Method("poly-mu", "the skills averaged into one LoRA, which trains", LORA_ONLY, ("poly",), start="mu"),
    Method("mhr-mu", "each head's skills averaged into one LoRA, which trains", LORA_ONLY, ("mhr",), start="mu"),
    Method("lora", "one shared LoRA", LORA_ONLY, ("lora",), control=True),
    Method("private_lora", "a fresh LoRA of the new task's own", LORA_ONLY, ("private_lora",), control=True),
    Method("ia3", "(IA)^3 output scales", IA3_ONLY, ("ia3",), control=True),
    Method("full", "every weight trains (an adapter present trains too)", EVERYTHING, _ALL_KINDS, vmapped=False),
)}
METHODS = tuple(METHOD_TABLE)


def canonical_method(method: str) -> str:
  """`method` as METHOD_TABLE spells it ('_' and '-' are interchangeable; case is ignored)."""
  key = method.lower().replace("_", "-")
  key = "private_lora" if key == "private-lora" else key
  if key not in METHOD_TABLE:
    raise ValueError(f"method={method!r}: expected one of {METHODS}")
  return key


def get(method: str) -> Method:
  """The record of `method` (any spelling `canonical_method` accepts)."""
  return METHOD_TABLE[canonical_method(method)]


def pretraining_rules(kind: str) -> Rules:
  """What multi-task pre-training of an adapter of `kind` trains: the adapter ("none": the whole base)."""
  if kind not in KIND_TABLE:
    raise ValueError(f"adapter kind {kind!r}: expected one of {KINDS}")
  return EVERYTHING if kind == "none" else METHOD_TABLE[canonical_method(kind)].rules


def pretrainable_kinds() -> tuple[str, ...]:
  """Adapter kinds that multi-task pre-training produces (every kind but the plain base)."""
  return tuple(k for k in KINDS if k != "none")


def controls() -> tuple[str, ...]:
  """Methods that may start from a plain base with a fresh adapter (the no-pre-training control)."""
  return tuple(m.name for m in METHOD_TABLE.values() if m.control)
