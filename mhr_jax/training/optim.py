"""Optimizers with per-group ("two-speed") learning rates, warmup + decay, clipping, update masks.

Parameter groups come from a labels tree (same structure as the params, one string per leaf, see
`mhr_jax.adapters.params.param_labels`):
  frozen    never updated (set_to_zero; the train step does not even pass these to the optimizer)
  adapters  adapter weights (LoRA A/B, (IA)^3 scales), learning rate `adapter_lr`
  routing   routing logits, `routing_lr` (METHODS.md: about 100x the adapters', 0.1 vs 1e-3)
  base      base-model weights when they are trained (full fine-tuning), `base_lr`
The chain is: global-norm clipping over all trained leaves -> per group (Adafactor or Adam scaling,
optional decoupled weight decay, the group's scheduled learning rate) -> optional update mask
(MHR-z: only the new tasks' routing rows move, `adapters.params.routing_row_mask`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from mhr_jax.adapters.params import GROUPS, TRAINED as TRAINED_GROUPS
_NAMES = ("adafactor", "adamw")
_SCHEDULES = ("linear", "cosine", "constant")
_FACTORINGS = ("largest", "last_two")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer settings (gin-bindable).

  Attributes:
    name: "adafactor" (the paper's T0 setting: no parameter scaling, no relative step, the given
      learning rate, factored second moments, update clipping 1.0) or "adamw".
    adapter_lr, routing_lr, base_lr: peak learning rate of each trained group.
    schedule: decay after warmup, "linear" (to 0 at the last step), "cosine" (to 0) or "constant".
    warmup_steps: linear warmup length; None -> round(warmup_fraction * total_steps).
    warmup_fraction: paper: 6% of the steps.
    clip_norm: global gradient-norm clipping threshold (None or <= 0: off).
    weight_decay: decoupled weight decay, multiplied by the learning rate (0: off).
    b1, b2, eps: Adam moments (adamw only).
    adafactor_decay_rate: Adafactor second-moment decay exponent (beta2_t = 1 - t^-0.8).
    adafactor_factoring: which second moments Adafactor factors: "largest" (optax and T5X: the two
      largest dims, when both are at least adafactor_min_dim_to_factor; other params keep a full
      moment) or "last_two" (Hugging Face's Adafactor, which the paper's authors train with: the last
      two dims of every param with 2 or more dims).
    adafactor_min_dim_to_factor: the "largest" rule's threshold (optax / T5X default 128).
    adafactor_scale_parameter: multiply each param's step by max(1e-3, RMS(param)), as Hugging Face's
      Adafactor(scale_parameter=True) does; the authors set it False.
    grad_accum_steps: micro-batches per update; the train step splits each batch and sums their
      gradients exactly (token-weighted), see train_step.make_train_step.
  """
  name: str = "adafactor"
  adapter_lr: float = 1e-3
  routing_lr: float = 0.1
  base_lr: float = 1e-4
  schedule: str = "linear"
  warmup_steps: int | None = None
  warmup_fraction: float = 0.06
  clip_norm: float | None = 1.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  adafactor_decay_rate: float = 0.8
  adafactor_factoring: str = "largest"
  adafactor_min_dim_to_factor: int = 128
  adafactor_scale_parameter: bool = False
  grad_accum_steps: int = 1

  def __post_init__(self):
    checks = [
        (self.name in _NAMES, f"OptimizerConfig.name={self.name!r}: expected one of {_NAMES}"),
        (self.schedule in _SCHEDULES,
         f"OptimizerConfig.schedule={self.schedule!r}: expected one of {_SCHEDULES}"),
        (0.0 <= self.warmup_fraction < 1.0,
         f"OptimizerConfig.warmup_fraction={self.warmup_fraction}: must be in [0, 1)"),
        (self.warmup_steps is None or self.warmup_steps >= 0,
         f"OptimizerConfig.warmup_steps={self.warmup_steps}: must be >= 0"),
        (self.grad_accum_steps >= 1,
         f"OptimizerConfig.grad_accum_steps={self.grad_accum_steps}: must be >= 1"),
        (self.weight_decay >= 0, f"OptimizerConfig.weight_decay={self.weight_decay}: must be >= 0"),
        (self.adafactor_factoring in _FACTORINGS,
         f"OptimizerConfig.adafactor_factoring={self.adafactor_factoring!r}: expected one of {_FACTORINGS}"),
    ]
    for name in ("adapter_lr", "routing_lr", "base_lr"):
      checks.append((getattr(self, name) >= 0, f"OptimizerConfig.{name}: must be >= 0"))
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  def peak_lr(self, group: str) -> float:
    return {"adapters": self.adapter_lr, "routing": self.routing_lr, "base": self.base_lr}[group]


def warmup_steps(opt_cfg: OptimizerConfig, total_steps: int) -> int:
  if opt_cfg.warmup_steps is not None:
    return opt_cfg.warmup_steps
  return int(round(opt_cfg.warmup_fraction * total_steps))


def lr_schedule(peak: float, opt_cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Learning rate for update number `count` (0-based): linear warmup from 0, then decay.

  Warmup: peak * count / warmup (the first update has lr 0, as Hugging Face's schedules).
  Linear decay reaches 0 at count = total_steps; cosine follows 0.5 (1 + cos(pi t)).
  """
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps}: must be >= 1 (TRAIN_STEPS)")
  warmup = warmup_steps(opt_cfg, total_steps)
  if warmup > total_steps:
    raise ValueError(f"OptimizerConfig.warmup_steps={warmup} exceeds total_steps={total_steps}")
  decay_len = max(total_steps - warmup, 1)
  kind = opt_cfg.schedule

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    frac = jnp.clip((t - warmup) / decay_len, 0.0, 1.0)
    if kind == "linear":
      decay = 1.0 - frac
    elif kind == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(math.pi * frac))
    else:
      decay = jnp.ones_like(frac)
    warm = t / max(warmup, 1)
    return peak * jnp.where(t < warmup, warm, decay)

  return schedule


class ScheduleState(NamedTuple):
  """Update count and the learning rate used by the latest update (for logging)."""
  count: jax.Array
  learning_rate: jax.Array


def scale_by_schedule_descent(schedule: optax.Schedule) -> optax.GradientTransformation:
  """updates -> -lr(count) * updates, recording lr(count) in the state."""
  def init(params):
    del params
    return ScheduleState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

  def update(updates, state, params=None):
    del params
    lr = jnp.asarray(schedule(state.count), jnp.float32)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, ScheduleState(optax.safe_increment(state.count), lr)

  return optax.GradientTransformation(init, update)


def multiply_updates(mask: Mapping) -> optax.GradientTransformation:
  """Multiplies the updates of some leaves by fixed arrays (e.g. a 0/1 routing-row mask).

  Args:
    mask: nested dict holding a subset of the parameter paths; each leaf broadcasts against its
      parameter, e.g. (T, 1, 1) for routing logits (T, S, K). Paths absent from the updates tree
      (frozen leaves) are ignored.
  """
  flat_mask = traverse_util.flatten_dict(dict(mask))

  def update(updates, state, params=None):
    del params
    flat = traverse_util.flatten_dict(dict(updates))
    for path, m in flat_mask.items():
      if path in flat:
        flat[path] = (flat[path] * m).astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class LastTwoFactoredState(NamedTuple):
  """Adafactor second moments: per leaf, (row, column) means over its last two dims, or a full
  moment for 0-D / 1-D leaves (the other entry is then a placeholder of shape (1,))."""
  count: jax.Array
  v_row: Any
  v_col: Any
  v: Any


def scale_by_last_two_factored_rms(decay_rate: float = 0.8, epsilon: float = 1e-30
                                   ) -> optax.GradientTransformation:
  """Hugging Face's Adafactor scaling (transformers.optimization.Adafactor), without its learning rate.

  Every param with ndim >= 2 keeps row and column means of g^2 + epsilon over its last two dims (the
  leading dims are independent matrices); the update is g / sqrt(v_row v_col / mean(v_row)). Other
  params keep the full moment. beta2_t = 1 - t^(-decay_rate) at update t = 1, 2, ...
  """
  placeholder = lambda: jnp.zeros((1,), jnp.float32)  # noqa: E731

  def init(params):
    def rows(p):
      return jnp.zeros(p.shape[:-1], jnp.float32) if p.ndim >= 2 else placeholder()
    def cols(p):
      return jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32) if p.ndim >= 2 else placeholder()
    def full(p):
      return placeholder() if p.ndim >= 2 else jnp.zeros(p.shape, jnp.float32)
    return LastTwoFactoredState(jnp.zeros((), jnp.int32), jax.tree.map(rows, params),
                                jax.tree.map(cols, params), jax.tree.map(full, params))

  def update(updates, state, params=None):
    del params
    t = (state.count + 1).astype(jnp.float32)
    beta2 = 1.0 - t ** (-decay_rate)

    def one(g, v_row, v_col, v):
      g32 = g.astype(jnp.float32)
      sq = g32 * g32 + epsilon
      if g.ndim >= 2:
        v_row = beta2 * v_row + (1.0 - beta2) * jnp.mean(sq, axis=-1)
        v_col = beta2 * v_col + (1.0 - beta2) * jnp.mean(sq, axis=-2)
        row_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=-1, keepdims=True))[..., None]
        col_factor = jax.lax.rsqrt(v_col)[..., None, :]
        u = g32 * row_factor * col_factor
      else:
        v = beta2 * v + (1.0 - beta2) * sq
        u = g32 * jax.lax.rsqrt(v)
      return u.astype(g.dtype), v_row, v_col, v

    leaves, treedef = jax.tree.flatten(updates)
    moments = [treedef.flatten_up_to(m) for m in (state.v_row, state.v_col, state.v)]
    out = [one(g, *m) for g, *m in zip(leaves, *moments)]
    pick = lambda i: treedef.unflatten([o[i] for o in out])  # noqa: E731
    return pick(0), LastTwoFactoredState(optax.safe_increment(state.count), pick(1), pick(2), pick(3))

  return optax.GradientTransformation(init, update)


def group_transform(opt_cfg: OptimizerConfig, schedule) -> optax.GradientTransformation:
  """One group's scaling (Adafactor or Adam), optional decoupled weight decay, and its scheduled step."""
  if opt_cfg.name == "adafactor":
    if opt_cfg.adafactor_factoring == "last_two":
      factored = scale_by_last_two_factored_rms(opt_cfg.adafactor_decay_rate, epsilon=1e-30)
    else:
      factored = optax.scale_by_factored_rms(
          factored=True, decay_rate=opt_cfg.adafactor_decay_rate, step_offset=0,
          min_dim_size_to_factor=opt_cfg.adafactor_min_dim_to_factor, epsilon=1e-30)
    scaling = [factored, optax.clip_by_block_rms(1.0)]
    if opt_cfg.adafactor_scale_parameter:  # Hugging Face: lr x max(eps2 = 1e-3, RMS(param))
      scaling.append(optax.scale_by_param_block_rms(min_scale=1e-3))
  else:
    scaling = [optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)]
  decay = [optax.add_decayed_weights(opt_cfg.weight_decay)] if opt_cfg.weight_decay else []
  return optax.chain(*scaling, *decay, scale_by_schedule_descent(schedule))


def _labels_for(labels, params):
  """The labels of the leaves present in `params` (a sub-tree of the full params tree)."""
  flat_labels = traverse_util.flatten_dict(dict(labels))
  flat = traverse_util.flatten_dict(dict(params))
  missing = ["/".join(path) for path in flat if path not in flat_labels]
  if missing:
    raise ValueError(f"param_labels has no label for params {missing[:5]}")
  return traverse_util.unflatten_dict({path: flat_labels[path] for path in flat})


def check_labels(labels) -> None:
  """ValueError naming the first leaf whose label is not one of GROUPS."""
  for path, label in traverse_util.flatten_dict(dict(labels)).items():
    if label not in GROUPS:
      raise ValueError(f"param label {label!r} of {'/'.join(path)}: expected one of {GROUPS}")


def make_optimizer(opt_cfg: OptimizerConfig, labels, total_steps: int,
                   update_mask: Mapping | None = None) -> optax.GradientTransformation:
  """The training optimizer for a labelled parameter tree.

  Args:
    opt_cfg: OptimizerConfig.
    labels: nested dict, same structure as the (unboxed) params, leaves in GROUPS. The optimizer
      works on the full tree or on any sub-tree (the train step passes only the trained leaves,
      so frozen leaves never get optimizer state).
    total_steps: number of optimizer updates (TRAIN_STEPS), for the schedules.
    update_mask: optional nested dict {param path: multiplier}, applied to the final updates
      (MHR-z: `adapters.params.routing_row_mask`, a (T, 1, 1) 0/1 mask per routing leaf).
  Returns:
    An optax.GradientTransformation; `learning_rates(opt_state)` reads the current per-group lrs.
  """
  check_labels(labels)
  present = set(traverse_util.flatten_dict(dict(labels)).values())
  transforms: dict[str, optax.GradientTransformation] = {"frozen": optax.set_to_zero()}
  for group in TRAINED_GROUPS:
    transforms[group] = group_transform(
        opt_cfg, lr_schedule(opt_cfg.peak_lr(group), opt_cfg, total_steps))
  # multi_transform needs a transform for every label in use; unused groups cost nothing.
  transforms = {g: t for g, t in transforms.items() if g in present or g == "frozen"}
  chain = []
  if opt_cfg.clip_norm is not None and opt_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
  chain.append(optax.multi_transform(transforms, lambda params: _labels_for(labels, params)))
  if update_mask is not None:
    chain.append(multiply_updates(update_mask))
  return optax.chain(*chain)


def learning_rates(opt_state) -> dict[str, jax.Array]:
  """{group: learning rate used by the latest update} from a `make_optimizer` state."""
  rates = {}
  def visit(node):
    if isinstance(node, optax.MultiTransformState):
      for group, inner in node.inner_states.items():
        for leaf in jax.tree.leaves(inner, is_leaf=lambda x: isinstance(x, ScheduleState)):
          if isinstance(leaf, ScheduleState):
            rates[group] = leaf.learning_rate
      return True
    return False
  jax.tree.leaves(opt_state, is_leaf=visit)
  return rates


def group_map(fn: Callable[[Any], Any], tree, labels) -> dict[str, Any]:
  """{group: fn(list of leaves of `tree` in that group)} for the groups present in `tree`."""
  flat_labels = traverse_util.flatten_dict(dict(labels))
  buckets: dict[str, list] = {}
  for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
    buckets.setdefault(flat_labels[path], []).append(leaf)
  return {group: fn(leaves) for group, leaves in buckets.items()}
