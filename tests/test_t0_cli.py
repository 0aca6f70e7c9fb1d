"""T0 through the CLI on a small P3 copy in the real format: multi-task pre-training on the training
templates, then few-shot adaptation to two held-out datasets (different numbers of answer choices) with
the T-Few loss and rank-classification evaluation of every template."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fixtures_formats as ff
from mhr_jax import config as config_lib
from mhr_jax import cli, train
from tasks import t0

REPO = config_lib.REPO_ROOT
CATALOG = {
    "max_examples_per_dataset": 100,
    "fewshot_seeds": [42, 1024, 0],
    "train": [{"dataset": "qa/a", "train_size": 24, "subsets": ["qa_a_t1", "qa_a_t2"]},
              {"dataset": "summ", "train_size": 24, "subsets": ["summ_t1"]}],
    "eval": [{"dataset": "nli/x", "shots": 4, "fewshot_split": "train", "eval_split": "validation",
              "subsets": ["nli_x_a", "nli_x_b"]},
             {"dataset": "copa", "shots": 6, "fewshot_split": "train", "eval_split": "validation",
              "subsets": ["copa_a", "copa_b", "copa_c"]}],
}
N_EVAL = {"nli_x_a": 10, "nli_x_b": 10, "copa_a": 8, "copa_b": 8, "copa_c": 8}


def _choices(subset, n, choices):
  return [{"inputs": f"{subset} {i}", "targets": choices[i % len(choices)], "answer_choices": choices}
          for i in range(n)]


@pytest.fixture(scope="module")
def p3(tmp_path_factory):
  root = tmp_path_factory.mktemp("p3")
  for subset in ("qa_a_t1", "qa_a_t2", "summ_t1"):
    ff.write_p3_subset(root, subset, "train", [{"inputs": f"{subset} q {i}", "targets": f"a{i % 5}"}
                                               for i in range(24)])
  for subset in ("nli_x_a", "nli_x_b"):
    ff.write_p3_subset(root, subset, "train", _choices(subset, 12, ["yes", "no", "maybe"]))
    ff.write_p3_subset(root, subset, "validation", _choices(subset, N_EVAL[subset], ["yes", "no", "maybe"]))
  for subset in ("copa_a", "copa_b", "copa_c"):
    ff.write_p3_subset(root, subset, "train", _choices(subset, 12, ["first", "second"]))
    ff.write_p3_subset(root, subset, "validation", _choices(subset, N_EVAL[subset], ["first", "second"]))
  catalog = root / "catalog.json"
  catalog.write_text(json.dumps(CATALOG))
  return str(root), str(catalog)


def _data_flags(p3):
  root, catalog = p3
  return ["--gin.DataConfig.source='t0'", "--gin.DataConfig.task='t0_train'",
          f"--gin.DataConfig.data_dir='{root}'", f"--gin.DataConfig.catalog='{catalog}'",
          "--gin.AdapterConfig.n_tasks=3"]


def _run(env, *flags):
  return subprocess.run([sys.executable, "-m", "mhr_jax.train", "--gin_file=configs/tiny.gin", *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def t0_pretrain(env, p3, tmp_path_factory):
  """A 2-step tiny MHR pre-training on the T0 training templates: (run dir, CompletedProcess)."""
  pretrain_dir = str(tmp_path_factory.mktemp("t0") / "pretrain")
  return pretrain_dir, _run(env, f"--gin.MODEL_DIR='{pretrain_dir}'", "--gin.TRAIN_STEPS=2", *_data_flags(p3))


def test_t0_pretrain_then_adapt_with_rank_classification(env, p3, t0_pretrain, tmp_path):
  pretrain_dir, pre = t0_pretrain
  assert pre.returncode == 0, pre.stderr[-3000:]
  assert "data: t0_train/train, 3 tasks" in pre.stderr

  model_dir = str(tmp_path / "adapt")
  result = _run(env, "--gin_file=configs/adapt/mhr.gin", "--gin_file=configs/adapt/t0.gin",
                f"--gin.PRETRAIN_DIR='{pretrain_dir}'", f"--gin.MODEL_DIR='{model_dir}'",
                "--gin.TRAIN_STEPS=2", "--gin.AdaptConfig.seeds=(42, 0)", "--gin.AdaptConfig.eval_batch_size=16",
                *_data_flags(p3))
  assert result.returncode == 0, result.stderr[-3000:]
  shots = "T-Few shots {'nli/x': 4, 'copa': 6}"
  assert f"4 pairs: 2 held-out dataset(s) x seeds [42, 0], {shots}" in result.stderr
  with open(os.path.join(model_dir, "results.json")) as f:
    results = json.load(f)
  assert results["source"] == "t0" and results["method"] == "mhr"
  assert [(p["task"], p["seed"]) for p in results["pairs"]] == [("nli/x", 42), ("nli/x", 0), ("copa", 42),
                                                               ("copa", 0)]
  for i, pair in enumerate(results["pairs"]):
    templates = CATALOG["eval"][0 if pair["task"] == "nli/x" else 1]["subsets"]
    assert sorted(pair["accuracy"]) == sorted(templates)
    with open(os.path.join(model_dir, "pairs", f"{i:04d}.json")) as f:
      chosen = json.load(f)["predictions"]
    for subset, accuracy in pair["accuracy"].items():
      # The accuracy is that of the stored choices against the gold labels read from the P3 files.
      gold = [ex["label"] for ex in t0.read_choice_examples(p3[0], subset, "validation")]
      assert len(chosen[subset]) == N_EVAL[subset]
      assert accuracy == pytest.approx(100.0 * np.mean(np.asarray(chosen[subset]) == np.asarray(gold)))
    assert pair["median_over_templates"] == pytest.approx(np.median(list(pair["accuracy"].values())))
    assert pair["mean_over_templates"] == pytest.approx(np.mean(list(pair["accuracy"].values())))
    assert np.isfinite(pair["final_loss"]) and pair["final_loss"] > 0
  table = results["table"]
  for dataset in ("nli/x", "copa"):
    seeds = [p["median_over_templates"] for p in results["pairs"] if p["task"] == dataset]
    assert table["per_dataset"][dataset]["median_over_templates"]["mean"] == pytest.approx(np.mean(seeds))
  with open(os.path.join(model_dir, "results.md")) as f:
    markdown = f.read()
  assert "| nli/x |" in markdown and "| average |" in markdown and "median_over_templates" in markdown


def test_t0_adaptation_needs_the_tfew_loss(p3, t0_pretrain, tmp_path, capsys):
  """A T0 adaptation with the LM loss is refused before anything is written."""
  pretrain_dir, pre = t0_pretrain
  assert pre.returncode == 0, pre.stderr[-3000:]
  status = train.main(["--gin_file=configs/tiny.gin", "--gin_file=configs/adapt/mhr.gin",
                       f"--gin.PRETRAIN_DIR='{pretrain_dir}'", f"--gin.MODEL_DIR='{tmp_path}/adapt'",
                       *_data_flags(p3)])
  assert status == cli.EXIT_CONFIG_ERROR
  (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert line == ("error: LossConfig.kind='lm': few-shot adaptation on DataConfig.source='t0' trains with "
                  "LossConfig.kind='tfew'")
  assert not os.path.exists(tmp_path / "adapt")


def test_t0_zero_shot_evaluation(env, p3, t0_pretrain, tmp_path):
  """TRAIN_STEPS=0: the pre-trained model with its skills averaged (mhr-mu) is evaluated without training."""
  pretrain_dir, pre = t0_pretrain
  assert pre.returncode == 0, pre.stderr[-3000:]
  model_dir = str(tmp_path / "zero_shot")
  result = _run(env, "--gin_file=configs/adapt/mhr_mu.gin", "--gin_file=configs/adapt/t0.gin",
                f"--gin.PRETRAIN_DIR='{pretrain_dir}'", f"--gin.MODEL_DIR='{model_dir}'",
                "--gin.TRAIN_STEPS=0", "--gin.AdaptConfig.seeds=(0,)", "--gin.AdaptConfig.tasks=('copa',)",
                *_data_flags(p3))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "RunConfig.train_steps=0: evaluating the mhr-mu starting point zero-shot" in result.stderr
  with open(os.path.join(model_dir, "results.json")) as f:
    results = json.load(f)
  (pair,) = results["pairs"]
  assert results["steps"] == 0 and "final_loss" not in pair
  assert sorted(pair["accuracy"]) == ["copa_a", "copa_b", "copa_c"]
  assert results["trainable_params_per_pair"] == 0 and results["checkpoints"] is None  # nothing trained
