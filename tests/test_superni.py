"""Super-NaturalInstructions loader on small clones written in the real format."""
import json
import os

import numpy as np
import pytest
import seqio

import fixtures_formats as ff
from mhr_jax.data import pipeline as data
from tasks import superni

TRAIN = ["task001_copy", "task002_more", "task003_small"]
TEST = ["task010_heldout"]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
  root = tmp_path_factory.mktemp("ni")
  tasks = {"task001_copy": ff.superni_task("task001_copy", 130),
           "task002_more": ff.superni_task("task002_more", 260, definition="Answer the question"),
           "task003_small": ff.superni_task("task003_small", 60),
           "task010_heldout": ff.superni_task("task010_heldout", 240, outputs_per_instance=3)}
  return ff.write_superni_clone(root, tasks, TRAIN, TEST)


@pytest.fixture(scope="module")
def vocab():
  return data.get_vocabulary("byte")


def test_instance_splits_protocol(clone):
  ids = [f"task010-{i:04x}" for i in range(240)]
  s13 = superni.instance_splits(clone, "task010_heldout", 16, 13)
  s42 = superni.instance_splits(clone, "task010_heldout", 16, 42)
  assert s13["test"] == s42["test"] == ids[:100]
  for s in (s13, s42):
    assert len(s["train"]) == len(s["dev"]) == 16
    assert not set(s["train"]) & set(s["dev"])
    assert not (set(s["train"]) | set(s["dev"])) & set(s["test"])
  assert s13 == superni.instance_splits(clone, "task010_heldout", 16, 13)
  assert s13["train"] != s42["train"]
  order = np.random.default_rng(13).permutation(140)  # the documented draw, over instances 100..239
  assert s13["train"] == [ids[100 + i] for i in order[:16]]
  assert s13["dev"] == [ids[100 + i] for i in order[16:32]]


def test_instance_splits_too_few_names_task_and_counts(clone):
  with pytest.raises(ValueError, match=r"'task010_heldout'.*240 instances leave 140 .* k=100 need 200"):
    superni.instance_splits(clone, "task010_heldout", 100, 13)


def test_format_input_follows_tk_instruct(clone):
  task = superni.load_task(clone, "task002_more")
  assert superni.format_input(task, " what is it ") == (
      "Definition: Answer the question.\n\n"
      "Now complete the following example -\nInput: what is it.\nOutput: ")
  two = superni.format_input(task, "q?", num_pos_examples=2)
  assert two == (
      "Definition: Answer the question.\n\n"
      " Positive Example 1 -\nInput: first example.\n Output: first answer.\n\n"
      " Positive Example 2 -\nInput: second example.\n Output: second answer!\n\n"
      "Now complete the following example -\nInput: q?\nOutput: ")
  one_fits = lambda text: len(text) <= len(two) - 10
  assert superni.format_input(task, "q?", 2, fits=one_fits).count("Positive Example") == 1


def test_authors_prompt_and_its_truncation(clone, vocab):
  """The MHR authors' input string (their DataCollatorForNI: "Task definition: ", one newline, "Output:"
  without a space); an input over the budget keeps its first budget - len("\\nOutput:") tokens and the cue."""
  task = superni.load_task(clone, "task002_more")
  assert superni.format_authors_input(task, " what is it ") == (
      "Task definition: Answer the question.\n"
      "Now complete the following example -\nInput: what is it.\nOutput:")
  assert superni.format_authors_input(task, "q?").endswith("Input: q?\nOutput:")
  whole = superni.format_authors_input(superni.load_task(clone, "task010_heldout"), "input 5")
  budget = len(vocab.encode(whole)) + 1 - 7  # 7 tokens (bytes) too long with EOS
  superni.register_superni(clone, vocab, fewshot_ks=(), input_format=superni.InputFormat(
      prompt="authors", max_input_tokens=budget))
  inputs = [ex["inputs"] for ex in data.eval_examples("superni_task010_heldout", "test")]
  cue = superni.AUTHORS_OUTPUT_CUE
  assert inputs[5] == whole[:budget - len(cue)] + cue
  with pytest.raises(ValueError, match=r"InputFormat.num_pos_examples=2: prompt 'authors' shows no"):
    superni.InputFormat(prompt="authors", num_pos_examples=2)
  from mhr_jax import config as config_lib
  with pytest.raises(config_lib.ConfigError, match=r"^DataConfig.num_pos_examples=2: prompt 'authors'"):
    config_lib.DataConfig(source="superni", task="superni_train", data_dir=clone, prompt="authors",
                          num_pos_examples=2)


def test_register_tasks_ids_splits_and_references(clone, vocab):
  reg = superni.register_superni(clone, vocab, fewshot_ks=(16,), fewshot_seeds=(13, 42))
  assert reg.tasks == {n: f"superni_{n}" for n in TRAIN + TEST}
  assert reg.task_ids == {"task001_copy": 0, "task002_more": 1, "task003_small": 2, "task010_heldout": 3}
  assert reg.mixtures == {"superni_train": tuple(TRAIN), "superni_test": tuple(TEST)}
  assert len(seqio.get_mixture_or_task("superni_train").tasks) == 3

  test = data.eval_examples("superni_task010_heldout", "test")
  assert [ex["instance_id"] for ex in test] == [f"task010-{i:04x}" for i in range(100)]
  assert test[5]["references"] == ["output 5", "alt 1 of 5", "alt 2 of 5"]
  assert test[5]["targets"] == "output 5" and test[5]["task_id"] == 3
  assert test[5]["inputs"].endswith("Input: input 5.\nOutput: ")

  fewshot = data.eval_examples("superni_task010_heldout", "train_k16_seed42")
  assert [ex["instance_id"] for ex in fewshot] == superni.instance_splits(
      clone, "task010_heldout", 16, 42)["train"]
  # Training tasks sample <= 100 of all their instances (Tk-Instruct's rule), so task003_small, with
  # fewer than 100 instances, takes part with all 60.
  train = data.eval_examples("superni_task002_more", "train")
  ids = [ex["instance_id"] for ex in train]
  assert len(ids) == 100 and len(set(ids)) == 100
  assert ids == [f"task002-{i:04x}" for i in np.random.default_rng(0).permutation(260)[:100]]
  assert len(data.eval_examples("superni_task001_copy", "train")) == 100
  mixture = seqio.get_mixture_or_task("superni_train")
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {"superni_task001_copy": 100.0, "superni_task002_more": 100.0, "superni_task003_small": 60.0}

  # Tk-Instruct's budget: positive examples are added only while the input plus EOS fits.
  task = superni.load_task(clone, "task010_heldout")
  budget = len(vocab.encode(superni.format_input(task, "input 5", 1))) + 1
  superni.register_superni(clone, vocab, fewshot_ks=(), input_format=superni.InputFormat(
      num_pos_examples=2, max_input_tokens=budget))
  inputs = [ex["inputs"] for ex in data.eval_examples("superni_task010_heldout", "test")]
  assert inputs[5] == superni.format_input(task, "input 5", 1)
  assert inputs[50].count("Positive Example") == 0  # "input 50" is one byte longer

  # Re-registration is allowed and replaces; held-out ids can be given; holding the test block out of
  # training leaves task003_small with nothing to train on.
  reg2 = superni.register_superni(clone, vocab, heldout_task_ids={"task010_heldout": 7},
                                  holdout_test_from_train=True)
  assert reg2.task_ids["task010_heldout"] == 7
  held = data.eval_examples("superni_task002_more", "train")
  assert len(held) == 100 and all(int(ex["instance_id"].split("-")[1], 16) >= 100 for ex in held)
  assert len(data.eval_examples("superni_task001_copy", "train")) == 30
  with pytest.raises(ValueError, match="'task003_small': split 'train' has no examples"):
    data.eval_examples("superni_task003_small", "train")


def test_user_task_list_mixture_and_unknown_task(clone, vocab, tmp_path):
  good = tmp_path / "my_eval.txt"
  good.write_text("task010_heldout\ntask001_copy\n")
  reg = superni.register_superni(clone, vocab, prefix="ni", task_list_files=[str(good)])
  assert reg.mixtures["ni_my_eval"] == ("task010_heldout", "task001_copy")
  bad = tmp_path / "bad_list.txt"
  bad.write_text("task001_copy\ntask999_missing\n")
  with pytest.raises(ValueError, match=r"bad_list\.txt: unknown SuperNI task 'task999_missing'"):
    superni.register_superni(clone, vocab, prefix="ni", task_list_files=[str(bad)])
  with pytest.raises(ValueError, match="no id for held-out task 'task010_heldout'"):
    superni.register_superni(clone, vocab, prefix="ni", heldout_task_ids={})


def _write(clone, name, text):
  with open(os.path.join(clone, "tasks", f"{name}.json"), "w") as f:
    f.write(text)


def test_bad_inputs_name_file_and_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a natural-instructions clone"):
    superni.load_task(str(tmp_path / "nowhere"), "task001_copy")
  clone = ff.write_superni_clone(tmp_path / "ni", {"task001_copy": ff.superni_task("task001_copy", 5)},
                                 ["task001_copy"], [""])
  with pytest.raises(ValueError, match=r"test_tasks\.txt: task list is empty"):
    superni.register_superni(clone, data.get_vocabulary("byte"))
  with pytest.raises(ValueError, match="unknown SuperNI task 'task404_x'"):
    superni.instance_splits(clone, "task404_x", 1, 0)
  _write(clone, "task100_broken", '{"Definition": ["x"], ')
  with pytest.raises(ValueError, match=r"task100_broken\.json: malformed JSON"):
    superni.load_task(clone, "task100_broken")
  empty = ff.superni_task("task101_empty", 0)
  _write(clone, "task101_empty", json.dumps(empty))
  with pytest.raises(ValueError, match=r"task101_empty\.json: task has no instances"):
    superni.load_task(clone, "task101_empty")
  missing = ff.superni_task("task102_missing", 3)
  del missing["Instances"][1]["output"]
  _write(clone, "task102_missing", json.dumps(missing))
  with pytest.raises(ValueError, match=r"task102_missing\.json: Instances\[1\] is missing field 'output'"):
    superni.load_task(clone, "task102_missing")
  no_def = ff.superni_task("task103_nodef", 3)
  del no_def["Definition"]
  _write(clone, "task103_nodef", json.dumps(no_def))
  with pytest.raises(ValueError, match=r"task103_nodef\.json: missing field 'Definition'"):
    superni.load_task(clone, "task103_nodef")
  os.remove(os.path.join(clone, "splits", "default", "test_tasks.txt"))
  with pytest.raises(FileNotFoundError, match=r"test_tasks\.txt: task list file not found"):
    superni.register_superni(clone, data.get_vocabulary("byte"))


def test_authors_validation_task_list_is_shipped_and_selectable(clone, tmp_path):
  """tasks/superni_val_tasks_20.txt (20 of the 119 test tasks: the authors' early-stopping list,
  NIOnlineZeroShot.VAL_TASKS) is a task list that DataConfig.test_task_list selects as the held-out
  tasks, resolved from the repository."""
  from mhr_jax import config as config_lib
  from mhr_jax.config import REPO_ROOT
  names = superni.read_task_list(os.path.join(REPO_ROOT, "tasks", "superni_val_tasks_20.txt"))
  assert len(names) == 20 and all(n.startswith("task") for n in names)
  assert "task1159_bard_analogical_reasoning_containers" in names
  d = config_lib.DataConfig(source="superni", task="superni_train", data_dir=clone,
                            test_task_list="tasks/superni_val_tasks_20.txt")
  assert d.test_task_list == os.path.join(REPO_ROOT, "tasks", "superni_val_tasks_20.txt")
  own = tmp_path / "two.txt"
  own.write_text("task010_heldout\ntask001_copy\n")
  cfg = config_lib.ExperimentConfig(
      model_cfg=config_lib.ModelConfig(), model=config_lib.preset("tiny"),
      data=config_lib.DataConfig(source="superni", task="superni_train", data_dir=clone, test_task_list=str(own),
                                 vocabulary="byte"),
      loss=config_lib.LossConfig(), optimizer=config_lib.OptimizerConfig(), mesh=config_lib.MeshConfig(),
      run=config_lib.RunConfig(model_dir=str(tmp_path / "run")), adapt=config_lib.AdaptConfig())
  registration, _ = data.register_data(cfg.data, cfg.default_data_dir)
  assert data.heldout_tasks(cfg.data, registration) == ["task010_heldout", "task001_copy"]
  with pytest.raises(config_lib.ConfigError, match="DataConfig.test_task_list='nope.txt': no such file"):
    config_lib.DataConfig(source="superni", task="superni_train", data_dir=clone, test_task_list="nope.txt")


def test_fewshot_decoding_uses_the_configured_beams(clone, vocab, monkeypatch):
  """SuperNI-format pairs decode their test and dev splits with AdaptConfig.num_beams (the authors: 4), the
  16-example dev split in a batch of 16, not of the 100-row evaluation batch."""
  from mhr_jax import config as config_lib
  from mhr_jax.data import fewshot as fewshot_data
  from mhr_jax.evaluation import drivers
  from mhr_jax.evaluation import fewshot as fewshot_eval
  seen, shapes = [], []

  def fake_generate(model, params, batches, max_len, **kwargs):
    seen.append(kwargs["num_beams"])
    batches = list(batches)
    shapes.append([b["encoder_input_tokens"].shape[0] for b in batches])
    rows = sum(int(np.sum(b["example_index"] >= 0)) for b in batches)  # padding rows dropped
    return np.full((rows, 2), vocab.encode("a")[0], np.int32)

  monkeypatch.setattr(drivers, "generate", fake_generate)
  cfg = config_lib.ExperimentConfig(
      model_cfg=config_lib.ModelConfig(), model=config_lib.preset("tiny"),
      data=config_lib.DataConfig(source="superni", task="superni_train", data_dir=clone, vocabulary="byte"),
      loss=config_lib.LossConfig(), optimizer=config_lib.OptimizerConfig(), mesh=config_lib.MeshConfig(),
      run=config_lib.RunConfig(model_dir=str(clone) + "/run"),
      adapt=config_lib.AdaptConfig(shots=16, seeds=(13,), num_beams=4, tasks=("task010_heldout",),
                                   eval_batch_size=100))
  registration = superni.register_superni(clone, vocab, fewshot_ks=(16,), fewshot_seeds=(13,))
  pairs = fewshot_data.SuperNIPairs(cfg, registration, vocab)
  result = fewshot_eval.evaluate(pairs, None, None, 0, None)
  assert len(result["predictions"]) == 100 and seen == [4]
  fewshot_eval.dev_scorer(pairs, None, [0])(None, {}, {}, slice(0, 1))
  assert seen == [4, 4] and shapes == [[100], [16]]
  with pytest.raises(config_lib.ConfigError, match=r"^AdaptConfig.num_beams=0: must be >= 1"):
    config_lib.AdaptConfig(num_beams=0)


def test_decode_batch_size_fits_small_splits():
  from mhr_jax.evaluation.fewshot import decode_batch_size
  assert [decode_batch_size(n, 100) for n in (1, 3, 16, 17, 64, 65, 100, 250)] == [1, 4, 16, 32, 64, 100,
                                                                                  100, 100]
  assert [decode_batch_size(n, 96, shards=8) for n in (1, 16, 20, 90)] == [8, 16, 32, 96]
  assert decode_batch_size(5, 12, shards=6) == 12  # 8 rounded up to the shards, then capped
