"""Few-shot adaptation of N (task, seed) pairs as one compiled program.

Every pair has its own trained parameters, optimizer state, batch stream and PRNG key; all pairs
share the frozen base. One train step is `jax.vmap`ped over the pairs (in_axes None for the base),
so N adaptations cost one compilation and run as one batched program. Each pair's gradients are
clipped by its own global norm and its loss normalised by its own token count, exactly as N
separate runs of `train_step.make_train_step` would (tests/test_adaptation.py checks this).

Methods are the records of `adapters.methods.METHOD_TABLE`: what trains (`rules`), where a pair starts
(`start_params`: a fresh routing row or private adapter for the new task, which becomes the adapted
model's only task, id 0; or the skills averaged into one LoRA), and whether pairs vmap (`vmapped`; full
fine-tuning would need N copies of the base, so its pairs run one after another with the same compiled
program, giving the same results). From a plain base (no adapter in `params`), a method whose record
allows `control` starts from a freshly initialised adapter: the paper's control without multi-task
pre-training. The pre-trained `params` must be of a kind the record `adapts`.

PRNG convention for a pair with key k: fresh rows come from fold_in(k, 0); step s uses
fold_in(fold_in(k, 1), s) (micro-batch i inside it: fold_in(., i), as in train_step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Mapping, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from mhr_jax.models import param_counts
from mhr_jax.training import losses, optim
from mhr_jax import models, partitioning
from mhr_jax.training import train_step as ts
from mhr_jax.adapters import methods
from mhr_jax.adapters import params as param_groups
from mhr_jax.adapters import transforms

METHODS = methods.METHODS

BatchFn = Callable[[int], Mapping[str, np.ndarray]]


@dataclasses.dataclass
class AdaptationResult:
  """model_cfg / labels / frozen: the adapted model and its shared frozen params.
  trainable: the pairs' trained params, leaves (N, ...) (best-on-dev when selected).
  losses: (num_steps, N) training loss of every step.  dev_scores: (evaluations, N) selection scores
  (higher is better) or None.  best_step: (N,) step whose parameters were kept (num_steps without
  selection)."""
  model_cfg: models.T5Config
  labels: dict
  frozen: Any
  trainable: Any
  losses: np.ndarray
  dev_scores: np.ndarray | None
  best_step: np.ndarray

  @property
  def dev_losses(self) -> np.ndarray | None:
    """(evaluations, N) dev losses when the selection score was the negated dev loss."""
    return None if self.dev_scores is None else -self.dev_scores

  def pair_params(self, i: int) -> dict:
    """Full unboxed params of pair i (untrained pairs that start alike share one copy)."""
    i %= jax.tree.leaves(self.trainable)[0].shape[0]
    return param_groups.combine(jax.tree.map(lambda x: x[i], self.trainable), self.frozen)


def _has_adapter(model_cfg: models.T5Config, params) -> bool:
  """Whether `params` carry the adapter leaves of `model_cfg` (False: a plain base model)."""
  wanted = {p for p in traverse_util.flatten_dict(dict(param_counts.abstract_params(model_cfg)))
            if p[-1] in transforms.ADAPTER_LEAVES}
  present = set(traverse_util.flatten_dict(dict(params)))
  return not wanted or wanted <= present


def _fresh_adapter(model_cfg: models.T5Config, base_params, keys: jax.Array):
  """Per pair: a freshly initialised adapter of `model_cfg` (one task) on the base weights.

  Returns (cfg, [params of each pair]); the no-pre-training control of the paper's comparisons.
  """
  from mhr_jax.checkpoints import hf_t5  # pylint: disable=g-import-not-at-top
  cfg = model_cfg
  if cfg.adapter.uses_task_ids:
    cfg = cfg.replace(adapter=cfg.adapter.replace(n_tasks=1))
  model = models.T5(cfg)
  inputs = ts.dummy_inputs(model)
  init = jax.jit(lambda k: nn.unbox(model.init({"params": k, "dropout": k}, enable_dropout=False,
                                               **inputs))["params"])
  out = []
  for key in keys:
    params, report = hf_t5.merge_base_params(init(jax.random.fold_in(key, 0)), base_params)
    missing = [k for k in report.missing if k.split("/")[-1] not in transforms.ADAPTER_LEAVES
               and not k.endswith("routing/logits")]
    if missing:
      raise ValueError(f"the base model lacks weights the adapted model needs: {missing[:5]}")
    out.append(params)
  return cfg, out


def prepare_pairs(method: str, model_cfg: models.T5Config, params, keys: jax.Array):
  """Per-pair starting points for `method` (its record's `start_params`, adapters.methods).

  Args:
    model_cfg: the pre-trained model's config; when `params` is a plain base without that config's
      adapter leaves (pre-trained kind "none"), the adapter is initialised fresh for every pair (the
      no-pre-training control: the method's record must allow `control`).
    params: pre-trained unboxed params of `models.T5(model_cfg)` (or of its base).
    keys: (N,) PRNG keys, one per (task, seed) pair.
  Returns:
    (adapted model_cfg, labels, frozen params shared by all pairs, trainable params with
    leaves stacked (N, ...)).
  """
  info = methods.get(method)
  if _has_adapter(model_cfg, params):
    starts = [info.start_params(model_cfg, params, key) for key in keys]
    cfg, per_pair = starts[0][0], [p for _, p in starts]
  else:
    if not info.control:
      raise ValueError(f"adaptation method {info.name!r} needs a pre-trained adapter of kind "
                       f"{info.adapts}; the given params have no adapter")
    cfg, per_pair = _fresh_adapter(model_cfg, params, keys)
  labels = param_groups.param_labels(per_pair[0], info.rules)
  parts = [param_groups.partition(p, labels) for p in per_pair]
  trainable = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *[t for t, _ in parts])
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


class Resume(Protocol):
  """Where adaptation saves and finds its training state (fewshot.py backs it with orbax).

  `every`: save every this many steps (and at each pair group's last step, and whenever
  `stop_requested`). `restore(target)` returns (group, step, state) of the latest save, laid out like
  `target` (a state dict as `_initial_state` makes), or None. `save(group, step, state)` stores one (and
  may end the run by raising, e.g. after a SIGTERM). `stop_requested(step_id)` is asked after every step
  with an increasing step id (group * num_steps + step), the same sequence in every process (see
  `adapt`'s `sync_groups`), as JAX's preemption sync point requires."""
  every: int

  def restore(self, target: dict) -> tuple[int, int, dict] | None: ...

  def save(self, group: int, step: int, state: dict) -> None: ...

  def stop_requested(self, step_id: int) -> bool: ...


_TREES = ("trainable", "opt_state", "best")  # device trees, leaves (N, ...); the rest: NumPy arrays


def _eval_steps(num_steps: int, eval_every: int) -> list[int]:
  """The steps (1-based) after which best-on-dev selection scores the pairs."""
  if eval_every <= 0:
    return []
  return sorted({s for s in range(eval_every, num_steps + 1, eval_every)} | {num_steps})


def _initial_state(trainable, init_fn, num_steps: int, n_evals: int) -> dict:
  """Every pair's training state, stacked (N, ...); not-yet-run losses and scores are NaN."""
  n = jax.tree.leaves(trainable)[0].shape[0]
  return {"trainable": trainable, "opt_state": init_fn(trainable),
          "best": jax.tree.map(jnp.copy, trainable) if n_evals else None,
          "best_score": np.full((n,), -np.inf), "best_step": np.full((n,), num_steps, np.int64),
          "losses": np.full((num_steps, n), np.nan, np.float32),
          "scores": np.full((n_evals, n), np.nan, np.float64)}


def _with_group(state: dict, trees: dict, g: slice, whole: bool) -> dict:
  """`state` with the device trees of group g replaced (`whole`: g is every pair)."""
  out = dict(state)
  for k, v in trees.items():
    if v is not None:
      out[k] = v if whole else jax.tree.map(lambda full, part: jnp.asarray(full).at[g].set(part), state[k], v)
  return out


def _run_group(step_fn, select, model_cfg, frozen, state: dict, g: slice, keys, get_batch, *,
               start_step: int, num_steps: int, eval_steps: list[int], mesh, progress, on_step) -> dict:
  """Trains the pairs of group g from `start_step` to `num_steps`; returns the updated state.

  The group's device trees are sliced out once; the NumPy logs (losses, scores, best_*) are written
  in place. on_step(step, current) runs after every step; current() gives the whole state then (for
  checkpoints).
  """
  whole = g == slice(0, len(keys))
  place_tree, place_batch = _placer(mesh)
  trees = {k: None if state[k] is None else place_tree(state[k] if whole else _slice(state[k], g))
           for k in _TREES}
  group_keys = keys[g]
  pending = []  # (step, device loss): fetched in bulk, so the host never waits on every step

  def flush():
    for done, loss in zip([p for p, _ in pending], jax.device_get([x for _, x in pending])):
      state["losses"][done, g] = loss
    pending.clear()

  def current():
    flush()
    return _with_group(state, trees, g, whole)

  for step in range(start_step, num_steps):
    batch = place_batch(_pair_batch(_slice(get_batch(step), g), model_cfg))
    trees["trainable"], trees["opt_state"], metrics = step_fn(
        frozen, trees["trainable"], trees["opt_state"], batch, group_keys, step)
    pending.append((step, metrics["loss"]))
    if progress is not None:
      progress(1)
    if step + 1 in eval_steps:
      score = np.asarray(select(frozen, trees["trainable"], g), np.float64)
      better = score > state["best_score"][g]
      state["scores"][eval_steps.index(step + 1), g] = score
      state["best_score"][g] = np.where(better, score, state["best_score"][g])
      state["best_step"][g] = np.where(better, step + 1, state["best_step"][g])
      # New arrays, never aliases of `trainable`, which the next step donates.
      mask = jnp.asarray(better)
      trees["best"] = jax.tree.map(lambda b, t: jnp.where(mask.reshape((-1,) + (1,) * (t.ndim - 1)), t, b),
                                   trees["best"], trees["trainable"])
    if on_step is not None:
      on_step(step + 1, current)
  return current()


def _placer(mesh):
  """(place a pair-state tree, place a pair batch): replicated states, batches split per pair."""
  if mesh is None:
    return (lambda tree: tree), (lambda batch: batch)
  repl = partitioning.replicated(mesh)
  pair_batch = NamedSharding(mesh, P(None, partitioning.BATCH_AXES))
  return (lambda tree: jax.device_put(tree, repl)), (lambda batch: jax.device_put(batch, pair_batch))


def _slice(tree, g: slice):
  return jax.tree.map(lambda x: x[g], dict(tree) if isinstance(tree, Mapping) else tree)


def adapt(method: str, model_cfg: models.T5Config, params, opt_cfg: optim.OptimizerConfig,
          loss_cfg: losses.LossConfig, get_batch: BatchFn, keys: jax.Array, num_steps: int, *,
          dev_batches=None, select=None, eval_every: int = 0, sequential: bool | None = None,
          mesh=None, progress: Callable[[int], Any] | None = None,
          resume: Resume | None = None, sync_groups: int = 0) -> AdaptationResult:
  """Adapts N (task, seed) pairs at once.

  Args:
    method: one of METHODS.  model_cfg, params: the pre-trained model (unboxed params), or a plain
      base for a fresh adapter (see `prepare_pairs`).
    opt_cfg: optimizer for every pair (paper, T0: Adafactor 3e-3, routing 0.1, 1000 steps, batch 8).
    get_batch: step -> dict of numpy arrays with leaves (N, B, ...), pair i's batch at index i
      (task ids are replaced by 0 for the adapted model).
    keys: (N,) PRNG keys (e.g. jax.random.key(seed) folded with the task index).
    num_steps: updates per pair; 0 returns the pairs' starting points untrained (zero-shot evaluation
      of e.g. the skill-averaged "-mu" model, which equals uniform routing); pairs that would start
      alike then share one copy (`AdaptationResult.pair_params` maps every pair to it).
    dev_batches: optional list of pair batches (N, B, ...): with eval_every > 0 the parameters with
      the lowest dev loss are kept (the score is the negated loss).
    select: optional fn(model, frozen, trainable (n, ...), pairs: slice) -> (n,) dev scores of those
      pairs (`model` is the adapted models.T5), higher is better (e.g. dev ROUGE-L); with eval_every > 0
      it runs every eval_every steps and at the end, and each pair keeps its best parameters. Give
      `select` or `dev_batches`, not both.
    sequential: run pairs one at a time (default: when the method's record is not `vmapped`).
    mesh: optional; the frozen base is sharded by LOGICAL_RULES, pair states replicated, each
      pair's batch split over ('data', 'fsdp').
    progress: optional callable(k) after every step of every pair group (a progress bar's update;
      sequential runs make num_steps steps per pair).
    resume: optional `Resume`: the loop saves its state there and continues from the latest save,
      exactly (same batches, same random numbers).
    sync_groups: with several processes adapting their own pairs, the most pair groups any of them has:
      a process with fewer keeps asking `resume.stop_requested` through the missing groups' steps (doing
      nothing else), so that every process asks for the same step ids and a SIGTERM reaching any of them
      stops all at the same step.
  """
  info = methods.get(method)
  if num_steps < 0:
    raise ValueError(f"adaptation num_steps={num_steps}: must be >= 0")
  if dev_batches is not None and select is not None:
    raise ValueError("adapt: give select or dev_batches, not both")
  keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
  n_pairs = len(keys)
  # Untrained pairs that draw nothing of their own are one model: keep a single copy (full: the base).
  alike = num_steps == 0 and not info.draws_per_pair(model_cfg.adapter.kind)
  cfg, labels, frozen, trainable = prepare_pairs(info.name, model_cfg, params, keys[:1] if alike else keys)
  model = models.T5(cfg)
  if mesh is not None:
    shardings = partitioning.param_shardings(ts.abstract_boxed_params(model), mesh)
    _, frozen_shardings = param_groups.partition(shardings, labels)
    frozen = jax.device_put(frozen, frozen_shardings)
  if num_steps == 0:
    return AdaptationResult(cfg, labels, frozen, trainable, np.zeros((0, n_pairs), np.float32), None,
                            np.zeros((n_pairs,), np.int64))
  if dev_batches is not None:
    evaluate = make_adaptation_eval(model, loss_cfg)
    score = lambda f, t, g: -dev_loss(evaluate, f, t, [_slice(b, g) for b in dev_batches], cfg)  # noqa: E731
  else:
    score = None if select is None else functools.partial(select, model)
  eval_steps = _eval_steps(num_steps, eval_every) if score is not None else []
  optimizer = optim.make_optimizer(opt_cfg, labels, num_steps)
  sequential = (not info.vmapped) if sequential is None else sequential
  groups = [slice(0, n_pairs)] if not sequential else [slice(i, i + 1) for i in range(n_pairs)]
  # Built once: sequential pairs reuse the same compiled programs.
  step_fn = make_adaptation_step(model, optimizer, loss_cfg, grad_accum_steps=opt_cfg.grad_accum_steps)
  state = _initial_state(trainable, jax.jit(jax.vmap(optimizer.init)), num_steps, len(eval_steps))
  first_group, first_step = 0, 0
  if resume is not None:
    saved = resume.restore(state)
    if saved is not None:
      first_group, first_step, state = saved
      if progress is not None:
        progress(first_group * num_steps + first_step)

  def on_step(index, step, current):
    if resume is None:
      return
    stop = resume.stop_requested(index * num_steps + step)  # asked at every step: a sync point
    due = index < len(groups) and (step % resume.every == 0 or step == num_steps)
    if stop or due:
      resume.save(index, step, current())

  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(partitioning.LOGICAL_RULES))
    for index in range(first_group, max(len(groups), sync_groups)):
      start = first_step if index == first_group else 0
      if index >= len(groups):  # this process's pairs are done; the others' steps go on
        for step in range(start + 1, num_steps + 1):
          on_step(index, step, lambda: state)
        continue
      state = _run_group(step_fn, score, cfg, frozen, state, groups[index], keys, get_batch,
                         start_step=start, num_steps=num_steps, eval_steps=eval_steps, mesh=mesh,
                         progress=progress, on_step=functools.partial(on_step, index))
  final = state["best"] if eval_steps else state["trainable"]
  return AdaptationResult(cfg, labels, frozen, final, state["losses"],
                          state["scores"] if eval_steps else None, state["best_step"])
