"""Optimizers with per-group ("two-speed") learning rates, warmup + decay, clipping, update masks.

Parameter groups come from a labels tree (same structure as the params, one string per leaf, see
`mhr_jax.adapters.params.param_labels`):
  frozen    never updated (set_to_zero; the train step does not even pass these to the optimizer)
  adapters  adapter weights (LoRA A/B, (IA)^3 scales), learning rate `adapter_lr`
  routing   routing logits, `routing_lr` (docs/METHODS.md: about 100x the adapters', 0.1 vs 1e-3)
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
import numpy as np
import optax
from flax import traverse_util

from mhr_jax.adapters.params import GROUPS, TRAINED as TRAINED_GROUPS
from mhr_jax.models import layout

_NAMES = ("adafactor", "adamw")
_SCHEDULES = ("linear", "cosine", "constant")
_FACTORINGS = ("largest", "last_two")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer settings (gin-bindable).

  Attributes:
    name: "adafactor" (the authors' T0 optimizer: no relative step, the given learning rate,
      factored second moments, update clipping 1.0) or "adamw". Adafactor treats each layer of a
      scanned stack as its own parameter and routing logits as the authors' 2-D (T, S*K)
      (`adafactor_block`), so both layouts train alike.
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
      two dims of every param with 2 or more dims). Dims of a parameter, not of a stacked leaf.
    adafactor_min_dim_to_factor: the "largest" rule's threshold (optax / T5X default 128).
    adafactor_scale_parameter: multiply each param's step by max(1e-3, RMS(param)), as Hugging Face's
      Adafactor(scale_parameter=True) does. The authors' Poly / MHR pre-training sets it False; their
      T0 adaptation and LoRA / (IA)^3 pre-training keep Hugging Face's default, True.
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
  """Adafactor second moments of the "last_two" factoring (Hugging Face's): per leaf, row and column
  means over the last two dims of one parameter, or a full moment for 0-D / 1-D parameters (the
  other entries are then placeholders of shape (1,)). The "largest" factoring keeps the same fields
  in an optax.FactoredState."""
  count: jax.Array
  v_row: Any
  v_col: Any
  v: Any


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def adafactor_block(names: tuple[str, ...], shape) -> tuple[int, tuple[int, ...]]:
  """How Adafactor sees the leaf at path `names`: (layer axes, view shape).

  Each index of the leading layer axes (a scanned stack, `models.layout.layer_axes`) is a parameter
  of its own: moments, update clipping and parameter scaling never mix layers, so a scanned stack
  trains as its layers one by one. Routing logits (..., T, S, K) are viewed as the authors' 2-D
  parameter (..., T, S*K) (their `module_logits`), which is what gets factored.
  """
  shape = tuple(int(d) for d in shape)
  if names[-2:] == ("routing", "logits"):
    shape = shape[:-2] + (shape[-2] * shape[-1],)
  return layout.layer_axes(names), shape


def _factored_axes(view: tuple[int, ...], lead: int, factoring: str,
                   min_dim_to_factor: int) -> tuple[int, int] | None:
  """(a, b): the axes of `view` whose second moment is factored (row statistics average over b and keep
  a; column statistics average over a), or None for a full moment. "last_two": the last two axes of
  every parameter with 2 or more dims (Hugging Face); "largest": its two largest axes when both are at
  least min_dim_to_factor (optax and T5X: a = the second largest, b = the largest)."""
  dims = view[lead:]
  if len(dims) < 2:
    return None
  if factoring == "last_two":
    return len(view) - 2, len(view) - 1
  order = np.argsort(dims)  # the same tie order as optax's _factored_dims
  if dims[order[-2]] < min_dim_to_factor:
    return None
  return lead + int(order[-2]), lead + int(order[-1])


def _drop(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  return shape[:axis] + shape[axis + 1:]


def scale_by_factored_rms(factoring: str, decay_rate: float = 0.8, min_dim_to_factor: int = 128,
                          epsilon: float = 1e-30) -> optax.GradientTransformation:
  """Adafactor's scaling by a factored second moment, without its learning rate, layer by layer.

  Each parameter (see `adafactor_block`) with factored axes (a, b) keeps row means v_row (over b) and
  column means v_col (over a) of g^2 + epsilon; its update is g / sqrt(v_row v_col / mean_a(v_row)).
  Other parameters keep the full moment (param-shaped, so it shards like its parameter); the update is
  g / sqrt(v). beta2_t = 1 - t^(-decay_rate) at update t = 1, 2, ... "last_two" is Hugging Face's
  Adafactor (transformers.optimization.Adafactor), "largest" optax's scale_by_factored_rms; on
  parameters without layer axes both give their numbers. State: LastTwoFactoredState ("last_two") or
  optax.FactoredState ("largest"), with the moments per leaf.
  """
  if factoring not in _FACTORINGS:
    raise ValueError(f"OptimizerConfig.adafactor_factoring={factoring!r}: expected one of {_FACTORINGS}")
  state_type = LastTwoFactoredState if factoring == "last_two" else optax.FactoredState
  placeholder = lambda: jnp.zeros((1,), jnp.float32)  # noqa: E731

  def layout_of(path, leaf):
    lead, view = adafactor_block(_path_names(path), leaf.shape)
    return lead, view, _factored_axes(view, lead, factoring, min_dim_to_factor)

  def init(params):
    def moments(path, p):
      _, view, axes = layout_of(path, p)
      if axes is None:
        return placeholder(), placeholder(), jnp.zeros(p.shape, jnp.float32)
      a, b = axes
      return jnp.zeros(_drop(view, b), jnp.float32), jnp.zeros(_drop(view, a), jnp.float32), placeholder()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = [moments(path, p) for path, p in leaves]
    pick = lambda i: treedef.unflatten([o[i] for o in out])  # noqa: E731
    return state_type(jnp.zeros((), jnp.int32), pick(0), pick(1), pick(2))

  def update(updates, state, params=None):
    del params
    t = (state.count + 1).astype(jnp.float32)
    beta2 = 1.0 - t ** (-decay_rate)

    def one(path, g, v_row, v_col, v):
      _, view, axes = layout_of(path, g)
      sq = jnp.square(g.astype(jnp.float32)) + epsilon
      # x ** -0.5 as optax writes it: the "largest" factoring gives optax's numbers bit for bit.
      if axes is None:
        v = beta2 * v + (1.0 - beta2) * sq
        return (g.astype(jnp.float32) * v ** -0.5).astype(g.dtype), v_row, v_col, v
      a, b = axes
      g32, sq = g.astype(jnp.float32).reshape(view), sq.reshape(view)
      v_row = beta2 * v_row + (1.0 - beta2) * jnp.mean(sq, axis=b)
      v_col = beta2 * v_col + (1.0 - beta2) * jnp.mean(sq, axis=a)
      row_mean = jnp.mean(v_row, axis=a if a < b else a - 1, keepdims=True)
      row_factor = jnp.expand_dims((v_row / row_mean) ** -0.5, b)
      col_factor = jnp.expand_dims(v_col ** -0.5, a)
      u = (g32 * row_factor * col_factor).reshape(g.shape)
      return u.astype(g.dtype), v_row, v_col, v

    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    moments = [treedef.flatten_up_to(m) for m in (state.v_row, state.v_col, state.v)]
    out = [one(path, g, *m) for (path, g), *m in zip(leaves, *moments)]
    pick = lambda i: treedef.unflatten([o[i] for o in out])  # noqa: E731
    return pick(0), state_type(optax.safe_increment(state.count), pick(1), pick(2), pick(3))

  return optax.GradientTransformation(init, update)


def _layer_rms(path, x) -> jax.Array:
  """RMS of each parameter in leaf `x`: over every axis but its layer axes, kept as size-1 dims."""
  lead = layout.layer_axes(_path_names(path))
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(lead, x.ndim)), keepdims=True))


def clip_by_layer_rms(threshold: float) -> optax.GradientTransformation:
  """Adafactor's update clipping u / max(1, RMS(u) / threshold), per parameter: each layer of a
  scanned stack on its own (optax.clip_by_block_rms would take the RMS over the whole stack)."""
  def update(updates, state, params=None):
    del params
    def one(path, u):
      return (u / jnp.maximum(1.0, _layer_rms(path, u) / threshold)).astype(u.dtype)
    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_param_layer_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
  """Hugging Face's Adafactor(scale_parameter=True): each parameter's update times max(min_scale,
  RMS(param)), per layer of a scanned stack (as it was per layer before scanning)."""
  def update(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_param_layer_rms: update() needs the params")
    def one(path, u, p):
      return (u * jnp.maximum(min_scale, _layer_rms(path, p))).astype(u.dtype)
    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def group_transform(opt_cfg: OptimizerConfig, schedule) -> optax.GradientTransformation:
  """One group's scaling (Adafactor or Adam), optional decoupled weight decay, and its scheduled step.

  Adafactor is Hugging Face's order: factored scaling, update clipping at RMS 1.0, then the learning
  rate, times max(1e-3, RMS(param)) with adafactor_scale_parameter; every step per parameter as
  `adafactor_block` defines it (a scanned stack's layers and routing's 2-D view).
  """
  if opt_cfg.name == "adafactor":
    scaling = [scale_by_factored_rms(opt_cfg.adafactor_factoring, opt_cfg.adafactor_decay_rate,
                                     opt_cfg.adafactor_min_dim_to_factor, epsilon=1e-30),
               clip_by_layer_rms(1.0)]
    if opt_cfg.adafactor_scale_parameter:
      scaling.append(scale_by_param_layer_rms(min_scale=1e-3))
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
