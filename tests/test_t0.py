"""T0 / P3 loader on small P3 folders written in the real format (SeqIO cache TFRecords + info JSON)."""
import json
import os

import numpy as np
import pytest
import seqio

import fixtures_formats as ff
from mhr_jax.data import pipeline as data
from tasks import t0

CATALOG = {
    "max_examples_per_dataset": 10,
    "fewshot_seeds": [42, 1024, 0],
    "train": [{"dataset": "big/one", "train_size": 1000, "subsets": ["big_one_t1", "big_one_t2"]},
              {"dataset": "small", "train_size": 5, "subsets": ["small_t1"]}],
    "eval": [{"dataset": "nli/x", "shots": 4, "fewshot_split": "train", "eval_split": "validation",
              "subsets": ["nli_x_a", "nli_x_b"]}],
}
CHOICES = ["yes", "no", "maybe"]


def _choice_examples(subset, n):
  # Example i of every template renders source example i; its gold answer is CHOICES[i % 3].
  return [{"inputs": f"{subset} premise {i}", "targets": (" " if i % 2 else "") + CHOICES[i % 3],
           "answer_choices": CHOICES} for i in range(n)]


@pytest.fixture(scope="module")
def p3(tmp_path_factory):
  root = tmp_path_factory.mktemp("p3")
  for subset, n, stats in (("big_one_t1", 12, True), ("big_one_t2", 12, False), ("small_t1", 5, True)):
    ff.write_p3_subset(root, subset, "train",
                       [{"inputs": f"{subset} q {i}", "targets": f"a {i}"} for i in range(n)], stats=stats)
  for subset in ("nli_x_a", "nli_x_b"):
    ff.write_p3_subset(root, subset, "train", _choice_examples(subset, 20))
    ff.write_p3_subset(root, subset, "validation", _choice_examples(subset, 6))
  catalog = root / "catalog.json"
  catalog.write_text(json.dumps(CATALOG))
  return str(root), str(catalog)


@pytest.fixture(scope="module")
def vocab():
  return data.get_vocabulary("byte")


def test_catalog_lists_t0_protocol():
  catalog = t0.load_catalog()
  assert len(catalog["train"]) == 38
  assert sum(len(e["subsets"]) for e in catalog["train"]) == 313
  large = {e["dataset"] for e in catalog["train"] if e["train_size"] > catalog["max_examples_per_dataset"]}
  assert large == {"amazon_polarity", "dbpedia_14", "gigaword", "wiki_bio", "yelp_review_full"}
  shots = {e["dataset"]: e["shots"] for e in catalog["eval"]}
  assert shots == {"anli_r1": 32, "anli_r2": 32, "anli_r3": 32, "super_glue/cb": 32, "super_glue/rte": 32,
                   "super_glue/wsc.fixed": 32, "winogrande/winogrande_xl": 50, "super_glue/copa": 32,
                   "hellaswag": 20, "story_cloze/2016": 70, "super_glue/wic": 32}
  assert catalog["fewshot_seeds"] == [42, 1024, 0]
  assert all(len(e["subsets"]) >= 4 for e in catalog["eval"])


def test_register_ids_rates_and_training_batches(p3, vocab):
  p3_dir, catalog = p3
  reg = t0.register_t0(p3_dir, vocab, prefix="x", catalog_path=catalog)
  assert reg.task_ids == {"big_one_t1": 0, "big_one_t2": 1, "small_t1": 2, "nli_x_a": 3, "nli_x_b": 3}
  assert reg.mixtures["x_train"] == ("big_one_t1", "big_one_t2", "small_t1")
  assert reg.fewshot_splits == {"nli/x": ("train_k4_seed42", "train_k4_seed1024", "train_k4_seed0")}
  mixture = seqio.get_mixture_or_task("x_train")
  # big/one is over the cap (10): each of its 2 templates is capped at 10 // 2 = 5 of its 12 examples
  # (big_one_t2 has no stats file: its records are counted); small keeps its 5.
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      "x_big_one_t1": 5.0, "x_big_one_t2": 5.0, "x_small_t1": 5.0}
  batch = next(data.train_batches("x_train", "train", 6, 24, 8, seed=0))
  subsets = {0: "big_one_t1", 1: "big_one_t2", 2: "small_t1"}
  for tokens, task_id in zip(batch["encoder_input_tokens"], batch["task_ids"]):
    text = vocab.decode([int(t) for t in tokens if t > 1])
    assert text.startswith(subsets[int(task_id)] + " q ")


def test_eval_labels_and_fewshot_samples(p3, vocab):
  p3_dir, catalog = p3
  t0.register_t0(p3_dir, vocab, prefix="x", catalog_path=catalog, heldout_task_ids={"nli/x": 9})
  evals = data.eval_examples("x_nli_x_a", "eval")
  assert [ex["label"] for ex in evals] == [i % 3 for i in range(6)]
  assert evals[1]["targets"] == " no" and evals[1]["answer_choices"] == CHOICES
  assert {ex["task_id"] for ex in evals} == {9}

  def source_index(ex):
    return int(ex["inputs"].rsplit(" ", 1)[1])

  samples = {}
  for seed in (42, 1024, 0):
    a = [source_index(ex) for ex in data.eval_examples("x_nli_x_a", f"train_k4_seed{seed}")]
    b = [source_index(ex) for ex in data.eval_examples("x_nli_x_b", f"train_k4_seed{seed}")]
    legacy = list(range(20))
    np.random.seed(seed)  # T-Few's sampler: seed the global generator, shuffle the examples, take k
    np.random.shuffle(legacy)
    assert a == b == legacy[:4]
    samples[seed] = a
  assert len({tuple(v) for v in samples.values()}) == 3

  (batch,) = list(data.rank_classification_batches(evals, vocab, 8, 32, 8))
  np.testing.assert_array_equal(batch["labels"][:6], [0, 1, 2, 0, 1, 2])
  assert batch["decoder_target_tokens"].shape == (8, 3, 8)
  assert vocab.decode([int(t) for t in batch["decoder_target_tokens"][0, 2] if t > 1]) == "maybe"

  it = data.choice_train_batches("x_eval_nli_x", "train_k4_seed42", 4, 32, 8, seed=0)
  first = next(it)
  assert first["encoder_input_tokens"].shape == (4, 32) and first["decoder_loss_weights"].shape == (4, 3, 8)
  assert set(first["task_ids"].tolist()) == {9}
  inputs = {vocab.decode([int(t) for t in row if t > 1]) for row in first["encoder_input_tokens"]}
  assert all(s.split(" premise ")[0] in ("nli_x_a", "nli_x_b") for s in inputs)


def test_real_catalog_names(tmp_path, vocab):
  catalog = t0.load_catalog()
  mrpc = next(e for e in catalog["train"] if e["dataset"] == "glue/mrpc")
  rte = next(e for e in catalog["eval"] if e["dataset"] == "super_glue/rte")
  for subset in mrpc["subsets"]:
    ff.write_p3_subset(tmp_path, subset, "train", [{"inputs": "s1 s2", "targets": "yes"}])
  for subset in rte["subsets"]:
    for split in ("train", "validation"):
      ff.write_p3_subset(tmp_path, subset, split, _choice_examples(subset, 33))
  reg = t0.register_t0(str(tmp_path), vocab, train_datasets=["glue/mrpc"], eval_datasets=["super_glue/rte"])
  positions = [s for e in catalog["train"] for s in e["subsets"]]
  assert {reg.task_ids[s] for s in mrpc["subsets"]} == {positions.index(s) for s in mrpc["subsets"]}
  assert {reg.task_ids[s] for s in rte["subsets"]} == {313 + catalog["eval"].index(rte)}
  assert reg.tasks["super_glue_rte_GPT_3_style"] == "t0_super_glue_rte_GPT_3_style"
  assert set(reg.mixtures) == {"t0_train", "t0_eval_super_glue_rte"}
  assert len(data.eval_examples("t0_super_glue_rte_can_we_infer", "train_k32_seed1024")) == 32


def test_bad_inputs(p3, vocab, tmp_path):
  p3_dir, catalog = p3
  with pytest.raises(FileNotFoundError, match=r"nowhere/data/big_one_t1/info\.train\.json"):
    t0.register_t0(str(tmp_path / "nowhere"), vocab, catalog_path=catalog)
  with pytest.raises(ValueError, match="no train dataset 'nope'"):
    t0.register_t0(p3_dir, vocab, catalog_path=catalog, train_datasets=["nope"])
  with pytest.raises(ValueError, match="no id for held-out dataset 'nli/x'"):
    t0.register_t0(p3_dir, vocab, catalog_path=catalog, heldout_task_ids={})
  broken = dict(CATALOG, eval=[{k: v for k, v in CATALOG["eval"][0].items() if k != "shots"}])
  path = tmp_path / "broken.json"
  path.write_text(json.dumps(broken))
  with pytest.raises(ValueError, match=r"broken\.json: eval\[0\] is missing field 'shots'"):
    t0.load_catalog(str(path))
  bad = [{"inputs": "p", "targets": "perhaps", "answer_choices": CHOICES}]
  ff.write_p3_subset(tmp_path, "bad_subset", "validation", bad)
  with pytest.raises(ValueError, match=r"bad_subset split 'validation' example 0: target 'perhaps'"):
    t0.read_choice_examples(str(tmp_path), "bad_subset", "validation")
  ff.write_p3_subset(tmp_path, "no_choices", "validation", [{"inputs": "p", "targets": "t"}])
  with pytest.raises(ValueError, match=r"no_choices/info\.validation\.json: feature 'answer_choices'"):
    t0.read_choice_examples(str(tmp_path), "no_choices", "validation")
  os.remove(os.path.join(tmp_path, "data", "no_choices", "validation.tfrecord-00000-of-00001"))
  with pytest.raises(FileNotFoundError, match="no P3 TFRecord files"):
    t0.read_split(str(tmp_path), "no_choices", "validation")


@pytest.mark.parametrize("rule,rates,kept", [
    ("authors", {"big_t1": 5.0, "big_t2": 5.0, "mid_t1": 5.0, "mid_t2": 5.0}, {"big_t1": 5, "mid_t1": 5}),
    ("t0", {"big_t1": 5.0, "big_t2": 5.0, "mid_t1": 8.0, "mid_t2": 8.0}, {"big_t1": 12, "mid_t1": 8}),
])
def test_mixture_cap_rules(tmp_path, vocab, rule, rates, kept):
  """The authors keep at most cap // n_templates examples of every template; T0 caps only datasets over
  the cap. 'mid' (8 examples, under the cap of 10) tells them apart."""
  catalog = {"max_examples_per_dataset": 10, "fewshot_seeds": [42],
             "train": [{"dataset": "big", "train_size": 1000, "subsets": ["big_t1", "big_t2"]},
                       {"dataset": "mid", "train_size": 8, "subsets": ["mid_t1", "mid_t2"]}],
             "eval": []}
  for subset, n in (("big_t1", 12), ("big_t2", 12), ("mid_t1", 8), ("mid_t2", 8)):
    ff.write_p3_subset(tmp_path, subset, "train",
                       [{"inputs": f"{subset} q {i}", "targets": f"a {i}"} for i in range(n)])
  (tmp_path / "catalog.json").write_text(json.dumps(catalog))
  t0.register_t0(str(tmp_path), vocab, prefix=f"cap_{rule}", catalog_path=str(tmp_path / "catalog.json"),
                 cap_rule=rule)
  mixture = seqio.get_mixture_or_task(f"cap_{rule}_train")
  assert {t.name[len(f"cap_{rule}_"):]: mixture.get_rate(t) for t in mixture.tasks} == rates
  for subset, n in kept.items():
    task = seqio.get_mixture_or_task(f"cap_{rule}_{subset}")
    inputs = [ex["inputs"].decode() for ex in task.source.get_dataset("train", shuffle=False).as_numpy_iterator()]
    assert inputs == [f"{subset} q {i}" for i in range(n)]   # the first ones, in file order
  with pytest.raises(ValueError, match="cap_rule='x'"):
    t0.register_t0(str(tmp_path), vocab, catalog_path=str(tmp_path / "catalog.json"), cap_rule="x")
