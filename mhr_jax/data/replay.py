"""Replaying the few-shot pairs' data across the adaptation stages of one process.

Every adaptation stage of an experiment (one per method) trains the same (task, seed) pairs on the same
batch streams and evaluates them on the same dev and test examples. A stream is deterministic (SeqIO with a
fixed seed, `pipeline.train_batches`), but building its tf.data pipeline costs more than the training steps
of a small run: with 48 pairs, rebuilding them for each stage took about 40% of an embedded-suite stage. So
the batches one stage drew are kept and replayed to the next, and the examples are read once.

What is kept is bounded by MEMO_BYTES for the process: a stream whose batches would go over it stops
growing, and a consumer that runs past its kept batches continues on a stream of its own (built afresh and
advanced past them), so every consumer sees exactly the batches a fresh stream gives. Keys name everything
that determines the data (the run's DataConfig, where the data lives, the split and the seed); files under
a data directory are taken not to change while a process runs (they are written once, atomically).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator, Mapping

import numpy as np

MEMO_BYTES = 256 << 20


class _Stream:
  """A stream's batches so far, and its live iterator positioned just after them (None once frozen)."""

  def __init__(self, live: Iterator[dict]):
    self.batches: list[dict] = []
    self.live: Iterator[dict] | None = live


class Memo:
  """The process's kept streams and example lists (use the module's `MEMO`)."""

  def __init__(self, max_bytes: int):
    self.max_bytes, self.used = max_bytes, 0
    self._streams: dict[Hashable, _Stream] = {}
    self._examples: dict[Hashable, list[dict]] = {}

  def clear(self) -> None:
    self._streams.clear()
    self._examples.clear()
    self.used = 0

  def stream(self, key: Hashable, make: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    """The batches of `make()`, replayed from what an earlier consumer of `key` drew, then drawn on."""
    entry = self._streams.get(key)
    if entry is None:
      if self.used >= self.max_bytes:
        return make()
      entry = self._streams[key] = _Stream(make())
    return self._replay(entry, make)

  def _replay(self, entry: _Stream, make: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    i = 0
    while True:
      if i < len(entry.batches):
        yield entry.batches[i]
        i += 1
        continue
      if entry.live is None:  # frozen: go on alone on a fresh stream
        yield from itertools.islice(make(), i, None)
        return
      batch = next(entry.live)
      size = _nbytes(batch)
      if self.used + size > self.max_bytes:
        live, entry.live = entry.live, None
        yield batch
        yield from live
        return
      entry.batches.append(batch)
      self.used += size
      yield batch
      i += 1

  def examples(self, key: Hashable, read: Callable[[], list[dict]]) -> list[dict]:
    """`read()`, read once per key (a new list each call; the example dicts are shared: do not change
    them)."""
    if key not in self._examples:
      examples = read()
      if self.used >= self.max_bytes:
        return examples
      self._examples[key] = examples
      self.used += sum(len(str(ex)) for ex in examples)
    return list(self._examples[key])


def _nbytes(batch: Mapping[str, np.ndarray]) -> int:
  return sum(np.asarray(v).nbytes for v in batch.values())


MEMO = Memo(MEMO_BYTES)
