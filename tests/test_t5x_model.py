"""The T5X bridge's model class and its inputs (mhr_jax.t5x_bridge.{models, features, partitioning})
against the project's own code paths as oracles: parameters and their logical axes, the loss, scoring and
decoding with task ids, T-Few's objective, the feature converter and the axis rules.

T5X is not on PyPI: the tests that need it skip when it is absent (the project's CI has no T5X). Run them
with a T5X virtualenv (README, section "T5X"):
  PYTHONPATH=. $T5X_PYTHON -m pytest -q tests/test_t5x_model.py
Training, the optimizer and checkpoints: tests/test_t5x_training.py; adaptation, evaluation and the gin
files: tests/test_t5x_adaptation.py.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from t5x_helpers import (HAS_T5X, LOGITS_ATOL, LOSS_ATOL, NO_T5X, ROOT, SCORE_ATOL, TASKS, bridge_model,
                         choice_batch, lm_batch, mhr_setup, needs_t5x)


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


# ---------------------------------------------------------------------------- the model class

@pytest.fixture(scope="module")
def mhr():
  """(tiny MHR bridge model, its init variables, its switched-on params)."""
  if not HAS_T5X:
    pytest.skip(NO_T5X)
  return mhr_setup()


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
  batch = lm_batch()
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
  batch = {**lm_batch(), "task_ids": np.array([0, 1, 2, TASKS], np.int32)}
  with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=3\)"):
    model.score_batch(params, batch)
  with pytest.raises(ValueError, match="has no 'task_ids'"):
    model.score_batch(params, {k: v for k, v in lm_batch().items() if k != "task_ids"})


@needs_t5x
def test_predict_batch_equals_the_projects_greedy_and_beam_search(mhr):
  import functools
  from t5x import decoding as t5x_decoding
  from mhr_jax.evaluation import decoding
  model, _, params = mhr
  batch = lm_batch()
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


@needs_t5x
def test_prompt_with_targets_forces_the_prefix_and_decodes_greedily_after_it(mhr):
  import functools
  from t5x import decoding as t5x_decoding
  model, _, params = mhr
  greedy = model.__class__(model.module, model.input_vocabulary, model.output_vocabulary,
                           model.optimizer_def,
                           decode_fn=functools.partial(t5x_decoding.temperature_sample,
                                                       temperature=0.0))
  batch = lm_batch(lt=8)
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
def test_tfew_loss_is_t_fews_formula(mhr):
  from mhr_jax.training import losses
  _, _, params = mhr
  model = bridge_model(loss_config=losses.LossConfig(kind="tfew"))
  batch = choice_batch()
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


# ------------------------------------------------------------------ partitioning rules, features

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
