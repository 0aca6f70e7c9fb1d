"""SeqIO registration for T5X: the project's tasks with `task_ids` kept, and T5X evaluation metrics.

The project registers its tasks (tasks/) with "inputs" and "targets" as output features and carries
`task_ids` as an extra example feature; its own pipeline reads tasks one by one. T5X reads mixtures
through `seqio.Mixture.get_dataset`, which keeps declared output features only, so here every task of a
registration is registered again with `task_ids` declared (features.TASK_IDS_FEATURE), and so are the
mixtures over them (a seqio mixture holds task objects). On top, for `t5x.eval` and T5X's
inference evaluation:
  SuperNI format (superni, synthetic)  predictions scored with ROUGE-L and exact match
                                       (`metrics.superni_metrics`: max over the instance's references)
  T0 held-out tasks                    "<task>_rank" / "<mixture>_rank": one row per answer choice,
                                       scored by T5X's score_batch; accuracy of the choice with the
                                       lowest length-normalised NLL (rank classification, as
                                       `evaluation.rank_classification`)

`registered(...)` does all of it from gin and returns the name T5X should read:
    MIXTURE_OR_TASK_NAME = @t5x_bridge.tasks.registered()
    t5x_bridge.tasks.registered.source = 'synthetic'

Few-shot T0 training with the T-Few loss reads answer-choice batches, not rows:
`choice_train_dataset` is T5X's `get_dataset_fn` for them (the project trainer's batches).
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

from mhr_jax.adapters.layers import check_task_ids
from mhr_jax.data import pipeline as data
from mhr_jax.evaluation import metrics
from mhr_jax.t5x_bridge.features import TASK_IDS_FEATURE, task_ids_as_vector

SOURCES = ("synthetic", "superni", "t0")
RANK_SUFFIX = "_rank"


# ------------------------------------------------------------------------------------- metrics

def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def references_postprocessor(output, example=None, is_target: bool = False):
  """Targets become the example's list of reference strings; predictions stay as decoded."""
  if is_target and example is not None and "references" in example:
    return [_text(r) for r in np.asarray(example["references"]).reshape(-1)]
  return [_text(output)] if is_target else _text(output)


def superni_metric(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """seqio predict metric: {"rougeL", "exact_match"} x100, max over each instance's references."""
  return metrics.superni_metrics(list(predictions), [list(t) for t in targets])


def choice_postprocessor(output, example=None, is_target: bool = False):
  """A rank-classification row's target: (example_index, choice_index, label, target tokens)."""
  if not is_target:
    return output
  return (int(example["example_index"]), int(example["choice_index"]), int(example["label"]),
          int(np.count_nonzero(example["targets"])))


def rank_classification_metric(targets: Sequence[tuple[int, int, int, int]],
                               scores: Sequence[float]) -> dict[str, float]:
  """seqio score metric: accuracy (x100) of the lowest length-normalised NLL choice per example.

  Args:
    targets: per row, (example_index, choice_index, label, number of target tokens incl. EOS).
    scores: per row, T5X's score_batch: the summed log-likelihood of the target tokens.
  """
  rows = np.asarray(targets, np.int64).reshape(-1, 4)
  nll = -np.asarray(scores, np.float64) / np.maximum(rows[:, 3], 1)
  choice_scores = metrics.choice_scores_from_rows(nll, rows[:, 0], rows[:, 1])
  labels = np.zeros(choice_scores.shape[0], np.int64)
  labels[rows[:, 0]] = rows[:, 2]
  return {"accuracy": metrics.rank_classification_accuracy(choice_scores, labels)}


def expand_choices(ds: tf.data.Dataset) -> tf.data.Dataset:
  """One example per answer choice: targets = the choice, plus choice_index (before tokenizing)."""
  def rows(ex):
    choices = ex["answer_choices"]
    n = tf.shape(choices)[0]
    repeat = lambda value: tf.repeat(tf.expand_dims(value, 0), n, axis=0)  # noqa: E731
    return tf.data.Dataset.from_tensor_slices({
        "inputs": repeat(ex["inputs"]), "targets": choices, "task_ids": repeat(ex["task_ids"]),
        "example_index": repeat(ex["example_index"]), "label": repeat(ex["label"]),
        "choice_index": tf.range(n, dtype=tf.int32)})
  return ds.flat_map(rows)


# ------------------------------------------------------------------------ T-Few training data

CHOICE_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                   "decoder_loss_weights", "task_ids", "labels")


def choice_train_dataset(cfg, shard_id: int, num_shards: int,
                         feature_converter_cls) -> tf.data.Dataset:
  """T5X `get_dataset_fn` for T-Few training: answer-choice batches, as the project's trainer reads
  them (`data.choice_train_batches`, the same examples in the same order for the same seed).

  For gin: `train_script.train.get_dataset_fn = @bridge_tasks.choice_train_dataset`, with a model
  whose loss_config has kind 'tfew'. From `cfg` (t5x.utils.DatasetConfig): mixture_or_task_name
  (e.g. every template of a held-out T0 dataset), split (train_k<shots>_seed<s>), batch_size
  (global), task_feature_lengths {'inputs': Li, 'targets': Lt}, seed (of the reshuffle every epoch;
  None: 0); pack must be False. This host takes every num_shards-th example of each epoch. The task
  ids are checked against the n_tasks that T5X's `feature_converter_cls` (the model's) carries.

  Returns an endless dataset of host batches (B = batch_size // num_shards, C = the most answer
  choices of an example): encoder_input_tokens (B, Li); decoder_input_tokens, decoder_target_tokens
  (B, C, Lt) int32; decoder_loss_weights (B, C, Lt) float32 (0 for an absent choice); task_ids,
  labels (B,) int32.
  """
  where = f"choice_train_dataset({cfg.mixture_or_task_name!r}, split {cfg.split!r})"
  if cfg.pack:
    raise ValueError(f"{where}: answer-choice batches are not packed; set "
                     "train/utils.DatasetConfig.pack = False")
  if cfg.batch_size % num_shards:
    raise ValueError(f"{where}: batch_size={cfg.batch_size} does not split over {num_shards} hosts")
  lengths = dict(cfg.task_feature_lengths or {})
  if not {"inputs", "targets"} <= set(lengths):
    raise ValueError(f"{where}: task_feature_lengths must give 'inputs' and 'targets', got {lengths}")
  n_tasks = feature_converter_cls(pack=False).n_tasks
  batches = data.choice_train_batches(
      cfg.mixture_or_task_name, cfg.split, cfg.batch_size // num_shards, lengths["inputs"],
      lengths["targets"], seed=0 if cfg.seed is None else cfg.seed, shard_index=shard_id,
      num_shards=num_shards)

  def checked(batch):
    if n_tasks is not None:   # inside jit an id past the routing table would take its last row
      check_task_ids(batch["task_ids"], n_tasks)
    return {k: batch[k] for k in CHOICE_FEATURES}

  first = checked(next(batches))
  spec = {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for k, v in first.items()}
  stream = itertools.chain([first], map(checked, batches))
  return tf.data.Dataset.from_generator(lambda: stream, output_signature=spec)


# -------------------------------------------------------------------------------- registration

def _with_task_ids(task: seqio.Task, **changes) -> seqio.Task:
  seqio.TaskRegistry.remove(task.name)
  preprocessors = [*changes.pop("preprocessors", task.preprocessors), task_ids_as_vector]
  new = task.replace(output_features={**task.output_features, "task_ids": TASK_IDS_FEATURE},
                     preprocessors=preprocessors, **changes)
  seqio.TaskRegistry.add_provider(task.name, new)
  return new


def _replace_mixture(name: str, tasks_and_rates) -> None:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(tasks_and_rates))


def prepare_for_t5x(registration, source: str) -> None:
  """Registers the tasks and mixtures of a tasks.superni / tasks.t0 Registration again for T5X.

  Every task gets the `task_ids` output feature; SuperNI-format tasks also the references
  postprocessor and `superni_metric`; T0 held-out tasks (those with an "eval" split) also a
  "<task>_rank" variant for rank classification, and each held-out mixture a "<mixture>_rank".
  """
  if source not in SOURCES:
    raise ValueError(f"source={source!r}: expected one of {SOURCES}")
  rank_tasks = set()
  for name in registration.tasks.values():
    task = seqio.get_mixture_or_task(name)
    if source == "t0":
      _with_task_ids(task)
      if "eval" in task.splits:
        rank_tasks.add(name)
        if name + RANK_SUFFIX in seqio.TaskRegistry.names():
          seqio.TaskRegistry.remove(name + RANK_SUFFIX)
        seqio.TaskRegistry.add_provider(name + RANK_SUFFIX, seqio.get_mixture_or_task(name).replace(
            name=name + RANK_SUFFIX, preprocessors=[expand_choices, *seqio.get_mixture_or_task(
                name).preprocessors], postprocess_fn=choice_postprocessor,
            metric_fns=[rank_classification_metric]))
    else:
      _with_task_ids(task, postprocess_fn=references_postprocessor, metric_fns=[superni_metric])
  for mixture, members in registration.mixtures.items():
    rates = seqio.get_mixture_or_task(mixture).rate_per_task_name
    _replace_mixture(mixture, rates.items())
    names = [registration.tasks[m] for m in members]
    if names and all(n in rank_tasks for n in names):
      _replace_mixture(mixture + RANK_SUFFIX, [(n + RANK_SUFFIX, 1.0) for n in names])


_DONE: dict[str, object] = {}


def register(source: str = "synthetic", data_dir: str | None = None, vocabulary: str = "byte",
             **register_kwargs):
  """Registers a source's tasks for T5X (once per process and arguments); returns its Registration.

  Args:
    source: "synthetic" (tasks.synthetic.register_synthetic: writes the suite to data_dir),
      "superni" (tasks.superni.register_superni; data_dir = a natural-instructions clone) or
      "t0" (tasks.t0.register_t0; data_dir = a P3 copy).
    vocabulary: "byte" or a SentencePiece model / Hugging Face directory (data.get_vocabulary).
    register_kwargs: passed to the source's register function (e.g. n_train_tasks, fewshot_ks).
  """
  if source not in SOURCES:
    raise ValueError(f"t5x_bridge.tasks: source={source!r}: expected one of {SOURCES}")
  if not data_dir:
    raise ValueError(f"t5x_bridge.tasks: source={source!r} needs data_dir")
  key = json.dumps([source, data_dir, vocabulary, register_kwargs], sort_keys=True, default=repr)
  if key not in _DONE:
    vocab = data.get_vocabulary(vocabulary)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in register_kwargs.items()}
    if source == "synthetic":
      from tasks import synthetic  # pylint: disable=g-import-not-at-top
      registration = synthetic.register_synthetic(data_dir, vocab, **kwargs)
    elif source == "superni":
      from tasks import superni  # pylint: disable=g-import-not-at-top
      registration = superni.register_superni(data_dir, vocab, **kwargs)
    else:
      from tasks import t0  # pylint: disable=g-import-not-at-top
      registration = t0.register_t0(data_dir, vocab, **kwargs)
    prepare_for_t5x(registration, source)
    _DONE[key] = registration
  return _DONE[key]


def registered(name: str, source: str = "synthetic", data_dir: str | None = None,
               vocabulary: str = "byte", **register_kwargs) -> str:
  """`register(...)`, then the SeqIO task or mixture `name` T5X should read (checked to exist).

  For gin: `MIXTURE_OR_TASK_NAME = @t5x_bridge.tasks.registered()` with `registered.name`,
  `.source`, `.data_dir` bound (the registration runs when T5X builds its dataset configs).
  """
  register(source, data_dir, vocabulary, **register_kwargs)
  if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
    known = sorted(seqio.MixtureRegistry.names())
    raise ValueError(f"t5x_bridge.tasks: no SeqIO task or mixture {name!r} after registering "
                     f"{source!r} from {data_dir} (mixtures: {', '.join(known)})")
  return name

