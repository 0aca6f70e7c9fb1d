"""Data: vocabularies, a feature converter that keeps task ids, host-local training and evaluation batches.

The only module of mhr_jax that imports TensorFlow and SeqIO (tasks/ registers the SeqIO tasks). Flow:
SeqIO task (source -> tokenize -> EOS) -> this host's shard, shuffled and repeated -> trim to the lengths
keeping EOS, counting truncations -> mix tasks by their mixture rates -> `TaskIdsFeatureConverter` (pad,
or pack windows of same-task examples) -> batches of NumPy arrays for
`jax.make_array_from_process_local_data`.

Batch sizes here are host-local: every yielded batch has `batch_size` rows of this host's shard.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from mhr_jax import storage
from mhr_jax.errors import ConfigError


@contextlib.contextmanager
def _quiet_native_stderr():
  """Sends file descriptor 2 to /dev/null for the duration: TensorFlow's C++ start-up notices (oneDNN,
  "failed call to cuInit" without a GPU) are written there before any Python logging exists and read like
  errors to a CPU user. Python exceptions still surface afterwards."""
  try:
    fd = sys.stderr.fileno()
  except (AttributeError, OSError, ValueError):  # a captured stream (tests): nothing to silence
    yield
    return
  sys.stderr.flush()
  saved = os.dup(fd)
  with open(os.devnull, "w") as null:
    os.dup2(null.fileno(), fd)
  try:
    yield
  finally:
    os.dup2(saved, fd)
    os.close(saved)


with _quiet_native_stderr():
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # JAX owns the accelerators; TensorFlow only reads and tokenizes data on the host.
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass  # devices already initialised by an earlier TensorFlow use

log = logging.getLogger(__name__)

# Packing: examples of one task are gathered in windows of PACK_WINDOW and packed into rows; the rows are
# then shuffled with a buffer of PACK_SHUFFLE_ROWS so that consecutive rows come from different tasks.
# Memory: up to (tasks x PACK_WINDOW) examples plus PACK_SHUFFLE_ROWS rows.
PACK_WINDOW = 16
PACK_SHUFFLE_ROWS = 512
# Training batches read ahead of the step that uses them.
PREFETCH_BATCHES = 2


class _DropUncachedSourceWarning(logging.Filter):
  # SeqIO warns once per task and call that an uncached function source is used for training. Ours are
  # in-memory (SuperNI) or stream their files through the task's shuffle buffer (P3) by design; with
  # hundreds of tasks the repeated warning would bury everything else.
  def filter(self, record):
    return not str(record.msg).startswith("Using an uncached FunctionDataset for training")


logging.getLogger("absl").addFilter(_DropUncachedSourceWarning())


# ---------------------------------------------------------------- vocabularies


def get_vocabulary(spec: str, extra_ids: int = 0) -> seqio.Vocabulary:
  """"byte" -> seqio.ByteVocabulary(); otherwise a SentencePiece model file, or a directory holding
  spiece.model (e.g. a Hugging Face T5 checkpoint directory). A URL is looked up through mhr_jax/storage.py;
  SeqIO then reads the model through TensorFlow's file systems (gs:// with Google's credentials)."""
  if spec == "byte":
    return seqio.ByteVocabulary(extra_ids=extra_ids)
  path = os.path.join(spec, "spiece.model") if storage.isdir(spec) else spec
  if not storage.isfile(path):
    raise FileNotFoundError(f"vocabulary {spec!r}: expected 'byte', a SentencePiece model file or a "
                            f"directory with spiece.model; {path} does not exist")
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


# ---------------------------------------------------------------- feature converter


class TaskIdsFeatureConverter:
  """seqio.EncDecFeatureConverter's conversion, plus a scalar `task_ids` per output row.

  Input examples: "inputs", "targets" (int32 (L,)) and "task_ids" (int32 scalar). Output rows:
  encoder_input_tokens (Li,), decoder_input_tokens, decoder_target_tokens, decoder_loss_weights (Lt,),
  task_ids (); and with pack=True encoder/decoder_segment_ids and encoder/decoder_positions.
  Packing carries the task id as a token stream aligned with the inputs and asserts that every packed row
  holds one task id only, so it must be fed one task's examples at a time (routing is per example;
  `train_batches` packs windows of same-task examples).
  Sequences are trimmed without keeping EOS here; `train_batches` trims keeping EOS beforehand.
  """

  def __init__(self, pack: bool = False, bos_id: int = 0):
    self._pack = pack
    self._bos_id = bos_id

  @property
  def pack(self) -> bool:
    return self._pack

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    li, lt = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    lengths = {"encoder_input_tokens": li, "decoder_input_tokens": lt, "decoder_target_tokens": lt,
               "decoder_loss_weights": lt, "task_ids": 0}
    if self._pack:
      lengths.update({"encoder_segment_ids": li, "encoder_positions": li, "decoder_segment_ids": lt,
                      "decoder_positions": lt})
    return lengths

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    spec = ds.element_spec
    for key in ("inputs", "targets", "task_ids"):
      if key not in spec:
        raise ValueError(f"TaskIdsFeatureConverter: the dataset has no '{key}' feature (has {sorted(spec)})")
    if spec["task_ids"].shape.rank != 0:
      raise ValueError(f"TaskIdsFeatureConverter: 'task_ids' must be a scalar per example, got shape "
                       f"{spec['task_ids'].shape}")
    li, lt = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"],
                            "task_ids": tf.cast(ex["task_ids"], tf.int32)})
    if not self._pack:
      ds = seqio.utils.trim_and_pad_dataset(ds, {"inputs": li, "targets": lt})
      return ds.map(self._padded_row, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda ex: {**ex, "task_ids": tf.fill([tf.maximum(tf.size(ex["inputs"]), 1)],
                                                      ex["task_ids"])})
    ds = seqio.utils.trim_and_pack_dataset(ds, {"inputs": li, "targets": lt, "task_ids": li})
    return ds.map(self._packed_row, num_parallel_calls=tf.data.AUTOTUNE)

  def _decoder(self, targets, segment_ids=None):
    return {
        "decoder_target_tokens": targets,
        "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
            targets, sequence_id=segment_ids, bos_id=self._bos_id),
        "decoder_loss_weights": tf.cast(tf.not_equal(targets, 0), tf.int32),
    }

  def _padded_row(self, ex):
    return {"encoder_input_tokens": ex["inputs"], **self._decoder(ex["targets"]), "task_ids": ex["task_ids"]}

  def _packed_row(self, ex):
    ids, segments = ex["task_ids"], ex["task_ids_segment_ids"]
    task_id = ids[0]
    single = tf.debugging.assert_equal(tf.boolean_mask(ids, segments > 0), task_id,
                                       message="a packed row holds examples of several tasks")
    with tf.control_dependencies([single]):
      task_id = tf.identity(task_id)
    return {
        "encoder_input_tokens": ex["inputs"],
        "encoder_segment_ids": ex["inputs_segment_ids"],
        "encoder_positions": ex["inputs_positions"],
        **self._decoder(ex["targets"], ex["targets_segment_ids"]),
        "decoder_segment_ids": ex["targets_segment_ids"],
        "decoder_positions": ex["targets_positions"],
        "task_ids": task_id,
    }


# ---------------------------------------------------------------- training batches


def _trim_keep_eos(tokens: tf.Tensor, length: int) -> tf.Tensor:
  # As seqio.preprocessors.append_eos_after_trim: a truncated sequence still ends with its EOS (the last
  # token). Without truncation this is the identity.
  return tf.concat([tokens[:tf.minimum(tf.size(tokens), length) - 1], tokens[-1:]], 0)


class _Truncations:
  """Per task (by position), the examples read and those longer than the feature lengths."""

  def __init__(self, task_names: Sequence[str], input_len: int, target_len: int):
    self.task_names = list(task_names)
    self.input_len, self.target_len = input_len, target_len
    # One variable, updated by one op per example, so that a read is a consistent (truncated, seen) pair.
    self._counts = tf.Variable(tf.zeros([len(task_names), 2], tf.int64), trainable=False)
    self._reported = np.zeros([len(task_names)], np.int64)

  def trim(self, ds: tf.data.Dataset, position: int) -> tf.data.Dataset:
    """Count and trim (keeping EOS) the examples of the task at `position`."""
    index = [[position, 0], [position, 1]]

    def fn(ex):
      over = tf.logical_or(tf.size(ex["inputs"]) > self.input_len, tf.size(ex["targets"]) > self.target_len)
      update = self._counts.scatter_nd_add(index, tf.stack([tf.cast(over, tf.int64), tf.constant(1, tf.int64)]))
      with tf.control_dependencies([update]):
        return {"inputs": _trim_keep_eos(ex["inputs"], self.input_len),
                "targets": _trim_keep_eos(ex["targets"], self.target_len), "task_ids": ex["task_ids"]}
    return ds.map(fn)

  def counts(self) -> dict[str, tuple[int, int]]:
    counts = self._counts.numpy()
    return {name: (int(counts[i, 0]), int(counts[i, 1])) for i, name in enumerate(self.task_names)}

  def report(self) -> None:
    counts = self._counts.numpy()
    for i in np.flatnonzero(counts[:, 0] > 2 * self._reported):  # the first truncation, then each doubling
      self._reported[i] = counts[i, 0]
      log.warning("%s: %d of %d examples read so far were longer than input_len=%d / target_len=%d "
                  "and were truncated", self.task_names[i], counts[i, 0], counts[i, 1], self.input_len,
                  self.target_len)


class TrainBatches(Iterator[dict]):
  """Infinite iterator of host-local training batches (see `train_batches`)."""

  def __init__(self, ds: tf.data.Dataset, truncations: _Truncations):
    self.dataset = ds
    self._it = ds.as_numpy_iterator()
    self._truncations = truncations

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._truncations.report()
    out = {k: v.astype(np.int32) for k, v in batch.items() if k != "decoder_loss_weights"}
    out["decoder_loss_weights"] = batch["decoder_loss_weights"].astype(np.float32)
    return out

  def truncation_counts(self) -> dict[str, tuple[int, int]]:
    """{task: (examples truncated, examples read)} so far (read-ahead included)."""
    return self._truncations.counts()


def _tasks_and_rates(name: str) -> list[tuple[seqio.Task, float]]:
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(f"unknown SeqIO task or mixture {name!r} (register it first, see tasks/): {e}") from None
  if isinstance(provider, seqio.Mixture):
    pairs = [(task, float(provider.get_rate(task))) for task in provider.tasks]
  else:
    pairs = [(provider, 1.0)]
  empty = [t.name for t, rate in pairs if rate <= 0]
  if empty:
    log.warning("%s: leaving out %d task(s) with mixing rate 0 (no examples): %s", name, len(empty),
                ", ".join(empty))
  pairs = [(t, r) for t, r in pairs if r > 0]
  if not pairs:
    raise ValueError(f"{name}: no task has a positive mixing rate")
  return pairs


def train_batches(mixture_or_task_name: str, split: str, batch_size: int, input_len: int, target_len: int,
                  pack: bool = False, seed: int = 0, shard_index: int = 0, num_shards: int = 1
                  ) -> TrainBatches:
  """Infinite, shuffled, deterministic (given seed) host-local batches of a SeqIO task or mixture.

  Each task's examples are this host's shard (shard_index of num_shards), repeated and shuffled with a
  seed derived from (seed, task position), trimmed to the lengths keeping EOS (truncations are counted and
  logged as warnings naming the task), mixed by the mixture rates (tasks with rate 0 are left out, with a
  warning), then padded, or packed within windows of PACK_WINDOW examples that share a task id
  (group_by_window; every packed row holds one task) and the rows shuffled (PACK_SHUFFLE_ROWS buffer).

  Returns an iterator of dicts of NumPy arrays (B = batch_size):
    encoder_input_tokens (B, input_len) int32; decoder_input_tokens, decoder_target_tokens
    (B, target_len) int32; decoder_loss_weights (B, target_len) float32; task_ids (B,) int32; and, with
    pack=True, encoder_segment_ids, encoder_positions (B, input_len) and decoder_segment_ids,
    decoder_positions (B, target_len) int32.
  """
  if batch_size < 1 or input_len < 1 or target_len < 1:
    raise ValueError(f"train_batches: batch_size={batch_size}, input_len={input_len}, "
                     f"target_len={target_len}: must all be >= 1")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"train_batches: shard_index={shard_index} must be in [0, num_shards={num_shards})")
  converter = TaskIdsFeatureConverter(pack=pack)
  lengths = {"inputs": input_len, "targets": target_len}
  tasks_and_rates = _tasks_and_rates(mixture_or_task_name)
  truncations = _Truncations([t.name for t, _ in tasks_and_rates], input_len, target_len)
  datasets = []
  for position, (task, _) in enumerate(tasks_and_rates):
    if split not in task.splits:
      raise ValueError(f"task {task.name!r} has no split {split!r} (splits: {', '.join(task.splits)})")
    task_seed = int(np.random.SeedSequence([seed, position]).generate_state(1)[0])
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=True, seed=task_seed,
                          shard_info=seqio.ShardInfo(shard_index, num_shards), num_epochs=None,
                          trim_output_features=False, use_cached=False)
    if "task_ids" not in ds.element_spec:
      raise ValueError(f"task {task.name!r}: examples have no 'task_ids' feature")
    datasets.append(truncations.trim(ds, position))
  if len(datasets) == 1:
    ds = datasets[0]
  else:
    rates = np.asarray([rate for _, rate in tasks_and_rates])
    ds = tf.data.Dataset.sample_from_datasets(datasets, weights=(rates / rates.sum()).tolist(), seed=seed)
  if pack:
    # Pack within windows of examples that share a task id, so that no packed row mixes tasks.
    ds = ds.group_by_window(key_func=lambda ex: tf.cast(ex["task_ids"], tf.int64),
                            reduce_func=lambda _, window: converter(window, lengths),
                            window_size=PACK_WINDOW)
    ds = ds.shuffle(PACK_SHUFFLE_ROWS, seed=seed)
  else:
    ds = converter(ds, lengths)
  # No tf.data autotuning: its model thread makes deleting an idle iterator block for 10-20 s (once per
  # adaptation stream, at the end of every stage); fixed read-ahead does as well for these small rows.
  options = tf.data.Options()
  options.autotune.enabled = False
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(PREFETCH_BATCHES).with_options(options)
  return TrainBatches(ds, truncations)


# ---------------------------------------------------------------- evaluation


def _to_python(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  return value


def eval_examples(task_name: str, split: str) -> list[dict]:
  """The examples of one task's split in source order, as Python values.

  Returns dicts with "inputs", "targets" (str), "references" (list of str; [targets] when the task has
  none), "task_id" (int), plus the task's other source features (e.g. answer_choices and label for T0,
  instance_id for SuperNI).
  """
  task = seqio.get_mixture_or_task(task_name)
  if not isinstance(task, seqio.Task):
    raise ValueError(f"eval_examples: {task_name!r} is a mixture; pass one of its tasks")
  if split not in task.splits:
    raise ValueError(f"task {task_name!r} has no split {split!r} (splits: {', '.join(task.splits)})")
  examples = []
  for ex in task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator():
    ex = {k: _to_python(v) for k, v in ex.items()}
    ex["task_id"] = ex.pop("task_ids")
    ex.setdefault("references", [ex["targets"]])
    examples.append(ex)
  return examples


def encode(vocabulary: seqio.Vocabulary, text: str, length: int) -> tuple[np.ndarray, bool]:
  """Token ids + EOS, trimmed keeping EOS and padded with 0 to (length,) int32; and whether it was trimmed."""
  ids = list(vocabulary.encode(text)) + [vocabulary.eos_id]
  truncated = len(ids) > length
  if truncated:
    ids = ids[:length - 1] + [vocabulary.eos_id]
  out = np.zeros((length,), np.int32)
  out[:len(ids)] = ids
  return out, truncated


def _shift_right(targets: np.ndarray, bos_id: int = 0) -> np.ndarray:
  out = np.full_like(targets, bos_id)
  out[..., 1:] = targets[..., :-1]
  return out


def _warn_truncated(what: str, count: int, total: int, length_name: str, length: int) -> None:
  if count:
    log.warning("%s: %d of %d texts were longer than %s=%d and were truncated", what, count, total,
                length_name, length)


def _pad_rows(arrays: Mapping[str, np.ndarray], start: int, batch_size: int, index_key: str | None) -> dict:
  """Rows [start, start + batch_size), zero-padded at the end; padded rows get index -1 in index_key."""
  out = {}
  for key, value in arrays.items():
    chunk = value[start:start + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      fill = -1 if key == index_key else 0
      chunk = np.concatenate([chunk, np.full((pad,) + chunk.shape[1:], fill, chunk.dtype)])
    out[key] = chunk
  return out


def generation_batches(examples: Sequence[Mapping], vocabulary: seqio.Vocabulary, batch_size: int,
                       input_len: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches for decoding: encoder_input_tokens (B, input_len), task_ids (B,), example_index (B,) int32.

  The last batch is padded with zero rows whose example_index is -1.
  """
  if not examples:
    raise ValueError("generation_batches: no examples")
  encoded = [encode(vocabulary, ex["inputs"], input_len) for ex in examples]
  _warn_truncated("generation inputs", sum(t for _, t in encoded), len(encoded), "input_len", input_len)
  arrays = {"encoder_input_tokens": np.stack([e for e, _ in encoded]),
            "task_ids": np.asarray([ex["task_id"] for ex in examples], np.int32),
            "example_index": np.arange(len(examples), dtype=np.int32)}
  for start in range(0, len(examples), batch_size):
    yield _pad_rows(arrays, start, batch_size, "example_index")


def lm_eval_batches(examples: Sequence[Mapping], vocabulary: seqio.Vocabulary, batch_size: int,
                    input_len: int, target_len: int) -> list[dict[str, np.ndarray]]:
  """One pass of teacher-forcing batches over `examples` (e.g. a dev split, for its exact loss).

  Returns a list of batches as `train_batches` yields them without packing (B = batch_size):
  encoder_input_tokens (B, input_len), decoder_input_tokens, decoder_target_tokens (B, target_len) int32, decoder_loss_weights (B, target_len)
  float32, task_ids (B,) int32. The last batch is padded with rows of zero loss weight.
  """
  if not examples:
    raise ValueError("lm_eval_batches: no examples")
  inputs = [encode(vocabulary, ex["inputs"], input_len) for ex in examples]
  targets = [encode(vocabulary, ex["targets"], target_len) for ex in examples]
  _warn_truncated("dev inputs", sum(t for _, t in inputs), len(inputs), "input_len", input_len)
  _warn_truncated("dev targets", sum(t for _, t in targets), len(targets), "target_len", target_len)
  target_tokens = np.stack([t for t, _ in targets])
  arrays = {"encoder_input_tokens": np.stack([t for t, _ in inputs]),
            "decoder_input_tokens": _shift_right(target_tokens), "decoder_target_tokens": target_tokens,
            "decoder_loss_weights": (target_tokens != 0).astype(np.float32),
            "task_ids": np.asarray([ex["task_id"] for ex in examples], np.int32)}
  return [_pad_rows(arrays, start, batch_size, None) for start in range(0, len(examples), batch_size)]


def rank_classification_rows(examples: Sequence[Mapping], vocabulary: seqio.Vocabulary, input_len: int,
                             target_len: int) -> dict[str, np.ndarray]:
  """One row per (example, answer choice).

  Args:
    examples: dicts with "inputs", "answer_choices", "label", "task_id" (eval_examples of a T0 task).
  Returns (R = total number of choices):
    encoder_input_tokens (R, input_len); decoder_input_tokens, decoder_target_tokens (R, target_len) int32;
    decoder_loss_weights (R, target_len) float32; task_ids, example_index, choice_index, label (R,) int32
    where label is the gold choice of the row's example.
  """
  if not examples:
    raise ValueError("rank_classification_rows: no examples")
  rows = {k: [] for k in ("encoder_input_tokens", "decoder_target_tokens", "task_ids", "example_index",
                          "choice_index", "label")}
  cut_inputs = cut_targets = 0
  for i, ex in enumerate(examples):
    if "answer_choices" not in ex or "label" not in ex:
      raise ValueError(f"rank_classification_rows: example {i} has no answer_choices/label")
    inputs, cut = encode(vocabulary, ex["inputs"], input_len)
    cut_inputs += cut
    for c, choice in enumerate(ex["answer_choices"]):
      target, cut = encode(vocabulary, choice, target_len)
      cut_targets += cut
      for key, value in (("encoder_input_tokens", inputs), ("decoder_target_tokens", target),
                         ("task_ids", ex["task_id"]), ("example_index", i), ("choice_index", c),
                         ("label", ex["label"])):
        rows[key].append(value)
  _warn_truncated("rank-classification inputs", cut_inputs, len(examples), "input_len", input_len)
  _warn_truncated("answer choices", cut_targets, len(rows["label"]), "target_len", target_len)
  out = {k: np.asarray(v, np.int32) for k, v in rows.items()}
  out["decoder_input_tokens"] = _shift_right(out["decoder_target_tokens"])
  out["decoder_loss_weights"] = (out["decoder_target_tokens"] != 0).astype(np.float32)
  return out


def _grouped_choices(examples: Sequence[Mapping], vocabulary: seqio.Vocabulary, input_len: int,
                     target_len: int, num_choices: int | None) -> dict[str, np.ndarray]:
  """All examples with their choices grouped: (N, ...) and (N, C, target_len) arrays."""
  rows = rank_classification_rows(examples, vocabulary, input_len, target_len)
  max_choices = int(rows["choice_index"].max()) + 1
  num_choices = max_choices if num_choices is None else num_choices
  if num_choices < max_choices:
    raise ValueError(f"rank classification: num_choices={num_choices} but an example has "
                     f"{max_choices} answer choices")
  n = len(examples)
  grouped = {k: np.zeros((n, num_choices, target_len), rows[k].dtype)
             for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
  for k in grouped:
    grouped[k][rows["example_index"], rows["choice_index"]] = rows[k]
  first = np.flatnonzero(rows["choice_index"] == 0)
  grouped.update({"encoder_input_tokens": rows["encoder_input_tokens"][first],
                  "task_ids": rows["task_ids"][first], "labels": rows["label"][first],
                  "example_index": rows["example_index"][first]})
  return grouped


def rank_classification_batches(examples: Sequence[Mapping], vocabulary: seqio.Vocabulary, batch_size: int,
                                input_len: int, target_len: int, num_choices: int | None = None
                                ) -> Iterator[dict[str, np.ndarray]]:
  """Batches with the choices of an example grouped, as decoding.score_sequences and the T-Few loss take.

  Yields (B = batch_size, C = num_choices or the largest number of choices):
    encoder_input_tokens (B, input_len); decoder_input_tokens, decoder_target_tokens (B, C, target_len)
    int32; decoder_loss_weights (B, C, target_len) float32 (all 0 for an absent choice); task_ids, labels,
    example_index (B,) int32. The last batch is padded with zero rows whose example_index is -1.
  """
  grouped = _grouped_choices(examples, vocabulary, input_len, target_len, num_choices)
  for start in range(0, len(examples), batch_size):
    yield _pad_rows(grouped, start, batch_size, "example_index")


def choice_train_batches(mixture_or_task_name: str, split: str, batch_size: int, input_len: int,
                         target_len: int, seed: int = 0, shard_index: int = 0, num_shards: int = 1
                         ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local batches of answer-choice examples (few-shot T0 training with the T-Few loss).

  All examples of the split over the mixture's tasks (e.g. every template of a held-out dataset) are
  reshuffled each epoch with numpy.random.default_rng(seed); this host keeps every num_shards-th of each
  epoch's order. Batches are as `rank_classification_batches` (C = the largest number of choices).
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"choice_train_batches: shard_index={shard_index} must be in [0, {num_shards})")
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  examples = [ex for task in tasks for ex in eval_examples(task.name, split)]
  vocabulary = tasks[0].output_features["targets"].vocabulary
  grouped = _grouped_choices(examples, vocabulary, input_len, target_len, None)
  if len(examples) < batch_size * num_shards:
    raise ValueError(f"{mixture_or_task_name} split {split!r}: {len(examples)} examples are fewer than one "
                     f"global batch ({batch_size} x {num_shards} hosts)")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(examples))[shard_index::num_shards]
    for start in range(0, len(order) - batch_size + 1, batch_size):
      yield {k: v[order[start:start + batch_size]] for k, v in grouped.items()}


# ---------------------------------------------------------------- a run's data


def register_data(d, default_dir: str, vocab_size: int | None = None, **fewshot):
  """Registers the SeqIO tasks of DataConfig.source; returns (Registration, vocabulary).

  Args:
    d: the run's config.DataConfig.
    default_dir: where the synthetic suite is written when DataConfig.data_dir is unset.
    vocab_size: the model's; ConfigError before anything is written when the vocabulary has more ids.
    fewshot: fewshot_seeds (all sources) and fewshot_ks (SuperNI-format sources) of the adaptation
      splits to register.
  """
  from tasks import superni  # pylint: disable=g-import-not-at-top
  vocabulary = get_vocabulary(d.vocabulary)
  if vocab_size is not None and vocabulary.vocab_size > vocab_size:
    raise ConfigError(f"DataConfig.vocabulary={d.vocabulary!r} has {vocabulary.vocab_size} ids but the "
                      f"model's vocab_size is {vocab_size}")
  lists = {"task_list_files": (d.test_task_list,)} if d.test_task_list else {}
  input_format = superni.InputFormat(d.input_prompt, d.num_pos_examples, d.input_len)
  if d.source == "synthetic":
    from tasks import synthetic  # pylint: disable=g-import-not-at-top
    out = d.data_dir or default_dir
    # Deterministic files written atomically: every process may write them.
    registration = synthetic.register_synthetic(
        out, vocabulary, n_train_tasks=d.synthetic_train_tasks, n_test_tasks=d.synthetic_test_tasks,
        n_instances=d.synthetic_instances, seed=d.synthetic_seed, suite=d.synthetic_suite,
        input_format=input_format, **lists, **fewshot)
    log.info("synthetic suite: %s", out)
  elif d.source == "superni":
    registration = superni.register_superni(
        d.data_dir, vocabulary, max_train_instances=d.max_train_instances, input_format=input_format,
        **lists, **fewshot)
  else:
    from tasks import t0  # pylint: disable=g-import-not-at-top
    seeds = fewshot.get("fewshot_seeds")
    registration = t0.register_t0(d.data_dir, vocabulary, catalog_path=d.catalog or t0.CATALOG,
                                  fewshot_seeds=None if seeds is None else tuple(seeds), cap_rule=d.t0_cap)
  log.info("data: %s/%s, %d tasks, vocabulary %s (%d ids)", d.task, d.split,
           len(registration.mixtures.get(d.task, ())) or 1, d.vocabulary, vocabulary.vocab_size)
  return registration, vocabulary


def check_task_rows(d, registration, task_rows: int) -> None:
  """ConfigError when DataConfig.task has task ids beyond the `task_rows` routing rows (or private
  adapters) of a model trained multi-task on it."""
  names = registration.mixtures.get(d.task, ())
  ids = [registration.task_ids[n] for n in names if n in registration.task_ids]
  if ids and max(ids) >= task_rows:
    raise ConfigError(f"AdapterConfig.n_tasks={task_rows} but {d.task} has task ids up to {max(ids)}; "
                      f"set AdapterConfig.n_tasks={max(ids) + 1}")


def heldout_tasks(d, registration) -> list[str]:
  """The held-out tasks adaptation uses by default (SuperNI-format sources): those of
  DataConfig.test_task_list, else of the source's test mixture."""
  if d.test_task_list:
    from tasks import seqio_name  # pylint: disable=g-import-not-at-top
    stem = os.path.splitext(os.path.basename(d.test_task_list))[0]
    return list(registration.mixtures[seqio_name(d.source, stem)])
  return list(registration.mixtures[f"{d.source}_test"])


def host_batches(d, seed: int, skip: int, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """This process's rows of each global training batch of DataConfig `d`, from batch number `skip` on
  (exact resume); `seed` orders the data.

  DataConfig.host_input "global": every process reads the global stream and keeps its own rows;
  "sharded": each process reads its own shard of every task.
  """
  local = d.batch_size // process_count
  common = dict(input_len=d.input_len, target_len=d.target_len, pack=d.pack, seed=seed)
  if d.host_input == "global":
    stream = train_batches(d.task, d.split, d.batch_size, **common)
    take = lambda b: {k: v[process_index * local:(process_index + 1) * local] for k, v in b.items()}  # noqa: E731
  else:
    stream = train_batches(d.task, d.split, local, shard_index=process_index, num_shards=process_count, **common)
    take = lambda b: b  # noqa: E731
  for _ in range(skip):
    next(stream)
  for batch in stream:
    yield take(batch)
