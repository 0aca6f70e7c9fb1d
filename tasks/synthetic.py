"""The embedded synthetic multi-task suites, written in the Super-NaturalInstructions on-disk format.

A suite has words in a few categories and skills; an input holds one word of each category in random order,
a skill reads one category and may transform it, and a task is a tuple of skills: its output is the skills'
words in order, its definition names them in order ("Write the color, then the animal in the plural."). So
tasks share skills, a held-out task is a new composition of skills the training tasks use (a router has
shared structure to discover), and a partly right answer gets partial ROUGE-L. The words come from small
lists, so a byte-level T5 learns the skills on a CPU. Two suites (SUITES):

- "demo" (configs/experiments/demo.gin): an input is four words (a color, an animal, a number, a fruit), e.g.
  "two plum red owl"; 8 skills: the color, the color in French, the animal, the animal in the plural, the
  number, the next number, the fruit, the fruit in capitals; a task composes two different skills ("red owls").
- "study" (tasks/synthetic_study.py, whose docstring gives the design): the same four categories, 16 skills,
  tasks of 2 or 3 skills, more skills than an 8-adapter inventory, held-out tasks that recombine trained skills.

A suite goes through the same loader as the real data (tasks.superni); `register_synthetic` registers it with
the "input_only" prompt by default, so the task id is the only task signal (the task definition is in each
file, e.g. for a base model's training).

Layout written: <out>/tasks/<task>.json (all SuperNI fields), <out>/splits/default/{train,test}_tasks.txt.
Deterministic given its arguments; every file is written atomically (mhr_jax/storage.py; out_dir may be a
URL), the split lists last.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from mhr_jax import storage
from tasks import superni, synthetic_study

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


def compose(skills: Sequence[str], table: Mapping = SKILLS) -> Callable[[str], str]:
  """The task `skills` (names in `table`): input text -> the skills' words in order, space-separated."""
  functions = [table[s][0] for s in skills]
  return lambda text: " ".join(f(text.split()) for f in functions)


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


class Suite(NamedTuple):
  """A suite's words per category, its skills (name -> (function of the input's words, description)) and its
  choice of (train, test) skill tuples: choose(n_train_tasks, n_test_tasks, seed)."""
  categories: Mapping[str, Sequence[str]]
  skills: Mapping[str, tuple[Callable[[Sequence[str]], str], str]]
  choose: Callable[[int, int, int], tuple[list[tuple[str, ...]], list[tuple[str, ...]]]]


SUITES: dict[str, Suite] = {
    "demo": Suite(CATEGORIES, SKILLS, choose_compositions),
    "study": Suite(synthetic_study.CATEGORIES, synthetic_study.SKILLS, synthetic_study.choose_compositions),
}


def _random_inputs(rng: np.random.Generator, n: int, categories: Mapping[str, Sequence[str]]) -> list[str]:
  """n distinct inputs: one word of each category, shuffled."""
  out, seen = [], set()
  space = math.prod(len(v) for v in categories.values()) * math.factorial(len(categories))
  if n > space:
    raise ValueError(f"synthetic suite: n_instances={n}: at most {space} distinct inputs")
  while len(out) < n:
    words = [ws[int(rng.integers(len(ws)))] for ws in categories.values()]
    rng.shuffle(words)
    text = " ".join(words)
    if text not in seen:
      seen.add(text)
      out.append(text)
  return out


def definition(skills: Sequence[str], table: Mapping = SKILLS) -> str:
  """The task definition of `skills` (names in `table`): "Write <description>, then <description>."."""
  return "Write " + ", then ".join(table[s][1] for s in skills) + "."


def _task_json(name: str, skills: Sequence[str], n_instances: int, rng: np.random.Generator,
               suite: Suite) -> dict:
  fn = compose(skills, suite.skills)
  inputs = _random_inputs(rng, n_instances + 3, suite.categories)
  positives, negative, instances = inputs[:2], inputs[2], inputs[3:]
  return {
      "Contributors": ["mhr-jax synthetic suite"],
      "Source": ["synthetic"],
      "URL": [],
      "Categories": ["Information Extraction"],
      "Reasoning": [],
      "Definition": [definition(skills, suite.skills)],
      "Input_language": ["English"],
      "Output_language": ["English"],
      "Instruction_language": ["English"],
      "Domains": ["Synthetic"],
      "Positive Examples": [
          {"input": s, "output": fn(s), "explanation": ", then ".join(skills)} for s in positives],
      "Negative Examples": [
          {"input": negative, "output": fn(negative)[::-1], "explanation": "the letters are reversed"}],
      "Instances": [{"id": f"{name.split('_')[0]}-{i:05d}", "input": s, "output": [fn(s)]}
                    for i, s in enumerate(instances)],
      "Instance License": ["Unknown"],
  }


def _write_atomic(path: str, text: str) -> None:
  # Several hosts may write the same suite: each process writes every file, whole (mhr_jax/storage.py).
  storage.write_text_atomic(path, text, every_process=True)


def task_name(index: int, skills: Sequence[str]) -> str:
  return f"task{index:03d}_synthetic_" + "_then_".join(skills)


def task_skills(name: str) -> tuple[str, ...]:
  """The skills, in order, of a task written by this module, from its name."""
  return tuple(name.split("_synthetic_", 1)[1].split("_then_"))


def write_synthetic_suite(out_dir: str, n_train_tasks: int = 16, n_test_tasks: int = 4,
                          n_instances: int = 200, seed: int = 0, suite: str = "demo") -> str:
  """Write the suite under out_dir (created if needed) and return out_dir.

  Args:
    n_train_tasks, n_test_tasks: tasks listed in splits/default/{train,test}_tasks.txt.
    n_instances: instances per task (the first 100 are the test instances of the SuperNI protocol).
    seed: selects the compositions and the strings.
    suite: a name in SUITES.
  """
  if suite not in SUITES:
    raise ValueError(f"synthetic suite: suite={suite!r}: expected one of {tuple(SUITES)}")
  if n_instances < 1:
    raise ValueError(f"synthetic suite: n_instances={n_instances}: must be >= 1")
  train, test = SUITES[suite].choose(n_train_tasks, n_test_tasks, seed)
  storage.makedirs(os.path.join(out_dir, "tasks"))
  storage.makedirs(os.path.join(out_dir, "splits", "default"))
  names = {"train": [], "test": []}
  for index, (split, skills) in enumerate([("train", t) for t in train] + [("test", t) for t in test], start=1):
    name = task_name(index, skills)
    rng = np.random.default_rng([seed, index])
    _write_atomic(os.path.join(out_dir, "tasks", f"{name}.json"),
                  json.dumps(_task_json(name, skills, n_instances, rng, SUITES[suite]), indent=1) + "\n")
    names[split].append(name)
  for split, listed in names.items():
    _write_atomic(os.path.join(out_dir, "splits", "default", f"{split}_tasks.txt"),
                  "".join(n + "\n" for n in listed))
  return out_dir


def register_synthetic(out_dir: str, vocabulary, *, prefix: str = "synthetic", n_train_tasks: int = 16,
                       n_test_tasks: int = 4, n_instances: int = 200, seed: int = 0, suite: str = "demo",
                       **superni_kwargs):
  """Write the suite to out_dir and register it through tasks.superni with the "input_only" prompt.

  Mixtures "<prefix>_train" and "<prefix>_test"; other keyword arguments go to register_superni.
  Returns the tasks.superni.Registration.
  """
  write_synthetic_suite(out_dir, n_train_tasks, n_test_tasks, n_instances, seed, suite)
  superni_kwargs.setdefault("input_format", superni.InputFormat(prompt="input_only"))
  return superni.register_superni(out_dir, vocabulary, prefix=prefix, **superni_kwargs)
