"""Vocabularies, the task-id feature converter, training batches and evaluation batches."""
import logging

import numpy as np
import pytest
import seqio
import tensorflow as tf

import fixtures_formats as ff
from mhr_jax.data import pipeline as data
from tasks import superni

TAGS = {0: "aa", 1: "bbb", 2: "c"}  # task id -> instance input prefix


@pytest.fixture(scope="module")
def vocab():
  return data.get_vocabulary("byte")


@pytest.fixture(scope="module")
def registered(tmp_path_factory, vocab):
  names = ["task001_a", "task002_b", "task003_c"]
  tasks = {n: ff.superni_task(n, 40, tag=TAGS[i]) for i, n in enumerate(names)}
  clone = ff.write_superni_clone(tmp_path_factory.mktemp("ni"), tasks, names, names[:1])
  return superni.register_superni(clone, vocab, prefix="dt", holdout_test_from_train=False,
                                  fewshot_ks=(), input_format=superni.InputFormat(prompt="input_only"))


def _decode(vocab, ids):
  ids = [int(i) for i in ids if i > 1]  # drop padding (0) and EOS (1)
  return vocab.decode(ids)


def test_get_vocabulary(tmp_path):
  assert isinstance(data.get_vocabulary("byte"), seqio.ByteVocabulary)
  with pytest.raises(FileNotFoundError, match=r"spiece\.model does not exist"):
    data.get_vocabulary(str(tmp_path))
  import sentencepiece as spm
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=31,
                                 pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  sp = data.get_vocabulary(str(tmp_path))
  assert isinstance(sp, seqio.SentencePieceVocabulary)
  assert sp.decode(sp.encode("the lazy dog")) == "the lazy dog"


def _examples_ds(rows):
  return tf.data.Dataset.from_generator(
      lambda: iter(rows), output_signature={
          "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32),
          "task_ids": tf.TensorSpec([], tf.int32)})


def test_converter_padding_keeps_task_ids():
  rows = [{"inputs": [5, 6, 1], "targets": [7, 1], "task_ids": 3},
          {"inputs": [8, 1], "targets": [9, 4, 1], "task_ids": 0}]
  out = list(data.TaskIdsFeatureConverter(pack=False)(_examples_ds(rows), {"inputs": 4, "targets": 4})
             .as_numpy_iterator())
  np.testing.assert_array_equal(out[0]["encoder_input_tokens"], [5, 6, 1, 0])
  np.testing.assert_array_equal(out[0]["decoder_target_tokens"], [7, 1, 0, 0])
  np.testing.assert_array_equal(out[0]["decoder_input_tokens"], [0, 7, 1, 0])
  np.testing.assert_array_equal(out[1]["decoder_loss_weights"], [1, 1, 1, 0])
  assert [int(o["task_ids"]) for o in out] == [3, 0]
  _assert_matches_seqio(rows, out, pack=False, lengths={"inputs": 4, "targets": 4})


def _assert_matches_seqio(rows, out, pack, lengths):
  """Every feature but task_ids equals seqio.EncDecFeatureConverter's on the same examples."""
  plain = _examples_ds(rows).map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})
  expected = list(seqio.EncDecFeatureConverter(pack=pack)(plain, lengths).as_numpy_iterator())
  assert len(expected) == len(out)
  for e, o in zip(expected, out):
    assert set(o) == set(e) | {"task_ids"}
    for key in e:
      np.testing.assert_array_equal(o[key], e[key], err_msg=key)


def test_converter_packing_is_single_task():
  rows = [{"inputs": [5, 6, 1], "targets": [7, 1], "task_ids": 2},
          {"inputs": [8, 1], "targets": [9, 4, 1], "task_ids": 2}]
  converter = data.TaskIdsFeatureConverter(pack=True)
  (row,) = list(converter(_examples_ds(rows), {"inputs": 6, "targets": 6}).as_numpy_iterator())
  np.testing.assert_array_equal(row["encoder_input_tokens"], [5, 6, 1, 8, 1, 0])
  np.testing.assert_array_equal(row["encoder_segment_ids"], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(row["decoder_input_tokens"], [0, 7, 0, 9, 4, 0])
  np.testing.assert_array_equal(row["decoder_positions"], [0, 1, 0, 1, 2, 0])
  assert int(row["task_ids"]) == 2
  _assert_matches_seqio(rows, [row], pack=True, lengths={"inputs": 6, "targets": 6})
  mixed = [dict(rows[0]), dict(rows[1], task_ids=5)]
  with pytest.raises(tf.errors.InvalidArgumentError, match="several tasks"):
    list(converter(_examples_ds(mixed), {"inputs": 6, "targets": 6}).as_numpy_iterator())
  with pytest.raises(ValueError, match="no 'task_ids' feature"):
    converter(_examples_ds(rows).map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]}),
              {"inputs": 6, "targets": 6})


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_padded_deterministic_and_task_ids(registered, vocab):
  stream = data.train_batches("dt_train", "train", 8, 12, 12, seed=0)
  # autotuning off: deleting an idle autotuned iterator blocks for seconds (every adaptation stream)
  assert stream.dataset.options().autotune.enabled is False
  batches = _take(stream, 3)
  b = batches[0]
  assert b["encoder_input_tokens"].shape == (8, 12) and b["encoder_input_tokens"].dtype == np.int32
  assert b["decoder_target_tokens"].shape == b["decoder_input_tokens"].shape == (8, 12)
  assert b["decoder_loss_weights"].dtype == np.float32 and b["task_ids"].shape == (8,)
  assert b["task_ids"].dtype == np.int32
  for batch in batches:
    for tokens, task_id in zip(batch["encoder_input_tokens"], batch["task_ids"]):
      assert _decode(vocab, tokens).split()[0] == TAGS[int(task_id)]
  assert {int(t) for batch in batches for t in batch["task_ids"]} == {0, 1, 2}
  again = _take(data.train_batches("dt_train", "train", 8, 12, 12, seed=0), 3)
  other = _take(data.train_batches("dt_train", "train", 8, 12, 12, seed=1), 3)
  for x, y in zip(batches, again):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["encoder_input_tokens"], y["encoder_input_tokens"])
             for x, y in zip(batches, other))


def test_train_batches_packed_rows_hold_one_task(registered, vocab):
  batches = _take(data.train_batches("dt_train", "train", 4, 24, 36, pack=True, seed=0), 2)
  seen_ids, segments_per_row = set(), []
  for batch in batches:
    assert batch["encoder_segment_ids"].shape == (4, 24) and batch["decoder_positions"].shape == (4, 36)
    for r in range(4):
      tag = TAGS[int(batch["task_ids"][r])]
      seen_ids.add(int(batch["task_ids"][r]))
      segments = batch["encoder_segment_ids"][r]
      segments_per_row.append(segments.max())
      for seg in range(1, segments.max() + 1):
        text = _decode(vocab, batch["encoder_input_tokens"][r][segments == seg])
        assert text.split()[0] == tag
      starts = np.flatnonzero(np.diff(np.concatenate([[0], batch["decoder_segment_ids"][r]])) != 0)
      assert np.all(batch["decoder_input_tokens"][r][starts] == 0)
  assert len(seen_ids) >= 2 and max(segments_per_row) >= 3


def test_truncation_is_counted_and_reported(registered, caplog):
  with caplog.at_level(logging.WARNING, logger="mhr_jax.data"):
    it = data.train_batches("dt_task002_b", "train", 4, 4, 12, seed=0)
    b = next(it)
  truncated, seen = it.truncation_counts()["dt_task002_b"]
  assert seen >= 4 and truncated == seen  # every "bbb <i>" input plus EOS is longer than 4
  assert "dt_task002_b" in caplog.text and "truncated" in caplog.text
  assert np.all(b["encoder_input_tokens"][:, -1] == 1)  # EOS kept at the end of truncated inputs


def test_host_shards_are_disjoint(registered, vocab):
  inputs = []
  for shard in range(2):
    it = data.train_batches("dt_task001_a", "train", 10, 12, 12, seed=0, shard_index=shard, num_shards=2)
    inputs.append({_decode(vocab, row) for b in _take(it, 4) for row in b["encoder_input_tokens"]})
  # 40 examples: each host owns 20 of them, and 40 draws per host cover nearly all of its own.
  assert len(inputs[0]) <= 20 and len(inputs[1]) <= 20 and len(inputs[0] | inputs[1]) >= 34
  assert not inputs[0] & inputs[1]


def test_train_batches_bad_arguments(registered):
  with pytest.raises(ValueError, match="unknown SeqIO task or mixture 'nope'"):
    data.train_batches("nope", "train", 2, 8, 8)
  with pytest.raises(ValueError, match="has no split 'dev'"):
    data.train_batches("dt_train", "dev", 2, 8, 8)
  with pytest.raises(ValueError, match="shard_index=2"):
    data.train_batches("dt_train", "train", 2, 8, 8, shard_index=2, num_shards=2)


def test_generation_and_rank_classification_batches(vocab):
  examples = [{"inputs": "ab", "answer_choices": ["x", "yz"], "label": 1, "task_id": 4},
              {"inputs": "c", "answer_choices": ["q", "r", "s"], "label": 2, "task_id": 5}]
  (gen,) = list(data.generation_batches(examples, vocab, 3, 4))
  np.testing.assert_array_equal(gen["example_index"], [0, 1, -1])
  np.testing.assert_array_equal(gen["encoder_input_tokens"][0], [ord("a") + 3, ord("b") + 3, 1, 0])

  rows = data.rank_classification_rows(examples, vocab, 4, 3)
  np.testing.assert_array_equal(rows["example_index"], [0, 0, 1, 1, 1])
  np.testing.assert_array_equal(rows["choice_index"], [0, 1, 0, 1, 2])
  np.testing.assert_array_equal(rows["label"], [1, 1, 2, 2, 2])
  np.testing.assert_array_equal(rows["decoder_target_tokens"][1], [ord("y") + 3, ord("z") + 3, 1])
  np.testing.assert_array_equal(rows["decoder_input_tokens"][1], [0, ord("y") + 3, ord("z") + 3])

  (batch,) = list(data.rank_classification_batches(examples, vocab, 4, 4, 3))
  assert batch["decoder_target_tokens"].shape == (4, 3, 3)
  np.testing.assert_array_equal(batch["labels"], [1, 2, 0, 0])
  np.testing.assert_array_equal(batch["example_index"], [0, 1, -1, -1])
  np.testing.assert_array_equal(batch["task_ids"][:2], [4, 5])
  np.testing.assert_array_equal(batch["decoder_loss_weights"][0, 2], [0, 0, 0])  # absent third choice
  np.testing.assert_array_equal(batch["decoder_target_tokens"][1, 2], [ord("s") + 3, 1, 0])
  with pytest.raises(ValueError, match="num_choices=2 but an example has 3"):
    next(data.rank_classification_batches(examples, vocab, 4, 4, 3, num_choices=2))


def test_lm_eval_batches_equal_the_training_rows(registered, vocab):
  """One pass over a split gives the rows `train_batches` makes of the same examples (SeqIO's feature
  conversion is the oracle), in order, the last batch padded with zero-weight rows."""
  task = registered.tasks["task002_b"]
  examples = data.eval_examples(task, "train")
  batches = data.lm_eval_batches(examples, vocab, 16, 10, 6)  # targets "output i" are truncated
  assert len(batches) == 3 and all(b["encoder_input_tokens"].shape == (16, 10) for b in batches)
  rows = {k: np.concatenate([b[k] for b in batches])[:len(examples)] for k in batches[0]}
  padding = np.concatenate([b["decoder_loss_weights"] for b in batches])[len(examples):]
  np.testing.assert_array_equal(padding, 0)
  keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
  joined = lambda r: np.concatenate(  # noqa: E731
      [r[k].astype(np.float32) for k in keys] + [r["task_ids"][:, None]], 1)
  # Several shuffled, repeated batches cover every example at least once.
  seqio_rows = np.concatenate([joined(b) for b in _take(data.train_batches(task, "train", 40, 10, 6), 4)])
  np.testing.assert_array_equal(np.unique(joined(rows), axis=0), np.unique(seqio_rows, axis=0))
  assert len(np.unique(joined(rows), axis=0)) == len(examples)
