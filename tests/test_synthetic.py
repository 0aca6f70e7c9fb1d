"""The synthetic suite: SuperNI-format files, compositions, determinism, and batches end to end."""
import os

import numpy as np
import pytest

from mhr_jax.data import pipeline as data
from tasks import superni, synthetic

# Independent re-statements of the skills, to check the written outputs.
COLORS, ANIMALS = ["red", "blue", "green", "black", "white", "pink"], ["cat", "dog", "fox", "owl", "bee", "cow"]
NUMBERS, FRUITS = ["one", "two", "three", "four", "five", "six"], ["apple", "lemon", "mango", "grape", "peach", "plum"]


def _in(words, pool):
  (word,) = [w for w in words if w in pool]
  return word


ORACLE = {
    "color": lambda w: _in(w, COLORS),
    "color_fr": lambda w: {"red": "rouge", "blue": "bleu", "green": "vert", "black": "noir", "white": "blanc",
                           "pink": "rose"}[_in(w, COLORS)],
    "animal": lambda w: _in(w, ANIMALS),
    "animals": lambda w: _in(w, ANIMALS) + ("es" if _in(w, ANIMALS) == "fox" else "s"),
    "number": lambda w: _in(w, NUMBERS),
    "next": lambda w: (NUMBERS + ["seven"])[NUMBERS.index(_in(w, NUMBERS)) + 1],
    "fruit": lambda w: _in(w, FRUITS),
    "fruit_caps": lambda w: _in(w, FRUITS).upper(),
}


def _expected(first, second, text):
  words = text.split()
  assert sorted(map(len, [set(words) & set(pool) for pool in (COLORS, ANIMALS, NUMBERS, FRUITS)])) == [1] * 4
  return f"{ORACLE[first](words)} {ORACLE[second](words)}"


_skills = synthetic.task_skills


def _listed(root, split):
  with open(os.path.join(root, "splits", "default", f"{split}_tasks.txt")) as f:
    return f.read().split()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  return synthetic.write_synthetic_suite(str(tmp_path_factory.mktemp("syn")), n_train_tasks=6,
                                         n_test_tasks=2, n_instances=120, seed=0)


def test_suite_files_compositions_and_outputs(suite):
  train, test = _listed(suite, "train"), _listed(suite, "test")
  assert len(train) == 6 and len(test) == 2
  assert not [f for f in os.listdir(os.path.join(suite, "tasks")) if ".tmp" in f]
  train_pairs = {_skills(n) for n in train}
  trained_skills = {s for pair in train_pairs for s in pair}
  for name in test:
    assert _skills(name) not in train_pairs and set(_skills(name)) <= trained_skills
  for name in train + test:
    task = superni.load_task(suite, name)  # validates the SuperNI format
    first, second = _skills(name)
    assert len(task["Instances"]) == 120 and len({i["id"] for i in task["Instances"]}) == 120
    assert len({i["input"] for i in task["Instances"]}) == 120
    for inst in task["Instances"] + task["Positive Examples"]:
      expected = _expected(first, second, inst["input"])
      assert inst["output"] in (expected, [expected])
      assert len(inst["input"]) <= 23 and len(expected) <= 11   # within the tiny configs' lengths
    assert task["Definition"] == [synthetic.definition(first, second)]
  # A held-out pair recombines a training task's first skill with another's second skill.
  firsts, seconds = {a for a, _ in train_pairs}, {b for _, b in train_pairs}
  assert all(_skills(n)[0] in firsts and _skills(n)[1] in seconds for n in test)
  assert len(synthetic._candidate_pairs()) == 56


def test_suite_is_deterministic_per_seed(suite, tmp_path):
  again = synthetic.write_synthetic_suite(str(tmp_path / "a"), n_train_tasks=6, n_test_tasks=2,
                                          n_instances=120, seed=0)
  other = synthetic.write_synthetic_suite(str(tmp_path / "b"), n_train_tasks=6, n_test_tasks=2,
                                          n_instances=120, seed=1)
  names = sorted(os.listdir(os.path.join(suite, "tasks")))
  assert sorted(os.listdir(os.path.join(again, "tasks"))) == names
  for name in names:
    with open(os.path.join(suite, "tasks", name), "rb") as f, open(os.path.join(again, "tasks", name), "rb") as g:
      assert f.read() == g.read()
  assert _listed(other, "train") != _listed(suite, "train")
  with pytest.raises(ValueError, match="at most"):
    synthetic.write_synthetic_suite(str(tmp_path / "c"), n_train_tasks=60, n_test_tasks=2)


def test_registered_suite_batches_follow_their_task(tmp_path):
  vocab = data.get_vocabulary("byte")
  reg = synthetic.register_synthetic(str(tmp_path / "s"), vocab, n_train_tasks=4, n_test_tasks=2,
                                     n_instances=110)
  assert set(reg.mixtures) == {"synthetic_train", "synthetic_test"}
  by_id = {tid: name for name, tid in reg.task_ids.items()}
  batch = next(data.train_batches("synthetic_train", "train", 16, 32, 16, seed=0))
  assert set(np.unique(batch["task_ids"])) <= set(range(4))
  decode = lambda row: vocab.decode([int(t) for t in row if t > 1])
  for inputs, targets, task_id in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"],
                                      batch["task_ids"]):
    first, second = _skills(by_id[int(task_id)])
    assert decode(targets) == _expected(first, second, decode(inputs))
  # The "definition" prompt puts the task definition before the input (a base model's training format).
  superni.register_superni(str(tmp_path / "s"), vocab, prefix="syndef",
                           input_format=superni.InputFormat(prompt="definition"))
  name = reg.mixtures["synthetic_test"][0]
  example = data.eval_examples(f"syndef_{name}", "test")[0]
  first, second = _skills(name)
  assert example["inputs"] == f"Write {synthetic.SKILLS[first][1]}, then {synthetic.SKILLS[second][1]}. " + \
      superni.load_task(str(tmp_path / "s"), name)["Instances"][0]["input"]
