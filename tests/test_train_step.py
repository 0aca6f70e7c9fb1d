"""The sharded train step on 1 and 8 simulated CPU devices: equal results, frozen base untouched,
per-group learning rates, exact gradient accumulation, NaN flag, T-Few objective, routing
annealing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from mhr_jax.models import param_counts
from mhr_jax.training import losses, optim
from mhr_jax import models, partitioning
from mhr_jax.training import train_step as ts
from mhr_jax.adapters import AdapterConfig, anneal_factor
from mhr_jax.adapters import params as param_groups

ADAPTER_LR, ROUTING_LR = 1e-3, 0.1
CFG = models.preset("tiny", num_layers=1, adapter=AdapterConfig(
    kind="mhr", n_tasks=3, n_skills=2, n_splits=2, rank=2, gumbel=False,
    target_modules=r".*/(q|v|wi_1)"))
OPT_CFG = optim.OptimizerConfig(name="adamw", adapter_lr=ADAPTER_LR, routing_lr=ROUTING_LR,
                                schedule="constant", warmup_steps=0, clip_norm=1.0)


def _random_params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.2).astype(np.float32),
                      param_counts.abstract_params(cfg))


def _lm_batch(b=8, li=6, lt=5, seed=1):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, CFG.vocab_size, (b, lt)).astype(np.int32)
  targets[0::2, 2:] = 0          # even rows (micro-batch 0 of 2) are mostly padding
  enc = rng.integers(2, CFG.vocab_size, (b, li)).astype(np.int32)
  enc[1, 4:] = 0
  return {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
          "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
          "decoder_loss_weights": (targets > 0).astype(np.float32),
          "task_ids": rng.integers(0, 3, (b,)).astype(np.int32)}


def _tfew_batch():
  """(B=4, C=2) answer-choice batch."""
  rng = np.random.default_rng(3)
  b, c, li, lt = 4, 2, 6, 5
  targets = rng.integers(2, CFG.vocab_size, (b, c, lt)).astype(np.int32)
  targets[:, 1, 2:] = 0
  return {"encoder_input_tokens": rng.integers(2, CFG.vocab_size, (b, li)).astype(np.int32),
          "decoder_target_tokens": targets,
          "decoder_input_tokens": np.concatenate([np.zeros((b, c, 1), np.int32),
                                                  targets[..., :-1]], -1),
          "decoder_loss_weights": (targets > 0).astype(np.float32),
          "labels": np.array([0, 1, 1, 0], np.int32), "task_ids": np.array([0, 1, 2, 0], np.int32)}


def _mesh(n, shape=(-1, 1, 1)):
  return partitioning.make_mesh(partitioning.MeshConfig(*shape), devices=jax.devices()[:n])


def _train(mesh, params, labels, batch, steps=2, grad_accum_steps=1):
  model = models.T5(CFG)
  tx = optim.make_optimizer(OPT_CFG, labels, 10)
  state = ts.init_train_state(model, params, labels, tx, mesh)
  step = ts.make_train_step(model, tx, losses.LossConfig(), mesh, ts.shardings_of(state),
                            grad_accum_steps=grad_accum_steps)
  history = []
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.key(i))
    history.append((jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, metrics)))
  return state, history, step


@pytest.fixture(scope="module")
def single():
  params = _random_params(CFG)
  labels = param_groups.param_labels(params, "mhr")
  state, history, step = _train(_mesh(1), params, labels, _lm_batch())
  return dict(params=params, labels=labels, state=state, history=history, step=step)


def _assert_trees_close(a, b, atol):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_allclose(flat_a[path], flat_b[path], rtol=0, atol=atol,
                               err_msg="/".join(path))


def test_mesh_2x2x2_matches_one_device_and_frozen_base_is_untouched(single):
  mesh = _mesh(8, (2, 2, 2))
  state, history, _ = _train(mesh, single["params"], single["labels"], _lm_batch())
  for (p8, m8), (p1, m1) in zip(history, single["history"]):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    _assert_trees_close(p8, p1, atol=1e-5)
  # The base is sharded over (fsdp, model); adapters and their optimizer state are replicated.
  assert state.frozen["encoder"]["block_0"]["self_attention"]["q"]["kernel"].sharding.spec == \
      P("fsdp", "model")
  lora = state.trainable["encoder"]["block_0"]["self_attention"]["q"]["lora_a"]
  assert lora.sharding.is_fully_replicated
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.opt_state))
  # Frozen leaves are bitwise unchanged on both meshes; every trained group moved.
  flat_labels = traverse_util.flatten_dict(single["labels"])
  before = traverse_util.flatten_dict(single["params"])
  for final in (history[-1][0], single["history"][-1][0]):
    after = traverse_util.flatten_dict(final)
    for path, group in flat_labels.items():
      if group == "frozen":
        np.testing.assert_array_equal(after[path], before[path], err_msg="/".join(path))
    moved = {flat_labels[p] for p in after if not np.array_equal(after[p], before[p])}
    assert moved == {"adapters", "routing"}


def test_two_speed_learning_rates_apply_per_group(single):
  _, metrics = single["history"][0]
  assert metrics["learning_rate/adapters"] == pytest.approx(ADAPTER_LR)
  assert metrics["learning_rate/routing"] == pytest.approx(ROUTING_LR)
  assert {"grad_norm/adapters", "grad_norm/routing", "tokens", "nonfinite"} <= set(metrics)
  np.testing.assert_allclose(
      np.hypot(metrics["grad_norm/adapters"], metrics["grad_norm/routing"]),
      metrics["grad_norm"], rtol=1e-5)
  # Adam's first update is -lr * g / (|g| + eps): |delta| / lr_group <= 1, reaching ~1.
  before = traverse_util.flatten_dict(single["params"])
  after = traverse_util.flatten_dict(single["history"][0][0])
  ratios = {"adapters": [], "routing": []}
  for path, group in traverse_util.flatten_dict(single["labels"]).items():
    if group in ratios:
      lr = ADAPTER_LR if group == "adapters" else ROUTING_LR
      ratios[group].append(np.abs(after[path] - before[path]).ravel() / lr)
  for group, parts in ratios.items():
    r = np.concatenate(parts)
    assert r.max() <= 1 + 1e-4, group
    assert r.max() > 0.999, group


def test_grad_accumulation_of_two_micro_batches_equals_one_big_batch(single):
  _, history, _ = _train(_mesh(1), single["params"], single["labels"], _lm_batch(),
                         grad_accum_steps=2)
  for (pa, ma), (p1, m1) in zip(history, single["history"]):
    np.testing.assert_allclose(ma["loss"], m1["loss"], rtol=0, atol=1e-5)
    assert ma["tokens"] == m1["tokens"]
    _assert_trees_close(pa, p1, atol=1e-5)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    _train(_mesh(1), single["params"], single["labels"], _lm_batch(), steps=1, grad_accum_steps=3)


def test_nonfinite_flag_names_the_group(single):
  state = single["state"]
  flat = traverse_util.flatten_dict(jax.tree.map(jnp.copy, state.trainable))
  path = next(p for p in flat if p[-1] == "lora_b")
  flat[path] = flat[path].at[0].set(jnp.nan)
  bad = state.replace(trainable=traverse_util.unflatten_dict(flat),
                      opt_state=jax.tree.map(jnp.copy, state.opt_state))
  _, metrics = single["step"](bad, _lm_batch(), jax.random.key(0))
  assert bool(metrics["nonfinite"])
  message = ts.nonfinite_message(metrics, step=7)
  assert "step 7" in message and "adapters" in message
  assert ts.nonfinite_message(single["history"][0][1], step=1) is None


def test_eval_steps_lm_and_tfew(single):
  mesh = _mesh(1)
  model = models.T5(CFG)
  tx = optim.make_optimizer(OPT_CFG, single["labels"], 10)
  state = ts.init_train_state(model, single["params"], single["labels"], tx, mesh)
  lm_eval = ts.make_eval_step(model, losses.LossConfig(), mesh, ts.shardings_of(state))
  # Without dropout or Gumbel noise the eval loss is the first train step's loss.
  first = lm_eval(state, _lm_batch())
  np.testing.assert_allclose(float(first["loss"]), single["history"][0][1]["loss"], rtol=1e-6)
  assert float(first["count/lm"]) == (_lm_batch()["decoder_target_tokens"] > 0).sum()

  # A (B=4, C=2) answer-choice batch; flattened to (8, Lt) it has the LM batch's shapes.
  batch = _tfew_batch()
  targets, labels = batch["decoder_target_tokens"], batch["labels"]
  b, c, lt = targets.shape
  tfew = ts.make_eval_step(model, losses.LossConfig(kind="tfew"), mesh,
                           ts.shardings_of(state))(state, batch)
  # The encoder runs once per example in the T-Few path; the LM path repeats the inputs.
  gold = (np.arange(c)[None, :] == labels[:, None]).astype(np.float32)[..., None]
  flat = {"encoder_input_tokens": np.repeat(batch["encoder_input_tokens"], c, 0),
          "decoder_target_tokens": targets.reshape(b * c, lt),
          "decoder_input_tokens": batch["decoder_input_tokens"].reshape(b * c, lt),
          "decoder_loss_weights": (batch["decoder_loss_weights"] * gold).reshape(b * c, lt),
          "task_ids": np.repeat(batch["task_ids"], c)}
  lm = lm_eval(state, flat)
  np.testing.assert_allclose(float(tfew["sum/lm"]), float(lm["sum/lm"]), rtol=1e-5)
  assert float(tfew["count/lm"]) == float(lm["count/lm"]) == (targets * gold > 0).sum()
  assert float(tfew["count/choice_ce"]) == b
  assert np.isfinite(float(tfew["loss"]))


def test_init_rejects_params_that_do_not_fit_the_model(single):
  params = jax.tree.map(np.copy, single["params"])
  del params["encoder"]["final_norm"]
  labels = param_groups.param_labels(params, "mhr")
  tx = optim.make_optimizer(OPT_CFG, labels, 10)
  with pytest.raises(ValueError, match="labels and params differ|missing"):
    ts.init_train_state(models.T5(CFG), params, labels, tx, _mesh(1))


# ---------------------------------------------------------------------------------------------
# Routing annealing (AdapterConfig.anneal_steps): w <- a w + (1 - a) / K in pre-training steps.

def _anneal_cfg(anneal_steps):
  return CFG.replace(adapter=CFG.adapter.replace(anneal_steps=anneal_steps))


def _set_routing(params, labels, values):
  """A copy of params with every routing-logits leaf replaced by values(shape)."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.copy, params))
  for path, group in traverse_util.flatten_dict(labels).items():
    if group == "routing":
      flat[path] = values(flat[path].shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def peaked():
  """Random params whose routing logits are far from uniform (weights up to ~0.99 / 0.01)."""
  params = _random_params(CFG)
  labels = param_groups.param_labels(params, "mhr")
  rng = np.random.default_rng(5)
  return dict(params=_set_routing(params, labels, lambda shape: rng.normal(size=shape) * 3.0),
              labels=labels)


def _one_step(cfg, params, labels, batch, *, count, total_steps=None, loss_cfg=None,
              grad_accum_steps=1):
  """One train step of a `cfg` model from a state whose step counter is `count`."""
  mesh = _mesh(1)
  model = models.T5(cfg)
  tx = optim.make_optimizer(OPT_CFG, labels, 10)
  state = ts.init_train_state(model, params, labels, tx, mesh)
  state = state.replace(step=jax.device_put(jnp.asarray(count, jnp.int32), state.step.sharding))
  step = ts.make_train_step(model, tx, loss_cfg or losses.LossConfig(), mesh,
                            ts.shardings_of(state), grad_accum_steps=grad_accum_steps,
                            total_steps=total_steps)
  state, metrics = step(state, batch, jax.random.key(0))
  assert int(state.step) == count + 1
  return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, metrics)


def _eval_loss(cfg, params, labels, batch, loss_cfg=None):
  mesh = _mesh(1)
  model = models.T5(cfg)
  tx = optim.make_optimizer(OPT_CFG, labels, 10)
  state = ts.init_train_state(model, params, labels, tx, mesh)
  return float(ts.make_eval_step(model, loss_cfg or losses.LossConfig(), mesh,
                                 ts.shardings_of(state))(state, batch)["loss"])


def _direct_lm_loss(cfg, params, batch, anneal):
  """Token cross-entropy of a plain model.apply with routing_anneal=anneal, in numpy."""
  logits = models.T5(cfg).apply(
      {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], task_ids=batch["task_ids"], enable_dropout=False,
      routing_anneal=anneal)
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  weights = batch["decoder_loss_weights"]
  return float((nll * weights).sum() / weights.sum())


def test_last_annealed_step_routes_uniformly(peaked):
  params, labels, batch = peaked["params"], peaked["labels"], _lm_batch()
  # K = 2: zero logits give sigmoid 1/2 per skill, i.e. exactly uniform weights 1/2.
  uniform_params = _set_routing(params, labels, np.zeros)
  uniform = _eval_loss(CFG, uniform_params, labels, batch)
  routed = _eval_loss(CFG, params, labels, batch)
  assert abs(routed - uniform) > 1e-3      # the routing matters for this loss
  # anneal_steps = total_steps = 4: the update from step 3 is the last, where a = 0.
  _, metrics = _one_step(_anneal_cfg(4), params, labels, batch, count=3, total_steps=4)
  assert metrics["routing_anneal"] == 0.0
  np.testing.assert_allclose(metrics["loss"], uniform, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], _direct_lm_loss(CFG, params, batch, 0.0), rtol=1e-5)
  # Evaluation is never annealed.
  np.testing.assert_allclose(_eval_loss(_anneal_cfg(4), params, labels, batch), routed, rtol=1e-6)

  # The T-Few objective (encode and decode of choice_logits) is annealed too.
  tfew_cfg, tfew_batch = losses.LossConfig(kind="tfew"), _tfew_batch()
  tfew_uniform = _eval_loss(CFG, uniform_params, labels, tfew_batch, tfew_cfg)
  assert abs(_eval_loss(CFG, params, labels, tfew_batch, tfew_cfg) - tfew_uniform) > 1e-3
  _, metrics = _one_step(_anneal_cfg(4), params, labels, tfew_batch, count=3, total_steps=4,
                         loss_cfg=tfew_cfg)
  np.testing.assert_allclose(metrics["loss"], tfew_uniform, rtol=1e-6)


def test_steps_before_the_window_are_not_annealed(peaked):
  params, labels, batch = peaked["params"], peaked["labels"], _lm_batch()
  plain_params, plain = _one_step(CFG, params, labels, batch, count=0)
  assert "routing_anneal" not in plain
  # Window: steps 9 and 10 of 10; the update from step 7 is step 8, still a = 1.
  annealed_params, annealed = _one_step(_anneal_cfg(2), params, labels, batch, count=7,
                                        total_steps=10)
  assert annealed["routing_anneal"] == 1.0
  np.testing.assert_allclose(annealed["loss"], plain["loss"], rtol=1e-6)
  np.testing.assert_allclose(annealed["grad_norm"], plain["grad_norm"], rtol=1e-6)
  _assert_trees_close(annealed_params, plain_params, atol=1e-6)


def test_mid_window_factor_follows_the_cosine(peaked):
  params, labels, batch = peaked["params"], peaked["labels"], _lm_batch()
  # total 8, window 4 (steps 5..8): the update from step 4 is step 6, halfway: a = 1/2.
  for count, expected in ((4, (1 + np.cos(np.pi / 4)) / 2), (5, 0.5)):
    _, metrics = _one_step(_anneal_cfg(4), params, labels, batch, count=count, total_steps=8,
                           grad_accum_steps=2)
    np.testing.assert_allclose(metrics["routing_anneal"], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics["routing_anneal"],
                               anneal_factor(count + 1, 8, 4), rtol=0, atol=0)
    np.testing.assert_allclose(metrics["loss"], _direct_lm_loss(CFG, params, batch, expected),
                               rtol=1e-5)


def test_annealing_needs_a_valid_total_steps(peaked):
  labels, mesh = peaked["labels"], _mesh(1)
  model = models.T5(_anneal_cfg(4))
  tx = optim.make_optimizer(OPT_CFG, labels, 10)
  shardings = ts.shardings_of(ts.abstract_train_state(model, labels, tx, mesh))
  make = lambda total: ts.make_train_step(model, tx, losses.LossConfig(), mesh, shardings,
                                          total_steps=total)
  with pytest.raises(ValueError, match=r"AdapterConfig.anneal_steps=4.*RunConfig.train_steps"):
    make(None)
  with pytest.raises(ValueError,
                     match=r"AdapterConfig.anneal_steps=4 exceeds RunConfig.train_steps=3"):
    make(3)
  make(4)


def test_out_of_range_task_ids_are_refused_where_host_data_enters():
  """Under jit a routing gather would clamp an id >= n_tasks to the last row silently; the train and
  eval steps refuse host batches with such ids before running anything."""
  model = models.T5(CFG)
  labels = param_groups.param_labels(param_counts.abstract_params(CFG), "mhr")
  tx = optim.make_optimizer(OPT_CFG, labels, 2)
  mesh = _mesh(1)
  shardings = ts.shardings_of(ts.abstract_train_state(model, labels, tx, mesh))
  batch = _lm_batch()
  for bad in (CFG.adapter.n_tasks, -1):
    batch["task_ids"][3] = bad
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=3\)"):
      ts.make_train_step(model, tx, losses.LossConfig(), mesh, shardings)(None, batch, jax.random.key(0))
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=3\)"):
      ts.make_eval_step(model, losses.LossConfig(), mesh, shardings)(None, batch)
