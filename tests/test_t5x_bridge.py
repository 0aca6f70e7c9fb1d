"""The T5X bridge (mhr_jax.t5x_bridge) against the project's own code paths as oracles.

T5X is not on PyPI: the tests that need it skip when it is absent (the project's CI has no T5X).
Run them with a T5X virtualenv (README, section "T5X"):
  PYTHONPATH=. $T5X_PYTHON -m pytest -q tests/test_t5x_bridge.py
The end-to-end `python -m t5x.train --gin_file=configs/mhr.gin` run is tests/t5x_bridge_check.sh.
"""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_T5X = importlib.util.find_spec("t5x") is not None
needs_t5x = pytest.mark.skipif(
    not HAS_T5X, reason="T5X is not installed (it is not on PyPI; see README.md, section 'T5X')")

LOGITS_ATOL = 1e-5       # the same computation on both sides: float32 round-off only
SCORE_ATOL = 1e-4        # summed log-probabilities over up to 8 tokens


# ------------------------------------------------------------------- without T5X (always run)

def test_importing_the_bridge_without_t5x_fails_with_a_clear_message():
  code = ("import sys; sys.modules['t5x'] = None\n"
          "try:\n  import mhr_jax.t5x_bridge\nexcept ImportError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "mhr_jax.t5x_bridge needs T5X, which is not on PyPI" in out.stdout


def test_no_other_module_imports_the_bridge():
  offenders = []
  for path in list((ROOT / "mhr_jax").rglob("*.py")) + list((ROOT / "tasks").rglob("*.py")):
    if "t5x_bridge" in path.parts:
      continue
    if re.search(r"^\s*(from|import)\s+mhr_jax\.t5x_bridge|t5x_bridge import", path.read_text(),
                 re.MULTILINE):
      offenders.append(str(path.relative_to(ROOT)))
  assert not offenders


# ------------------------------------------------------------------------------- fixtures

TASKS, SKILLS, SPLITS = 3, 4, 4


def _trained_like(params, seed=0):
  """Init params with the adapters switched on: B != 0 and spread routing logits, so that task ids
  change the outputs (at init B = 0 and every task computes the base model)."""
  import jax
  rng = np.random.default_rng(seed)

  def one(path, x):
    name = jax.tree_util.keystr(path)
    if "lora_b" in name:
      return np.asarray(rng.normal(0, 0.5, x.shape), np.float32)
    if "routing" in name:
      return np.asarray(rng.normal(0, 2.0, x.shape), np.float32)
    return np.asarray(x)
  return jax.tree_util.tree_map_with_path(one, params)


@pytest.fixture(scope="module")
def bridge():
  if not HAS_T5X:
    pytest.skip("T5X is not installed (it is not on PyPI; see README.md, section 'T5X')")
  import seqio
  from mhr_jax.training import optim
  from mhr_jax.adapters import AdapterConfig
  from mhr_jax.t5x_bridge import models as bridge_models
  from mhr_jax.t5x_bridge import optim as bridge_optim

  def make(kind="mhr", n_tasks=TASKS, method=None, **opt):
    acfg = AdapterConfig(kind=kind, n_tasks=n_tasks, n_skills=SKILLS,
                         n_splits=SPLITS if kind == "mhr" else 1, rank=2)
    module = bridge_models.t5_module("tiny", acfg)
    vocab = seqio.ByteVocabulary()
    config = optim.OptimizerConfig(name="adafactor", adapter_lr=1e-2, routing_lr=1.0, warmup_steps=0,
                                   schedule="constant")
    optimizer = bridge_optim.MhrOptimizer(config, method or kind, total_steps=10, **opt)
    return bridge_models.MhrEncoderDecoderModel(module, vocab, vocab, optimizer,
                                                loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
  return make


@pytest.fixture(scope="module")
def mhr(bridge):
  import flax.core
  import jax
  model = bridge()
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 6)}
  variables = model.get_initial_variables(jax.random.key(0), shapes)
  params = flax.core.freeze(_trained_like(flax.core.unfreeze(variables["params"])))
  return model, variables, params


def _batch(n=4, li=8, lt=6, seed=1):
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, 200, (n, li)).astype(np.int32)
  enc[:, -2:] = 0
  tgt = rng.integers(3, 200, (n, lt)).astype(np.int32)
  tgt[0, 4:] = 0
  dec = np.zeros_like(tgt)
  dec[:, 1:] = tgt[:, :-1]
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
          "decoder_loss_weights": (tgt > 0).astype(np.int32),
          "task_ids": np.arange(n, dtype=np.int32) % TASKS}


# ---------------------------------------------------------------------------- the model class

@needs_t5x
def test_initial_variables_are_unboxed_with_the_modules_axis_names(mhr):
  import flax.linen as nn
  import jax
  from flax import traverse_util
  model, variables, _ = mhr
  boxed = model.module.init({"params": jax.random.key(0)}, *[np.ones((2, 8), np.int32)] * 3,
                            task_ids=np.zeros(2, np.int32), enable_dropout=False)["params"]
  want = traverse_util.flatten_dict(nn.unbox(boxed))
  got = traverse_util.flatten_dict(variables["params"])
  assert set(got) == set(want)
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value)
  axes = traverse_util.flatten_dict(variables["params_axes"])
  routing = ("encoder", "block_0", "self_attention", "q", "routing", "logits_axes")
  assert axes[routing].names == ("routing_tasks", "adapter_splits", "adapter_skills")
  assert len(axes) == len(got)


@needs_t5x
def test_loss_and_score_batch_route_by_task_as_the_project_does(mhr):
  import jax.numpy as jnp
  from mhr_jax.evaluation import decoding
  from mhr_jax.training import losses
  model, _, params = mhr
  batch = _batch()
  logits = model.module.apply({"params": params}, batch["encoder_input_tokens"],
                              batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                              task_ids=batch["task_ids"], enable_dropout=False)
  total, count = losses.lm_loss(logits, batch["decoder_target_tokens"],
                                jnp.asarray(batch["decoder_loss_weights"], jnp.float32))
  loss, _ = model.loss_fn(params, batch, None)
  np.testing.assert_allclose(loss, total / count, atol=LOGITS_ATOL, rtol=0)
  sums, _, _ = decoding.score_sequences(model.module, params, batch["encoder_input_tokens"],
                                        batch["decoder_target_tokens"], batch["task_ids"])
  np.testing.assert_allclose(model.score_batch(params, batch), sums, atol=SCORE_ATOL, rtol=0)
  # The task ids matter: another routing gives other scores.
  other = {**batch, "task_ids": (batch["task_ids"] + 1) % TASKS}
  assert np.abs(np.asarray(model.score_batch(params, other)) - np.asarray(sums)).max() > 1e-3


@needs_t5x
def test_out_of_range_task_ids_fail_before_the_routing_gather(mhr):
  model, _, params = mhr
  batch = {**_batch(), "task_ids": np.array([0, 1, 2, TASKS], np.int32)}
  with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=3\)"):
    model.score_batch(params, batch)
  with pytest.raises(ValueError, match="has no 'task_ids'"):
    model.score_batch(params, {k: v for k, v in _batch().items() if k != "task_ids"})


@needs_t5x
def test_predict_batch_equals_the_projects_greedy_and_beam_search(mhr, bridge):
  import functools
  from t5x import decoding as t5x_decoding
  from mhr_jax.evaluation import decoding
  model, _, params = mhr
  batch = _batch()
  inputs, task_ids, max_len = batch["encoder_input_tokens"], batch["task_ids"], 6
  greedy = model.__class__(model.module, model.input_vocabulary, model.output_vocabulary,
                           model.optimizer_def,
                           decode_fn=functools.partial(t5x_decoding.temperature_sample,
                                                       temperature=0.0))
  tokens, _ = greedy.predict_batch_with_aux(params, batch)
  want = decoding.greedy_decode(model.module, params, inputs, max_len, task_ids=task_ids)
  np.testing.assert_array_equal(tokens, want)
  beams, _ = model.predict_batch_with_aux(params, batch, num_decodes=3,
                                          decoder_params={"alpha": 0.0})
  want, _ = decoding.beam_search(model.module, params, inputs, max_len, num_beams=3,
                                 length_penalty=0.0, task_ids=task_ids)
  np.testing.assert_array_equal(beams, want)


# ------------------------------------------------------------------------------ optimizer

@needs_t5x
def test_optimizer_freezes_the_base_and_gives_routing_its_own_rate(mhr):
  import flax.core
  import jax
  from mhr_jax.training import optim
  model, _, params = mhr
  opt = model.optimizer_def
  labels = opt.labels(params)
  assert isinstance(labels, flax.core.FrozenDict)  # optax.multi_transform needs params' containers
  tx = opt.optax_optimizer
  state = tx.init(params)
  grads = jax.grad(lambda p: model.loss_fn(p, _batch(), None)[0])(params)
  updates, state = tx.update(grads, state, params)
  flat_u = flax.traverse_util.flatten_dict(flax.core.unfreeze(updates))
  flat_l = flax.traverse_util.flatten_dict(flax.core.unfreeze(labels))
  for path, update in flat_u.items():
    moved = float(np.abs(np.asarray(update)).max())
    if flat_l[path] == "frozen":
      assert moved == 0.0, path
  assert {g for g in flat_l.values()} == {"frozen", "adapters", "routing"}
  assert max(float(np.abs(np.asarray(u)).max()) for p, u in flat_u.items()
             if flat_l[p] == "routing") > 0
  rates = {g: float(v) for g, v in optim.learning_rates(state).items()}
  assert rates == {"adapters": pytest.approx(1e-2), "routing": pytest.approx(1.0)}
  # Frozen leaves get no gradient at all through the model's loss (stop_gradient).
  flat_g = flax.traverse_util.flatten_dict(flax.core.unfreeze(grads))
  assert all(float(np.abs(np.asarray(flat_g[p])).max()) == 0.0 for p in flat_g
             if flat_l[p] == "frozen")


@needs_t5x
def test_mhr_z_moves_only_the_new_routing_rows(bridge, mhr):
  import flax.core
  import jax
  _, _, params = mhr
  model = bridge(method="mhr-z", update_routing_rows_from=2)
  tx = model.optimizer_def.optax_optimizer
  grads = jax.grad(lambda p: model.loss_fn(p, _batch(), None)[0])(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in flax.traverse_util.flatten_dict(flax.core.unfreeze(updates)).items():
    u = np.asarray(u)
    if path[-2:] == ("routing", "logits"):
      assert np.abs(u[:2]).max() == 0.0 and np.abs(u[2:]).max() > 0.0, path
    else:
      assert np.abs(u).max() == 0.0, path


@needs_t5x
def test_partitioning_rules_map_the_adapter_and_activation_names():
  from mhr_jax import partitioning
  from mhr_jax.t5x_bridge import partitioning as bridge_partitioning
  rules = dict(reversed(bridge_partitioning.logical_axis_rules()))  # first rule wins
  names = {name for name, _ in partitioning.LOGICAL_RULES}
  assert names <= set(rules)
  assert rules["activation_batch"] == "data" and rules["activation_mlp"] == "model"
  assert rules["routing_tasks"] is None and rules["adapter_skills"] is None
  assert rules["embed"] is None   # T5X's own rule for the base model is kept


# --------------------------------------------------------------------------------- features

@needs_t5x
def test_feature_converter_gives_the_projects_rows_and_checks_ids():
  import seqio
  import tensorflow as tf
  from mhr_jax.data import pipeline as data
  from mhr_jax.t5x_bridge import features
  examples = [{"inputs": [5, 6, 7, 1], "targets": [8, 9, 1], "task_ids": 2},
              {"inputs": [4, 1], "targets": [3, 3, 3, 1], "task_ids": 0},
              {"inputs": [9, 9, 9, 1], "targets": [7, 1], "task_ids": 2}]

  def dataset(rows):
    return tf.data.Dataset.from_generator(
        lambda: iter(rows), output_signature={
            "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32),
            "task_ids": tf.TensorSpec([], tf.int32)})
  lengths = {"inputs": 6, "targets": 6}
  converter = features.TaskIdsFeatureConverter(pack=False, n_tasks=3)
  assert isinstance(converter, seqio.FeatureConverter)
  got = list(converter(dataset(examples), lengths).as_numpy_iterator())
  want = list(data.TaskIdsFeatureConverter(pack=False)(dataset(examples), lengths).as_numpy_iterator())
  assert len(got) == len(want) == 3
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])
  packed = list(features.TaskIdsFeatureConverter(pack=True, n_tasks=3)(
      dataset(examples), {"inputs": 10, "targets": 10}).as_numpy_iterator())
  assert sorted(int(r["task_ids"]) for r in packed) == [0, 2]  # the two task-2 examples share a row
  assert max(int(r["encoder_segment_ids"].max()) for r in packed) == 2
  bad = features.TaskIdsFeatureConverter(pack=False, n_tasks=2)(dataset(examples), lengths)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"AdapterConfig.n_tasks=2"):
    list(bad.as_numpy_iterator())
  with pytest.raises(ValueError, match="no 'task_ids' feature"):
    converter(dataset(examples).map(lambda ex: {k: v for k, v in ex.items() if k != "task_ids"}),
              lengths)


@needs_t5x
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


@needs_t5x
def test_rank_classification_metric_uses_length_normalised_scores():
  from mhr_jax.t5x_bridge import tasks as bridge_tasks
  # Example 0: choice 1 (gold) has the lower total log-likelihood but the higher per-token one.
  targets = [(0, 0, 1, 2), (0, 1, 1, 8), (1, 0, 1, 3), (1, 1, 1, 3)]
  scores = [-2.0, -1.9 * 4, -3.0, -1.5]
  assert bridge_tasks.rank_classification_metric(targets, scores) == {"accuracy": 100.0}
  assert bridge_tasks.rank_classification_metric(targets, [-0.5, -8.0, -1.0, -3.0]) == {"accuracy": 0.0}


# ------------------------------------------------------------------------------ checkpoints

def _logits(module, params, batch):
  return np.asarray(module.apply({"params": params}, batch["encoder_input_tokens"],
                                 batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                                 task_ids=batch["task_ids"], enable_dropout=False))


@needs_t5x
def test_checkpoints_convert_both_ways_with_equal_logits_and_optimizer_state(mhr, tmp_path):
  import flax.core
  import jax
  from mhr_jax.checkpoints import run_state as run_checkpoints
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  model, _, params = mhr
  tx = model.optimizer_def.optax_optimizer
  grads = jax.grad(lambda p: model.loss_fn(p, _batch(), None)[0])(params)
  _, opt_state = tx.update(grads, tx.init(params), params)   # a non-trivial optimizer state
  state = bridge_checkpoints.train_state_from_params(model, flax.core.unfreeze(params), 7, opt_state)
  t5x_path = bridge_checkpoints.save_t5x(state, str(tmp_path / "t5x"))
  assert t5x_path.endswith("checkpoint_7")

  step = bridge_checkpoints.t5x_to_run(t5x_path, model, str(tmp_path / "run"))
  assert step == 7
  run_params = run_checkpoints.restore_params(str(tmp_path / "run" / "checkpoints"), 7)
  batch = _batch()
  want = _logits(model.module, params, batch)
  np.testing.assert_array_equal(_logits(model.module, run_params, batch), want)

  back = bridge_checkpoints.run_to_t5x(str(tmp_path / "run"), model, str(tmp_path / "t5x_back"))
  restored = bridge_checkpoints.load_t5x(back, model)
  assert int(restored.step) == 7
  np.testing.assert_array_equal(_logits(model.module, restored.params, batch), want)
  original = jax.tree.leaves(state.state_dict())
  round_trip = jax.tree.leaves(restored.state_dict())
  assert len(original) == len(round_trip)
  for a, b in zip(original, round_trip):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_t5x
def test_initial_checkpoints_for_few_shot_methods(bridge, mhr, tmp_path):
  import flax.core
  from flax import traverse_util
  from mhr_jax.adapters import transforms
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  model, _, params = mhr
  params = flax.core.unfreeze(params)
  pretrained = bridge_checkpoints.save_t5x(
      bridge_checkpoints.train_state_from_params(model, params, 20), str(tmp_path / "pre"))

  # MHR / MHR-z: two new tasks get fresh rows; the pre-trained rows and the inventory are kept.
  adapted = bridge(n_tasks=TASKS + 2, method="mhr-z", update_routing_rows_from=TASKS)
  path = bridge_checkpoints.initial_checkpoint(adapted, str(tmp_path / "z"), pretrained=pretrained)
  new = traverse_util.flatten_dict(bridge_checkpoints.read_t5x_params(path))
  old = traverse_util.flatten_dict(params)
  for key, value in old.items():
    if key[-2:] == ("routing", "logits"):
      assert new[key].shape == (TASKS + 2,) + value.shape[1:]
      np.testing.assert_array_equal(new[key][:TASKS], value)
      assert np.abs(new[key][TASKS:]).max() <= 1e-3     # near-uniform fresh rows
    else:
      np.testing.assert_array_equal(new[key], value)

  # MHR-mu: the skill-averaged LoRA, exactly transforms.to_mu.
  mu = bridge(kind="lora", method="mhr-mu")
  path = bridge_checkpoints.initial_checkpoint(mu, str(tmp_path / "mu"), pretrained=pretrained)
  _, want = transforms.to_mu(model.config, params)
  got = traverse_util.flatten_dict(bridge_checkpoints.read_t5x_params(path))
  want = traverse_util.flatten_dict(want)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-7, rtol=0)

  with pytest.raises(ValueError, match="do not fit the model"):
    bridge_checkpoints.initial_checkpoint(bridge(kind="ia3"), str(tmp_path / "ia3"),
                                          pretrained=pretrained)

  # Hugging Face base weights under fresh adapters (the paper's settings start from T5-XL LM-adapt).
  from mhr_jax import models
  from mhr_jax.checkpoints import hf_t5
  base = {k: v for k, v in old.items() if not set(k) & {"lora_a", "lora_b", "routing"}}
  hf_t5.save_hf_t5(str(tmp_path / "hf"), models.preset("tiny"), traverse_util.unflatten_dict(base))
  path = bridge_checkpoints.initial_checkpoint(model, str(tmp_path / "from_hf"),
                                               hf_checkpoint=str(tmp_path / "hf"))
  got = traverse_util.flatten_dict(bridge_checkpoints.read_t5x_params(path))
  assert set(got) == set(old)
  for key, value in got.items():
    if key in base:
      np.testing.assert_array_equal(value, base[key])
    elif key[-1] == "lora_b":
      assert not value.any()    # fresh adapters: the model starts as the base model


# ----------------------------------------------------------------------------- T0 rank eval

T0_CATALOG = {
    "max_examples_per_dataset": 10, "fewshot_seeds": [42],
    "train": [{"dataset": "qa", "train_size": 4, "subsets": ["qa_t1", "qa_t2", "qa_t3"]}],
    "eval": [{"dataset": "nli/x", "shots": 4, "fewshot_split": "train", "eval_split": "validation",
              "subsets": ["nli_x_a"]}],
}


@needs_t5x
def test_t0_rank_task_scores_choices_as_the_projects_rank_classification(bridge, mhr, tmp_path):
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
  model = bridge(n_tasks=TASKS + 1)
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


def _with_task_rows(params, n_new):
  import flax.core
  import jax
  from mhr_jax import models
  from mhr_jax.adapters import AdapterConfig, transforms
  acfg = AdapterConfig(kind="mhr", n_tasks=TASKS, n_skills=SKILLS, n_splits=SPLITS, rank=2)
  cfg = models.preset("tiny", adapter=acfg)
  _, out = transforms.add_task_rows(cfg, flax.core.unfreeze(params), n_new, jax.random.key(3))
  # Spread the new rows too, so that the held-out task has a routing of its own.
  return _trained_like(out, seed=4)


# --------------------------------------------------------------------------------- gin files

def _hf_dir(tmp_path):
  import json
  from mhr_jax import models
  from mhr_jax.checkpoints import hf_t5
  path = tmp_path / "hf"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(hf_t5.config_to_hf(models.preset("tiny"))))
  return str(path)


GIN_RUNS = {
    # run files -> expected (adapter kind, n_tasks, n_splits, rank, method, first frozen routing row)
    "pretrain_tiny": (["configs/mhr.gin"], ("mhr", 8, 4, 1, "mhr", 0)),
    "pretrain_t0": (["configs/t5x/t0_mhr.gin"], ("mhr", 313, 8, 1, "mhr", 0)),
    "pretrain_superni": (["configs/t5x/superni_mhr.gin"], ("mhr", 756, 8, 16, "mhr", 0)),
    "adapt_tiny_mhr_z": (["configs/t5x/adapt_tiny.gin", "configs/t5x/adapt_mhr_z.gin"],
                         ("mhr", 10, 4, 1, "mhr-z", 8)),
    "adapt_t0_mhr_mu": (["configs/t5x/adapt_t0.gin", "configs/t5x/adapt_mhr_mu.gin"],
                        ("lora", 313, 1, 1, "mhr-mu", 0)),
    "adapt_superni_mhr": (["configs/t5x/adapt_superni.gin", "configs/t5x/adapt_mhr.gin"],
                          ("mhr", 875, 8, 16, "mhr", 0)),
    "adapt_tiny_lora": (["configs/t5x/adapt_tiny.gin", "configs/t5x/adapt_lora.gin"],
                        ("lora", 8, 1, 1, "lora", 0)),
    "eval_tiny": (["configs/t5x/eval_tiny.gin", "configs/t5x/adapt_mhr.gin"],
                  ("mhr", 10, 4, 1, "mhr", 0)),
    "eval_t0": (["configs/t5x/eval_t0.gin", "configs/t5x/adapt_mhr_z.gin"],
                ("mhr", 324, 8, 1, "mhr-z", 313)),
    "eval_superni": (["configs/t5x/eval_superni.gin"], ("mhr", 756, 8, 16, "mhr", 0)),
}


@needs_t5x
@pytest.mark.parametrize("run", sorted(GIN_RUNS))
def test_gin_files_build_the_papers_models(run, tmp_path):
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  from mhr_jax.t5x_bridge import models as bridge_models
  files, (kind, n_tasks, n_splits, rank, method, frozen_rows) = GIN_RUNS[run]
  bindings = ["MODEL_DIR='/unused'", "VOCABULARY_SPEC='byte'", f"HF_CHECKPOINT='{_hf_dir(tmp_path)}'"]
  model = bridge_checkpoints.load_gin_model([str(ROOT / f) for f in files], bindings)
  assert isinstance(model, bridge_models.MhrEncoderDecoderModel)
  acfg = model.config.adapter
  assert (acfg.kind, acfg.n_tasks, acfg.n_splits, acfg.rank) == (kind, n_tasks, n_splits, rank)
  from mhr_jax.adapters import params as param_groups
  assert list(model.optimizer_def.rules) == param_groups.default_rules(method)
  assert model.optimizer_def.update_routing_rows_from == frozen_rows
