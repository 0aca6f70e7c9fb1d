"""data/replay.py: every consumer of a kept stream sees exactly the batches of a fresh stream, whether the
stream is replayed, frozen at the memory bound, or drawn by consumers in turn; examples are read once."""
import itertools

import numpy as np

from mhr_jax.data.replay import Memo

BATCH_BYTES = 8 * 4


def _counting(made):
  def make():
    made.append(1)
    return ({"x": np.arange(8, dtype=np.int32) + 8 * i} for i in itertools.count())
  return make


def _take(stream, n):
  return [b["x"].tolist() for b in itertools.islice(stream, n)]


FRESH = [list(range(8 * i, 8 * i + 8)) for i in range(12)]


def test_a_later_consumer_replays_then_draws_on_the_same_stream():
  memo, made = Memo(max_bytes=1 << 20), []
  assert _take(memo.stream("k", _counting(made)), 5) == FRESH[:5]
  assert _take(memo.stream("k", _counting(made)), 12) == FRESH
  assert _take(memo.stream("k", _counting(made)), 3) == FRESH[:3]
  assert len(made) == 1 and memo.used == 12 * BATCH_BYTES
  assert _take(memo.stream("other", _counting(made)), 2) == FRESH[:2] and len(made) == 2


def test_at_the_bound_a_stream_freezes_and_consumers_past_it_go_on_alone():
  memo, made = Memo(max_bytes=3 * BATCH_BYTES), []
  assert _take(memo.stream("k", _counting(made)), 5) == FRESH[:5]      # keeps 3, goes on alone
  assert memo.used == 3 * BATCH_BYTES
  assert _take(memo.stream("k", _counting(made)), 7) == FRESH[:7]      # 3 replayed, then a fresh stream
  assert len(made) == 2
  assert _take(memo.stream("new", _counting(made)), 2) == FRESH[:2]    # the memo is full: not kept
  assert memo.used == 3 * BATCH_BYTES


def test_consumers_drawing_in_turn_each_see_the_fresh_sequence():
  memo, made = Memo(max_bytes=4 * BATCH_BYTES), []
  a, b = memo.stream("k", _counting(made)), memo.stream("k", _counting(made))
  got_a, got_b = [], []
  for _ in range(9):
    got_a += _take(a, 1)
    got_b += _take(b, 1)
    got_b += _take(b, 1)
  assert got_a == FRESH[:9] and got_b[:12] == FRESH[:12]


def test_examples_are_read_once_and_handed_out_as_new_lists():
  memo, reads = Memo(max_bytes=1 << 20), []
  def read():
    reads.append(1)
    return [{"inputs": "a"}, {"inputs": "b"}]
  first = memo.examples("k", read)
  first.append({"inputs": "c"})
  assert memo.examples("k", read) == [{"inputs": "a"}, {"inputs": "b"}] and len(reads) == 1
  memo.clear()
  memo.examples("k", read)
  assert len(reads) == 2
