"""The data of few-shot adaptation: which (task, seed) pairs a run adapts, their training batches, their
dev batches and the examples they are evaluated on (docs/METHODS.md "Protocols"). Their evaluation and tables
are mhr_jax/evaluation/fewshot.py.

- SuperNI-format sources ("superni", "synthetic"): a pair is (task, seed). It trains on the task's
  train_k<shots>_seed<seed> split and is evaluated on the task's test split (the first 100 instances).
- T0 ("t0"): a pair is (held-out dataset, seed). It trains on the T-Few few-shot sample rendered with every
  original-task template (answer-choice batches) and is evaluated on each template's evaluation split.

Imports TensorFlow through mhr_jax.data.pipeline.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from mhr_jax.data import pipeline
from mhr_jax.data.replay import MEMO
from mhr_jax.errors import ConfigError


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


def eval_batch_size(cfg) -> int:
  """Examples per evaluation batch: AdaptConfig.eval_batch_size, else DataConfig.batch_size."""
  return cfg.adapt.eval_batch_size or cfg.data.batch_size


class SuperNIPairs:
  """(task, seed) pairs of a SuperNI-format source.

  Attributes: pairs ([(task, seed)]), description, source ("superni" or "synthetic"), vocabulary, data
  (the run's DataConfig), eval_batch_size and num_beams (AdaptConfig: how evaluation decodes).
  """

  def __init__(self, cfg, registration, vocabulary):
    a, d = cfg.adapt, cfg.data
    self.source, self.vocabulary, self.data, self.eval_batch_size = d.source, vocabulary, d, eval_batch_size(cfg)
    self.num_beams = a.num_beams
    self._shots, self._registration = a.shots, registration
    # What determines the pairs' data, for replaying it to the process's later stages (data/replay.py).
    self._data_key = (repr(d), d.data_dir or cfg.default_data_dir)
    tasks = list(a.tasks) or pipeline.heldout_tasks(d, registration)
    unknown = [t for t in tasks if t not in registration.tasks]
    if unknown:
      raise ConfigError(f"AdaptConfig.tasks: unknown task(s) {unknown} in {d.source}")
    self.pairs = [(t, seed) for t in tasks for seed in a.seeds]
    self.description = f"{len(tasks)} task(s) x seeds {list(a.seeds)}, {a.shots} shots each"

  def train_streams(self, indices: Sequence[int]) -> list[Iterator[dict]]:
    """The training batch streams of pairs `indices`."""
    d = self.data

    def stream(task: str, seed: int) -> Iterator[dict]:
      split = f"train_k{self._shots}_seed{seed}"
      return MEMO.stream((self._data_key, task, split), lambda: pipeline.train_batches(
          self._registration.tasks[task], split, d.batch_size, d.input_len, d.target_len, seed=seed))
    return [stream(t, seed) for t, seed in _at(self.pairs, indices)]

  def _examples(self, task: str, split: str) -> list[dict]:
    return MEMO.examples((self._data_key, task, split),
                         lambda: pipeline.eval_examples(self._registration.tasks[task], split))

  def dev_examples(self, pair: int) -> list[dict]:
    """The examples of the pair's dev_k<shots>_seed<seed> split (best-on-dev selection)."""
    task, seed = self.pairs[pair]
    return self._examples(task, f"dev_k{self._shots}_seed{seed}")

  def dev_batches(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Pairs `indices`' dev splits as pair batches (n, B, ...), one pass (best-on-dev by the dev loss)."""
    d = self.data
    per_pair = [pipeline.lm_eval_batches(self.dev_examples(i), self.vocabulary, d.batch_size, d.input_len,
                                         d.target_len) for i in indices]
    return [stack_pairs(rows) for rows in zip(*per_pair)]

  def test_examples(self, pair: int) -> list[dict]:
    """The examples of the pair's task's test split (the first 100 instances), in file order."""
    return self._examples(self.pairs[pair][0], "test")


class T0Pairs:
  """(held-out dataset, seed) pairs of the T0 protocol. Attributes as SuperNIPairs' (source "t0")."""

  def __init__(self, cfg, registration, vocabulary):
    from tasks import seqio_name  # pylint: disable=g-import-not-at-top
    a, d = cfg.adapt, cfg.data
    self.source, self.vocabulary, self.data, self.eval_batch_size = "t0", vocabulary, d, eval_batch_size(cfg)
    self._registration = registration
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
    self._template_batches: dict[str, list[tuple[str, list[dict]]]] = {}

  def train_streams(self, indices: Sequence[int]) -> list[Iterator[dict]]:
    """The training batch streams of pairs `indices`."""
    d = self.data
    return [pipeline.choice_train_batches(self._mixtures[name], self._splits[name][seed], d.batch_size,
                                          d.input_len, d.target_len, seed=seed)
            for name, seed in _at(self.pairs, indices)]

  def template_batches(self, pair: int) -> list[tuple[str, list[dict]]]:
    """(template subset, its rank-classification batches) for every template of the pair's dataset. Pairs
    come dataset by dataset, so only the current dataset's batches are kept."""
    dataset = self.pairs[pair][0]
    if dataset not in self._template_batches:
      self._template_batches.clear()
      d = self.data
      templates = self._registration.mixtures[self._mixtures[dataset]]
      self._template_batches[dataset] = [
          (subset, list(pipeline.rank_classification_batches(
              pipeline.eval_examples(self._registration.tasks[subset], "eval"), self.vocabulary,
              self.eval_batch_size, d.input_len, d.target_len)))
          for subset in templates]
    return self._template_batches[dataset]


def _at(pairs: Sequence, indices: Sequence[int]) -> list:
  return [pairs[i] for i in indices]


def fewshot_pairs(cfg, registration, vocabulary) -> SuperNIPairs | T0Pairs:
  """The (task, seed) pairs of DataConfig.source and AdaptConfig (cfg: a config.ExperimentConfig)."""
  return (T0Pairs if cfg.data.source == "t0" else SuperNIPairs)(cfg, registration, vocabulary)
