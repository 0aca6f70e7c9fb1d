"""The T5X bridge (mhr_jax.t5x_bridge) against the project's own code paths as oracles.

T5X is not on PyPI: the tests that need it skip when it is absent (the project's CI has no T5X).
Run them with a T5X virtualenv (README, section "T5X"):
  PYTHONPATH=. $T5X_PYTHON -m pytest -q tests/test_t5x_bridge.py
Two tests start processes: `eight_device_check` on 8 simulated CPU devices under T5X's partitioner,
and `python -m t5x.eval` against the project's evaluation. The end-to-end `python -m t5x.train` runs
(pre-training, best-on-dev and T-Few adaptation) are tests/t5x_bridge_check.sh.
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
LOSS_ATOL = 1e-5         # float32 losses against a float64 formula or the project's own step
UPDATE_RTOL = 1e-4       # two Adafactor steps from float32 gradients that two programs sum in other
                         # orders (they agree to ~3e-6 relative; Adafactor's RMS scaling amplifies it)


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


def _bridge_model(kind="mhr", n_tasks=TASKS, method=None, loss_config=None, **opt):
  """A tiny MhrEncoderDecoderModel with the byte vocabulary and Adafactor (routing at 100x)."""
  import seqio
  from mhr_jax.training import optim
  from mhr_jax.adapters import AdapterConfig
  from mhr_jax.t5x_bridge import models as bridge_models
  from mhr_jax.t5x_bridge import optim as bridge_optim
  acfg = AdapterConfig(kind=kind, n_tasks=n_tasks, n_skills=SKILLS,
                       n_splits=SPLITS if kind == "mhr" else 1, rank=2)
  module = bridge_models.t5_module("tiny", acfg)
  vocab = seqio.ByteVocabulary()
  config = optim.OptimizerConfig(name="adafactor", adapter_lr=1e-2, routing_lr=1.0, warmup_steps=0,
                                 schedule="constant")
  optimizer = bridge_optim.MhrOptimizer(config, method or kind, total_steps=10, **opt)
  return bridge_models.MhrEncoderDecoderModel(module, vocab, vocab, optimizer,
                                              loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
                                              loss_config=loss_config)


def _switched_on_params(model):
  """The model's init params with the adapters switched on (`_trained_like`), frozen."""
  import flax.core
  import jax
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 6)}
  variables = model.get_initial_variables(jax.random.key(0), shapes)
  return variables, flax.core.freeze(_trained_like(flax.core.unfreeze(variables["params"])))


@pytest.fixture(scope="module")
def bridge():
  if not HAS_T5X:
    pytest.skip("T5X is not installed (it is not on PyPI; see README.md, section 'T5X')")
  return _bridge_model


@pytest.fixture(scope="module")
def mhr(bridge):
  model = bridge()
  variables, params = _switched_on_params(model)
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


def _choice_batch(n=4, choices=3, li=8, lt=6, seed=2):
  """Answer-choice rows as data.rank_classification_batches gives them; example 1 has 2 choices."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, 200, (n, li)).astype(np.int32)
  enc[:, -1] = 0
  tgt = rng.integers(3, 200, (n, choices, lt)).astype(np.int32)
  tgt[:, :, -1] = 0
  tgt[:, 0, 3:] = 0          # choices of different lengths
  tgt[1, 2] = 0              # an absent choice
  dec = np.zeros_like(tgt)
  dec[..., 1:] = tgt[..., :-1]
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
          "decoder_loss_weights": (tgt > 0).astype(np.float32),
          "task_ids": np.arange(n, dtype=np.int32) % TASKS,
          "labels": np.asarray([1, 0, 2, 1, 0, 2, 1, 0][:n], np.int32)}


def _tfew_formula(module, params, batch):
  """T-Few's loss written out in NumPy from per-choice logits (T-Few's paper, section 3.2):
  L_LM on the gold answer + L_LN (softmax over the choices' mean token log-likelihoods) +
  L_UL = -log(1 - p + 0.01) over the wrong answers' tokens, each averaged over its own count."""
  n, c, lt = batch["decoder_target_tokens"].shape
  rows = lambda x: np.repeat(x, c, axis=0)  # noqa: E731
  logits = np.asarray(module.apply(
      {"params": params}, rows(batch["encoder_input_tokens"]),
      batch["decoder_input_tokens"].reshape(n * c, lt), batch["decoder_target_tokens"].reshape(n * c, lt),
      task_ids=rows(batch["task_ids"]), enable_dropout=False), np.float64).reshape(n, c, lt, -1)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  tok = np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  w = batch["decoder_loss_weights"]
  gold = np.zeros((n, c), bool)
  gold[np.arange(n), batch["labels"]] = True
  lm = -(tok * w)[gold].sum() / w[gold].sum()
  lengths = w.sum(-1)
  present = lengths > 0
  choice_ce = 0.0
  for i in range(n):
    beta = (tok[i] * w[i]).sum(-1)[present[i]] / lengths[i][present[i]]
    gold_index = int(np.flatnonzero(present[i]).tolist().index(batch["labels"][i]))
    choice_ce += -(beta[gold_index] - np.log(np.exp(beta).sum()))
  choice_ce /= n
  wrong = w * ~gold[..., None]
  ul = -(np.log(1.0 - np.exp(tok) + 0.01) * wrong).sum() / wrong.sum()
  return lm + choice_ce + ul, {"lm": lm, "choice_ce": choice_ce, "unlikelihood": ul}


@needs_t5x
def test_tfew_loss_is_t_fews_formula(bridge, mhr):
  from mhr_jax.training import losses
  _, _, params = mhr
  model = bridge(loss_config=losses.LossConfig(kind="tfew"))
  batch = _choice_batch()
  want, terms = _tfew_formula(model.module, params, batch)
  loss, metrics = model.loss_fn(params, batch, None)
  np.testing.assert_allclose(loss, want, atol=LOSS_ATOL, rtol=0)
  for name, value in terms.items():
    np.testing.assert_allclose(metrics[f"loss/{name}"].compute(), value, atol=LOSS_ATOL, rtol=0)
  # Every term depends on the model: the unlikelihood of tokens of probability 0 is -log(1.01).
  assert terms["lm"] > 1 and terms["choice_ce"] > 0.1
  assert terms["unlikelihood"] > -np.log(1.01) + 1e-4
  # Not T5X's LM loss on the gold answers alone.
  assert abs(float(loss) - terms["lm"]) > 0.1
  with pytest.raises(ValueError, match="belong to T5X's loss"):
    model.__class__(model.module, model.input_vocabulary, model.output_vocabulary,
                    model.optimizer_def, label_smoothing=0.1, loss_config=losses.LossConfig(kind="tfew"))


@needs_t5x
def test_t5x_training_steps_with_tfew_equal_the_projects_steps(bridge, mhr):
  """Two steps of T5X's train_with_lr (MhrOptimizer, the model's T-Few loss) against two steps of
  the project's train step (optim.make_optimizer, train_step.compute_gradients) from the same start."""
  import flax.core
  import jax
  from t5x import trainer as t5x_trainer
  from mhr_jax.training import losses, optim, train_step
  from mhr_jax.adapters import params as param_groups
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  _, _, params = mhr
  loss_cfg = losses.LossConfig(kind="tfew")
  model = bridge(loss_config=loss_cfg)
  batches = [_choice_batch(seed=2), _choice_batch(seed=3)]

  # The same Gumbel routing noise: the project's step draws micro-batch 0's from fold_in(key, 0).
  key = jax.random.key(5)
  state = bridge_checkpoints.train_state_from_params(model, flax.core.unfreeze(params), 0)
  t5x_step = jax.jit(lambda s, b: t5x_trainer.train_with_lr(s, b, 0.0, jax.random.fold_in(key, 0),
                                                            model, None))
  t5x_losses = []
  for batch in batches:
    state, metrics = t5x_step(state, batch)
    t5x_losses.append(float(metrics["loss"].compute()))

  opt = model.optimizer_def
  plain = jax.tree.map(np.asarray, flax.core.unfreeze(params))
  labels = param_groups.param_labels(plain, list(opt.rules))
  optimizer = optim.make_optimizer(opt.config, labels, opt.total_steps)
  trainable, frozen = param_groups.partition(plain, labels)
  opt_state = optimizer.init(trainable)

  @jax.jit
  def native_step(trainable, opt_state, batch):
    grads, loss, _, _ = train_step.compute_gradients(model.module, loss_cfg, trainable, frozen, batch,
                                                     key)
    return (*train_step.update(optimizer, trainable, opt_state, grads), loss)
  native_losses = []
  for batch in batches:
    trainable, opt_state, loss = native_step(trainable, opt_state, batch)
    native_losses.append(float(loss))

  np.testing.assert_allclose(t5x_losses, native_losses, atol=LOSS_ATOL, rtol=0)
  assert t5x_losses[1] != t5x_losses[0]
  start = flax.traverse_util.flatten_dict(plain)
  got = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.params))
  want = flax.traverse_util.flatten_dict(param_groups.combine(trainable, frozen))
  flat_labels = flax.traverse_util.flatten_dict(labels)
  for path, value in want.items():
    update, want_update = np.asarray(got[path]) - start[path], np.asarray(value) - start[path]
    if flat_labels[path] == "frozen":
      assert not update.any() and not want_update.any(), path
      continue
    size = np.abs(want_update).max()
    assert size > 0, path
    assert np.abs(update - want_update).max() <= UPDATE_RTOL * size, path


@needs_t5x
def test_prompt_with_targets_forces_the_prefix_and_decodes_greedily_after_it(mhr):
  import functools
  from t5x import decoding as t5x_decoding
  model, _, params = mhr
  greedy = model.__class__(model.module, model.input_vocabulary, model.output_vocabulary,
                           model.optimizer_def,
                           decode_fn=functools.partial(t5x_decoding.temperature_sample,
                                                       temperature=0.0))
  batch = _batch(lt=8)
  eos = model.output_vocabulary.eos_id
  prompts = batch["decoder_target_tokens"].copy()
  lengths = np.asarray([0, 1, 3, 5])         # prompt tokens per row
  for i, k in enumerate(lengths):
    prompts[i, k:] = 0
    prompts[i, k] = eos                       # T5X drops the EOS that ends a prompt
  decoder_input = np.zeros_like(prompts)
  decoder_input[:, 1:] = prompts[:, :-1]
  tokens, _ = greedy.predict_batch_with_aux(params, {**batch, "decoder_input_tokens": decoder_input},
                                            prompt_with_targets=True)
  tokens = np.asarray(tokens)
  unprompted, _ = greedy.predict_batch_with_aux(params, batch)
  # Oracle: one teacher-forced pass over each output (no cache): after the prompt, every token is the
  # argmax given the tokens before it, up to EOS.
  shifted = np.zeros_like(tokens)
  shifted[:, 1:] = tokens[:, :-1]
  logits = np.asarray(model.module.apply({"params": params}, batch["encoder_input_tokens"], shifted,
                                         tokens, task_ids=batch["task_ids"], enable_dropout=False))
  for i, k in enumerate(lengths):
    np.testing.assert_array_equal(tokens[i, :k], prompts[i, :k])
    for j in range(k, tokens.shape[1]):
      assert tokens[i, j] == int(np.argmax(logits[i, j])), (i, j)
      if tokens[i, j] == eos:
        break
  np.testing.assert_array_equal(tokens[0], np.asarray(unprompted)[0])   # an empty prompt
  assert not np.array_equal(tokens[3], np.asarray(unprompted)[3])


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


# ------------------------------------------------------------------- 8 devices, T5X's partitioner

def _grid_partitioner(data: int, model: int):
  """T5X's PjitPartitioner (the bridge's axis rules) on a (data, model) grid of the CPU devices:
  on CPU T5X's own mesh puts every device on 'model', so the task ids would not be split."""
  import jax
  from t5x import partitioning as t5x_partitioning
  from mhr_jax.t5x_bridge import partitioning as bridge_partitioning

  class GridPartitioner(t5x_partitioning.PjitPartitioner):

    @property
    def mesh(self):
      return jax.sharding.Mesh(np.asarray(jax.devices()[:data * model]).reshape(data, model),
                               ("data", "model"))
  return GridPartitioner(num_partitions=model,
                         logical_axis_rules=bridge_partitioning.logical_axis_rules())


def _run_under(partitioner, model, params, batches, predict_batch):
  """T5X's trainer (MhrTrainer) for len(batches) steps, then score_batch and greedy predict_batch
  partitioned as t5x.eval / t5x.infer do (unless predict_batch is None). Returns (losses, params,
  scores, tokens, train state axes)."""
  import functools
  import flax.core
  import jax
  from t5x import decoding as t5x_decoding
  from t5x import utils as t5x_utils
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  from mhr_jax.t5x_bridge import optim as bridge_optim
  shapes = {k: v.shape for k, v in batches[0].items()}
  initializer = t5x_utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables, input_shapes=shapes,
      partitioner=partitioner)
  axes = initializer.train_state_axes
  state = partitioner.move_params_to_devices(
      bridge_checkpoints.train_state_from_params(model, flax.core.unfreeze(params), 0), axes)
  trainer = bridge_optim.MhrTrainer(model, state, partitioner, eval_names=[], summary_dir=None,
                                    train_state_axes=axes, rng=jax.random.key(3))
  losses = []
  for step, batch in enumerate(batches):
    summary = trainer.train(iter([batch]), 1, start_step=step)
    losses.append(float(summary.result()["loss"].value))
  trained = trainer.train_state.params
  host = lambda x: np.asarray(jax.device_get(x))  # noqa: E731
  params = jax.tree.map(host, flax.core.unfreeze(trained))
  if predict_batch is None:
    return losses, params, None, None, axes
  data = partitioner.data_partition_spec
  score = partitioner.partition(model.score_batch, in_axis_resources=(axes.params, data),
                                out_axis_resources=data)
  greedy = model.__class__(model.module, model.input_vocabulary, model.output_vocabulary,
                           model.optimizer_def, decode_fn=functools.partial(
                               t5x_decoding.temperature_sample, temperature=0.0))
  predict = partitioner.partition(lambda p, b: greedy.predict_batch_with_aux(p, b)[0],
                                  in_axis_resources=(axes.params, data), out_axis_resources=data)
  return losses, params, host(score(trained, predict_batch)), host(predict(trained, predict_batch)), axes


def eight_device_check() -> None:
  """The bridge on 8 CPU devices (data 4 x model 2) against 1 device: T5X training with the T-Few
  objective and with T5X's LM loss, then (LM model) score_batch and greedy decoding, with every
  device holding rows of other tasks. Run in a process with 8 devices (test_sharded_task_ids_...)."""
  import flax.core
  import jax
  from flax import traverse_util
  from mhr_jax.training import losses
  assert jax.device_count() == 8, jax.devices()
  runs = {"tfew": (losses.LossConfig(kind="tfew"), [_choice_batch(n=8, seed=s) for s in (4, 5, 6)],
                   None),
          "lm": (None, [_batch(n=8, seed=s) for s in (7, 8, 9)], _batch(n=8, lt=6, seed=11))}
  for name, (loss_config, batches, predict_batch) in runs.items():
    model = _bridge_model(loss_config=loss_config)
    _, params = _switched_on_params(model)
    one = _run_under(_grid_partitioner(1, 1), model, params, batches, predict_batch)
    grid = _grid_partitioner(4, 2)
    assert dict(grid.mesh.shape) == {"data": 4, "model": 2} and tuple(grid.data_partition_spec) == ("data",)
    eight = _run_under(grid, model, params, batches, predict_batch)
    np.testing.assert_allclose(eight[0], one[0], atol=LOSS_ATOL, rtol=0, err_msg=name)
    assert len(set(one[0])) == len(batches), one[0]      # the loss moved
    start = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(params)))
    want, got = traverse_util.flatten_dict(one[1]), traverse_util.flatten_dict(eight[1])
    for path, value in want.items():
      update, want_update = got[path] - start[path], value - start[path]
      assert np.abs(update - want_update).max() <= UPDATE_RTOL * max(np.abs(want_update).max(), 1e-30), \
          (name, path)
    if predict_batch is not None:
      np.testing.assert_allclose(eight[2], one[2], atol=SCORE_ATOL, rtol=0, err_msg=name)
      np.testing.assert_array_equal(eight[3], one[3], err_msg=name)
    # The layout under test: routing replicated, the MLP split over 'model', rows over 'data'.
    axes = traverse_util.flatten_dict(flax.core.unfreeze(eight[4].params))
    assert all(a is None for a in axes[("encoder", "block_0", "mlp", "wi_0", "routing", "logits")])
    assert "model" in tuple(axes[("encoder", "block_0", "mlp", "wi_0", "kernel")])
    print(f"{name}: losses on 1 device {one[0]}, on 8 devices {eight[0]}" + (
        "" if predict_batch is None else
        f"; max |score_batch diff| {np.abs(eight[2] - one[2]).max():.2e}; greedy tokens equal"))


@needs_t5x
def test_sharded_task_ids_under_t5x_partitioner_on_8_devices_match_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
  out = subprocess.run([sys.executable, "-c", "import test_t5x_bridge as t; t.eight_device_check()"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  print(out.stdout)
  assert out.stdout.count("losses on 1 device") == 2 and "greedy tokens equal" in out.stdout


# ------------------------------------------------------------------------ best-on-dev selection

@needs_t5x
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


# ------------------------------------------------------------------------------ command line

@needs_t5x
def test_gin_files_resolve_from_another_directory_which_stays_current(tmp_path, monkeypatch):
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  monkeypatch.chdir(tmp_path)
  model = bridge_checkpoints.load_gin_model(["configs/mhr.gin"], ["MODEL_DIR = '/unused'"])
  assert os.getcwd() == str(tmp_path)
  assert (model.config.adapter.kind, model.config.adapter.n_tasks) == ("mhr", 8)


@needs_t5x
def test_converter_takes_the_projects_gin_flags(tmp_path, capsys):
  import flax.core
  import jax
  from flax import traverse_util
  from mhr_jax.checkpoints import run_state as run_checkpoints
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  model = bridge_checkpoints.load_gin_model([str(ROOT / "configs/mhr.gin")], ["MODEL_DIR = '/unused'"])
  params = flax.core.unfreeze(model.get_initial_variables(
      jax.random.key(1), {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)})["params"])
  path = bridge_checkpoints.save_t5x(bridge_checkpoints.train_state_from_params(model, params, 3),
                                     str(tmp_path / "t5x"))
  flags = ["--to=run", "--gin_file=mhr.gin", f"--gin_search_paths={ROOT / 'configs'}",
           f"--gin.MODEL_DIR='{tmp_path}'", "--gin_bindings=TRAIN_STEPS = 20",
           f"--t5x_checkpoint={path}", f"--run_dir={tmp_path / 'run'}"]
  assert bridge_checkpoints.main(flags) == 0
  got = traverse_util.flatten_dict(run_checkpoints.restore_params(str(tmp_path / "run" / "checkpoints"), 3))
  for key, value in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(got[key], value)
  # A missing checkpoint is one line, exit status 2 (a configuration error).
  assert bridge_checkpoints.main(flags[:-2] + [f"--t5x_checkpoint={tmp_path / 'none'}",
                                                f"--run_dir={tmp_path / 'run2'}"]) == 2
  assert "no T5X checkpoint" in capsys.readouterr().err
  with pytest.raises(SystemExit):   # no other spelling of the bindings
    bridge_checkpoints.main(flags + ["--gin", "TRAIN_STEPS=20"])


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


@needs_t5x
def test_choice_train_dataset_gives_the_projects_t_few_batches(bridge, tmp_path):
  import dataclasses
  from t5x import utils as t5x_utils
  from mhr_jax.data import pipeline as data
  from mhr_jax.t5x_bridge import tasks as bridge_tasks
  catalog = _write_t0_fixture(tmp_path, "nli_c")
  registration = bridge_tasks.register("t0", str(tmp_path), "byte", prefix="c", catalog_path=catalog)
  mixture, split = "c_eval_nli_c", registration.fewshot_splits["nli_c"][0]
  model = bridge(n_tasks=TASKS + 1)        # the held-out dataset's id is TASKS
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
    bridge_tasks.choice_train_dataset(cfg, 0, 1, bridge().FEATURE_CONVERTER_CLS)


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


@needs_t5x
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
  _, params = _switched_on_params(model)
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
  # T0 adaptation trains with the T-Few objective, everything else with T5X's LM loss.
  loss = model.loss_config.kind if model.loss_config is not None else "t5x"
  assert loss == ("tfew" if run.startswith("adapt_t0") else "t5x")
