"""Few-shot adaptation of N (task, seed) pairs as one compiled program.

Every pair has its own trained parameters, optimizer state, batch stream and PRNG key; all pairs
share the frozen base. One train step is `jax.vmap`ped over the pairs (in_axes None for the base),
so N adaptations cost one compilation and run as one batched program. Each pair's gradients are
clipped by its own global norm and its loss normalised by its own token count, exactly as N
separate runs of `train_step.make_train_step` would (tests/test_adaptation.py checks this).

Methods (METHODS.md "Few-shot adaptation variants"); the pre-trained `params` must match:
  poly, mhr          one fresh routing row for the new task (U(-1e-3, 1e-3), drawn per pair) and
                     the inventory train; the adapted model has adapter.n_tasks = 1 (task id 0).
  poly-z, mhr-z      the same fresh row trains alone; the inventory is frozen (shared by all pairs).
  poly-mu, mhr-mu    the skill-averaged inventory becomes one LoRA (transforms.to_mu), which trains.
  lora, ia3          the model's (shared) LoRA or (IA)^3 scales train.
  private_lora       a fresh private adapter for the new task trains.
  full               every weight trains. Stacking N copies of the base would multiply memory by N,
                     so pairs run one after another (`sequential`), each with the same compiled
                     program; results are identical to the vmapped form.

PRNG convention for a pair with key k: fresh rows come from fold_in(k, 0); step s uses
fold_in(fold_in(k, 1), s) (micro-batch i inside it: fold_in(., i), as in train_step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mhr_jax import losses, models, optim, partitioning
from mhr_jax import train_step as ts
from mhr_jax.adapters import params as param_groups
from mhr_jax.adapters import transforms

METHODS = ("poly", "mhr", "poly-z", "mhr-z", "poly-mu", "mhr-mu", "lora", "ia3",
           "private_lora", "full")
_NEW_TASK = ("poly", "mhr", "poly-z", "mhr-z", "private_lora")
_MU = ("poly-mu", "mhr-mu")

BatchFn = Callable[[int], Mapping[str, np.ndarray]]


@dataclasses.dataclass
class AdaptationResult:
  """model_cfg / labels / frozen: the adapted model and its shared frozen params.
  trainable: the pairs' trained params, leaves (N, ...) (best-on-dev when selected).
  losses: (num_steps, N) training loss of every step.  dev_losses: (evaluations, N) or None.
  best_step: (N,) step whose parameters were kept (num_steps without selection)."""
  model_cfg: models.T5Config
  labels: dict
  frozen: Any
  trainable: Any
  losses: np.ndarray
  dev_losses: np.ndarray | None
  best_step: np.ndarray

  def pair_params(self, i: int) -> dict:
    """Full unboxed params of pair i."""
    return param_groups.combine(jax.tree.map(lambda x: x[i], self.trainable), self.frozen)


def _method(method: str) -> str:
  key = method.lower().replace("_", "-")
  key = "private_lora" if key == "private-lora" else key
  if key not in METHODS:
    raise ValueError(f"adaptation method={method!r}: expected one of {METHODS}")
  return key


def prepare_pairs(method: str, model_cfg: models.T5Config, params, keys: jax.Array):
  """Per-pair starting points for `method`.

  Args:
    params: pre-trained unboxed params of `models.T5(model_cfg)`.
    keys: (N,) PRNG keys, one per (task, seed) pair.
  Returns:
    (adapted model_cfg, labels, frozen params shared by all pairs, trainable params with
    leaves stacked (N, ...)).
  """
  method = _method(method)
  n_pairs = len(keys)
  per_pair = []
  for i in range(n_pairs):
    cfg, p = model_cfg, params
    if method in _NEW_TASK or (method == "full" and cfg.adapter.uses_task_ids):
      cfg, p = transforms.add_task_rows(cfg, p, 1, jax.random.fold_in(keys[i], 0))
      cfg, p = transforms.select_task_rows(cfg, p, [cfg.adapter.n_tasks - 1])
    elif method in _MU:
      cfg, p = transforms.to_mu(cfg, p)
    per_pair.append((cfg, p))
  cfg = per_pair[0][0]
  labels = param_groups.param_labels(per_pair[0][1], method)
  parts = [param_groups.partition(p, labels) for _, p in per_pair]
  trainable = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                           *[t for t, _ in parts])
  return cfg, labels, parts[0][1], trainable


def _pair_batch(batch, model_cfg):
  """Pair batches (N, B, ...); the adapted model's only task is id 0."""
  batch = dict(batch)
  if model_cfg.adapter.uses_task_ids:
    batch["task_ids"] = np.zeros(np.shape(batch["encoder_input_tokens"])[:2], np.int32)
  else:
    batch.pop("task_ids", None)
  return batch


def make_adaptation_step(model, optimizer: optax.GradientTransformation,
                         loss_cfg: losses.LossConfig, *, grad_accum_steps: int = 1):
  """fn(frozen, trainable, opt_state, batch, keys, step) -> (trainable, opt_state, metrics).

  trainable / opt_state / batch / keys have a leading pair axis N (batch leaves (N, B, ...));
  frozen is shared. metrics: {"loss": (N,), "grad_norm": (N,)}. trainable and opt_state are
  donated.
  """
  def one(trainable, opt_state, batch, key, frozen, step):
    rng = jax.random.fold_in(jax.random.fold_in(key, 1), step)
    grads, loss, _, _ = ts.compute_gradients(model, loss_cfg, trainable, frozen, batch, rng,
                                             grad_accum_steps=grad_accum_steps)
    trainable, opt_state = ts.update(optimizer, trainable, opt_state, grads)
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  pairs = jax.vmap(one, in_axes=(0, 0, 0, 0, None, None))
  return jax.jit(lambda f, t, o, b, k, s: pairs(t, o, b, k, f, s), donate_argnums=(1, 2))


def make_adaptation_eval(model, loss_cfg: losses.LossConfig):
  """fn(frozen, trainable, batch) -> ({term: (N,) sums}, {term: (N,) counts}), no dropout."""
  objective = ts.OBJECTIVES[loss_cfg.kind]

  def one(trainable, batch, frozen):
    params = param_groups.combine(trainable, frozen)
    sums = objective.sums(model, params, batch, jax.random.key(0), False, loss_cfg)
    return sums, objective.counts(batch, loss_cfg)

  pairs = jax.vmap(one, in_axes=(0, 0, None))
  return jax.jit(lambda frozen, trainable, batch: pairs(trainable, batch, frozen))


def dev_loss(evaluate, frozen, trainable, dev_batches, model_cfg) -> np.ndarray:
  """(N,) exact loss of each pair over all `dev_batches` (sums and counts added up first).

  evaluate: from make_adaptation_eval.  dev_batches: pair batches, leaves (N, B, ...).
  """
  total_sums, total_counts = {}, {}
  for batch in dev_batches:
    sums, counts = evaluate(frozen, trainable, _pair_batch(batch, model_cfg))
    for k in sums:
      total_sums[k] = total_sums.get(k, 0.0) + np.asarray(sums[k], np.float64)
      total_counts[k] = total_counts.get(k, 0.0) + np.asarray(counts[k], np.float64)
  return sum(total_sums[k] / np.maximum(total_counts[k], 1e-9) for k in total_sums)


def _run_pairs(step_fn, init_fn, evaluate, model_cfg, frozen, trainable, keys, get_batch, *,
               num_steps, dev_batches, eval_every, mesh, progress):
  """The training loop over stacked pairs; returns (trainable, losses, dev_losses, best_step)."""
  place = lambda tree, sharding: tree if mesh is None else jax.device_put(tree, sharding)
  pair_batch_sharding = (None if mesh is None
                         else NamedSharding(mesh, P(None, partitioning.BATCH_AXES)))
  trainable = place(trainable, None if mesh is None else partitioning.replicated(mesh))
  opt_state = init_fn(trainable)
  n_pairs = len(keys)
  selecting = bool(dev_batches) and eval_every > 0
  best, best_loss = None, np.full((n_pairs,), np.inf)
  best_step = np.full((n_pairs,), num_steps)
  train_losses, dev_losses = [], []
  for step in range(num_steps):
    batch = place(_pair_batch(get_batch(step), model_cfg), pair_batch_sharding)
    trainable, opt_state, metrics = step_fn(frozen, trainable, opt_state, batch, keys, step)
    train_losses.append(metrics["loss"])
    if progress is not None:
      progress(1)
    if selecting and ((step + 1) % eval_every == 0 or step + 1 == num_steps):
      dev = dev_loss(evaluate, frozen, trainable, dev_batches, model_cfg)
      dev_losses.append(dev)
      better = dev < best_loss
      best_loss = np.where(better, dev, best_loss)
      best_step = np.where(better, step + 1, best_step)
      # New arrays, never aliases of `trainable`, which the next step donates.
      if best is None:
        best = jax.tree.map(jnp.copy, trainable)
      else:
        mask = jnp.asarray(better)
        best = jax.tree.map(lambda b, t: jnp.where(mask.reshape((-1,) + (1,) * (t.ndim - 1)),
                                                   t, b), best, trainable)
  final = best if selecting else trainable
  return (final, np.stack([np.asarray(x) for x in train_losses]),
          np.stack(dev_losses) if selecting else None, best_step)


def adapt(method: str, model_cfg: models.T5Config, params, opt_cfg: optim.OptimizerConfig,
          loss_cfg: losses.LossConfig, get_batch: BatchFn, keys: jax.Array, num_steps: int, *,
          dev_batches=None, eval_every: int = 0, sequential: bool | None = None,
          mesh=None, progress: Callable[[int], Any] | None = None) -> AdaptationResult:
  """Adapts N (task, seed) pairs at once.

  Args:
    method: one of METHODS.  model_cfg, params: the pre-trained model (unboxed params).
    opt_cfg: optimizer for every pair (paper, T0: Adafactor 3e-3, 1000 steps, batch 8).
    get_batch: step -> dict of numpy arrays with leaves (N, B, ...), pair i's batch at index i
      (task ids are replaced by 0 for the adapted model).
    keys: (N,) PRNG keys (e.g. jax.random.key(seed) folded with the task index).
    num_steps: updates per pair; 0 returns the pairs' starting points untrained (zero-shot evaluation
      of e.g. the skill-averaged "-mu" model, which equals uniform routing).
    dev_batches: optional list of pair batches (N, B, ...); with eval_every > 0 the parameters
      with the lowest dev loss (checked every eval_every steps and at the end) are returned.
    sequential: run pairs one at a time (default: only for "full").
    mesh: optional; the frozen base is sharded by LOGICAL_RULES, pair states replicated, each
      pair's batch split over ('data', 'fsdp').
    progress: optional callable(1) after every step of every pair group (a progress bar's update;
      sequential runs make num_steps steps per pair).
  """
  method = _method(method)
  if num_steps < 0:
    raise ValueError(f"adaptation num_steps={num_steps}: must be >= 0")
  keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
  cfg, labels, frozen, trainable = prepare_pairs(method, model_cfg, params, keys)
  model = models.T5(cfg)
  if mesh is not None:
    shardings = partitioning.param_shardings(ts.abstract_boxed_params(model), mesh)
    _, frozen_shardings = param_groups.partition(shardings, labels)
    frozen = jax.device_put(frozen, frozen_shardings)
  if num_steps == 0:
    return AdaptationResult(cfg, labels, frozen, trainable, np.zeros((0, len(keys)), np.float32), None,
                            np.zeros((len(keys),), np.int64))
  optimizer = optim.make_optimizer(opt_cfg, labels, num_steps)
  sequential = (method == "full") if sequential is None else sequential
  # Built once: sequential pairs reuse the same compiled programs.
  step_fn = make_adaptation_step(model, optimizer, loss_cfg,
                                 grad_accum_steps=opt_cfg.grad_accum_steps)
  run = functools.partial(_run_pairs, step_fn, jax.jit(jax.vmap(optimizer.init)),
                          make_adaptation_eval(model, loss_cfg), cfg, frozen,
                          num_steps=num_steps, eval_every=eval_every, mesh=mesh, progress=progress)
  groups = [slice(0, len(keys))] if not sequential else [slice(i, i + 1) for i in range(len(keys))]
  outs = []
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(partitioning.LOGICAL_RULES))
    for g in groups:
      part = lambda tree, g=g: jax.tree.map(lambda x: x[g], dict(tree))
      outs.append(run(part(trainable), keys[g], lambda s, part=part: part(get_batch(s)),
                      dev_batches=[part(b) for b in dev_batches] if dev_batches else None))
  trained = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[o[0] for o in outs])
  dev = None if outs[0][2] is None else np.concatenate([o[2] for o in outs], axis=1)
  return AdaptationResult(cfg, labels, frozen, trained,
                          np.concatenate([o[1] for o in outs], axis=1), dev,
                          np.concatenate([o[3] for o in outs]))
