"""Evaluating adapted few-shot pairs and tabulating them (docs/METHODS.md "Protocols"); the pairs and their
data are mhr_jax/data/fewshot.py.

- SuperNI-format sources: decoding of the test split (greedy, or beam search with AdaptConfig.num_beams);
  exact match and ROUGE-L, the official SuperNI metrics; best-on-dev scores each pair's dev ROUGE-L the same
  way.
- T0: rank classification of each template's evaluation split; accuracy per template, median and mean over
  templates.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from mhr_jax import partitioning
from mhr_jax.adapters import params as param_groups
from mhr_jax.data.fewshot import SuperNIPairs, T0Pairs
from mhr_jax.evaluation import drivers, metrics

TASK_ID = 0  # an adapted model's only task is the new one


def decode_batch_size(n_examples: int, eval_batch_size: int, shards: int = 1) -> int:
  """The batch that decodes a split of n_examples: eval_batch_size, or for a smaller split (a 16-example dev
  split against a batch of 100) the smallest power of two that holds it, rounded up to a multiple of the
  mesh's batch shards. Padding rows cost as much as real ones, and powers of two keep the compiled shapes
  few. eval_batch_size is itself a multiple of shards (config.check_config)."""
  fitted = max(1 << max(n_examples - 1, 0).bit_length(), shards)
  return min(eval_batch_size, -(-fitted // shards) * shards)


def _generate(benchmark: SuperNIPairs, model, params, examples, mesh) -> tuple[dict, list[str]]:
  """(official metrics, predictions) of greedy decoding of `examples`."""
  from mhr_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  d = benchmark.data
  shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in partitioning.BATCH_AXES]))
  batch_size = decode_batch_size(len(examples), benchmark.eval_batch_size, shards)
  batches = pipeline.generation_batches(examples, benchmark.vocabulary, batch_size, d.input_len)
  tokens = drivers.generate(model, params, batches, d.target_len, mesh=mesh, task_id=TASK_ID,
                            num_beams=benchmark.num_beams)
  predictions = drivers.decode_texts(benchmark.vocabulary, tokens)
  return metrics.superni_metrics(predictions, [ex["references"] for ex in examples]), predictions


def evaluate(benchmark: SuperNIPairs | T0Pairs, model, params, pair: int, mesh) -> dict:
  """The metrics of one adapted pair, with its predictions (for the pair's result file).

  SuperNI-format: {"exact_match", "rougeL", "predictions": [str]} (predictions in the test split's order).
  T0: {"accuracy": {template: %}, "median_over_templates", "mean_over_templates",
  "predictions": {template: [chosen answer index]}}.
  """
  if isinstance(benchmark, SuperNIPairs):
    scores, predictions = _generate(benchmark, model, params, benchmark.test_examples(pair), mesh)
    return {**scores, "predictions": predictions}
  results = {subset: drivers.rank_classification(model, params, batches, mesh=mesh, task_id=TASK_ID)
             for subset, batches in benchmark.template_batches(pair)}
  accuracy = {subset: r.accuracy for subset, r in results.items()}
  values = list(accuracy.values())
  return {"accuracy": accuracy, "median_over_templates": float(np.median(values)),
          "mean_over_templates": float(np.mean(values)),
          "predictions": {subset: r.predictions.tolist() for subset, r in results.items()}}


def dev_scorer(benchmark: SuperNIPairs, mesh, indices: Sequence[int]):
  """adaptation.adapt's `select` for pairs `indices` (a SuperNI-format benchmark): each pair's ROUGE-L on
  its dev split, decoded as the test split (the authors keep the checkpoint with the best dev ROUGE-L)."""
  dev = [benchmark.dev_examples(i) for i in indices]

  def select(model, frozen, trainable, pairs: slice):
    scores = []
    for local, pair in enumerate(range(pairs.start, pairs.stop)):
      params = param_groups.combine(jax.tree.map(lambda x, i=local: x[i], trainable), frozen)
      scores.append(_generate(benchmark, model, params, dev[pair], mesh)[0]["rougeL"])
    return np.asarray(scores)
  return select


def summary(source: str, rows: Sequence[Mapping]) -> tuple[dict, str]:
  """(table of the evaluated pairs' rows, its Markdown). SuperNI-format: superni_table, per task and the
  mean over tasks; T0: t0_table, per dataset and the average over datasets."""
  if source != "t0":
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for row in rows:
      per_seed.setdefault(row["seed"], {})[row["task"]] = {m: row[m] for m in ("exact_match", "rougeL")}
    table = metrics.superni_table(per_seed)
    return table, metrics.markdown_table({**table["per_task"], "mean over tasks": table["aggregate"]})
  accuracy: dict[str, dict[str, dict[int, float]]] = {}
  for row in rows:
    for subset, value in row["accuracy"].items():
      accuracy.setdefault(row["task"], {}).setdefault(subset, {})[row["seed"]] = value
  table = metrics.t0_table(accuracy)
  return table, metrics.markdown_table({**table["per_dataset"], "average": table["average"]})
