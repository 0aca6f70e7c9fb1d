"""The synthetic suite: SuperNI-format files, compositions, determinism, and batches end to end."""
import os

import numpy as np
import pytest

from mhr_jax import data
from tasks import superni, synthetic

# Independent re-statements of the skills, to check the written outputs.
ORACLE = {
    "reverse": lambda s: "".join(reversed(s)),
    "uppercase": lambda s: "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in s),
    "drop_vowels": lambda s: "".join(c for c in s if c.lower() not in "aeiou"),
    "double": lambda s: "".join(c * 2 for c in s),
    "rotate": lambda s: s[1:] + s[0] if s else s,
    "sort": lambda s: "".join(sorted(s)),
    "first3": lambda s: s[:3],
    "swap_ends": lambda s: s if len(s) < 2 else s[-1] + s[1:-1] + s[0],
}


def _skills(task_name):
  first, second = task_name.split("_synthetic_")[1].split("_then_")
  return first, second


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
      expected = ORACLE[second](ORACLE[first](inst["input"]))
      assert inst["output"] in (expected, [expected])
      assert 3 <= len(inst["input"]) <= 12 and expected
  # Pairs that collapse to a single skill or the identity are never tasks.
  for first, second in train_pairs:
    probe = ["hello", "abcdefg", "banana"]
    composed = [ORACLE[second](ORACLE[first](p)) for p in probe]
    assert composed != probe and all(composed != [ORACLE[s](p) for p in probe] for s in ORACLE)


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
  batch = next(data.train_batches("synthetic_train", "train", 16, 16, 16, seed=0))
  assert set(np.unique(batch["task_ids"])) <= set(range(4))
  decode = lambda row: vocab.decode([int(t) for t in row if t > 1])
  for inputs, targets, task_id in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"],
                                      batch["task_ids"]):
    first, second = _skills(by_id[int(task_id)])
    assert decode(targets) == ORACLE[second](ORACLE[first](decode(inputs)))
