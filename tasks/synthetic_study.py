"""The "study" synthetic suite: a compositional suite on which the paper's findings can show, or fail.

tasks/synthetic.py writes it (suite="study") in the SuperNI on-disk format, beside the smaller "demo" suite.

An input is four words, one of each category (a color, an animal, a number, a fruit), in random order, as in
the demo suite: "two plum red owl". A skill reads one category and may transform it; every category has four
skills, so there are 16:

  color   the color; in French (rouge); in capitals (RED); backwards (der)
  animal  the animal; in the plural (owls); its sound (hoot); in capitals (OWL)
  number  the number; the next number (three); the previous number (one); as a digit (2)
  fruit   the fruit; in the plural (plums); in capitals (PLUM); backwards (mulp)

Four skills copy a word, five look it up in a small table (French, sound, next, previous, digit), and seven
apply a spelling rule that several categories share (capitals, plural, backwards), so skills overlap in what a
network must compute. A task is an ordered tuple of 2 or 3 skills of different categories; its output is their
words in order ("rouge hoot 2"), and its definition says so in words ("Write the color in French, then the
animal's sound, then the number as a digit."), so a base model can learn the skills from definitions.

Why this design (what each of the paper's claims needs to be testable):
- More latent skills (16) than the adapter inventory of the experiments (K = 8): a routing that picks whole
  adapters cannot give every skill an adapter of its own, while per-head routing (MHR) can combine blocks of
  adapters into more distinct modules. So "MHR beats Poly at equal parameters" can show, and can fail.
- Held-out tasks are new compositions of trained skills: every skill of a held-out task is used by training
  tasks, every adjacent skill pair of a held-out task is adjacent in some training task (in either order), and
  no training task uses the same set of skills (a held-out task is not a training task reordered). So
  re-routing a pre-trained inventory can solve a held-out task (routing-only adaptation, MHR-z, can be
  competitive), and an averaged inventory (MHR-mu) holds every skill as a starting point.
- Few shots and a tiny model: with k in {16, 32, 64} examples a fully fine-tuned base can overfit, so full
  fine-tuning can lose to adapters.
- Half the tasks compose 2 skills, half 3, so partial credit (ROUGE-L) separates nearly right from wrong.
- Every skill writes a different word for the same input (categories share no words, and a category's four
  skills never agree), so any two tasks differ on every input: no training task's output answers a held-out
  task.
- Four words per input, not more: finding a category's word among shuffled bytes is what the tiny byte-level
  T5 learns slowest. In a pilot with six categories (18 skills), 300 steps of multi-task adapter training
  ended at a loss of 0.34 per target token, that of a model that only guesses each word among six (0.37);
  with four categories the same run ended at 0.20 (guessing: 0.36).
- Short byte strings (inputs <= 21 bytes, targets <= 19 bytes, definitions <= 89 bytes, so <= 111 with the
  definition before the input) keep a byte-level T5 of d_model 128 fast on a CPU.

The design's sizes: 64 training tasks (32 of 2 skills, 32 of 3), 16 held-out tasks (8 and 8), 240 instances per
task (the SuperNI protocol's 100 test instances plus disjoint train and dev draws of k <= 64). Training tasks
are chosen so that every skill is used about equally often; held-out tasks spread over the skills the same
way. Deterministic given the seed.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

CATEGORIES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "black", "white", "pink"),
    "animal": ("cat", "dog", "fox", "owl", "bee", "cow"),
    "number": ("one", "two", "three", "four", "five", "six"),
    "fruit": ("apple", "lemon", "mango", "grape", "peach", "plum"),
}
_TABLES: dict[str, dict[str, str]] = {
    "color_fr": dict(zip(CATEGORIES["color"], ("rouge", "bleu", "vert", "noir", "blanc", "rose"))),
    "animals": dict(zip(CATEGORIES["animal"], ("cats", "dogs", "foxes", "owls", "bees", "cows"))),
    "animal_sound": dict(zip(CATEGORIES["animal"], ("meow", "woof", "yip", "hoot", "buzz", "moo"))),
    "next": dict(zip(CATEGORIES["number"], ("two", "three", "four", "five", "six", "seven"))),
    "previous": dict(zip(CATEGORIES["number"], ("zero", "one", "two", "three", "four", "five"))),
    "digit": dict(zip(CATEGORIES["number"], ("1", "2", "3", "4", "5", "6"))),
    "fruits": dict(zip(CATEGORIES["fruit"], ("apples", "lemons", "mangoes", "grapes", "peaches", "plums"))),
}
_SPELLINGS: dict[str, Callable[[str], str]] = {"caps": str.upper, "back": lambda word: word[::-1]}


def _skill(category: str, transform: Callable[[str], str]) -> Callable[[Sequence[str]], str]:
  """The skill that finds the input's word of `category` and applies `transform` to it."""
  def apply(words: Sequence[str]) -> str:
    return transform(next(w for w in words if w in CATEGORIES[category]))
  return apply


_IDENTITY: Callable[[str], str] = lambda word: word
# (skill, its category, what it does to the category's word, description used in task definitions)
_SKILL_TABLE = (
    ("color", "color", _IDENTITY, "the color"),
    ("color_fr", "color", _TABLES["color_fr"].get, "the color in French"),
    ("color_caps", "color", _SPELLINGS["caps"], "the color in capitals"),
    ("color_back", "color", _SPELLINGS["back"], "the color backwards"),
    ("animal", "animal", _IDENTITY, "the animal"),
    ("animals", "animal", _TABLES["animals"].get, "the animal in the plural"),
    ("animal_sound", "animal", _TABLES["animal_sound"].get, "the animal's sound"),
    ("animal_caps", "animal", _SPELLINGS["caps"], "the animal in capitals"),
    ("number", "number", _IDENTITY, "the number"),
    ("next", "number", _TABLES["next"].get, "the next number"),
    ("previous", "number", _TABLES["previous"].get, "the previous number"),
    ("digit", "number", _TABLES["digit"].get, "the number as a digit"),
    ("fruit", "fruit", _IDENTITY, "the fruit"),
    ("fruits", "fruit", _TABLES["fruits"].get, "the fruit in the plural"),
    ("fruit_caps", "fruit", _SPELLINGS["caps"], "the fruit in capitals"),
    ("fruit_back", "fruit", _SPELLINGS["back"], "the fruit backwards"),
)
SKILL_CATEGORY: dict[str, str] = {name: category for name, category, _, _ in _SKILL_TABLE}
# name -> (function of the input's words, description used in the task definition), as tasks/synthetic.py
SKILLS: dict[str, tuple[Callable[[Sequence[str]], str], str]] = {
    name: (_skill(category, transform), description) for name, category, transform, description in _SKILL_TABLE}


def candidates(length: int) -> list[tuple[str, ...]]:
  """Every ordered tuple of `length` skills of different categories (192 of 2 skills, 1,536 of 3)."""
  return [t for t in itertools.permutations(SKILLS, length)
          if len({SKILL_CATEGORY[s] for s in t}) == length]


def adjacent_pairs(skills: Sequence[str]) -> set[frozenset[str]]:
  """The unordered pairs of skills next to each other in a task."""
  return {frozenset(pair) for pair in zip(skills, skills[1:])}


def _alternating_lengths(n: int) -> list[int]:
  """n task lengths, n - n // 2 of 3 skills and n // 2 of 2, alternating (3, 2, 3, 2, ...)."""
  return [3 if i % 2 == 0 else 2 for i in range(n)]


def _pick_balanced(pools: dict[int, list[tuple[str, ...]]], lengths: Sequence[int],
                   allowed: Callable[[tuple[str, ...]], bool], taken: set[frozenset[str]]
                   ) -> list[tuple[str, ...]]:
  """One tuple per entry of `lengths`: each time the allowed tuple of that length whose skills the tuples
  picked so far use least (ties: the first in its pool's order), never two with the same skill set.

  `taken` (skill sets excluded) gains the picks; stops early when no tuple is left.
  """
  uses = dict.fromkeys(SKILLS, 0)
  picked = []
  for length in lengths:
    best, best_uses = None, None
    for t in pools[length]:
      if frozenset(t) in taken or not allowed(t):
        continue
      t_uses = sum(uses[s] for s in t)
      if best is None or t_uses < best_uses:
        best, best_uses = t, t_uses
    if best is None:
      break
    picked.append(best)
    taken.add(frozenset(best))
    for s in best:
      uses[s] += 1
  return picked


def choose_compositions(n_train_tasks: int, n_test_tasks: int, seed: int
                        ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
  """(train tuples, test tuples) of skills, half of 3 skills and half of 2 (3 first when odd).

  The training tasks use every skill, about equally often, with different skill sets. A test tuple's skill set
  is no training task's, its skills are trained and each of its adjacent pairs is adjacent in a training
  task (either order); test tuples also use the skills about equally often. Raises ValueError when the
  counts do not allow that.
  """
  if n_train_tasks < 1 or n_test_tasks < 0:
    raise ValueError(f"synthetic study suite: n_train_tasks={n_train_tasks}, n_test_tasks={n_test_tasks}: "
                     "need n_train_tasks >= 1 and n_test_tasks >= 0")
  rng = np.random.default_rng(seed)
  # The pools' random order breaks ties, so the seed picks among equally balanced choices.
  pools = {length: [pool[i] for i in rng.permutation(len(pool))]
           for length, pool in ((2, candidates(2)), (3, candidates(3)))}
  taken: set[frozenset[str]] = set()
  train = _pick_balanced(pools, _alternating_lengths(n_train_tasks), lambda t: True, taken)
  trained = {s for t in train for s in t}
  if len(train) < n_train_tasks or trained != set(SKILLS):
    n_sets = {length: len({frozenset(t) for t in pool}) for length, pool in pools.items()}
    raise ValueError(f"synthetic study suite: n_train_tasks={n_train_tasks}: the training tasks must use all "
                     f"{len(SKILLS)} skills, with different skill sets (at least 7 tasks, at most "
                     f"{min(2 * n_sets[2] + 1, 2 * n_sets[3])})")
  adjacent = set().union(*(adjacent_pairs(t) for t in train))
  test = _pick_balanced(pools, _alternating_lengths(n_test_tasks),
                        lambda t: set(t) <= trained and adjacent_pairs(t) <= adjacent, taken)
  if len(test) < n_test_tasks:
    raise ValueError(f"synthetic study suite: n_test_tasks={n_test_tasks}: only {len(test)} held-out "
                     f"recombinations of {n_train_tasks} training tasks (seed {seed})")
  return train, test
