"""Evaluation drivers: rank classification by batched scoring, generation by batched decoding.

Both take host-global NumPy batches as `data.rank_classification_batches` / `data.generation_batches`
yield them: every process passes the same batches (evaluation sets are small and deterministic), rows
whose `example_index` is -1 are padding, and results come back ordered by `example_index`.

With a mesh, the parameters are placed by the logical rules (the frozen base sharded over 'fsdp' /
'model'), each batch is split over ('data', 'fsdp') and the outputs come back replicated, so every
process holds all results (multi-host included). One program is compiled per (model, mesh, shapes).
No TensorFlow here: the batches come from mhr_jax.data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mhr_jax.evaluation import decoding, metrics
from mhr_jax import partitioning
from mhr_jax.training import train_step as ts
from mhr_jax.adapters.layers import check_task_ids


@dataclasses.dataclass(frozen=True)
class RankClassification:
  """scores: (N, C) length-normalised NLL per answer choice, +inf for absent choices.
  labels, predictions: (N,) gold and argmin choice.  accuracy: percent."""
  scores: np.ndarray
  labels: np.ndarray
  predictions: np.ndarray
  accuracy: float


# ---------------------------------------------------------------------------------------- placement


@functools.lru_cache(maxsize=32)
def _param_shardings(model, mesh: Mesh):
  # Tracing the model for its abstract params costs a fraction of a second: few-shot evaluation places the
  # params of every pair, and at every dev selection, for one model.
  return partitioning.param_shardings(ts.abstract_boxed_params(model), mesh)


def place_params(model, params, mesh: Mesh | None):
  """Unboxed params on the mesh by the logical rules (as training places them); as given without one."""
  params = nn.meta.unbox(params)
  if mesh is None:
    return params
  return jax.device_put(params, _param_shardings(model, mesh))


def _global_arrays(batch: Mapping[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
  """Host-global numpy rows (the same on every process) -> arrays split over ('data', 'fsdp'); each device
  takes its rows from its own process's copy."""
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  sharding = partitioning.batch_sharding(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.shape[0] % shards:
      raise ValueError(f"evaluation batch of {value.shape[0]} rows ('{key}') does not split over the "
                       f"{shards} mesh batch shards (MeshConfig.data x MeshConfig.fsdp); use a batch "
                       "size that is a multiple of it")
    out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
  return out


def _task_ids(model, batch: Mapping[str, np.ndarray], task_id: int | None):
  """Routing ids for the rows: None for models without task ids, else `task_id` for every row (an
  adapted model whose one task is the new one) or the batch's own ids."""
  if not model.config.adapter.uses_task_ids:
    return None
  rows = len(batch["encoder_input_tokens"])
  if task_id is not None:
    check_task_ids(np.asarray([task_id]), model.config.adapter.n_tasks)
    return np.full((rows,), task_id, np.int32)
  if "task_ids" not in batch:
    raise ValueError("evaluation batch has no 'task_ids' and no task_id was given; the model routes by task")
  ids = np.asarray(batch["task_ids"], np.int32)
  # Under jit an out-of-range id would take the last routing row silently: refuse it here.
  check_task_ids(ids[np.asarray(batch["example_index"]) >= 0] if "example_index" in batch else ids,
                 model.config.adapter.n_tasks)
  return ids


def _check_batch(batch: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"evaluation batch is missing {missing} (has {sorted(batch)})")


@contextlib.contextmanager
def _tracing_context(mesh: Mesh | None):
  """The mesh and logical rules the jitted programs trace under."""
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(partitioning.LOGICAL_RULES))
    yield


def _constrain(mesh: Mesh | None, **arrays):
  """Inside jit: rank-2+ leaves split over the batch axes, (B,) ids replicated (as training does)."""
  if mesh is None:
    return arrays
  present = {k: v for k, v in arrays.items() if v is not None}
  return {**arrays, **partitioning.constrain_batch(present, mesh)}


def _out_sharding(mesh: Mesh | None):
  return None if mesh is None else partitioning.replicated(mesh)


def _per_example(name: str, model, fn, params, batches, mesh, task_id, progress, *,
                 inputs: tuple[str, ...], host_keys: tuple[str, ...] = ()):
  """Runs fn(params, *batch[inputs], task_ids) over the batches, keeping the real rows (example_index >= 0).

  Returns (fn's outputs, {key: the batches' host_keys arrays}), both ordered by example_index.
  """
  params = place_params(model, params, mesh)
  indices, outputs, host = [], [], {k: [] for k in host_keys}
  for batch in batches:
    _check_batch(batch, (*inputs, *host_keys, "example_index"))
    ids = _task_ids(model, batch, task_id)
    arrays = _global_arrays({**{k: batch[k] for k in inputs}, **({} if ids is None else {"task_ids": ids})},
                            mesh)
    with _tracing_context(mesh):
      out = np.asarray(fn(params, *(arrays[k] for k in inputs), arrays.get("task_ids")))
    keep = np.asarray(batch["example_index"]) >= 0
    indices.append(np.asarray(batch["example_index"])[keep])
    outputs.append(out[keep])
    for k in host_keys:
      host[k].append(np.asarray(batch[k])[keep])
    if progress is not None:
      progress(int(keep.sum()))
  if not sum(len(i) for i in indices):
    raise ValueError(f"{name}: no examples")
  index = np.concatenate(indices)
  order = np.argsort(index, kind="stable")
  if np.any(np.diff(index[order]) == 0):
    raise ValueError(f"{name}: an example_index appears in more than one row")
  return np.concatenate(outputs)[order], {k: np.concatenate(v)[order] for k, v in host.items()}


# ------------------------------------------------------------------------------ rank classification


@functools.lru_cache(maxsize=32)
def _choice_nll_fn(model, mesh: Mesh | None):
  def nll(params, encoder_input_tokens, decoder_target_tokens, task_ids):
    a = _constrain(mesh, encoder_input_tokens=encoder_input_tokens,
                   decoder_target_tokens=decoder_target_tokens, task_ids=task_ids)
    _, mean_logprob, lengths = decoding.score_sequences(
        model, params, a["encoder_input_tokens"], a["decoder_target_tokens"], a["task_ids"])
    return jnp.where(lengths > 0, -mean_logprob, jnp.inf)
  return jax.jit(nll, out_shardings=_out_sharding(mesh))


def rank_classification(model, params, batches: Iterable[Mapping[str, np.ndarray]], *,
                        mesh: Mesh | None = None, task_id: int | None = None,
                        progress=None) -> RankClassification:
  """Scores every answer choice and picks the one with the lowest length-normalised NLL.

  Args:
    model: a `models.T5`; params: its parameters (boxed or unboxed).
    batches: from `data.rank_classification_batches`: encoder_input_tokens (B, Li),
      decoder_target_tokens (B, C, Lt), labels and example_index (B,) (-1: padding row), and task_ids
      (B,) when the model routes by task and `task_id` is None.
    mesh: shard the evaluation (B must be a multiple of the mesh batch shards).
    task_id: route every row with this id (e.g. 0 for a model adapted to one new task).
    progress: optional callable(rows_done) called after each batch (a progress bar's update).
  Returns:
    RankClassification over the N real examples, ordered by example_index.
  """
  fn = _choice_nll_fn(model, mesh)
  nll, host = _per_example("rank_classification", model, fn, params, batches, mesh, task_id, progress,
                           inputs=("encoder_input_tokens", "decoder_target_tokens"), host_keys=("labels",))
  scores, labels = nll.astype(np.float64), host["labels"]
  return RankClassification(scores, labels, metrics.rank_classification_predictions(scores),
                            metrics.rank_classification_accuracy(scores, labels))


# ---------------------------------------------------------------------------------------- generation


@functools.lru_cache(maxsize=32)
def _generate_fn(model, mesh: Mesh | None, max_decode_length: int, num_beams: int, length_penalty: float):
  def generate(params, encoder_input_tokens, task_ids):
    a = _constrain(mesh, encoder_input_tokens=encoder_input_tokens, task_ids=task_ids)
    if num_beams == 1:
      return decoding.greedy_decode(model, params, a["encoder_input_tokens"], max_decode_length,
                                    task_ids=a["task_ids"])
    tokens, _ = decoding.beam_search(model, params, a["encoder_input_tokens"], max_decode_length,
                                     num_beams, length_penalty, task_ids=a["task_ids"])
    return tokens
  return jax.jit(generate, out_shardings=_out_sharding(mesh))


def generate(model, params, batches: Iterable[Mapping[str, np.ndarray]], max_decode_length: int, *,
             mesh: Mesh | None = None, task_id: int | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, progress=None) -> np.ndarray:
  """Greedy (num_beams=1) or beam-search decoding of every example.

  Args:
    batches: from `data.generation_batches`: encoder_input_tokens (B, Li), example_index (B,) (-1:
      padding row), and task_ids (B,) when the model routes by task and `task_id` is None.
    max_decode_length: the most tokens generated per example (EOS included).
    model, params, mesh, task_id, progress: as `rank_classification`.
    num_beams, length_penalty: beam search as Hugging Face `generate` (early_stopping=False).
  Returns:
    (N, max_decode_length) int32 tokens ordered by example_index; 0 after EOS.
  """
  if num_beams < 1:
    raise ValueError(f"generate: num_beams={num_beams}: must be >= 1")
  fn = _generate_fn(model, mesh, int(max_decode_length), int(num_beams), float(length_penalty))
  tokens, _ = _per_example("generate", model, fn, params, batches, mesh, task_id, progress,
                           inputs=("encoder_input_tokens",))
  return tokens.astype(np.int32)


def decode_texts(vocabulary, tokens: np.ndarray, eos_id: int | None = None) -> list[str]:
  """Generated token rows -> strings, each cut at its first EOS (or padding 0)."""
  eos_id = vocabulary.eos_id if eos_id is None else eos_id
  texts = []
  for row in np.asarray(tokens).tolist():
    for stop in (eos_id, 0):
      if stop in row:
        row = row[:row.index(stop)]
    texts.append(vocabulary.decode(row))
  return texts
