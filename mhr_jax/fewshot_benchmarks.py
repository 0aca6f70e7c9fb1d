"""The benchmark side of few-shot adaptation: which (task, seed) pairs, their training batches, their
evaluation and the result tables (METHODS.md "Protocols").

- SuperNI-format sources ("superni", "synthetic"): a pair is (task, seed). It trains on the task's
  train_k<shots>_seed<seed> split with the LM loss and is evaluated on the task's test split (the first 100
  instances) by decoding (greedy, or beam search with AdaptConfig.num_beams): exact match and ROUGE-L, the
  official SuperNI metrics.
- T0 ("t0"): a pair is (held-out dataset, seed). It trains on the T-Few few-shot sample rendered with every
  original-task template (answer-choice batches, T-Few loss) and is evaluated by rank classification on
  each template's evaluation split: accuracy per template, median and mean over templates.

Used by `mhr_jax.train` (RunConfig.mode="adapt"); imports TensorFlow through mhr_jax.data.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np

from mhr_jax import data, evaluation, metrics
from mhr_jax.config import ConfigError, ExperimentConfig

TASK_ID = 0  # an adapted model's only task is the new one


def stack_pairs(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The pairs' batches stacked (N, B, ...); answer-choice arrays of datasets with fewer choices are
  padded with absent (all-zero) choices."""
  def stack(values):
    shape = np.max([v.shape for v in values], axis=0)
    return np.stack([np.pad(v, [(0, n - m) for n, m in zip(shape, v.shape)]) for v in values])
  return {k: stack([r[k] for r in rows]) for k in rows[0]}


class PairBatches:
  """step -> the N pair streams' next batches stacked (N, B, ...) (adaptation.adapt's get_batch).

  Steps come in order; with `keep_all` (pairs adapted one after another) every step's batch is kept for
  the next pair group.
  """

  def __init__(self, streams: Sequence[Iterator[dict]], keep_all: bool):
    self._streams, self._keep_all, self._made, self._next = streams, keep_all, {}, 0

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    while self._next <= step:
      rows = [next(s) for s in self._streams]
      if not self._keep_all:
        self._made.clear()
      self._made[self._next] = stack_pairs(rows)
      self._next += 1
    return self._made[step]


class SuperNIPairs:
  """(task, seed) pairs of a SuperNI-format source."""

  def __init__(self, cfg: ExperimentConfig, registration, vocabulary):
    a, d = cfg.adapt, cfg.data
    self._cfg, self._registration, self._vocabulary = cfg, registration, vocabulary
    tasks = list(a.tasks) or data.heldout_tasks(cfg, registration)
    unknown = [t for t in tasks if t not in registration.tasks]
    if unknown:
      raise ConfigError(f"AdaptConfig.tasks: unknown task(s) {unknown} in {d.source}")
    self.pairs = [(t, seed) for t in tasks for seed in a.seeds]
    self.description = f"{len(tasks)} task(s) x seeds {list(a.seeds)}, {a.shots} shots each"

  def train_streams(self, indices: Sequence[int]) -> list[Iterator[dict]]:
    """The training batch streams of pairs `indices`."""
    d, shots = self._cfg.data, self._cfg.adapt.shots
    return [data.train_batches(self._registration.tasks[t], f"train_k{shots}_seed{seed}", d.batch_size,
                               d.input_len, d.target_len, seed=seed) for t, seed in _at(self.pairs, indices)]

  def dev_batches(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Pairs `indices`' dev_k<shots>_seed<seed> splits as pair batches (n, B, ...), one pass (best-on-dev)."""
    d, shots = self._cfg.data, self._cfg.adapt.shots
    per_pair = [
        data.lm_eval_batches(data.eval_examples(self._registration.tasks[t], f"dev_k{shots}_seed{seed}"),
                             self._vocabulary, d.batch_size, d.input_len, d.target_len)
        for t, seed in _at(self.pairs, indices)]
    return [stack_pairs(rows) for rows in zip(*per_pair)]

  def _generate(self, model, params, examples, mesh) -> tuple[dict, list[str]]:
    d = self._cfg.data
    batches = data.generation_batches(examples, self._vocabulary, _eval_batch_size(self._cfg), d.input_len)
    tokens = evaluation.generate(model, params, batches, d.target_len, mesh=mesh, task_id=TASK_ID,
                                 num_beams=self._cfg.adapt.num_beams)
    predictions = evaluation.decode_texts(self._vocabulary, tokens)
    return metrics.superni_metrics(predictions, [ex["references"] for ex in examples]), predictions

  def evaluate(self, model, params, pair: int, mesh) -> dict:
    """Decoding of the pair's test split -> {"exact_match", "rougeL", "predictions": [str]}
    (predictions in the split's order, for the pair's result file)."""
    examples = data.eval_examples(self._registration.tasks[self.pairs[pair][0]], "test")
    scores, predictions = self._generate(model, params, examples, mesh)
    return {**scores, "predictions": predictions}

  def dev_scorer(self, mesh, indices: Sequence[int]):
    """adaptation.adapt's `select` for pairs `indices`: each pair's ROUGE-L on its dev_k<shots>_seed<seed>
    split, decoded as the test split (the authors keep the checkpoint with the best dev ROUGE-L)."""
    from mhr_jax.adapters import params as param_groups  # pylint: disable=g-import-not-at-top
    shots = self._cfg.adapt.shots
    dev = [data.eval_examples(self._registration.tasks[t], f"dev_k{shots}_seed{seed}")
           for t, seed in _at(self.pairs, indices)]

    def select(model, frozen, trainable, pairs: slice):
      scores = []
      for local, pair in enumerate(range(pairs.start, pairs.stop)):
        params = param_groups.combine(jax.tree.map(lambda x, i=local: x[i], trainable), frozen)
        scores.append(self._generate(model, params, dev[pair], mesh)[0]["rougeL"])
      return np.asarray(scores)
    return select

  @staticmethod
  def summary(rows: Sequence[Mapping]) -> tuple[dict, str]:
    """(superni_table of the rows, its Markdown: per task and the mean over tasks)."""
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for row in rows:
      per_seed.setdefault(row["seed"], {})[row["task"]] = {m: row[m] for m in ("exact_match", "rougeL")}
    table = metrics.superni_table(per_seed)
    markdown = metrics.markdown_table({**table["per_task"], "mean over tasks": table["aggregate"]})
    return table, markdown


class T0Pairs:
  """(held-out dataset, seed) pairs of the T0 protocol."""

  def __init__(self, cfg: ExperimentConfig, registration, vocabulary):
    from tasks import seqio_name  # pylint: disable=g-import-not-at-top
    a = cfg.adapt
    self._cfg, self._registration, self._vocabulary = cfg, registration, vocabulary
    datasets = list(a.tasks) or list(registration.fewshot_splits)
    unknown = [name for name in datasets if name not in registration.fewshot_splits]
    if unknown:
      raise ConfigError(f"AdaptConfig.tasks: unknown held-out dataset(s) {unknown}; the T0 catalog has "
                        f"{sorted(registration.fewshot_splits)}")
    self._mixtures = {name: seqio_name("t0", "eval", name) for name in datasets}
    self._splits = {name: dict(zip(a.seeds, registration.fewshot_splits[name])) for name in datasets}
    self.pairs = [(name, seed) for name in datasets for seed in a.seeds]
    shots = {name: int(re.search(r"_k(\d+)_", registration.fewshot_splits[name][0]).group(1))
             for name in datasets}
    self.description = f"{len(datasets)} held-out dataset(s) x seeds {list(a.seeds)}, T-Few shots {shots}"
    self._eval_batches: dict[str, list[tuple[str, list[dict]]]] = {}

  def train_streams(self, indices: Sequence[int]) -> list[Iterator[dict]]:
    """The training batch streams of pairs `indices`."""
    d = self._cfg.data
    return [data.choice_train_batches(self._mixtures[name], self._splits[name][seed], d.batch_size,
                                      d.input_len, d.target_len, seed=seed)
            for name, seed in _at(self.pairs, indices)]

  def _batches(self, dataset: str) -> list[tuple[str, list[dict]]]:
    """(template subset, its rank-classification batches) for every template of `dataset`. Pairs come
    dataset by dataset, so only the current dataset's batches are kept."""
    if dataset not in self._eval_batches:
      self._eval_batches.clear()
      d = self._cfg.data
      templates = self._registration.mixtures[self._mixtures[dataset]]
      self._eval_batches[dataset] = [
          (subset, list(data.rank_classification_batches(
              data.eval_examples(self._registration.tasks[subset], "eval"), self._vocabulary,
              _eval_batch_size(self._cfg), d.input_len, d.target_len)))
          for subset in templates]
    return self._eval_batches[dataset]

  def evaluate(self, model, params, pair: int, mesh) -> dict:
    """Rank classification of every template -> {"accuracy": {template: %}, "median_over_templates",
    "mean_over_templates", "predictions": {template: [chosen answer index]}}."""
    results = {subset: evaluation.rank_classification(model, params, batches, mesh=mesh, task_id=TASK_ID)
               for subset, batches in self._batches(self.pairs[pair][0])}
    accuracy = {subset: r.accuracy for subset, r in results.items()}
    values = list(accuracy.values())
    return {"accuracy": accuracy, "median_over_templates": float(np.median(values)),
            "mean_over_templates": float(np.mean(values)),
            "predictions": {subset: r.predictions.tolist() for subset, r in results.items()}}

  @staticmethod
  def summary(rows: Sequence[Mapping]) -> tuple[dict, str]:
    """(t0_table of the rows, its Markdown: per dataset and the average over datasets)."""
    accuracy: dict[str, dict[str, dict[int, float]]] = {}
    for row in rows:
      for subset, value in row["accuracy"].items():
        accuracy.setdefault(row["task"], {}).setdefault(subset, {})[row["seed"]] = value
    table = metrics.t0_table(accuracy)
    markdown = metrics.markdown_table({**table["per_dataset"], "average": table["average"]})
    return table, markdown


def _at(pairs: Sequence, indices: Sequence[int]) -> list:
  return [pairs[i] for i in indices]


def _eval_batch_size(cfg: ExperimentConfig) -> int:
  return cfg.adapt.eval_batch_size or cfg.data.batch_size


def fewshot_pairs(cfg: ExperimentConfig, registration, vocabulary) -> SuperNIPairs | T0Pairs:
  """The (task, seed) pairs of DataConfig.source and AdaptConfig."""
  return (T0Pairs if cfg.data.source == "t0" else SuperNIPairs)(cfg, registration, vocabulary)
