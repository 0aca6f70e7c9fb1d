"""Adaptation and evaluation with T5X (mhr_jax.t5x_bridge.{tasks, selection}, the gin files in
configs/t5x/) against the project's own code paths as oracles: SeqIO registration with task ids, rank
classification, best-on-dev selection, T-Few's answer-choice batches, `python -m t5x.eval` against the
project's evaluation, and the gin files: the models they build and the paper's settings they carry, the
same as the project's own configs (configs/experiments/, configs/adapt/).

T5X is not on PyPI: these tests skip when it is absent. Run them with a T5X virtualenv (README, section
"T5X"):
  PYTHONPATH=. $T5X_PYTHON -m pytest -q tests/test_t5x_adaptation.py
`test_t5x_eval_...` starts `python -m t5x.eval`; the end-to-end `python -m t5x.train` runs (pre-training,
best-on-dev and T-Few adaptation) are tests/t5x_bridge_check.sh.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from t5x_helpers import (HAS_T5X, NO_T5X, ROOT, SKILLS, SPLITS, TASKS, bridge_model, hf_dir, mhr_setup,
                         needs_t5x, switched_on_params, trained_like)

pytestmark = needs_t5x


@pytest.fixture(scope="module")
def mhr():
  """(tiny MHR bridge model, its init variables, its switched-on params)."""
  if not HAS_T5X:
    pytest.skip(NO_T5X)
  return mhr_setup()


# ------------------------------------------------------------------ tasks and their metrics

def test_registered_mixture_keeps_task_ids_and_scores_superni_metrics(tmp_path):
  import seqio
  from mhr_jax.t5x_bridge import tasks as bridge_tasks
  name = bridge_tasks.registered("synth_train", source="synthetic", data_dir=str(tmp_path),
                                 prefix="synth", n_train_tasks=3, n_test_tasks=1, n_instances=110)
  mixture = seqio.get_mixture_or_task(name)
  ds = mixture.get_dataset({"inputs": 16, "targets": 16}, split="train", shuffle=False, num_epochs=1)
  ids = {int(ex["task_ids"][0]) for ex in ds.take(60).as_numpy_iterator()}  # declared as (1,)
  assert ids == {0, 1, 2}
  task = seqio.get_mixture_or_task(mixture.tasks[0].name)
  assert task.predict_metric_fns == [bridge_tasks.superni_metric]
  got = bridge_tasks.superni_metric([["abc", "xyz"], ["hello"]], ["xyz", "help"])
  assert got["exact_match"] == 50.0


def test_rank_classification_metric_uses_length_normalised_scores():
  from mhr_jax.t5x_bridge import tasks as bridge_tasks
  # Example 0: choice 1 (gold) has the lower total log-likelihood but the higher per-token one.
  targets = [(0, 0, 1, 2), (0, 1, 1, 8), (1, 0, 1, 3), (1, 1, 1, 3)]
  scores = [-2.0, -1.9 * 4, -3.0, -1.5]
  assert bridge_tasks.rank_classification_metric(targets, scores) == {"accuracy": 100.0}
  assert bridge_tasks.rank_classification_metric(targets, [-0.5, -8.0, -1.0, -3.0]) == {"accuracy": 0.0}


# ------------------------------------------------------------------------ best-on-dev selection

def test_best_on_dev_keeps_the_first_best_step_and_deletes_other_checkpoints(mhr, tmp_path):
  import flax.core
  import seqio
  from t5x import checkpoints as t5x_checkpoints
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  from mhr_jax.t5x_bridge import selection
  model, _, params = mhr
  model_dir = str(tmp_path / "run")
  os.makedirs(model_dir)

  def state(step):
    return bridge_checkpoints.train_state_from_params(model, flax.core.unfreeze(params), step)
  manager = selection.BestOnDevCheckpointManager(model_dir, state(0),
                                                 bridge_checkpoints.default_partitioner(), period=1)
  action = selection.BestOnDev(model_dir, "rougeL")
  # Two tasks' dev ROUGE-L per step; means 30, 40, 40 (a tie: the earlier step stays best), 20.
  scores = {10: (20.0, 40.0), 20: (30.0, 50.0), 30: (50.0, 30.0), 40: (10.0, 30.0)}
  kept = []
  for step, (first, second) in scores.items():
    manager.save(state(step))     # T5X saves a step's checkpoint, then evaluates it
    kept.append(sorted(manager.all_steps()))
    metrics = {"t_a": {"rougeL": first, "exact_match": 0.0},
               "t_b": {"rougeL": seqio.metrics.Scalar(second)}}
    assert action.run(state(step), metrics) is False
  manager.close()
  assert kept == [[10], [10, 20], [20, 30], [20, 40]]
  assert sorted(os.listdir(model_dir)) == ["best_on_dev.json", "checkpoint_20", "checkpoint_40"]
  record = selection.read_record(model_dir)
  assert (record["best_step"], record["best_score"]) == (20, 40.0)
  assert record["checkpoint"] == t5x_checkpoints.get_checkpoint_dir(model_dir, 20)
  assert [(h["step"], h["score"]) for h in record["history"]] == [(10, 30.0), (20, 40.0), (30, 40.0),
                                                                  (40, 20.0)]
  assert selection.BestOnDev(model_dir, "rougeL").record == record   # a resumed run goes on
  with pytest.raises(ValueError, match="no evaluated task reports it"):
    action.run(state(50), {"t_a": {"accuracy": 1.0}})
  with pytest.raises(ValueError, match="use a new MODEL_DIR"):
    selection.BestOnDev(model_dir, "exact_match")


# ----------------------------------------------------------------------------- T0 rank eval

T0_CATALOG = {
    "max_examples_per_dataset": 10, "fewshot_seeds": [42],
    "train": [{"dataset": "qa", "train_size": 4, "subsets": ["qa_t1", "qa_t2", "qa_t3"]}],
    "eval": [{"dataset": "nli/x", "shots": 4, "fewshot_split": "train", "eval_split": "validation",
              "subsets": ["nli_x_a"]}],
}


def test_t0_rank_task_scores_choices_as_the_projects_rank_classification(mhr, tmp_path):
  import json
  import seqio
  import fixtures_formats as ff
  from mhr_jax.data import pipeline as data
  from mhr_jax.evaluation import drivers as evaluation
  from mhr_jax.t5x_bridge import tasks as bridge_tasks
  choices = ["yes", "no", "maybe so"]
  for subset in T0_CATALOG["train"][0]["subsets"]:
    ff.write_p3_subset(tmp_path, subset, "train", [{"inputs": f"{subset} q", "targets": "a"}] * 4)
  rows = [{"inputs": f"premise number {i}", "targets": choices[i % 3], "answer_choices": choices}
          for i in range(7)]
  for split in ("train", "validation"):
    ff.write_p3_subset(tmp_path, "nli_x_a", split, rows)
  (tmp_path / "catalog.json").write_text(json.dumps(T0_CATALOG))
  registration = bridge_tasks.register("t0", str(tmp_path), "byte", prefix="r",
                                       catalog_path=str(tmp_path / "catalog.json"))
  assert registration.task_ids["nli_x_a"] == TASKS     # the held-out dataset's id: after training ids
  _, _, params = mhr
  model = bridge_model(n_tasks=TASKS + 1)
  task = seqio.get_mixture_or_task("r_nli_x_a" + bridge_tasks.RANK_SUFFIX)
  examples = list(task.get_dataset(None, split="eval", shuffle=False).as_numpy_iterator())
  assert len(examples) == 7 * 3
  converted = model.FEATURE_CONVERTER_CLS(pack=False)(
      task.get_dataset(None, split="eval", shuffle=False), {"inputs": 24, "targets": 10, "task_ids": 1})
  batch = {k: np.stack([ex[k] for ex in converted.as_numpy_iterator()])
           for k in converted.element_spec}
  params = _with_task_rows(params, 1)
  scores = model.score_batch(params, batch)
  targets = [task.postprocess_fn(None, example=ex, is_target=True) for ex in examples]
  got = bridge_tasks.rank_classification_metric(targets, scores)

  project = evaluation.rank_classification(
      model.module, params, data.rank_classification_batches(
          data.eval_examples("r_nli_x_a", "eval"), data.get_vocabulary("byte"), 4, 24, 10))
  assert got == {"accuracy": pytest.approx(project.accuracy, abs=1e-9)}
  assert 0 < project.accuracy < 100   # a discriminating fixture: some right, some wrong


def _write_t0_fixture(tmp_path, heldout: str, n_templates: int = 2, n_examples: int = 12) -> str:
  """A P3-format T0 fixture: T0_CATALOG's training tasks and one held-out dataset `heldout` with
  `n_templates` templates whose examples have 2 or 3 answer choices. Returns the catalog path."""
  import json
  import fixtures_formats as ff
  for subset in T0_CATALOG["train"][0]["subsets"]:
    ff.write_p3_subset(tmp_path, subset, "train", [{"inputs": f"{subset} q", "targets": "a"}] * 4)
  subsets = [f"{heldout}_t{t}" for t in range(n_templates)]
  for t, subset in enumerate(subsets):
    rows = []
    for i in range(n_examples):
      choices = ["yes", "no", "maybe so"][:2 + (i + t) % 2]
      rows.append({"inputs": f"template {t} premise {i}", "targets": choices[i % len(choices)],
                   "answer_choices": choices})
    for split in ("train", "validation"):
      ff.write_p3_subset(tmp_path, subset, split, rows)
  catalog = {**T0_CATALOG, "eval": [{**T0_CATALOG["eval"][0], "dataset": heldout, "shots": 8,
                                     "subsets": subsets}]}
  path = tmp_path / "catalog.json"
  path.write_text(json.dumps(catalog))
  return str(path)


def test_choice_train_dataset_gives_the_projects_t_few_batches(tmp_path):
  import dataclasses
  from t5x import utils as t5x_utils
  from mhr_jax.data import pipeline as data
  from mhr_jax.t5x_bridge import tasks as bridge_tasks
  catalog = _write_t0_fixture(tmp_path, "nli_c")
  registration = bridge_tasks.register("t0", str(tmp_path), "byte", prefix="c", catalog_path=catalog)
  mixture, split = "c_eval_nli_c", registration.fewshot_splits["nli_c"][0]
  model = bridge_model(n_tasks=TASKS + 1)        # the held-out dataset's id is TASKS
  cfg = t5x_utils.DatasetConfig(mixture_or_task_name=mixture, task_feature_lengths={
      "inputs": 32, "targets": 8}, split=split, batch_size=4, shuffle=True, seed=7, pack=False)
  for shard in (0, 1):   # two hosts of 2 examples each; 16 examples: the 5th batch starts epoch 2
    got = bridge_tasks.choice_train_dataset(cfg, shard, 2, model.FEATURE_CONVERTER_CLS)
    assert set(got.element_spec) == set(bridge_tasks.CHOICE_FEATURES)
    want = data.choice_train_batches(mixture, split, 2, 32, 8, seed=7, shard_index=shard, num_shards=2)
    got = list(got.take(5).as_numpy_iterator())
    assert len(got) == 5
    for g, w in zip(got, [next(want) for _ in range(5)]):
      assert g["decoder_target_tokens"].shape == (2, 3, 8)
      for key in bridge_tasks.CHOICE_FEATURES:
        np.testing.assert_array_equal(g[key], w[key], err_msg=key)
  with pytest.raises(ValueError, match="not packed"):
    bridge_tasks.choice_train_dataset(dataclasses.replace(cfg, pack=True), 0, 1,
                                      model.FEATURE_CONVERTER_CLS)
  with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=3\)"):
    bridge_tasks.choice_train_dataset(cfg, 0, 1, bridge_model().FEATURE_CONVERTER_CLS)


def _with_task_rows(params, n_new):
  import flax.core
  import jax
  from mhr_jax import models
  from mhr_jax.adapters import AdapterConfig, transforms
  acfg = AdapterConfig(kind="mhr", n_tasks=TASKS, n_skills=SKILLS, n_splits=SPLITS, rank=2)
  cfg = models.preset("tiny", adapter=acfg)
  _, out = transforms.add_task_rows(cfg, flax.core.unfreeze(params), n_new, jax.random.key(3))
  # Spread the new rows too, so that the held-out task has a routing of its own.
  return trained_like(out, seed=4)


# ------------------------------------------------------- t5x.eval against the project's evaluation

EVAL_LENGTHS = {"inputs": 32, "targets": 16}   # configs/t5x/synthetic.gin's, as configs/tiny.gin's


def _fit(model, params, examples, steps: int):
  """`steps` full fine-tuning steps of the project's trainer on `examples` (one device), so that the
  checkpoint's predictions are partly right and the metrics are neither 0 nor 100."""
  import itertools
  import jax
  from mhr_jax.data import pipeline as data
  from mhr_jax.training import losses, optim, train_step
  from mhr_jax import partitioning
  from mhr_jax.adapters import params as param_groups
  labels = param_groups.param_labels(params, "full")
  optimizer = optim.make_optimizer(optim.OptimizerConfig(
      name="adamw", base_lr=3e-3, adapter_lr=3e-3, routing_lr=3e-3, warmup_steps=0,
      schedule="constant", weight_decay=0.0), labels, steps)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])
  state = train_step.init_train_state(model.module, params, labels, optimizer, mesh)
  step = train_step.make_train_step(model.module, optimizer, losses.LossConfig(), mesh,
                                    train_step.shardings_of(state))
  batches = itertools.cycle(data.lm_eval_batches(examples, data.get_vocabulary("byte"), 32,
                                                 EVAL_LENGTHS["inputs"], EVAL_LENGTHS["targets"]))
  for i in range(steps):
    state, _ = step(state, next(batches), jax.random.key(i))
  return jax.tree.map(np.asarray, param_groups.combine(state.trainable, state.frozen))


def test_t5x_eval_and_the_projects_evaluation_agree_on_a_checkpoint(tmp_path):
  """One T5X checkpoint of the tiny MHR model with rows for the synthetic suite's held-out tasks:
  `python -m t5x.eval` (configs/t5x/eval_tiny.gin) and the project's few-shot evaluation
  (evaluation.fewshot.evaluate: greedy decoding by evaluation.drivers.generate, metrics.superni_metrics)
  of each task's row give the same predictions, exact match and ROUGE-L."""
  import json
  import flax.core
  import jax
  from mhr_jax import config as config_lib
  from mhr_jax.data import fewshot as fewshot_data
  from mhr_jax.data import pipeline as data
  from mhr_jax.evaluation import fewshot as fewshot_eval
  from mhr_jax.training import losses, optim
  from mhr_jax import models, partitioning
  from mhr_jax.adapters import transforms
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  from mhr_jax.t5x_bridge import tasks as bridge_tasks
  files = [str(ROOT / "configs/t5x/eval_tiny.gin"), str(ROOT / "configs/t5x/adapt_mhr.gin")]
  out = tmp_path / "eval"
  model = bridge_checkpoints.load_gin_model(files, [f"EVAL_OUTPUT_DIR = '{out}'"])
  # The suite as synthetic.gin registers it for t5x.eval (task ids 8 and 9 held out).
  registration = bridge_tasks.register("synthetic", str(out / "synthetic_data"), "byte", n_train_tasks=8,
                                       n_test_tasks=2, fewshot_ks=(16, 32, 64, 100))
  heldout = list(registration.mixtures["synthetic_test"])
  _, params = switched_on_params(model)
  params = _fit(model, jax.tree.map(np.asarray, flax.core.unfreeze(params)), [
      ex for task in heldout for ex in data.eval_examples(registration.tasks[task], "train")], steps=60)
  checkpoint = bridge_checkpoints.save_t5x(bridge_checkpoints.train_state_from_params(model, params, 7),
                                           str(tmp_path / "t5x"))
  # One CPU device: T5X's CPU mesh puts every device on 'model', which the tiny model's dims need not
  # divide (the session's 8 simulated devices come from tests/conftest.py's XLA_FLAGS).
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
  run = subprocess.run(
      [sys.executable, "-m", "t5x.eval", *(f"--gin_file={f}" for f in files),
       f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.EVAL_OUTPUT_DIR='{out}'"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]

  # The project's side: one adapted model per task (its routing row as task 0).
  cfg = config_lib.ExperimentConfig(
      model_cfg=config_lib.ModelConfig(), model=model.config,
      data=config_lib.DataConfig(input_len=EVAL_LENGTHS["inputs"], target_len=EVAL_LENGTHS["targets"]),
      loss=losses.LossConfig(), optimizer=optim.OptimizerConfig(), mesh=partitioning.MeshConfig(),
      run=config_lib.RunConfig(model_dir=str(tmp_path / "native")),
      adapt=config_lib.AdaptConfig(tasks=tuple(heldout), seeds=(13,), shots=16))
  benchmark = fewshot_data.SuperNIPairs(cfg, registration, data.get_vocabulary("byte"))
  compared = 0
  for index, (task, _) in enumerate(benchmark.pairs):
    one_cfg, one_params = transforms.select_task_rows(model.config, params, [registration.task_ids[task]])
    native = fewshot_eval.evaluate(benchmark, models.T5(one_cfg), one_params, index, mesh=None)
    name = registration.tasks[task]
    with open(out / "inference_eval" / f"{name}-metrics.jsonl") as f:
      t5x_metrics = json.loads(f.read().splitlines()[-1])
    with open(out / "inference_eval" / f"{name}-{7:06d}.jsonl") as f:
      t5x_predictions = [json.loads(line)["prediction"] for line in f]
    assert t5x_predictions == native["predictions"], task
    assert t5x_metrics["rougeL"] == pytest.approx(native["rougeL"], abs=1e-9)
    assert t5x_metrics["exact_match"] == pytest.approx(native["exact_match"], abs=1e-9)
    compared += len(t5x_predictions)
    print(f"{task}: {len(t5x_predictions)} test instances, identical predictions; t5x.eval "
          f"rougeL {t5x_metrics['rougeL']:.4f} EM {t5x_metrics['exact_match']:.2f}, project "
          f"rougeL {native['rougeL']:.4f} EM {native['exact_match']:.2f}")
    assert 0 < native["exact_match"] < 100
  assert compared == 200   # both held-out tasks' test sets


# --------------------------------------------------------------------------------- gin files

GIN_RUNS = {
    # run files -> expected (adapter kind, n_tasks, n_splits, rank, method, first frozen routing row)
    "pretrain_tiny": (["configs/mhr.gin"], ("mhr", 8, 4, 1, "mhr", 0)),
    "pretrain_t0": (["configs/t5x/t0_mhr.gin"], ("mhr", 313, 64, 1, "mhr", 0)),
    "pretrain_t0_lora": (["configs/t5x/t0_lora.gin"], ("lora", 313, 1, 1, "lora", 0)),
    "pretrain_t0_ia3": (["configs/t5x/t0_ia3.gin"], ("ia3", 313, 1, 1, "ia3", 0)),
    "pretrain_superni": (["configs/t5x/superni_mhr.gin"], ("mhr", 756, 8, 16, "mhr", 0)),
    "adapt_tiny_mhr_z": (["configs/t5x/adapt_tiny.gin", "configs/t5x/adapt_mhr_z.gin"],
                         ("mhr", 10, 4, 1, "mhr-z", 8)),
    "adapt_t0_mhr_mu": (["configs/t5x/adapt_t0.gin", "configs/t5x/adapt_mhr_mu.gin"],
                        ("lora", 313, 1, 1, "mhr-mu", 0)),
    "adapt_superni_mhr": (["configs/t5x/adapt_superni.gin", "configs/t5x/adapt_mhr.gin"],
                          ("mhr", 875, 8, 16, "mhr", 0)),
    "adapt_tiny_lora": (["configs/t5x/adapt_tiny.gin", "configs/t5x/adapt_lora.gin"],
                        ("lora", 8, 1, 1, "lora", 0)),
    "adapt_t0_ia3": (["configs/t5x/adapt_t0.gin", "configs/t5x/adapt_ia3.gin"], ("ia3", 313, 1, 1, "ia3", 0)),
    "eval_tiny": (["configs/t5x/eval_tiny.gin", "configs/t5x/adapt_mhr.gin"],
                  ("mhr", 10, 4, 1, "mhr", 0)),
    "eval_t0": (["configs/t5x/eval_t0.gin", "configs/t5x/adapt_mhr_z.gin"],
                ("mhr", 324, 64, 1, "mhr-z", 313)),
    "eval_superni": (["configs/t5x/eval_superni.gin"], ("mhr", 756, 8, 16, "mhr", 0)),
}


@pytest.mark.parametrize("run", sorted(GIN_RUNS))
def test_gin_files_build_the_papers_models(run, tmp_path):
  import gin
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  from mhr_jax.t5x_bridge import models as bridge_models
  files, (kind, n_tasks, n_splits, rank, method, frozen_rows) = GIN_RUNS[run]
  # The paper's settings read T5-XL's architecture from HF_CHECKPOINT (64 heads divide its widths).
  bindings = ["MODEL_DIR='/unused'", "VOCABULARY_SPEC='byte'", f"HF_CHECKPOINT='{hf_dir(tmp_path, 'xl')}'"]
  model = bridge_checkpoints.load_gin_model([str(ROOT / f) for f in files], bindings)
  assert isinstance(model, bridge_models.MhrEncoderDecoderModel)
  acfg = model.config.adapter
  assert (acfg.kind, acfg.n_tasks, acfg.n_splits, acfg.rank) == (kind, n_tasks, n_splits, rank)
  from mhr_jax.adapters import params as param_groups
  assert list(model.optimizer_def.rules) == param_groups.default_rules(method)
  assert model.optimizer_def.update_routing_rows_from == frozen_rows
  assert gin.query_parameter("%METHOD") == method   # also the fine-tuning start's method (adapt.gin)
  # T0 adaptation trains with the T-Few objective, everything else with T5X's LM loss.
  loss = model.loss_config.kind if model.loss_config is not None else "t5x"
  assert loss == ("tfew" if run.startswith("adapt_t0") else "t5x")


# ------------------------------------------------------------- the paper's settings, both trainers

PAPER_PATHS = ("MODEL_DIR", "DATA_DIR", "HF_CHECKPOINT", "PRETRAIN_DIR", "PRETRAINED_CHECKPOINT")

# setting -> (the project's config files, the T5X config files); adaptation runs as docs/METHODS.md describes.


PAPER_SETTINGS = {
    "t0_mhr": (["configs/experiments/t0_mhr.gin"], ["configs/t5x/t0_mhr.gin"]),
    "t0_lora": (["configs/experiments/t0_lora.gin"], ["configs/t5x/t0_lora.gin"]),
    "t0_ia3": (["configs/experiments/t0_ia3.gin"], ["configs/t5x/t0_ia3.gin"]),
    "superni_mhr": (["configs/experiments/superni_mhr.gin"], ["configs/t5x/superni_mhr.gin"]),
    "t0_adapt_mhr_z": (["configs/experiments/t0_mhr.gin", "configs/adapt/mhr_z.gin", "configs/adapt/t0.gin"],
                       ["configs/t5x/adapt_t0.gin", "configs/t5x/adapt_mhr_z.gin"]),
    "superni_adapt_mhr": (["configs/experiments/superni_mhr.gin", "configs/adapt/mhr.gin",
                           "configs/adapt/superni.gin"],
                          ["configs/t5x/adapt_superni.gin", "configs/t5x/adapt_mhr.gin"]),
    "superni_eval": (["configs/experiments/superni_mhr.gin", "configs/adapt/mhr.gin", "configs/adapt/superni.gin"],
                     ["configs/t5x/eval_superni.gin", "configs/t5x/adapt_mhr.gin"]),
}


def print_project_settings(stub_dir: str) -> None:
  """Prints {setting: the project trainer's checked config of its files, as dicts} as JSON (macros'
  paths stubbed with `stub_dir`). Run in a process of its own: gin's dynamic registration (T5X's gin
  files) makes the project configs' short names, such as AdapterConfig, ambiguous in the process."""
  import dataclasses
  import json
  from mhr_jax import config as config_lib
  out = {}
  for setting, (files, _) in PAPER_SETTINGS.items():
    config_lib.parse_gin(files, [f"{m} = '{stub_dir}'" for m in PAPER_PATHS[:4]])
    cfg = config_lib.load_config()
    out[setting] = {"adapter": dataclasses.asdict(cfg.model.adapter), "input_prompt": cfg.data.input_prompt,
                    **{name: dataclasses.asdict(getattr(cfg, name))
                       for name in ("optimizer", "loss", "data", "run", "adapt")}}
  print(json.dumps(out))


@pytest.fixture(scope="module")
def project_settings(tmp_path_factory):
  """{setting: the project's config of PAPER_SETTINGS' files} (see print_project_settings)."""
  import json
  stub = tmp_path_factory.mktemp("paper_paths")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
  out = subprocess.run([sys.executable, "-c", f"import test_t5x_adaptation as t; t.print_project_settings('{stub}')"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _t5x_settings(files, tmp_path) -> dict:
  """The settings a T5X run of `files` uses: its MODEL, its macros and its SuperNI input format."""
  import gin
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  bindings = [f"{m} = '{tmp_path}'" for m in PAPER_PATHS if m != "HF_CHECKPOINT"] + [
      f"HF_CHECKPOINT = '{hf_dir(tmp_path, 'xl')}'", "VOCABULARY_SPEC = 'byte'", "SUPERNI_TASK = 'unused'",
      "T0_DATASET_MIXTURE = 'unused'", "CHECKPOINT_PATH = 'unused'", "EVAL_OUTPUT_DIR = 'unused'"]
  model = bridge_checkpoints.load_gin_model([str(ROOT / f) for f in files], bindings)

  def query(name):
    try:
      return gin.query_parameter(name)
    except ValueError:   # not bound in these files
      return None
  macros = {m: query(f"%{m}") for m in ("TRAIN_STEPS", "BATCH_SIZE", "TASK_FEATURE_LENGTHS", "TRAIN_SPLIT",
                                        "DEV_SPLIT", "EVAL_PERIOD", "SELECT_METRIC")}
  return {"model": model, **macros, "prompt": query("superni.InputFormat.prompt"),
          "max_train_instances": query("bridge_tasks.registered.max_train_instances"),
          "cap_rule": query("bridge_tasks.registered.cap_rule")}


def _adapter_settings(acfg) -> dict:
  """The AdapterConfig fields its kind uses (a shared LoRA or (IA)^3 has no heads or routing)."""
  names = ["kind", "target_modules", "rank", "alpha", "init_a"]
  if acfg.routed:
    names += ["n_skills", "n_splits", "routing", "gumbel", "temperature", "anneal_steps"]
  return {name: getattr(acfg, name) for name in names}


@pytest.mark.parametrize("setting", sorted(PAPER_SETTINGS))
def test_t5x_configs_carry_the_projects_paper_settings(setting, project_settings, tmp_path):
  """The paper's settings in configs/t5x/ are those of the project's configs (configs/experiments/,
  configs/adapt/), as far as T5X expresses them (README, section "T5X"): the optimizer field by field,
  the adapter, steps, batch size, lengths, loss, the SuperNI prompt, shots, dev selection and beams."""
  import dataclasses
  from mhr_jax.adapters import AdapterConfig
  from mhr_jax.training import losses
  want = project_settings[setting]
  data, adapt = want["data"], want["adapt"]
  got = _t5x_settings(PAPER_SETTINGS[setting][1], tmp_path)
  model = got["model"]
  acfg = model.config.adapter
  if want["adapter"]["kind"] == acfg.kind:   # MHR-mu's adapted LoRA aside, the pre-trained adapter
    assert _adapter_settings(acfg) == _adapter_settings(AdapterConfig(**want["adapter"]))
  assert got["TASK_FEATURE_LENGTHS"] == {"inputs": data["input_len"], "targets": data["target_len"]}
  beams = model._default_decoder_params.num_decodes   # pylint: disable=protected-access
  if setting.endswith("_eval"):   # t5x.eval: the generation settings of the test split
    assert (beams, got["prompt"]) == (adapt["num_beams"], want["input_prompt"])
    return
  opt = model.optimizer_def
  assert dataclasses.asdict(opt.config) == want["optimizer"]
  assert (opt.total_steps, got["TRAIN_STEPS"], got["BATCH_SIZE"]) == (
      want["run"]["train_steps"], want["run"]["train_steps"], data["batch_size"])
  if model.loss_config is not None:   # the project's objective (T-Few)
    assert model.loss_config == losses.LossConfig(**want["loss"])
  else:
    assert want["loss"]["kind"] == "lm"
    assert model._label_smoothing == want["loss"]["label_smoothing"]   # pylint: disable=protected-access
  if data["source"] == "superni":
    assert (got["prompt"], got["max_train_instances"]) == (want["input_prompt"], data["max_train_instances"])
  elif "adapt" not in setting:   # the T0 training mixture's cap
    assert got["cap_rule"] == data["t0_cap"]
  if "adapt" in setting:
    shots, seed = (int(x) for x in re.fullmatch(r"train_k(\d+)_seed(\d+)", got["TRAIN_SPLIT"]).groups())
    assert seed in adapt["seeds"]
    if data["source"] == "superni":
      assert shots == adapt["shots"] and got["DEV_SPLIT"] == f"dev_k{shots}_seed{seed}"
      assert (got["EVAL_PERIOD"], got["SELECT_METRIC"]) == (adapt["select_every"], adapt["select_metric"])
      assert beams == adapt["num_beams"]
