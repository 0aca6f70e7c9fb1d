"""The sharded train step: a pure function of (state, batch, rng), jit-compiled with shardings.

The parameters are split once, by their labels (optim.GROUPS), into `trainable` and `frozen`
trees. Gradients are taken with respect to `trainable` only, so frozen base weights are never
differentiated and get no optimizer state; the frozen tree is passed to the compiled step without
donation and handed back as is. `trainable`, `opt_state` and `step` are donated.

Objectives ("lm", "tfew", see losses.py) are pairs of functions: `counts(batch)` (normalisers,
from the batch alone) and `sums(model, params, batch, rng, train, loss_cfg, routing_anneal=None)`
(`routing_anneal`: the model's routing annealing factor, see AdapterConfig.anneal_steps; only
pre-training passes one). The step computes counts for
the whole batch first, then sums the gradients of sum/count over its micro-batches, so gradient
accumulation is exact (equals one big batch), whatever the padding of each micro-batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.core import FrozenDict

from mhr_jax.training import losses, optim
from mhr_jax import partitioning
from mhr_jax.adapters import anneal_factor
from mhr_jax.adapters.layers import check_task_ids
from mhr_jax.adapters import params as param_groups


@flax.struct.dataclass
class TrainState:
  """step: () int32 updates done.  trainable / frozen: nested dicts of the params in trained
  groups / the "frozen" group (together: the unboxed params).  opt_state: optimizer state of
  `trainable`.  labels: static, the group of every trainable leaf."""
  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any
  labels: FrozenDict = flax.struct.field(pytree_node=False)

  @property
  def params(self):
    """The full unboxed params tree."""
    return param_groups.combine(self.trainable, self.frozen)


# ---------------------------------------------------------------------------------------------
# Parameter trees.

def trainable_labels(labels) -> FrozenDict:
  flat = traverse_util.flatten_dict(dict(labels))
  return FrozenDict(traverse_util.unflatten_dict(
      {p: g for p, g in flat.items() if g != "frozen"}))


def dummy_inputs(model) -> dict:
  """Smallest valid model inputs, for init / eval_shape (param shapes do not depend on lengths)."""
  ones = jnp.ones((1, 1), jnp.int32)
  task_ids = jnp.zeros((1,), jnp.int32) if model.config.adapter.uses_task_ids else None
  return dict(encoder_input_tokens=ones, decoder_input_tokens=ones, decoder_target_tokens=ones,
              task_ids=task_ids)


def abstract_boxed_params(model):
  """The boxed (logically partitioned) params tree of `model`, as ShapeDtypeStructs."""
  init = functools.partial(model.init, enable_dropout=False, **dummy_inputs(model))
  key = jax.random.key(0)
  return jax.eval_shape(lambda: init({"params": key, "dropout": key}))["params"]


def _with_sharding(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _opt_state_shardings(abstract_opt_state, param_sharding_by_path, mesh):
  """Optimizer-state leaves shaped like a parameter (Adam moments, unfactored Adafactor moments)
  take that parameter's sharding; everything else (counts, factored row/column moments) is
  replicated. A state leaf belongs to the parameter whose path its key path ends with."""
  def one(keypath, leaf):
    names = []
    for key in reversed(keypath):
      if not isinstance(key, jax.tree_util.DictKey):
        break
      names.insert(0, str(key.key))
      match = param_sharding_by_path.get(tuple(names))
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return partitioning.replicated(mesh)
  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def abstract_train_state(model, labels, optimizer: optax.GradientTransformation,
                         mesh) -> TrainState:
  """The TrainState as ShapeDtypeStructs carrying their NamedShardings (for orbax restore and
  for `make_train_step`): the frozen base sharded by LOGICAL_RULES, adapters replicated."""
  optim.check_labels(labels)
  boxed = abstract_boxed_params(model)
  shardings = partitioning.param_shardings(boxed, mesh)
  abstract = nn.meta.unbox(boxed)
  abstract = _with_sharding(abstract, shardings)
  trainable, frozen = param_groups.partition(abstract, labels)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  by_path = {p: (a.shape, a.sharding)
             for p, a in traverse_util.flatten_dict(dict(trainable)).items()}
  opt_state = _with_sharding(opt_state, _opt_state_shardings(opt_state, by_path, mesh))
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=partitioning.replicated(mesh))
  return TrainState(step, trainable, frozen, opt_state, trainable_labels(labels))


def shardings_of(tree):
  """The `.sharding` of every leaf (jax.Arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def _check_params(params, abstract_params) -> None:
  flat = traverse_util.flatten_dict(dict(params))
  want = traverse_util.flatten_dict(dict(abstract_params))
  missing = sorted("/".join(p) for p in set(want) - set(flat))
  extra = sorted("/".join(p) for p in set(flat) - set(want))
  if missing or extra:
    raise ValueError(f"params do not match the model: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}")
  for path, spec in want.items():
    if tuple(flat[path].shape) != tuple(spec.shape):
      raise ValueError(f"param {'/'.join(path)}: shape {tuple(flat[path].shape)}, the model "
                       f"expects {tuple(spec.shape)}")


def init_train_state(model, params, labels, optimizer: optax.GradientTransformation,
                     mesh) -> TrainState:
  """Places unboxed `params` on the mesh and initialises the optimizer for the trainable part.

  Args:
    model: models.T5.  params: unboxed params (numpy or jax arrays; the same values on every host).
    labels: nested dict like params, leaves in optim.GROUPS.
    optimizer: from optim.make_optimizer.  mesh: from partitioning.make_mesh.
  Returns:
    TrainState with NamedSharded leaves. Arrays already placed as required may be shared with
    `params` (no copy); the train step never donates the frozen part.
  """
  abstract = abstract_train_state(model, labels, optimizer, mesh)
  _check_params(params, param_groups.combine(abstract.trainable, abstract.frozen))
  trainable, frozen = param_groups.partition(params, labels)
  trainable = jax.device_put(trainable, shardings_of(abstract.trainable))
  frozen = jax.device_put(frozen, shardings_of(abstract.frozen))
  opt_state = jax.jit(optimizer.init, out_shardings=shardings_of(abstract.opt_state))(trainable)
  step = jax.device_put(jnp.zeros((), jnp.int32), partitioning.replicated(mesh))
  return TrainState(step, trainable, frozen, opt_state, abstract.labels)


# ---------------------------------------------------------------------------------------------
# Objectives: forward pass -> {term: sum}; batch -> {term: count}.

class Objective(NamedTuple):
  counts: Callable[[dict], dict]
  sums: Callable[..., dict]


def _loss_weights(batch):
  weights = batch.get("decoder_loss_weights")
  if weights is None:
    weights = batch["decoder_target_tokens"] > 0
  return weights.astype(jnp.float32)


def _lm_counts(batch, loss_cfg):
  del loss_cfg
  return {"lm": jnp.sum(_loss_weights(batch))}


def _lm_sums(model, params, batch, rng, train, loss_cfg, routing_anneal=None):
  logits = model.apply(
      {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], encoder_segment_ids=batch.get("encoder_segment_ids"),
      decoder_segment_ids=batch.get("decoder_segment_ids"),
      encoder_positions=batch.get("encoder_positions"),
      decoder_positions=batch.get("decoder_positions"), task_ids=batch.get("task_ids"),
      enable_dropout=train, routing_anneal=routing_anneal, rngs={"dropout": rng})
  total, _ = losses.lm_loss(logits, batch["decoder_target_tokens"], _loss_weights(batch),
                            loss_cfg.label_smoothing)
  return {"lm": total}


def choice_logits(module, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                  task_ids=None, enable_dropout=False, routing_anneal=None):
  """Logits (B, C, Lt, V) of C answer choices per example; the input is encoded once.

  For `model.apply(..., method=choice_logits)`. decoder_*: (B, C, Lt).  task_ids: (B,) or None.
  routing_anneal: optional routing annealing factor, passed to both encode and decode.
  """
  encoded = module.encode(encoder_input_tokens, task_ids=task_ids, enable_dropout=enable_dropout,
                          routing_anneal=routing_anneal)
  b, c, length = decoder_input_tokens.shape
  rep = lambda x: None if x is None else jnp.repeat(x, c, axis=0)
  logits = module.decode(rep(encoded), rep(encoder_input_tokens),
                         decoder_input_tokens.reshape(b * c, length),
                         decoder_target_tokens.reshape(b * c, length), task_ids=rep(task_ids),
                         enable_dropout=enable_dropout, routing_anneal=routing_anneal)
  return logits.reshape(b, c, length, -1)


def _tfew_counts(batch, loss_cfg):
  del loss_cfg
  return losses.tfew_counts(_loss_weights(batch), batch["labels"])


def _tfew_sums(model, params, batch, rng, train, loss_cfg, routing_anneal=None):
  del loss_cfg
  logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                       batch.get("task_ids"), train, routing_anneal, method=choice_logits,
                       rngs={"dropout": rng})
  terms = losses.tfew_terms(logits, batch["decoder_target_tokens"], _loss_weights(batch),
                            batch["labels"])
  return {name: total for name, (total, _) in terms.items()}


OBJECTIVES = {"lm": Objective(_lm_counts, _lm_sums), "tfew": Objective(_tfew_counts, _tfew_sums)}


# ---------------------------------------------------------------------------------------------
# The step, as pieces that adaptation.py vmaps.

def _micro_batches(batch, k: int):
  """(B, ...) leaves -> (k, B/k, ...); micro-batch i holds rows i, k+i, 2k+i, ... so that every
  device keeps a contiguous share of each micro-batch."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                       f"OptimizerConfig.grad_accum_steps={k}")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def compute_gradients(model, loss_cfg: losses.LossConfig, trainable, frozen, batch, rng, *,
                      grad_accum_steps: int = 1, constrain: Callable | None = None,
                      routing_anneal=None):
  """Gradients of the objective with respect to `trainable` only.

  Args:
    batch: dict of (B, ...) arrays.  rng: PRNG key; micro-batch i uses fold_in(rng, i).
    grad_accum_steps: micro-batches the batch is split into (scanned, gradients summed).
    constrain: optional sharding constraint applied to the batch and to each micro-batch.
    routing_anneal: optional scalar routing annealing factor a (w <- a w + (1 - a) / K) for every
      forward pass; None leaves the routing as is.
  Returns:
    (grads like trainable, loss scalar, {term: sum}, {term: count}).
  """
  objective = OBJECTIVES[loss_cfg.kind]
  if constrain is not None:
    batch = constrain(batch)
  counts = objective.counts(batch, loss_cfg)

  def micro_loss(params_t, micro, key):
    if constrain is not None:
      micro = constrain(micro)
    params = param_groups.combine(params_t, frozen)
    sums = objective.sums(model, params, micro, key, True, loss_cfg,
                          routing_anneal=routing_anneal)
    return losses.combine_terms(sums, counts), sums

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if grad_accum_steps == 1:
    (loss, sums), grads = grad_fn(trainable, batch, jax.random.fold_in(rng, 0))
    return grads, loss, sums, counts

  def body(carry, xs):
    micro, i = xs
    (loss, sums), grads = grad_fn(trainable, micro, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (grads, loss, sums)), None

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  init = (zeros, jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in counts})
  (grads, loss, sums), _ = jax.lax.scan(
      body, init, (_micro_batches(batch, grad_accum_steps), jnp.arange(grad_accum_steps)))
  return grads, loss, sums, counts


def step_metrics(loss, sums, counts, grads, labels, opt_state) -> dict[str, jax.Array]:
  """Scalars for logging: loss (+ per term when several), tokens (non-pad target tokens; gold
  answer tokens for "tfew", which also reports examples), grad norms (total and per group),
  learning rates per group, and `nonfinite` (loss or a gradient is NaN/inf)."""
  metrics = {"loss": loss}
  if len(sums) > 1:
    for name in sums:
      metrics[f"loss/{name}"] = sums[name] / jnp.maximum(counts[name], 1e-9)
  metrics["tokens"] = counts["lm"]
  if "choice_ce" in counts:
    metrics["examples"] = counts["choice_ce"]
  metrics["grad_norm"] = optax.tree.norm(grads)
  for group, norm in optim.group_map(optax.tree.norm, grads, labels).items():
    metrics[f"grad_norm/{group}"] = norm
  for group, lr in optim.learning_rates(opt_state).items():
    metrics[f"learning_rate/{group}"] = lr
  metrics["nonfinite"] = ~(jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]))
  return metrics


def nonfinite_message(metrics, step) -> str | None:
  """None when the step was finite, else a one-line message naming the step and the groups."""
  if not bool(metrics["nonfinite"]):
    return None
  groups = [k.split("/", 1)[1] for k, v in metrics.items()
            if k.startswith("grad_norm/") and not np.isfinite(np.asarray(v))]
  return (f"non-finite loss ({float(metrics['loss'])}) or gradients at step {step}; "
          f"non-finite gradient groups: {groups or 'none (loss only)'}")


def update(optimizer, trainable, opt_state, grads):
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state


def check_host_task_ids(model, batch) -> None:
  """ValueError for task ids outside [0, adapter.n_tasks) in a host (NumPy) batch.

  Under jit an out-of-range id would silently take the last routing row (gathers clamp), so ids are
  checked where host data enters a compiled step; device arrays are the caller's responsibility.
  """
  acfg = model.config.adapter
  ids = batch.get("task_ids")
  if acfg.uses_task_ids and ids is not None and not isinstance(ids, jax.Array):
    check_task_ids(np.asarray(ids), acfg.n_tasks)


def _ensure_global(batch, mesh):
  if all(isinstance(x, jax.Array) for x in batch.values()):
    return batch
  return partitioning.global_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)


def _anneal_steps(model, total_steps: int | None) -> int:
  """The routing annealing window of `model` (0: off), checked against `total_steps`."""
  acfg = model.config.adapter
  if not (acfg.routed and acfg.anneal_steps > 0):
    return 0
  if total_steps is None:
    raise ValueError(f"AdapterConfig.anneal_steps={acfg.anneal_steps} needs the number of "
                     "training steps (RunConfig.train_steps) as make_train_step(total_steps=...)")
  if acfg.anneal_steps > total_steps:
    raise ValueError(f"AdapterConfig.anneal_steps={acfg.anneal_steps} exceeds "
                     f"RunConfig.train_steps={total_steps}")
  return acfg.anneal_steps


def make_train_step(model, optimizer: optax.GradientTransformation, loss_cfg: losses.LossConfig,
                    mesh, state_shardings: TrainState, *, grad_accum_steps: int = 1,
                    total_steps: int | None = None):
  """The jit-compiled update.

  Args:
    state_shardings: TrainState of NamedShardings (`shardings_of(abstract_train_state(...))`).
    grad_accum_steps: OptimizerConfig.grad_accum_steps; each batch is split into this many
      micro-batches whose gradients are summed before one optimizer update.
    total_steps: RunConfig.train_steps. Needed when the model's routing is annealed
      (AdapterConfig.anneal_steps > 0, kind poly / mhr): the update from `state.step` = n uses
      a = adapters.anneal_factor(n + 1, total_steps, anneal_steps), reported as the metric
      "routing_anneal".
  Returns:
    fn(state, batch, rng) -> (state, metrics). batch: dict of (B, ...) arrays, global jax.Arrays
    or host-local numpy (converted with partitioning.global_batch). The old state's trainable
    part and optimizer state are donated; metrics are replicated scalars (see step_metrics).
  Raises:
    ValueError: annealing is on and total_steps is None or smaller than anneal_steps.
  """
  anneal_steps = _anneal_steps(model, total_steps)
  labels = state_shardings.labels
  batch_sharding = partitioning.batch_sharding(mesh)
  repl = partitioning.replicated(mesh)
  mutable_shardings = (state_shardings.step, state_shardings.trainable, state_shardings.opt_state)
  constrain = functools.partial(partitioning.constrain_batch, mesh=mesh)

  def step(frozen, mutable, batch, rng):
    count, trainable, opt_state = mutable
    # The update being made is step count + 1 (1-based, as the training loop counts).
    anneal = anneal_factor(count + 1, total_steps, anneal_steps) if anneal_steps else None
    grads, loss, sums, counts = compute_gradients(
        model, loss_cfg, trainable, frozen, batch, rng, grad_accum_steps=grad_accum_steps,
        constrain=constrain, routing_anneal=anneal)
    trainable, opt_state = update(optimizer, trainable, opt_state, grads)
    metrics = step_metrics(loss, sums, counts, grads, labels, opt_state)
    if anneal is not None:
      metrics["routing_anneal"] = anneal
    return (count + 1, trainable, opt_state), metrics

  jitted = jax.jit(step, in_shardings=(state_shardings.frozen, mutable_shardings, batch_sharding,
                                       repl),
                   out_shardings=(mutable_shardings, repl), donate_argnums=(1,))

  def train_step(state: TrainState, batch, rng):
    check_host_task_ids(model, batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_RULES):
      (count, trainable, opt_state), metrics = jitted(
          state.frozen, (state.step, state.trainable, state.opt_state),
          _ensure_global(batch, mesh), rng)
    return state.replace(step=count, trainable=trainable, opt_state=opt_state), metrics

  train_step.jitted = jitted  # the compiled program, for ahead-of-time lowering (benchmarks)
  return train_step


def make_eval_step(model, loss_cfg: losses.LossConfig, mesh, state_shardings: TrainState):
  """fn(state, batch) -> {"loss", "sum/<term>", "count/<term>"} without dropout; sum the sums
  and counts over batches for an exact dataset loss."""
  objective = OBJECTIVES[loss_cfg.kind]
  batch_sharding = partitioning.batch_sharding(mesh)

  def evaluate(trainable, frozen, batch):
    batch = partitioning.constrain_batch(batch, mesh)
    counts = objective.counts(batch, loss_cfg)
    params = param_groups.combine(trainable, frozen)
    sums = objective.sums(model, params, batch, jax.random.key(0), False, loss_cfg)
    out = {"loss": losses.combine_terms(sums, counts)}
    out.update({f"sum/{k}": v for k, v in sums.items()})
    out.update({f"count/{k}": v for k, v in counts.items()})
    return out

  jitted = jax.jit(evaluate, in_shardings=(state_shardings.trainable, state_shardings.frozen,
                                           batch_sharding),
                   out_shardings=partitioning.replicated(mesh))

  def eval_step(state: TrainState, batch):
    check_host_task_ids(model, batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_RULES):
      return jitted(state.trainable, state.frozen, _ensure_global(batch, mesh))

  return eval_step
