"""Gradient alignment between training tasks (the MHR paper's evidence of better multi-task optimisation):
each task's exact gradient over its own batches, and the cosines between tasks per adapted layer."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mhr_jax import config as config_lib
from mhr_jax import models
from mhr_jax.adapters import params as params_lib
from mhr_jax.analysis.routing import layer_sort_key
from mhr_jax.errors import RunError
from mhr_jax.training import losses, train_step


def _cosine_matrix(g: np.ndarray) -> np.ndarray:
  """(T, P) -> (T, T) cosines in float64; NaN where a row is all zeros (the cosine is undefined)."""
  g = np.asarray(g, np.float64).reshape(g.shape[0], -1)
  norms = np.linalg.norm(g, axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    out = (g @ g.T) / np.outer(norms, norms)
  out[(norms == 0)[:, None] | (norms == 0)[None, :]] = np.nan
  return out


def off_diagonal_mean(m: np.ndarray) -> float:
  """Mean over task pairs i != j, ignoring undefined (NaN) entries; NaN when there are none."""
  values = m[~np.eye(m.shape[0], dtype=bool)]
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def gradient_alignment(per_task_grads: Mapping[str, np.ndarray]) -> dict:
  """Pairwise cosine similarity of per-task gradients, per layer and averaged over layers.

  Args:
    per_task_grads: {layer: (T, ...) array}, row t the gradient of task t with respect to that layer's
      parameters (trailing axes are flattened), e.g. from `task_gradients`.
  Returns:
    {"per_layer": {layer: (T, T) cosines}, "per_layer_mean": {layer: mean over task pairs i != j},
     "matrix": (T, T) the per-layer cosines averaged over layers, "mean_pairwise_cosine": mean of
     "matrix" over pairs i != j}. A cosine involving an all-zero gradient is undefined (NaN) and left
    out of the averages.
  """
  if not per_task_grads:
    raise ValueError("gradient_alignment: no layers")
  per_layer = {layer: _cosine_matrix(g) for layer, g in per_task_grads.items()}
  sizes = {m.shape[0] for m in per_layer.values()}
  if len(sizes) != 1:
    raise ValueError(f"gradient_alignment: layers disagree on the number of tasks ({sorted(sizes)})")
  stack = np.stack(list(per_layer.values()))
  defined = np.isfinite(stack)
  with np.errstate(invalid="ignore"):
    matrix = np.where(defined, stack, 0.0).sum(0) / defined.sum(0)
  return {"per_layer": per_layer,
          "per_layer_mean": {layer: off_diagonal_mean(m) for layer, m in per_layer.items()},
          "matrix": matrix, "mean_pairwise_cosine": off_diagonal_mean(matrix)}


def gradient_group(cfg: config_lib.ExperimentConfig) -> str:
  """The parameter group whose gradients are compared: "adapters", or "base" for kind "none"."""
  return "base" if cfg.model.adapter.kind == "none" else "adapters"


def gradient_leaves(cfg: config_lib.ExperimentConfig, params) -> list[tuple[str, ...]]:
  """Paths of the leaves in `gradient_group` under the run's parameter rules (config.param_rules)."""
  group = gradient_group(cfg)
  labels = traverse_util.flatten_dict(params_lib.param_labels(params, config_lib.param_rules(cfg), require_trainable=False))
  leaves = [path for path, label in labels.items() if label == group]
  if not leaves:
    raise RunError(f"the run's parameter rules train no {group!r} parameters (RunConfig.param_rules"
                        f"={cfg.run.param_rules}): no gradients to compare")
  return leaves


def task_gradients(model_cfg, loss_cfg: losses.LossConfig, params, leaves: Sequence[tuple[str, ...]],
                   task_batches: Sequence[Sequence[Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
  """Per-task gradients of the training objective, grouped by layer.

  Args:
    model_cfg: the T5Config.  loss_cfg: the run's LossConfig.  params: unboxed params.
    leaves: paths of the leaves to differentiate (e.g. `gradient_leaves`); the rest is held fixed.
    task_batches: task_batches[t] is the list of batches (dicts of NumPy arrays, as
      data.train_batches yields them) of task t; every batch must have the same shapes.
  Returns:
    {layer path: (T, P_layer) float32}: row t is the gradient of task t's objective over the union of
    its batches (sum of term sums / sum of term counts, as the train step normalises a batch), flattened
    and concatenated over the layer's leaves in path order. Computed without dropout or routing noise.
  """
  model = models.T5(model_cfg)
  objective = train_step.OBJECTIVES[loss_cfg.kind]
  chosen = set(leaves)
  flat = traverse_util.flatten_dict(params)
  measured = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p in chosen})
  rest = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in chosen})

  @jax.jit
  def batch_grads(measured, rest, batch, counts):
    def loss(m):
      sums = objective.sums(model, params_lib.combine(m, rest), batch, jax.random.key(0), False, loss_cfg)
      return losses.combine_terms(sums, counts)
    return jax.grad(loss)(measured)

  counts_of = jax.jit(lambda batch: objective.counts(batch, loss_cfg))
  by_layer: dict[str, list[tuple[str, ...]]] = {}
  for path in sorted(chosen):
    by_layer.setdefault("/".join(path[:-1]), []).append(path)
  layer_names = sorted(by_layer, key=layer_sort_key)
  out: dict[str, np.ndarray] = {}
  for t, batches in enumerate(task_batches):
    # The objective's normalisers over all of the task's batches first: the summed per-batch gradients
    # are then exactly the gradient of the union's token-mean loss.
    counts = None
    for batch in batches:
      c = counts_of(batch)
      counts = c if counts is None else jax.tree.map(jnp.add, counts, c)
    grads = None
    for batch in batches:
      g = batch_grads(measured, rest, batch, counts)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    flat_grads = traverse_util.flatten_dict(jax.device_get(grads))
    for layer in layer_names:
      row = np.concatenate([np.asarray(flat_grads[p], np.float32).ravel() for p in by_layer[layer]])
      if layer not in out:
        out[layer] = np.zeros((len(task_batches), row.size), np.float32)
      out[layer][t] = row
  return out


def task_batches_for(cfg: config_lib.ExperimentConfig, seqio_name: str, n_batches: int,
                     batch_size: int) -> list[dict]:
  """The first `n_batches` training batches of one registered SeqIO task (the run's lengths and seed)."""
  from mhr_jax.data import pipeline as data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  d = cfg.data
  stream = data.train_batches(seqio_name, d.split, batch_size, d.input_len, d.target_len, pack=d.pack,
                              seed=cfg.run.seed)
  try:
    return [next(stream) for _ in range(n_batches)]
  except StopIteration:
    raise RunError(f"task {seqio_name!r}: no {d.split!r} examples") from None
