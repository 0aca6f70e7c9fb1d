"""T0 (bigscience/P3) as SeqIO tasks: the multi-task training mixture and the 11 held-out datasets.

Reads a copy of the P3 dataset repository, a SeqIO cache per prompted subset, from a local directory or a URL
(the JSON files and the listing through mhr_jax/storage.py; the TFRecords through TensorFlow's file systems, which
read gs:// with Google's credentials):
  <p3_dir>/data/<subset>/info.<split>.json   {"features": {name: {"dtype", "shape"}}, "num_shards", ...}
  <p3_dir>/data/<subset>/stats.<split>.json  {"examples": n, ...} (optional here; records are counted if absent)
  <p3_dir>/data/<subset>/<split>.tfrecord-0000i-of-0000n
with features inputs/targets (int token ids of T5's vocabulary, ignored here), inputs_pretokenized and
targets_pretokenized (strings, retokenized with our vocabulary) and, for classification subsets,
answer_choices (strings). The "_score_eval" subsets are not used: rank classification is built from
answer_choices.

Which subsets: tasks/t0_datasets.json (reviewable). Training: every template of the 38 T0 training datasets,
313 subsets, each its own task with id = its position in that file. The mixture cap (docs/METHODS.md), by
`cap_rule`: "authors" (the MHR authors' code, the default): every (dataset, template) task keeps at most
max_examples_per_dataset (500k) // n_templates examples (the first ones in file order) and its mixing rate
is that count; "t0" (the original T0 rule): only a dataset with more than 500k training examples has each
template's mixing rate capped at 500k // n_templates, and every other template's rate is its number of
examples.
Held-out evaluation: the original-task templates of the 11 datasets. All templates of a dataset share one
task id (caller-given, default after the training tasks). Each template's examples carry answer_choices and
the gold label (position of the stripped target among the stripped choices). Few-shot samples follow T-Few:
indices numpy.random.RandomState(seed).permutation(n)[:shots] of the dataset's few-shot source split (the
same as seeding the global generator and shuffling the example list); the same indices are used for every
template with n examples.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from mhr_jax import storage
from tasks import examples_dataset, replace_mixture, replace_task, seqio_name

CATALOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t0_datasets.json")
EVAL_SPLIT = "eval"
_TEXT_FEATURES = ("inputs_pretokenized", "targets_pretokenized")


# ---------------------------------------------------------------- catalog


def load_catalog(path: str = CATALOG) -> dict:
  """The validated dataset/template list (see tasks/t0_datasets.json)."""
  try:
    catalog = json.loads(storage.read_text(path))
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: T0 dataset list not found") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
  for key in ("max_examples_per_dataset", "fewshot_seeds", "train", "eval"):
    if key not in catalog:
      raise ValueError(f"{path}: missing field '{key}'")
  for section, fields in (("train", ("dataset", "train_size", "subsets")),
                          ("eval", ("dataset", "shots", "fewshot_split", "eval_split", "subsets"))):
    for i, entry in enumerate(catalog[section]):
      for field in fields:
        if field not in entry:
          raise ValueError(f"{path}: {section}[{i}] is missing field '{field}'")
      if not entry["subsets"]:
        raise ValueError(f"{path}: {section}[{i}] ({entry['dataset']}) lists no subsets")
  subsets = [s for section in ("train", "eval") for e in catalog[section] for s in e["subsets"]]
  if len(set(subsets)) != len(subsets):
    raise ValueError(f"{path}: a subset is listed twice")
  return catalog


# ---------------------------------------------------------------- reading P3


def subset_dir(p3_dir: str, subset: str) -> str:
  return os.path.join(p3_dir, "data", subset)


def _split_info(p3_dir: str, subset: str, split: str) -> dict:
  path = os.path.join(subset_dir(p3_dir, subset), f"info.{split}.json")
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path}: P3 split info not found (subset {subset!r}, split {split!r})")
  try:
    info = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
  features = info.get("features")
  if not isinstance(features, dict):
    raise ValueError(f"{path}: missing field 'features'")
  for name in _TEXT_FEATURES:
    if features.get(name, {}).get("dtype") != "string":
      raise ValueError(f"{path}: feature '{name}' (string) not found")
  return info


def _tfrecord_files(p3_dir: str, subset: str, split: str) -> list[str]:
  pattern = os.path.join(subset_dir(p3_dir, subset), f"{split}.tfrecord-*-of-*")
  files = storage.glob(pattern)
  if not files:
    raise FileNotFoundError(f"{pattern}: no P3 TFRecord files")
  return files


def read_split(p3_dir: str, subset: str, split: str, with_choices: bool = False) -> tf.data.Dataset:
  """Stream one P3 split as {"inputs", "targets"} strings (and "answer_choices" (n,) when asked)."""
  info = _split_info(p3_dir, subset, split)
  description = {name: tf.io.FixedLenFeature([], tf.string) for name in _TEXT_FEATURES}
  if with_choices:
    if info["features"].get("answer_choices", {}).get("dtype") != "string":
      raise ValueError(f"{os.path.join(subset_dir(p3_dir, subset), f'info.{split}.json')}: feature "
                       "'answer_choices' (string list) not found; rank classification needs it")
    description["answer_choices"] = tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True)

  def parse(record):
    ex = tf.io.parse_single_example(record, description)
    out = {"inputs": ex["inputs_pretokenized"], "targets": ex["targets_pretokenized"]}
    if with_choices:
      out["answer_choices"] = ex["answer_choices"]
    return out

  files = _tfrecord_files(p3_dir, subset, split)
  return tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def num_examples(p3_dir: str, subset: str, split: str) -> int:
  """Examples in a split: stats.<split>.json "examples" if present, else a count of the records."""
  stats = os.path.join(subset_dir(p3_dir, subset), f"stats.{split}.json")
  if storage.isfile(stats):
    value = json.loads(storage.read_text(stats)).get("examples")
    if not isinstance(value, int):
      raise ValueError(f"{stats}: field 'examples' (int) not found")
    return value
  return int(tf.data.TFRecordDataset(_tfrecord_files(p3_dir, subset, split)).reduce(
      np.int64(0), lambda n, _: n + 1).numpy())


@functools.lru_cache(maxsize=64)
def read_choice_examples(p3_dir: str, subset: str, split: str) -> tuple[dict, ...]:
  """All examples of a classification split with answer_choices and the gold label, in file order."""
  examples = []
  for i, ex in enumerate(read_split(p3_dir, subset, split, with_choices=True).as_numpy_iterator()):
    choices = [c.decode("utf-8") for c in ex["answer_choices"]]
    target = ex["targets"].decode("utf-8")
    stripped = [c.strip() for c in choices]
    if target.strip() not in stripped:
      raise ValueError(f"{subset_dir(p3_dir, subset)} split {split!r} example {i}: target {target!r} is not "
                       f"among answer_choices {choices}")
    examples.append({"inputs": ex["inputs"].decode("utf-8"), "targets": target,
                     "answer_choices": choices, "label": stripped.index(target.strip())})
  return tuple(examples)


def fewshot_indices(n: int, shots: int, seed: int) -> np.ndarray:
  """T-Few's few-shot sample: the first `shots` of numpy.random.RandomState(seed).permutation(n)."""
  if shots > n:
    raise ValueError(f"few-shot sample of {shots} examples from a split of {n}")
  return np.random.RandomState(seed).permutation(n)[:shots]


# ---------------------------------------------------------------- registration


@dataclasses.dataclass(frozen=True)
class Registration:
  """What register_t0 registered.

  Attributes:
    tasks: P3 subset -> SeqIO task name.
    task_ids: P3 subset -> task id (all templates of a held-out dataset share one id).
    mixtures: SeqIO mixture name -> P3 subsets.
    fewshot_splits: held-out dataset -> its few-shot split names ("train_k<shots>_seed<seed>").
  """
  tasks: dict[str, str]
  task_ids: dict[str, int]
  mixtures: dict[str, tuple[str, ...]]
  fewshot_splits: dict[str, tuple[str, ...]]


CAP_RULES = ("authors", "t0")


def _train_dataset_fn(p3_dir: str, subset: str, task_id: int, keep: int | None):
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # one shard per split in P3; the Task shuffles examples
    ds = read_split(p3_dir, subset, split)
    if keep is not None:
      ds = ds.take(keep)
    return ds.map(lambda ex: {**ex, "task_ids": tf.constant(task_id, tf.int32)})
  return dataset_fn


def _eval_dataset_fn(p3_dir: str, subset: str, task_id: int, entry: Mapping, seeds: Sequence[int]):
  splits = {EVAL_SPLIT: (entry["eval_split"], None)}
  splits.update({f"train_k{entry['shots']}_seed{s}": (entry["fewshot_split"], s) for s in seeds})

  def dataset_fn(split, shuffle_files, seed=None):
    # Fixed order: SeqIO shards the examples across hosts first, then shuffles them.
    del shuffle_files, seed
    if split not in splits:
      raise ValueError(f"T0 task {subset!r}: unknown split {split!r} (expected one of {sorted(splits)})")
    source_split, sample_seed = splits[split]
    examples = read_choice_examples(p3_dir, subset, source_split)
    if sample_seed is not None:
      examples = [examples[i] for i in fewshot_indices(len(examples), entry["shots"], sample_seed)]
    examples = [{**ex, "task_ids": task_id, "example_index": i} for i, ex in enumerate(examples)]
    return examples_dataset(examples, f"T0 task {subset!r} split {split!r}")
  return dataset_fn, list(splits)


def register_t0(
    p3_dir: str,
    vocabulary: seqio.Vocabulary,
    *,
    prefix: str = "t0",
    catalog_path: str = CATALOG,
    train_datasets: Sequence[str] | None = None,
    eval_datasets: Sequence[str] | None = None,
    heldout_task_ids: Mapping[str, int] | None = None,
    fewshot_seeds: Sequence[int] | None = None,
    cap_rule: str = "authors",
) -> Registration:
  """Register the T0 training tasks and mixture and the held-out evaluation tasks.

  Args:
    p3_dir: the P3 repository copy (holding data/<subset>/).
    vocabulary: the model's vocabulary (texts are retokenized).
    prefix: SeqIO names are "<prefix>_<subset>"; mixtures "<prefix>_train" and "<prefix>_eval_<dataset>".
    catalog_path: the dataset/template list.
    train_datasets, eval_datasets: restrict to these catalog "dataset" names (None: all; [] : none).
    heldout_task_ids: held-out dataset -> task id; default len(training subsets) + catalog position.
    fewshot_seeds: default the catalog's (42, 1024, 0).
    cap_rule: "authors" or "t0", the training-mixture cap (see the module docstring).
  Training tasks have split "train"; held-out tasks "eval" (the catalog's eval_split) and
  "train_k<shots>_seed<seed>". Missing folders or split files fail here, naming the path.
  """
  if cap_rule not in CAP_RULES:
    raise ValueError(f"register_t0: cap_rule={cap_rule!r}: expected one of {CAP_RULES}")
  catalog = load_catalog(catalog_path)
  seeds = tuple(catalog["fewshot_seeds"] if fewshot_seeds is None else fewshot_seeds)

  def pick(section, wanted):
    entries = catalog[section]
    if wanted is None:
      return entries
    known = {e["dataset"]: e for e in entries}
    for name in wanted:
      if name not in known:
        raise ValueError(f"{catalog_path}: no {section} dataset {name!r}")
    return [known[name] for name in wanted]

  train_entries, eval_entries = pick("train", train_datasets), pick("eval", eval_datasets)
  train_positions = {s: i for i, s in enumerate(s for e in catalog["train"] for s in e["subsets"])}
  for entry, split in [(e, "train") for e in train_entries] + [
      (e, sp) for e in eval_entries for sp in {e["eval_split"], e["fewshot_split"]}]:
    for subset in entry["subsets"]:
      _split_info(p3_dir, subset, split)

  tasks, task_ids, mixtures, fewshot = {}, {}, {}, {}
  cap_total = catalog["max_examples_per_dataset"]
  train_rates = []
  for entry in train_entries:
    cap = cap_total // len(entry["subsets"])
    if cap_rule == "t0" and entry["train_size"] <= cap_total:
      cap = None
    for subset in entry["subsets"]:
      task_ids[subset] = train_positions[subset]
      tasks[subset] = seqio_name(prefix, subset)
      keep = cap if cap_rule == "authors" else None  # the authors keep at most `cap` examples
      replace_task(tasks[subset], _train_dataset_fn(p3_dir, subset, task_ids[subset], keep), ["train"],
                   vocabulary)

      def rate(task, subset=subset, cap=cap):
        n = num_examples(p3_dir, subset, "train")
        return float(n if cap is None else min(n, cap))
      train_rates.append((tasks[subset], rate))
  if train_rates:
    mixtures[seqio_name(prefix, "train")] = tuple(s for e in train_entries for s in e["subsets"])
    replace_mixture(seqio_name(prefix, "train"), train_rates)

  for entry in eval_entries:
    dataset = entry["dataset"]
    if heldout_task_ids is None:
      task_id = len(train_positions) + catalog["eval"].index(entry)
    elif dataset in heldout_task_ids:
      task_id = int(heldout_task_ids[dataset])
    else:
      raise ValueError(f"heldout_task_ids: no id for held-out dataset {dataset!r}")
    for subset in entry["subsets"]:
      dataset_fn, splits = _eval_dataset_fn(p3_dir, subset, task_id, entry, seeds)
      task_ids[subset] = task_id
      tasks[subset] = seqio_name(prefix, subset)
      replace_task(tasks[subset], dataset_fn, splits, vocabulary)
    mixture = seqio_name(prefix, "eval", dataset)
    replace_mixture(mixture, [(tasks[s], 1.0) for s in entry["subsets"]])
    mixtures[mixture] = tuple(entry["subsets"])
    fewshot[dataset] = tuple(f"train_k{entry['shots']}_seed{s}" for s in seeds)
  return Registration(tasks=tasks, task_ids=task_ids, mixtures=mixtures, fewshot_splits=fewshot)
