"""Super-NaturalInstructions (natural-instructions v2) as SeqIO tasks.

Reads a clone of allenai/natural-instructions, a local directory or a URL (gs://..., ram://...; read through
mhr_jax/storage.py):
  <clone>/tasks/<task>.json  "Definition" (list of str; a str in old versions), "Positive Examples" and
                             "Negative Examples" ([{input, output, explanation}]), "Instances"
                             ([{id, input, output: [str, ...]}]), and metadata (Source, Categories, ...).
  <clone>/splits/default/train_tasks.txt, test_tasks.txt: one task name per line (756 and 119 tasks).

Instance splits (docs/METHODS.md, Protocols): the first 100 instances in file order are a task's test set for
every seed. The remaining instances R (file order) are permuted with numpy.random.default_rng(seed)
.permutation(len(R)); few-shot train = the first k of that order, dev = the next k. The multi-task training
split takes up to `max_train_instances` (default 100) instances of every listed task in the order of
default_rng(train_sample_seed).permutation over all its instances, as Tk-Instruct samples its training tasks
(so a task with 100 instances or fewer takes part too); holdout_test_from_train=True draws them from R
instead, keeping the 100 test instances out of training.

Inputs follow Tk-Instruct's template (its ni_collator), including its quirks:
  "Definition: <definition[0] stripped>" + "." if it does not end in punctuation, then "\\n\\n";
  per positive example i: " Positive Example i -\\n" "Input: <input>" [+ "."] "\\n" " Output: <output>" [+ "."]
  "\\n\\n" (note the leading spaces);
  "Now complete the following example -\\n" "Input: <instance input>" [+ "."] "\\n" "Output: ".
With a token budget, positive examples are added only while the whole input (plus EOS) fits, as Tk-Instruct
does. The MHR authors' runs use another string (prompt "authors", their DataCollatorForNI with
use_task_descriptions and no examples):
  "Task definition: <definition[0] stripped>" [+ "."] "\\n"
  "Now complete the following example -\\n" "Input: <instance input>" [+ "."] "\\n" "Output:";
an input over the token budget keeps its first (budget - len("\\nOutput:")) tokens, decoded, and then
"\\nOutput:", as their collator does. Training targets are the first reference output, stripped; every
reference is kept for evaluation (feature "references").
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
import seqio

from mhr_jax import storage
from tasks import examples_dataset, replace_mixture, replace_task, seqio_name

TEST_INSTANCES = 100
PROMPTS = ("tk_instruct", "definition", "input_only", "authors")
AUTHORS_OUTPUT_CUE = "\nOutput:"
DEFAULT_FEWSHOT_KS = (16, 32, 64, 100, 1000)
DEFAULT_FEWSHOT_SEEDS = (13, 42, 58)
_FEWSHOT_SPLIT = re.compile(r"^(train|dev)_k(\d+)_seed(\d+)$")


# ---------------------------------------------------------------- reading the clone


def _check_clone(clone_dir: str) -> None:
  if not storage.isdir(os.path.join(clone_dir, "tasks")):
    raise FileNotFoundError(f"{clone_dir}: not a natural-instructions clone (no tasks/ directory)")


def task_path(clone_dir: str, task_name: str) -> str:
  return os.path.join(clone_dir, "tasks", f"{task_name}.json")


def _validate_task(path: str, data) -> None:
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object at the top level")
  for key in ("Definition", "Positive Examples", "Instances"):
    if key not in data:
      raise ValueError(f"{path}: missing field '{key}'")
  definition = data["Definition"]
  if isinstance(definition, str):
    definition = [definition]
  if not (isinstance(definition, list) and definition and all(isinstance(d, str) for d in definition)):
    raise ValueError(f"{path}: field 'Definition' must be a non-empty list of strings")
  for i, ex in enumerate(data["Positive Examples"]):
    for key in ("input", "output"):
      if not isinstance(ex, dict) or not isinstance(ex.get(key), str):
        raise ValueError(f"{path}: 'Positive Examples'[{i}] needs a string field '{key}'")
  instances = data["Instances"]
  if not isinstance(instances, list) or not instances:
    raise ValueError(f"{path}: task has no instances")
  seen = set()
  for i, inst in enumerate(instances):
    if not isinstance(inst, dict):
      raise ValueError(f"{path}: Instances[{i}] is not an object")
    for key in ("id", "input", "output"):
      if key not in inst:
        raise ValueError(f"{path}: Instances[{i}] is missing field '{key}'")
    if not isinstance(inst["id"], str) or not isinstance(inst["input"], str):
      raise ValueError(f"{path}: Instances[{i}]: 'id' and 'input' must be strings")
    out = inst["output"]
    if not (isinstance(out, list) and out and all(isinstance(o, str) for o in out)):
      raise ValueError(f"{path}: Instances[{i}]: 'output' must be a non-empty list of strings")
    if inst["id"] in seen:
      raise ValueError(f"{path}: Instances[{i}]: duplicate id {inst['id']!r}")
    seen.add(inst["id"])


@functools.lru_cache(maxsize=16)
def _load_task_file(path: str, file_version: tuple) -> dict:
  del file_version  # cache key only: a rewritten file is read again
  try:
    data = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  _validate_task(path, data)
  return data


def load_task(clone_dir: str, task_name: str) -> dict:
  """The validated JSON of one task (cached per file version; do not mutate)."""
  _check_clone(clone_dir)
  path = task_path(clone_dir, task_name)
  try:
    file_version = storage.version(path)  # one request for an object
  except FileNotFoundError:
    raise ValueError(f"unknown SuperNI task {task_name!r}: {path} does not exist") from None
  return _load_task_file(path, file_version)


def read_task_list(path: str) -> list[str]:
  """Task names from a list file (one per line; blank lines ignored)."""
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path}: task list file not found")
  names = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
  if not names:
    raise ValueError(f"{path}: task list is empty")
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"{path}: task {dupes[0]!r} is listed more than once")
  return names


def default_split_files(clone_dir: str) -> dict[str, str]:
  """{"train": .../splits/default/train_tasks.txt, "test": .../test_tasks.txt}."""
  _check_clone(clone_dir)
  base = os.path.join(clone_dir, "splits", "default")
  return {s: os.path.join(base, f"{s}_tasks.txt") for s in ("train", "test")}


# ---------------------------------------------------------------- instance splits


def instance_splits(clone_dir: str, task_name: str, k: int, seed: int) -> dict[str, list[str]]:
  """Instance ids of one task: {"train": k ids, "dev": k ids, "test": the first 100 ids in file order}.

  train and dev are disjoint, drawn from the instances after the first 100 with
  numpy.random.default_rng(seed).permutation (train = first k of the permutation, dev = next k). A task
  with at most 100 instances has them all as test and supports k = 0 only.
  """
  if not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"instance_splits: k must be a non-negative int, got {k!r}")
  ids = [inst["id"] for inst in load_task(clone_dir, task_name)["Instances"]]
  rest = ids[TEST_INSTANCES:]
  if len(rest) < 2 * k:
    raise ValueError(
        f"SuperNI task {task_name!r} ({task_path(clone_dir, task_name)}): {len(ids)} instances leave "
        f"{len(rest)} after the {TEST_INSTANCES} test instances, but train and dev with k={k} need {2 * k}")
  order = np.random.default_rng(seed).permutation(len(rest))
  return {"train": [rest[i] for i in order[:k]], "dev": [rest[i] for i in order[k:2 * k]],
          "test": ids[:TEST_INSTANCES]}


def train_instance_ids(clone_dir: str, task_name: str, max_train_instances: int = 100,
                       holdout_test_from_train: bool = False, sample_seed: int = 0) -> list[str]:
  """Instance ids of the multi-task training split (see the module docstring)."""
  ids = [inst["id"] for inst in load_task(clone_dir, task_name)["Instances"]]
  pool = ids[TEST_INSTANCES:] if holdout_test_from_train else ids
  order = np.random.default_rng(sample_seed).permutation(len(pool))
  return [pool[i] for i in order[:max_train_instances]]


# ---------------------------------------------------------------- input formatting


def _with_period(text: str) -> str:
  return text if text[-1] in string.punctuation else text + "."


def format_input(task: Mapping, instance_input: str, num_pos_examples: int = 0, fits=None) -> str:
  """Tk-Instruct's input for one instance (definition, positive examples, instance).

  Args:
    task: a task JSON (load_task).
    instance_input: the instance's "input".
    num_pos_examples: how many of the task's positive examples to show at most.
    fits: optional predicate on the full input string; a positive example is added only if the input
      with it still fits (Tk-Instruct's max_source_length rule); None adds all.
  """
  definition = task["Definition"]
  definition = definition[0] if isinstance(definition, list) else definition
  head = _with_period("Definition: " + definition.strip()) + "\n\n"
  tail = ("Now complete the following example -\n" + _with_period("Input: " + instance_input.strip())
          + "\nOutput: ")
  examples = ""
  for i, ex in enumerate(task["Positive Examples"][:num_pos_examples]):
    block = (f" Positive Example {i + 1} -\n" + _with_period("Input: " + ex["input"].strip()) + "\n"
             + _with_period(" Output: " + ex["output"].strip()) + "\n\n")
    if fits is not None and not fits(head + examples + block + tail):
      break
    examples += block
  return head + examples + tail


def format_authors_input(task: Mapping, instance_input: str, truncate=None) -> str:
  """The MHR authors' input for one instance (see the module docstring).

  Args:
    task: a task JSON (load_task).  instance_input: the instance's "input".
    truncate: optional fn(text) -> text that shortens an over-long input to its kept prefix (their
      collator's rule); None keeps it whole.
  """
  definition = task["Definition"]
  definition = definition[0] if isinstance(definition, list) else definition
  text = (_with_period("Task definition: " + definition.strip()) + "\n"
          + "Now complete the following example -\n" + _with_period("Input: " + instance_input.strip())
          + AUTHORS_OUTPUT_CUE)
  return text if truncate is None else truncate(text)


@dataclasses.dataclass(frozen=True)
class InputFormat:
  """How instance inputs are rendered.

  Attributes:
    prompt: "tk_instruct" (definition, positive examples, instance; see the module docstring),
      "authors" (the MHR authors' string: definition and instance, no examples), "definition" (the
      definition, a space and the instance input: Tk-Instruct's content without its boilerplate, for
      short inputs) or "input_only" (the instance input verbatim: the task id is the only task signal).
    num_pos_examples: positive examples shown after the definition (Tk-Instruct uses 0 or 2).
    max_input_tokens: token budget (input plus EOS) for adding positive examples, and for the
      "authors" prompt's truncation; None: no budget.
  """
  prompt: str = "tk_instruct"
  num_pos_examples: int = 0
  max_input_tokens: int | None = None

  def __post_init__(self):
    if self.prompt not in PROMPTS:
      raise ValueError(f"InputFormat.prompt={self.prompt!r}: expected one of {PROMPTS}")
    if self.num_pos_examples < 0:
      raise ValueError(f"InputFormat.num_pos_examples={self.num_pos_examples}: must be >= 0")
    if self.prompt == "authors" and self.num_pos_examples:
      raise ValueError(f"InputFormat.num_pos_examples={self.num_pos_examples}: prompt 'authors' shows no "
                       "positive examples (the authors' SuperNI runs use num_pos_examples 0)")


# ---------------------------------------------------------------- split examples


@dataclasses.dataclass(frozen=True)
class _TaskSpec:
  clone_dir: str
  task_name: str
  task_id: int
  input_format: InputFormat
  vocabulary: seqio.Vocabulary = dataclasses.field(compare=False)  # unhashable; keyed by id below
  max_train_instances: int
  holdout_test_from_train: bool
  train_sample_seed: int


def _split_ids(spec: _TaskSpec, split: str) -> list[str]:
  if split == "train":
    return train_instance_ids(spec.clone_dir, spec.task_name, spec.max_train_instances,
                              spec.holdout_test_from_train, spec.train_sample_seed)
  if split == "test":
    return instance_splits(spec.clone_dir, spec.task_name, 0, 0)["test"]
  match = _FEWSHOT_SPLIT.match(split)
  if not match:
    raise ValueError(f"SuperNI task {spec.task_name!r}: unknown split {split!r} (expected train, test, "
                     "train_k<k>_seed<seed> or dev_k<k>_seed<seed>)")
  part, k, seed = match.group(1), int(match.group(2)), int(match.group(3))
  return instance_splits(spec.clone_dir, spec.task_name, k, seed)[part]


@functools.lru_cache(maxsize=1024)  # holds a full training mixture (756 tasks x <= 100 examples)
def _split_examples_cached(spec: _TaskSpec, split: str, vocabulary_id: int, file_version: tuple | None
                           ) -> tuple[dict, ...]:
  del vocabulary_id, file_version  # cache key only (the spec keeps its vocabulary alive, so the id is stable)
  task = load_task(spec.clone_dir, spec.task_name)
  by_id = {inst["id"]: inst for inst in task["Instances"]}
  fits = None
  budget, vocab = spec.input_format.max_input_tokens, spec.vocabulary
  if budget is not None:
    fits = lambda text: len(vocab.encode(text)) + 1 <= budget  # +1: EOS

  def truncate(text):
    if fits is None or fits(text):
      return text
    # The authors' collator: the first budget - len(cue) tokens, decoded, then the cue again (the
    # pipeline's truncation to the budget then keeps EOS, as their tokenizer call does).
    return vocab.decode(vocab.encode(text)[:budget - len(vocab.encode(AUTHORS_OUTPUT_CUE))]) + AUTHORS_OUTPUT_CUE
  examples = []
  for instance_id in _split_ids(spec, split):
    inst = by_id[instance_id]
    if spec.input_format.prompt == "input_only":
      inputs = inst["input"]
    elif spec.input_format.prompt == "authors":
      inputs = format_authors_input(task, inst["input"], truncate)
    elif spec.input_format.prompt == "definition":
      definition = task["Definition"]
      inputs = f"{(definition[0] if isinstance(definition, list) else definition).strip()} {inst['input']}"
    else:
      inputs = format_input(task, inst["input"], spec.input_format.num_pos_examples, fits)
    examples.append({"inputs": inputs, "targets": inst["output"][0].strip(),
                     "references": list(inst["output"]), "task_ids": spec.task_id, "instance_id": instance_id})
  return tuple(examples)


def _split_examples(spec: _TaskSpec, split: str) -> tuple[dict, ...]:
  """Formatted examples of one split: dicts with inputs, targets, references, task_ids, instance_id."""
  try:
    file_version = storage.version(task_path(spec.clone_dir, spec.task_name))
  except FileNotFoundError:
    file_version = None
  return _split_examples_cached(spec, split, id(spec.vocabulary), file_version)


def _dataset_fn(spec: _TaskSpec):
  def dataset_fn(split, shuffle_files, seed=None):
    # Fixed order: SeqIO shards the examples across hosts first, then shuffles them (buffer 1000).
    del shuffle_files, seed
    examples = _split_examples(spec, split)
    if not examples:
      raise ValueError(f"SuperNI task {spec.task_name!r}: split {split!r} has no examples "
                       f"({task_path(spec.clone_dir, spec.task_name)})")
    return examples_dataset(examples, f"SuperNI task {spec.task_name!r} split {split!r}")
  return dataset_fn


# ---------------------------------------------------------------- registration


@dataclasses.dataclass(frozen=True)
class Registration:
  """What register_superni registered.

  Attributes:
    tasks: SuperNI task name -> SeqIO task name.
    task_ids: SuperNI task name -> integer task id (the routing row).
    mixtures: SeqIO mixture name -> SuperNI task names, in list-file order.
  """
  tasks: dict[str, str]
  task_ids: dict[str, int]
  mixtures: dict[str, tuple[str, ...]]


def _assign_task_ids(train: Sequence[str], others: Sequence[str],
                     heldout_task_ids: Mapping[str, int] | None) -> dict[str, int]:
  ids = {name: i for i, name in enumerate(train)}
  extra = [n for n in others if n not in ids]
  if heldout_task_ids is None:
    ids.update({name: len(train) + i for i, name in enumerate(dict.fromkeys(extra))})
    return ids
  for name, tid in heldout_task_ids.items():
    if name in ids and ids[name] != tid:
      raise ValueError(f"heldout_task_ids[{name!r}]={tid}: {name} is a training task with id {ids[name]}")
  for name in extra:
    if name not in heldout_task_ids:
      raise ValueError(f"heldout_task_ids: no id for held-out task {name!r}")
    ids[name] = int(heldout_task_ids[name])
  return ids


def register_superni(
    clone_dir: str,
    vocabulary: seqio.Vocabulary,
    *,
    prefix: str = "superni",
    task_list_files: Sequence[str] = (),
    heldout_task_ids: Mapping[str, int] | None = None,
    max_train_instances: int = 100,
    holdout_test_from_train: bool = False,
    train_sample_seed: int = 0,
    fewshot_ks: Sequence[int] = DEFAULT_FEWSHOT_KS,
    fewshot_seeds: Sequence[int] = DEFAULT_FEWSHOT_SEEDS,
    input_format: InputFormat = InputFormat(),
) -> Registration:
  """Register one SeqIO task per listed SuperNI task, and mixtures over the task lists.

  Tasks: "<prefix>_<task>" for every task named in splits/default/{train,test}_tasks.txt or in a
  `task_list_files` file, with splits "train", "test" and "train_k<k>_seed<s>" / "dev_k<k>_seed<s>" for k in
  `fewshot_ks`, s in `fewshot_seeds` (a split whose k is too large for a task fails when it is read, naming
  the task). Examples: inputs, targets (str), references (list of str), task_ids (int32), instance_id.
  Mixtures: "<prefix>_train" and "<prefix>_test" over the default lists and "<prefix>_<file stem>" per list
  file; rates are the number of "train" examples (a task without any is left out of training batches),
  except "<prefix>_test" which weighs tasks equally.
  Task ids: a training task's id is its position in train_tasks.txt; other tasks take `heldout_task_ids`
  (which must then cover them all) or, by default, len(train) + their order of first appearance in
  test_tasks.txt and then the list files.
  """
  files = default_split_files(clone_dir)
  lists = {seqio_name(prefix, "train"): (files["train"], read_task_list(files["train"])),
           seqio_name(prefix, "test"): (files["test"], read_task_list(files["test"]))}
  for path in task_list_files:
    stem = os.path.splitext(os.path.basename(path))[0]
    name = seqio_name(prefix, stem)
    if name in lists:
      raise ValueError(f"{path}: mixture name {name!r} is already taken by {lists[name][0]}")
    lists[name] = (path, read_task_list(path))
  for path, names in lists.values():
    for task in names:
      if not storage.isfile(task_path(clone_dir, task)):
        raise ValueError(f"{path}: unknown SuperNI task {task!r} ({task_path(clone_dir, task)} does not exist)")

  train_names = lists[seqio_name(prefix, "train")][1]
  all_names = list(dict.fromkeys(n for _, names in lists.values() for n in names))
  task_ids = _assign_task_ids(train_names, all_names, heldout_task_ids)
  seqio_names = {n: seqio_name(prefix, n) for n in all_names}
  if len(set(seqio_names.values())) != len(seqio_names):
    raise ValueError(f"two SuperNI task names map to the same SeqIO name under prefix {prefix!r}")

  splits = ["train", "test"] + [f"{part}_k{k}_seed{s}" for k in fewshot_ks for s in fewshot_seeds
                                for part in ("train", "dev")]
  specs = {}
  for name in all_names:
    specs[name] = _TaskSpec(clone_dir, name, task_ids[name], input_format, vocabulary,
                            max_train_instances, holdout_test_from_train, train_sample_seed)
    replace_task(seqio_names[name], _dataset_fn(specs[name]), splits, vocabulary)

  def train_rate(spec):
    return lambda task: float(len(_split_examples(spec, "train")))

  mixtures = {}
  for mixture, (_, names) in lists.items():
    equal = mixture == seqio_name(prefix, "test")
    replace_mixture(mixture, [(seqio_names[n], 1.0 if equal else train_rate(specs[n])) for n in names])
    mixtures[mixture] = tuple(names)
  return Registration(tasks=seqio_names, task_ids=task_ids, mixtures=mixtures)
