"""Adapter configuration: which T5 linear layers get an adapter, and of which kind.

The adapter kinds are one table, `KIND_TABLE` (docs/METHODS.md); what each few-shot method does with them is
the method table, `mhr_jax.adapters.methods`.
"""
from __future__ import annotations

import dataclasses
import re

# The paper's two placements (docs/METHODS.md "Where adapters go in T5").
ALL_LINEAR = r".*/(q|k|v|o|wi|wi_0|wi_1|wo)$"      # authors' T0 setting (rank 1)
ATTENTION_ONLY = r".*/(q|k|v|o)$"                   # authors' SuperNI setting (rank 16)
IA3_TARGETS = r".*/(k|v|wi_1|wi)$"                  # (IA)^3: keys, values, first FFN input


@dataclasses.dataclass(frozen=True)
class Kind:
  """An adapter kind.

  Attributes:
    name: AdapterConfig.kind.
    description: what the model holds.
    task_ids: the model reads a task id per example (a routing row or a private adapter per task).
    routed: the Poly / MHR inventory with routing logits (T, S, K).
    targets: the default AdapterConfig.target_modules.
    peft_type: the PEFT tuner an adapter of this kind exports to (checkpoints.export_peft), or None.
  """
  name: str
  description: str
  task_ids: bool = False
  routed: bool = False
  targets: str = ALL_LINEAR
  peft_type: str | None = None


KIND_TABLE: dict[str, Kind] = {k.name: k for k in (
    Kind("none", "the base model"),
    Kind("lora", "one LoRA shared by all tasks (shared LoRA; also what MHR-mu / Poly-mu become)",
         peft_type="LORA"),
    Kind("private_lora", "one LoRA per task (K = T); the task id picks it", task_ids=True),
    Kind("ia3", "(IA)^3: a learned output scale vector per targeted layer, init ones", targets=IA3_TARGETS,
         peft_type="IA3"),
    Kind("poly", "the routed inventory with one head (MHR with n_splits = 1)", task_ids=True, routed=True,
         peft_type="POLY"),
    Kind("mhr", "the routed inventory: K skills, S heads (n_splits), routing logits (T, S, K)", task_ids=True,
         routed=True, peft_type="POLY"),
)}
KINDS = tuple(KIND_TABLE)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Adapter settings; part of `models.T5Config` (field `adapter`).

  Attributes:
    kind: one of KINDS (KIND_TABLE).
    target_modules: regex matched (re.fullmatch) against a linear layer's module path, e.g.
      "encoder/block_0/self_attention/q" or "decoder/block_3/mlp/wo". None: the kind's default
      (KIND_TABLE: IA3_TARGETS for ia3, ALL_LINEAR, the authors' T0 placement, otherwise).
    rank: LoRA rank r (not split across heads).
    alpha: LoRA scale numerator; the delta is x A B * (alpha / rank).
    n_tasks: T, rows of the routing table (and number of private adapters).
    n_skills: K, adapter copies in the inventory.
    n_splits: S, routing heads; d_in and d_out of every targeted layer must be divisible by S.
    routing: "layer" (one routing matrix per adapted layer, fine-grained) or "shared" (one for the model).
    gumbel: relaxed-Bernoulli (Gumbel-sigmoid) routing in training; the authors' T0 setting turns it off.
    temperature: Gumbel-sigmoid temperature tau.
    init_a: "authors" (U(-b, b), b = sqrt(1/3)/sqrt(d_in), the authors' code; the default) or
      "kaiming" (PEFT: kaiming-uniform a=sqrt(5) with fan-in d_in/S, b = 1/sqrt(d_in/S)).
      LoRA and private LoRA use the same rule with S = 1. B always starts at zero, so a fresh
      adapted model computes exactly the base model.
    anneal_steps: anneal the routing toward uniform over the last N pre-training steps
      (w <- a w + (1 - a) / K with a = layers.anneal_factor(step, total_steps, anneal_steps),
      passed to the model as `routing_anneal`); 0 turns it off.
  """
  kind: str = "none"
  target_modules: str | None = None
  rank: int = 1
  alpha: float = 1.0
  n_tasks: int = 1
  n_skills: int = 8
  n_splits: int = 1
  routing: str = "layer"
  gumbel: bool = True
  temperature: float = 1.0
  init_a: str = "authors"
  anneal_steps: int = 0

  def __post_init__(self):
    checks = [
        (self.kind in KINDS, f"adapter.kind={self.kind!r}: expected one of {KINDS}"),
        (self.rank >= 1, f"adapter.rank={self.rank}: must be >= 1"),
        (self.alpha > 0, f"adapter.alpha={self.alpha}: must be > 0"),
        (self.anneal_steps >= 0, f"adapter.anneal_steps={self.anneal_steps}: must be >= 0"),
        (self.n_tasks >= 1, f"adapter.n_tasks={self.n_tasks}: must be >= 1"),
        (self.n_skills >= 1, f"adapter.n_skills={self.n_skills}: must be >= 1"),
        (self.n_splits >= 1, f"adapter.n_splits={self.n_splits}: must be >= 1"),
        (self.routing in ("layer", "shared"),
         f"adapter.routing={self.routing!r}: expected 'layer' or 'shared'"),
        (self.init_a in ("authors", "kaiming"),
         f"adapter.init_a={self.init_a!r}: expected 'authors' or 'kaiming'"),
        (self.temperature > 0, f"adapter.temperature={self.temperature}: must be > 0"),
        (not (self.kind == "poly" and self.n_splits != 1),
         f"adapter.n_splits={self.n_splits}: kind 'poly' is MHR with n_splits=1; use kind 'mhr'"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)
    try:
      re.compile(self.target_regex)
    except re.error as e:
      raise ValueError(f"adapter.target_modules={self.target_modules!r}: bad regex ({e})") from None

  @property
  def info(self) -> Kind:
    return KIND_TABLE[self.kind]

  @property
  def target_regex(self) -> str:
    return self.info.targets if self.target_modules is None else self.target_modules

  @property
  def routed(self) -> bool:
    return self.info.routed

  @property
  def uses_task_ids(self) -> bool:
    return self.info.task_ids

  def targets(self, path: str) -> bool:
    """Whether the linear layer at module path `path` carries an adapter."""
    return self.kind != "none" and re.fullmatch(self.target_regex, path) is not None

  def replace(self, **changes) -> "AdapterConfig":
    return dataclasses.replace(self, **changes)
