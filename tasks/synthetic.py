"""The embedded synthetic multi-task suite, written in the Super-NaturalInstructions on-disk format.

An input is four words, one of each category (a color, an animal, a number, a fruit), in random order, e.g.
"two plum red owl". A skill reads one category and may transform it: the color, the color in French, the
animal, the animal in the plural, the number, the next number, the fruit, the fruit in capitals. A task
composes two different skills: its output is the first skill's word, then the second's ("red owls"). So
tasks share skills, a held-out task is a new composition of skills the training tasks use (a router has
shared structure to discover), and an answer half right gets ROUGE-L 50. The words come from small lists,
so a byte-level T5 learns the skills in a CPU minute. The suite goes through the same loader as the real
data (tasks.superni); `register_synthetic` registers it with the "input_only" prompt by default, so the
task id is the only task signal (the task definition is in each file, e.g. for a base model's training).

Layout written: <out>/tasks/<task>.json (all SuperNI fields), <out>/splits/default/{train,test}_tasks.txt.
Deterministic given its arguments; every file is written atomically (temp file, then os.replace), the split
lists last.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from tasks import superni

CATEGORIES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "black", "white", "pink"),
    "animal": ("cat", "dog", "fox", "owl", "bee", "cow"),
    "number": ("one", "two", "three", "four", "five", "six"),
    "fruit": ("apple", "lemon", "mango", "grape", "peach", "plum"),
}
_FRENCH = dict(zip(CATEGORIES["color"], ("rouge", "bleu", "vert", "noir", "blanc", "rose")))
_PLURAL = dict(zip(CATEGORIES["animal"], ("cats", "dogs", "foxes", "owls", "bees", "cows")))
_NEXT = dict(zip(CATEGORIES["number"], ("two", "three", "four", "five", "six", "seven")))


def _word(category: str) -> Callable[[Sequence[str]], str]:
  """The input's word of `category`."""
  return lambda words: next(w for w in words if w in CATEGORIES[category])


# name -> (function of the input's words, description used in the task definition)
SKILLS: dict[str, tuple[Callable[[Sequence[str]], str], str]] = {
    "color": (_word("color"), "the color"),
    "color_fr": (lambda w: _FRENCH[_word("color")(w)], "the color in French"),
    "animal": (_word("animal"), "the animal"),
    "animals": (lambda w: _PLURAL[_word("animal")(w)], "the animal in the plural"),
    "number": (_word("number"), "the number"),
    "next": (lambda w: _NEXT[_word("number")(w)], "the next number"),
    "fruit": (_word("fruit"), "the fruit"),
    "fruit_caps": (lambda w: _word("fruit")(w).upper(), "the fruit in capitals"),
}


def compose(first: str, second: str) -> Callable[[str], str]:
  """The task (first, second): input text -> "<first skill's word> <second skill's word>"."""
  f, g = SKILLS[first][0], SKILLS[second][0]
  return lambda text: f"{f(text.split())} {g(text.split())}"


def _candidate_pairs() -> list[tuple[str, str]]:
  """Every ordered pair of different skills: 56 tasks, all with different outputs."""
  return [(a, b) for a, b in itertools.permutations(SKILLS, 2)]


def choose_compositions(n_train_tasks: int, n_test_tasks: int, seed: int
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """(train pairs, test pairs): disjoint; every skill appears in training; a test pair (a, b) has a first
  and b second in some training pairs, so a held-out task recombines what training tasks do."""
  pairs = _candidate_pairs()
  if n_train_tasks < 1 or n_test_tasks < 0 or n_train_tasks + n_test_tasks > len(pairs):
    raise ValueError(f"synthetic suite: n_train_tasks={n_train_tasks}, n_test_tasks={n_test_tasks}: need "
                     f"n_train_tasks >= 1 and at most {len(pairs)} tasks in all")
  rng = np.random.default_rng(seed)
  for _ in range(1000):
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    train = order[:n_train_tasks]
    covered = {s for pair in train for s in pair}
    firsts, seconds = {a for a, _ in train}, {b for _, b in train}
    test = [(a, b) for a, b in order[n_train_tasks:] if a in firsts and b in seconds][:n_test_tasks]
    if len(test) == n_test_tasks and (covered == set(SKILLS) or 2 * n_train_tasks < len(SKILLS)):
      return train, test
  raise ValueError(f"synthetic suite: no split of {len(pairs)} compositions into {n_train_tasks} train "
                   f"tasks covering every skill and {n_test_tasks} test tasks (seed {seed})")


def _random_inputs(rng: np.random.Generator, n: int) -> list[str]:
  """n distinct inputs: one word of each category, shuffled."""
  out, seen = [], set()
  space = int(np.prod([len(v) for v in CATEGORIES.values()])) * 24
  if n > space:
    raise ValueError(f"synthetic suite: n_instances={n}: at most {space} distinct inputs")
  while len(out) < n:
    words = [ws[int(rng.integers(len(ws)))] for ws in CATEGORIES.values()]
    rng.shuffle(words)
    text = " ".join(words)
    if text not in seen:
      seen.add(text)
      out.append(text)
  return out


def definition(first: str, second: str) -> str:
  return f"Write {SKILLS[first][1]}, then {SKILLS[second][1]}."


def _task_json(name: str, first: str, second: str, n_instances: int, rng: np.random.Generator) -> dict:
  fn = compose(first, second)
  inputs = _random_inputs(rng, n_instances + 3)
  positives, negative, instances = inputs[:2], inputs[2], inputs[3:]
  return {
      "Contributors": ["mhr-jax synthetic suite"],
      "Source": ["synthetic"],
      "URL": [],
      "Categories": ["Information Extraction"],
      "Reasoning": [],
      "Definition": [definition(first, second)],
      "Input_language": ["English"],
      "Output_language": ["English"],
      "Instruction_language": ["English"],
      "Domains": ["Synthetic"],
      "Positive Examples": [
          {"input": s, "output": fn(s), "explanation": f"{first}, then {second}"} for s in positives],
      "Negative Examples": [
          {"input": negative, "output": fn(negative)[::-1], "explanation": "the letters are reversed"}],
      "Instances": [{"id": f"{name.split('_')[0]}-{i:05d}", "input": s, "output": [fn(s)]}
                    for i, s in enumerate(instances)],
      "Instance License": ["Unknown"],
  }


def _write_atomic(path: str, text: str) -> None:
  # A unique temp name in the same directory (several hosts may write the same suite), then a rename.
  with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=os.path.dirname(path),
                                   prefix=os.path.basename(path) + ".", suffix=".tmp", delete=False) as f:
    f.write(text)
  os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
  os.replace(f.name, path)


def task_name(index: int, first: str, second: str) -> str:
  return f"task{index:03d}_synthetic_{first}_then_{second}"


def task_skills(name: str) -> tuple[str, str]:
  """(first, second) skill of a task written by this module, from its name."""
  first, second = name.split("_synthetic_", 1)[1].split("_then_")
  return first, second


def write_synthetic_suite(out_dir: str, n_train_tasks: int = 16, n_test_tasks: int = 4,
                          n_instances: int = 200, seed: int = 0) -> str:
  """Write the suite under out_dir (created if needed) and return out_dir.

  Args:
    n_train_tasks, n_test_tasks: tasks listed in splits/default/{train,test}_tasks.txt.
    n_instances: instances per task (the first 100 are the test instances of the SuperNI protocol).
    seed: selects the compositions and the strings.
  """
  if n_instances < 1:
    raise ValueError(f"synthetic suite: n_instances={n_instances}: must be >= 1")
  train, test = choose_compositions(n_train_tasks, n_test_tasks, seed)
  os.makedirs(os.path.join(out_dir, "tasks"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "splits", "default"), exist_ok=True)
  names = {"train": [], "test": []}
  for index, (split, (first, second)) in enumerate(
      [("train", p) for p in train] + [("test", p) for p in test], start=1):
    name = task_name(index, first, second)
    rng = np.random.default_rng([seed, index])
    _write_atomic(os.path.join(out_dir, "tasks", f"{name}.json"),
                  json.dumps(_task_json(name, first, second, n_instances, rng), indent=1) + "\n")
    names[split].append(name)
  for split, listed in names.items():
    _write_atomic(os.path.join(out_dir, "splits", "default", f"{split}_tasks.txt"),
                  "".join(n + "\n" for n in listed))
  return out_dir


def register_synthetic(out_dir: str, vocabulary, *, prefix: str = "synthetic", n_train_tasks: int = 16,
                       n_test_tasks: int = 4, n_instances: int = 200, seed: int = 0, **superni_kwargs):
  """Write the suite to out_dir and register it through tasks.superni with the "input_only" prompt.

  Mixtures "<prefix>_train" and "<prefix>_test"; other keyword arguments go to register_superni.
  Returns the tasks.superni.Registration.
  """
  write_synthetic_suite(out_dir, n_train_tasks, n_test_tasks, n_instances, seed)
  superni_kwargs.setdefault("input_format", superni.InputFormat(prompt="input_only"))
  return superni.register_superni(out_dir, vocabulary, prefix=prefix, **superni_kwargs)
