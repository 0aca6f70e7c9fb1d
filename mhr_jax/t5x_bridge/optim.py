"""Freezing and two-speed learning rates through T5X's optimizer API, and a trainer that logs them.

`MhrOptimizer` is a `t5x.optimizers.OptaxWrapper` around the project's optimizer recipe
(`mhr_jax.training.optim`): global-norm clipping, then per parameter group (labels from the rules of the
method's record in `adapters.methods`, or explicit (regex, group) rules)
  frozen    optax.set_to_zero: no update and no optimizer state
  adapters  Adafactor / AdamW at OptimizerConfig.adapter_lr, warmup then decay
  routing   the same at OptimizerConfig.routing_lr (docs/METHODS.md: about 100x the adapters')
  base      the same at OptimizerConfig.base_lr (full fine-tuning)
The chain has the same structure as `optim.make_optimizer`'s, so optimizer states convert between
T5X checkpoints and run checkpoints leaf for leaf (`t5x_bridge.checkpoints`).

T5X specifics handled here:
  - the label tree keeps T5X's container types (FrozenDict), as optax.multi_transform requires;
  - T5X's partitioner needs axis rules for every optax state it meets: rules for the project's
    Adafactor moments (optax.FactoredState, optim.LastTwoFactoredState) and ScheduleState are
    registered on import;
  - T5X's `learning_rate` metric is its `learning_rate_fn`, which an optax chain ignores:
    `MhrTrainer` logs `learning_rate/<group>`, the rate each group's last update used;
  - MHR-z trains only new routing rows: `update_routing_rows_from=T` zeroes the updates of rows < T.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import clu.metrics
import flax.core
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import PartitionSpec
from t5x import optimizers as t5x_optimizers
from t5x import trainer as t5x_trainer

from mhr_jax.training import optim
from mhr_jax.adapters import params as param_groups
from mhr_jax.checkpoints.packing import path_tokens

Rules = Sequence[tuple[str, str]]


def labels_like(params, rules: Rules) -> Any:
  """The group of every leaf of `params` (adapters.params.param_labels), in params' own containers."""
  labels = traverse_util.flatten_dict(param_groups.param_labels(flax.core.unfreeze(params), rules))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return treedef.unflatten([labels[tuple(path_tokens(path))] for path, _ in leaves])


def update_routing_rows_from(first_row: int) -> optax.GradientTransformation:
  """Zeroes the updates of routing rows < first_row (MHR-z: only the new tasks' rows move).

  Routing leaves are the `.../routing/logits` (T, S, K) arrays; other leaves pass unchanged.
  """
  def update(updates, state, params=None):
    del params

    def one(path, u):
      if tuple(path_tokens(path)[-2:]) != ("routing", "logits") or isinstance(u, optax.MaskedNode):
        return u
      keep = (jnp.arange(u.shape[0]) >= first_row).astype(u.dtype)
      return u * keep.reshape((-1,) + (1,) * (u.ndim - 1))
    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class MhrOptimizer(t5x_optimizers.OptaxWrapper):
  """T5X optimizer definition with parameter groups (see the module docstring).

  Args:
    config: optim.OptimizerConfig (name, adapter_lr, routing_lr, base_lr, schedule, warmup,
      clip_norm, weight_decay, ...). grad_accum_steps must be 1: T5X accumulates with
      Trainer.num_microbatches.
    method: a method of adapters.methods (gin: METHOD) whose record's rules label the parameters;
      ignored when `rules` is given.
    total_steps: TRAIN_STEPS, the length of the learning-rate schedules.
    rules: optional (regex, group) pairs, first full match wins; end with ('.*', 'frozen').
    update_routing_rows_from: when > 0, routing rows below it never move (MHR-z adaptation).
  """

  def __init__(self, config: optim.OptimizerConfig | None = None, method: str = "mhr",
               total_steps: int = 0, rules: Rules | None = None, update_routing_rows_from: int = 0):
    config = optim.OptimizerConfig() if config is None else config
    if total_steps < 1:
      raise ValueError(f"MhrOptimizer.total_steps={total_steps}: bind it to TRAIN_STEPS (>= 1)")
    if config.grad_accum_steps != 1:
      raise ValueError(f"OptimizerConfig.grad_accum_steps={config.grad_accum_steps}: under T5X use "
                       "trainer.Trainer.num_microbatches instead")
    self.config, self.total_steps = config, total_steps
    self.rules = tuple(rules) if rules is not None else tuple(param_groups.default_rules(method))
    for _, group in self.rules:
      if group not in param_groups.GROUPS:
        raise ValueError(f"MhrOptimizer rules: group {group!r} is not one of {param_groups.GROUPS}")
    self.update_routing_rows_from = update_routing_rows_from
    super().__init__(self._chain())

  def labels(self, params) -> Any:
    """The group name of every parameter, in the same containers as `params`."""
    return labels_like(params, self.rules)

  def _chain(self) -> optax.GradientTransformation:
    cfg = self.config
    # Same structure as optim.make_optimizer (clip, multi_transform over every group, optional
    # mask), so that its states map leaf for leaf onto run checkpoints.
    transforms = {"frozen": optax.set_to_zero()}
    for group in param_groups.TRAINED:
      if any(g == group for _, g in self.rules):
        schedule = optim.lr_schedule(cfg.peak_lr(group), cfg, self.total_steps)
        transforms[group] = optim.group_transform(cfg, schedule)
    chain = []
    if cfg.clip_norm is not None and cfg.clip_norm > 0:
      chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.multi_transform(transforms, self.labels))
    if self.update_routing_rows_from > 0:
      chain.append(update_routing_rows_from(self.update_routing_rows_from))
    return optax.chain(*chain)


# ------------------------------------------------------------------- partitioning of optax states

def _adafactor_state_axes(state, params_axes):
  """Logical axes of the project's Adafactor moments (optim.scale_by_factored_rms: optax.FactoredState
  for the "largest" factoring, optim.LastTwoFactoredState for "last_two"), as the project's trainer
  shards them (train_step.abstract_train_state):
    v             a full moment has its parameter's shape (a 0-D / 1-D parameter, a scanned stack of
                  them, or one whose dims are below Adafactor's factoring threshold): the parameter's
                  axes; a factored parameter keeps a (1,) placeholder: replicated
    v_row, v_col  row / column means of one parameter's view (a scanned stack's layers each, routing
                  logits (..., T, S, K) seen as (..., T, S*K)), or (1,) placeholders: replicated
                  (small; their rank differs from the parameter's)
  The full moment is told from the placeholder by its rank: a factored parameter has 2 or more dims.
  """
  def full_moment(axes, v):
    if isinstance(v, optax.MaskedNode):
      return v
    names = tuple(axes) if axes is not None else ()
    return PartitionSpec(*names) if len(v.shape) == len(names) else PartitionSpec()

  def replicated(axes, x):
    del axes
    return x if isinstance(x, optax.MaskedNode) else PartitionSpec()

  return type(state)(count=None, v_row=jax.tree.map(replicated, params_axes, state.v_row),
                     v_col=jax.tree.map(replicated, params_axes, state.v_col),
                     v=jax.tree.map(full_moment, params_axes, state.v))


def _schedule_state_axes(state: optim.ScheduleState, params_axes):
  del state, params_axes
  return optim.ScheduleState(count=None, learning_rate=None)


# T5X documents this table as the place to add optax states it does not know. FactoredState is set,
# not defaulted: the project's Adafactor keeps it per layer and per routing view, which a rule written
# for optax's own layout would mis-shape (this rule also fits optax's layout).
_RULES = t5x_optimizers.OptaxStatePartitionRules._RULES  # pylint: disable=protected-access
_RULES[optax.FactoredState] = _adafactor_state_axes
_RULES[optim.LastTwoFactoredState] = _adafactor_state_axes
_RULES.setdefault(optim.ScheduleState, _schedule_state_axes)


# -------------------------------------------------------------------------------- the trainer

class MhrTrainer(t5x_trainer.Trainer):
  """t5x.trainer.Trainer that logs the learning rate of each parameter group.

  `learning_rate_fn` is optional: MhrOptimizer schedules its own rates, so T5X's single
  `learning_rate` metric is replaced by `learning_rate/<group>` (adapters, routing, base).
  A model with the project's objective (`loss_config`) trains without microbatches: the objective
  normalises each term over the whole batch, which T5X's per-microbatch losses would not.
  """

  def __init__(self, model, train_state, partitioner, eval_names, summary_dir, train_state_axes,
               rng, learning_rate_fn=None, num_microbatches=None, weight_metrics_computer=None):
    if getattr(model, "loss_config", None) is not None and (num_microbatches or 1) > 1:
      raise ValueError(f"Trainer.num_microbatches={num_microbatches}: the model's loss_config "
                       f"(kind {model.loss_config.kind!r}) needs whole batches; use 1 or None")
    super().__init__(model=model, train_state=train_state, partitioner=partitioner,
                     eval_names=eval_names, summary_dir=summary_dir,
                     train_state_axes=train_state_axes, rng=rng,
                     learning_rate_fn=learning_rate_fn or (lambda step: jnp.zeros((), jnp.float32)),
                     num_microbatches=num_microbatches,
                     weight_metrics_computer=weight_metrics_computer)

  @functools.cached_property
  def _partitioned_train_step(self):
    def train_step(train_state, batch):
      new_state, metrics = t5x_trainer.train_with_lr(
          train_state, batch, learning_rate=self._learning_rate_fn(train_state.step),
          dropout_rng=self._get_step_rng(train_state.step), model=self._model,
          num_microbatches=self._num_microbatches,
          weight_metrics_computer=self._weight_metrics_computer,
          data_partition_spec=self._partitioner.data_partition_spec)
      if isinstance(self._model.optimizer_def, MhrOptimizer):
        metrics.pop("learning_rate", None)
        metrics.pop("learning_rate/current", None)
        for group, rate in optim.learning_rates(new_state.param_states).items():
          metrics[f"learning_rate/{group}"] = clu.metrics.Average.from_model_output(
              jnp.asarray([rate], jnp.float32))
      return new_state, metrics

    return self._partitioner.partition(
        train_step,
        in_axis_resources=(self._train_state_axes, self._partitioner.data_partition_spec),
        out_axis_resources=(self._train_state_axes, None),
        donate_argnums=(0,))
