"""The embedded synthetic multi-task suite, written in the Super-NaturalInstructions on-disk format.

Every task composes two atomic string skills (apply the first, then the second) on short random lowercase
strings (3-7 characters, so inputs and targets stay within 16 bytes with EOS: small enough for a tiny
byte-level T5 on CPU). Held-out test tasks are new compositions of skills that the training tasks use, so a
router has shared structure to discover. The suite goes through the same loader as the real data
(tasks.superni); `register_synthetic` writes it and registers it with the "input_only" prompt, so the task
id is the only task signal.

Layout written: <out>/tasks/<task>.json (all SuperNI fields), <out>/splits/default/{train,test}_tasks.txt.
Deterministic given its arguments; every file is written atomically (temp file, then os.replace), the split
lists last.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import numpy as np

from tasks import superni

_VOWELS = frozenset("aeiouAEIOU")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LEN, MAX_LEN = 3, 7

# name -> (function, description used in the task definition)
SKILLS: dict[str, tuple[Callable[[str], str], str]] = {
    "reverse": (lambda s: s[::-1], "reverse the string"),
    "uppercase": (str.upper, "write every letter in upper case"),
    "drop_vowels": (lambda s: "".join(c for c in s if c not in _VOWELS), "remove the vowels"),
    "double": (lambda s: "".join(c + c for c in s), "write every character twice"),
    "rotate": (lambda s: s[1:] + s[:1], "move the first character to the end"),
    "sort": (lambda s: "".join(sorted(s)), "sort the characters alphabetically"),
    "first3": (lambda s: s[:3], "keep the first three characters"),
    "swap_ends": (lambda s: s[-1:] + s[1:-1] + s[:1] if len(s) > 1 else s,
                  "swap the first and the last character"),
}
# Strings that tell compositions apart (duplicates and identities are dropped).
_PROBES = ("hello", "abcdefg", "zyxw", "banana", "qwrtp", "eaglet", "mix")


def _compose(first: str, second: str) -> Callable[[str], str]:
  f, g = SKILLS[first][0], SKILLS[second][0]
  return lambda s: g(f(s))


def _candidate_pairs() -> list[tuple[str, str]]:
  """Ordered skill pairs whose composition differs from the identity, every single skill and each other."""
  seen = {tuple(p for p in _PROBES)}
  seen.update(tuple(SKILLS[s][0](p) for p in _PROBES) for s in SKILLS)
  pairs = []
  for a in SKILLS:
    for b in SKILLS:
      if a == b:
        continue
      fingerprint = tuple(_compose(a, b)(p) for p in _PROBES)
      if fingerprint not in seen:
        seen.add(fingerprint)
        pairs.append((a, b))
  return pairs


def choose_compositions(n_train_tasks: int, n_test_tasks: int, seed: int
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """(train pairs, test pairs): disjoint; every skill appears in training; test pairs use trained skills."""
  pairs = _candidate_pairs()
  if n_train_tasks < 1 or n_test_tasks < 0 or n_train_tasks + n_test_tasks > len(pairs):
    raise ValueError(f"synthetic suite: n_train_tasks={n_train_tasks}, n_test_tasks={n_test_tasks}: need "
                     f"n_train_tasks >= 1 and at most {len(pairs)} tasks in all")
  rng = np.random.default_rng(seed)
  for _ in range(1000):
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    train = order[:n_train_tasks]
    covered = {s for pair in train for s in pair}
    test = [p for p in order[n_train_tasks:] if set(p) <= covered][:n_test_tasks]
    if len(test) == n_test_tasks and (covered == set(SKILLS) or 2 * n_train_tasks < len(SKILLS)):
      return train, test
  raise ValueError(f"synthetic suite: no split of {len(pairs)} compositions into {n_train_tasks} train "
                   f"tasks covering every skill and {n_test_tasks} test tasks (seed {seed})")


def _random_inputs(rng: np.random.Generator, n: int, fn: Callable[[str], str]) -> list[str]:
  """n distinct random strings whose output under fn is non-empty."""
  out, seen = [], set()
  while len(out) < n:
    length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
    s = "".join(_LETTERS[i] for i in rng.integers(0, len(_LETTERS), size=length))
    if s not in seen and fn(s):
      seen.add(s)
      out.append(s)
  return out


def _task_json(name: str, first: str, second: str, n_instances: int, rng: np.random.Generator) -> dict:
  fn = _compose(first, second)
  inputs = _random_inputs(rng, n_instances + 3, fn)
  positives, negative, instances = inputs[:2], inputs[2], inputs[3:]
  definition = (f"Apply two string operations in order: first {SKILLS[first][1]}, "
                f"then {SKILLS[second][1]}.")
  return {
      "Contributors": ["mhr-jax synthetic suite"],
      "Source": ["synthetic"],
      "URL": [],
      "Categories": ["String Manipulation"],
      "Reasoning": [],
      "Definition": [definition],
      "Input_language": ["English"],
      "Output_language": ["English"],
      "Instruction_language": ["English"],
      "Domains": ["Synthetic"],
      "Positive Examples": [
          {"input": s, "output": fn(s), "explanation": f"{first} then {second}"} for s in positives],
      "Negative Examples": [
          {"input": negative, "output": negative, "explanation": "the input is returned unchanged"}],
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
