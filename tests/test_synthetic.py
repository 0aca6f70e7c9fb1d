"""The synthetic suites: SuperNI-format files, compositions, determinism, and batches end to end."""
import collections
import hashlib
import itertools
import os

import numpy as np
import pytest

from mhr_jax import config as config_lib
from mhr_jax.data import pipeline as data
from tasks import superni, synthetic, synthetic_study

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
    assert task["Definition"] == [synthetic.definition((first, second))]
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


# ---------------------------------------------------------------- the demo suite stays as it was

def _tree_digest(root):
  """sha256 over the relative paths and bytes of every file under root, in sorted order."""
  digest = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(dirpath, name)
      digest.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        digest.update(f.read() + b"\0")
  return digest.hexdigest()


# Digests of the files that tasks/synthetic.py wrote at commit 4b0f9a1, before the "study" suite existed,
# with the arguments of configs/experiments/demo.gin (16, 4, 200, 0) and configs/tiny.gin (8, 2, 200, 0):
# README.md's demo table depends on these bytes.
DEMO_DIGESTS = {
    (16, 4, 200, 0): "40df3a4e995a3be43bcad7ffc215e9607c3bf59d8beef26713db49109ba6dcbe",
    (8, 2, 200, 0): "73272c90473f85cbb75e399a9bdad40d6d5814cf399ccc078fbf289385ce66bf",
}


@pytest.mark.parametrize("args", sorted(DEMO_DIGESTS))
def test_demo_suite_files_are_byte_for_byte_unchanged(args, tmp_path):
  n_train, n_test, n_instances, seed = args
  out = synthetic.write_synthetic_suite(str(tmp_path), n_train, n_test, n_instances, seed)
  assert _tree_digest(out) == DEMO_DIGESTS[args]
  assert _tree_digest(synthetic.write_synthetic_suite(str(tmp_path / "named"), n_train, n_test, n_instances,
                                                      seed, suite="demo")) == DEMO_DIGESTS[args]


# ---------------------------------------------------------------- the study suite

# Independent re-statement of the study's 16 skills, each as (category, what it writes for the category's word).
STUDY_WORDS = {"color": COLORS, "animal": ANIMALS, "number": NUMBERS, "fruit": FRUITS}
_same, _backwards = (lambda w: w), (lambda w: "".join(reversed(w)))
STUDY_ORACLE = {
    "color": ("color", _same),
    "color_fr": ("color", dict(zip(COLORS, ["rouge", "bleu", "vert", "noir", "blanc", "rose"])).get),
    "color_caps": ("color", str.upper),
    "color_back": ("color", _backwards),
    "animal": ("animal", _same),
    "animals": ("animal", lambda w: w + ("es" if w == "fox" else "s")),
    "animal_sound": ("animal", dict(zip(ANIMALS, ["meow", "woof", "yip", "hoot", "buzz", "moo"])).get),
    "animal_caps": ("animal", str.upper),
    "number": ("number", _same),
    "next": ("number", lambda w: (NUMBERS + ["seven"])[NUMBERS.index(w) + 1]),
    "previous": ("number", lambda w: (["zero"] + NUMBERS)[NUMBERS.index(w)]),
    "digit": ("number", lambda w: str(NUMBERS.index(w) + 1)),
    "fruit": ("fruit", _same),
    "fruits": ("fruit", lambda w: w + ("es" if w in ("mango", "peach") else "s")),
    "fruit_caps": ("fruit", str.upper),
    "fruit_back": ("fruit", _backwards),
}
# The study's design sizes (tasks/synthetic_study.py): 64 training tasks, 16 held out, 240 instances
# (100 test instances plus train and dev draws of k = 64).
STUDY_TRAIN, STUDY_TEST, STUDY_INSTANCES = 64, 16, 240


def _study_word(skill, words):
  category, transform = STUDY_ORACLE[skill]
  (word,) = [w for w in words if w in STUDY_WORDS[category]]
  return transform(word)


def _study_expected(skills, text):
  words = text.split()
  assert sorted(len(set(words) & set(pool)) for pool in STUDY_WORDS.values()) == [1] * 4
  return " ".join(_study_word(s, words) for s in skills)


def _adjacent(skills):
  return {frozenset(pair) for pair in zip(skills, skills[1:])}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  return synthetic.write_synthetic_suite(str(tmp_path_factory.mktemp("study")), STUDY_TRAIN, STUDY_TEST,
                                         STUDY_INSTANCES, seed=0, suite="study")


def test_study_suite_has_more_skills_than_the_inventory_in_tasks_of_two_or_three(study):
  train, test = [[_skills(n) for n in _listed(study, split)] for split in ("train", "test")]
  assert set(synthetic_study.SKILLS) == set(STUDY_ORACLE) and len(STUDY_ORACLE) == 16 > 8
  assert len(train) == STUDY_TRAIN and len(test) == STUDY_TEST
  for tasks in (train, test):
    assert collections.Counter(map(len, tasks)) == {2: len(tasks) // 2, 3: len(tasks) // 2}
    for skills in tasks:  # skills of different categories
      assert len({STUDY_ORACLE[s][0] for s in skills}) == len(skills)
  # Training uses every skill, about equally often, each task with its own skill set.
  uses = collections.Counter(s for skills in train for s in skills)
  assert set(uses) == set(STUDY_ORACLE) and max(uses.values()) - min(uses.values()) <= 2
  assert len({frozenset(skills) for skills in train}) == STUDY_TRAIN


def test_study_held_out_tasks_recombine_trained_skills(study):
  train, test = [[_skills(n) for n in _listed(study, split)] for split in ("train", "test")]
  train_sets = {frozenset(skills) for skills in train}
  trained = set().union(*train)
  adjacent = set().union(*map(_adjacent, train))
  assert len({frozenset(skills) for skills in test}) == STUDY_TEST
  for skills in test:
    assert skills not in train and frozenset(skills) not in train_sets   # no training task, not even reordered
    assert set(skills) <= trained and _adjacent(skills) <= adjacent
  assert len(set().union(*test)) == 16   # the held-out tasks spread over all the skills


def test_study_files_instances_and_outputs(study):
  names = _listed(study, "train") + _listed(study, "test")
  assert sorted(os.listdir(os.path.join(study, "tasks"))) == sorted(f"{n}.json" for n in names)
  for name in names:
    task = superni.load_task(study, name)
    skills = _skills(name)
    instances = task["Instances"]
    assert len(instances) == STUDY_INSTANCES and len({i["id"] for i in instances}) == STUDY_INSTANCES
    assert len({i["input"] for i in instances}) == STUDY_INSTANCES
    for inst in instances + task["Positive Examples"]:
      expected = _study_expected(skills, inst["input"])
      assert inst["output"] in (expected, [expected])
      assert len(inst["input"].encode()) <= 21 and len(expected.encode()) <= 19   # the docstring's lengths
    assert task["Definition"] == ["Write " + ", then ".join(synthetic_study.SKILLS[s][1] for s in skills) + "."]
    assert len(task["Definition"][0]) <= 89
  # k = 64 few-shot train and dev draws fit beside the 100 test instances.
  splits = superni.instance_splits(study, names[-1], 64, seed=13)
  assert len(set(splits["train"]) | set(splits["dev"]) | set(splits["test"])) == 228
  assert synthetic.definition(("color_fr", "animal", "next"), synthetic_study.SKILLS) == \
      "Write the color in French, then the animal, then the next number."


def test_study_tasks_all_answer_differently_on_every_input(study):
  """Any two tuples of different-category skills write different outputs for the same input, so no held-out
  task is answered by a training task (checked over every 2- and 3-skill tuple, on 50 inputs)."""
  tuples = [t for n in (2, 3) for t in itertools.permutations(STUDY_ORACLE, n)
            if len({STUDY_ORACLE[s][0] for s in t}) == n]
  assert len(tuples) == 192 + 1536
  for inst in superni.load_task(study, _listed(study, "test")[0])["Instances"][:50]:
    outputs = [_study_expected(t, inst["input"]) for t in tuples]
    assert len(set(outputs)) == len(tuples)


def test_study_suite_is_deterministic_per_seed(study, tmp_path):
  again = synthetic.write_synthetic_suite(str(tmp_path / "a"), STUDY_TRAIN, STUDY_TEST, STUDY_INSTANCES, seed=0,
                                          suite="study")
  assert _tree_digest(again) == _tree_digest(study)
  other = synthetic.write_synthetic_suite(str(tmp_path / "b"), STUDY_TRAIN, STUDY_TEST, 110, seed=1,
                                          suite="study")
  assert _listed(other, "train") != _listed(study, "train")
  with pytest.raises(ValueError, match="must use all 16 skills"):
    synthetic.write_synthetic_suite(str(tmp_path / "c"), 6, 2, suite="study")
  with pytest.raises(ValueError, match="only 2 held-out recombinations of 7 training tasks"):
    synthetic.write_synthetic_suite(str(tmp_path / "c"), 7, 3, suite="study")
  with pytest.raises(ValueError, match="suite='nope'"):
    synthetic.write_synthetic_suite(str(tmp_path / "d"), suite="nope")


def test_data_config_selects_the_study_suite(tmp_path):
  assert config_lib.SYNTHETIC_SUITES == tuple(synthetic.SUITES)
  with pytest.raises(config_lib.ConfigError, match=r"^DataConfig.synthetic_suite='nope': expected one of"):
    config_lib.DataConfig(synthetic_suite="nope")
  cfg = config_lib.ExperimentConfig(
      model_cfg=config_lib.ModelConfig(), model=config_lib.preset("tiny"),
      data=config_lib.DataConfig(synthetic_suite="study", synthetic_train_tasks=8, synthetic_test_tasks=2,
                                 synthetic_instances=110, input_len=40, target_len=24),
      loss=config_lib.LossConfig(), optimizer=config_lib.OptimizerConfig(), mesh=config_lib.MeshConfig(),
      run=config_lib.RunConfig(model_dir=str(tmp_path / "run")), adapt=config_lib.AdaptConfig())
  registration, vocab = data.register_data(cfg.data, cfg.default_data_dir)
  assert {len(_skills(n)) for n in registration.mixtures["synthetic_train"]} == {2, 3}
  by_id = {tid: name for name, tid in registration.task_ids.items()}
  batch = next(data.train_batches("synthetic_train", "train", 16, 40, 24, seed=0))
  decode = lambda row: vocab.decode([int(t) for t in row if t > 1])
  for inputs, targets, task_id in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"],
                                      batch["task_ids"]):
    assert decode(targets) == _study_expected(_skills(by_id[int(task_id)]), decode(inputs))
