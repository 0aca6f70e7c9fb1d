"""Training with T5X (mhr_jax.t5x_bridge.{optim, checkpoints}) against the project's own trainer as the
oracle: freezing and two-speed rates, the partitioning of the optimizer state, train steps on 1 and on 8
devices under T5X's partitioner, checkpoints both ways, and the starts of fine-tuning runs that the
method records (mhr_jax.adapters.methods) make.

T5X is not on PyPI: these tests skip when it is absent. Run them with a T5X virtualenv (README, section
"T5X"):
  PYTHONPATH=. $T5X_PYTHON -m pytest -q tests/test_t5x_training.py
`test_sharded_task_ids_...` starts a process with 8 simulated CPU devices (`eight_device_check`).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from t5x_helpers import (HAS_T5X, LOSS_ATOL, NO_T5X, ROOT, SCORE_ATOL, TASKS, UPDATE_RTOL, bridge_model,
                         choice_batch, grid_partitioner, lm_batch, mhr_setup, needs_t5x,
                         switched_on_params)

pytestmark = needs_t5x


@pytest.fixture(scope="module")
def mhr():
  """(tiny MHR bridge model, its init variables, its switched-on params)."""
  if not HAS_T5X:
    pytest.skip(NO_T5X)
  return mhr_setup()


# ------------------------------------------------------------------------------ optimizer

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
  grads = jax.grad(lambda p: model.loss_fn(p, lm_batch(), None)[0])(params)
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


def test_mhr_z_moves_only_the_new_routing_rows(mhr):
  import flax.core
  import jax
  _, _, params = mhr
  model = bridge_model(method="mhr-z", update_routing_rows_from=2)
  tx = model.optimizer_def.optax_optimizer
  grads = jax.grad(lambda p: model.loss_fn(p, lm_batch(), None)[0])(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in flax.traverse_util.flatten_dict(flax.core.unfreeze(updates)).items():
    u = np.asarray(u)
    if path[-2:] == ("routing", "logits"):
      assert np.abs(u[:2]).max() == 0.0 and np.abs(u[2:]).max() > 0.0, path
    else:
      assert np.abs(u).max() == 0.0, path


def _state_leaves(state_axes, state_shapes):
  """[(field, key path, mesh PartitionSpec, shape)] of every optimizer-state leaf; field is the
  Adafactor moment ('v', 'v_row', 'v_col') the leaf belongs to, or None."""
  import jax
  from jax.sharding import PartitionSpec
  spec_leaf = lambda x: x is None or isinstance(x, PartitionSpec)  # noqa: E731
  specs = dict(jax.tree_util.tree_flatten_with_path(state_axes, is_leaf=spec_leaf)[0])
  out = []
  for path, shape in jax.tree_util.tree_flatten_with_path(state_shapes)[0]:
    names = [getattr(key, "name", None) for key in path]
    field = next((n for n in names if n in ("v", "v_row", "v_col")), None)
    out.append((field, path, specs[path], tuple(shape.shape)))
  return out


@pytest.mark.parametrize("factoring", ["largest", "last_two"])
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_optimizer_state_partition_specs_fit_every_adafactor_moment(factoring, scan):
  """T5X's partitioner on a (data 4, model 2) grid, with 2-D parameter sharding, gets a PartitionSpec that
  fits every optimizer-state leaf of the project's Adafactor (each layer of a scanned stack its own
  parameter, routing logits factored as (..., T, S*K), 1-D leaves with a full moment): a moment shaped
  like its parameter is sharded like it, factored statistics and placeholders are replicated."""
  import collections
  import jax
  from flax import traverse_util
  from jax.sharding import NamedSharding, PartitionSpec
  from t5x import utils as t5x_utils
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated devices of tests/conftest.py")
  # 2-D sharding puts 'embed' on 'data', so that the layer norms' (1-D) full moments are sharded too.
  grid = grid_partitioner(4, 2, parameter_partitioning_dims=2)
  seen = collections.Counter()
  # Full fine-tuning of an MHR model trains every kind of leaf (kernels, norms, inventory, routing);
  # (IA)^3 scales are 1-D leaves on 'mlp', which T5X's rules shard over 'model'.
  for kind, method in (("mhr", "full"), ("ia3", "ia3")):
    model = bridge_model(kind, method=method, module_overrides={"scan_layers": scan}, optimizer={
        "adafactor_factoring": factoring, "adafactor_min_dim_to_factor": 8})
    initializer = t5x_utils.TrainStateInitializer(
        model.optimizer_def, model.get_initial_variables,
        {"encoder_input_tokens": (8, 8), "decoder_input_tokens": (8, 6)}, grid)
    shapes, axes = initializer.global_train_state_shape, initializer.train_state_axes
    param_specs = traverse_util.flatten_dict(dict(axes.params))
    param_shapes = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(dict(shapes.params)).items()}
    for field, path, spec, shape in _state_leaves(axes.param_states, shapes.param_states):
      NamedSharding(grid.mesh, spec or PartitionSpec()).shard_shape(shape)   # raises if it does not fit
      names = tuple(str(getattr(key, "key", "")) for key in path)
      param = next((names[i:] for i in range(len(names)) if names[i:] in param_shapes), None)
      if field == "v" and param is not None and shape == param_shapes[param]:
        assert spec == param_specs[param], (path, spec)
        seen["sharded full moments" if any(a is not None for a in spec) else "full moments"] += 1
      elif field is not None:
        assert spec is None or all(a is None for a in spec), (path, spec)
        seen[field] += 1
        if field != "v" and param is not None and param[-2:] == ("routing", "logits"):
          lead, (tasks, splits, skills) = param_shapes[param][:-3], param_shapes[param][-3:]
          if factoring == "last_two":   # the authors' 2-D routing (T, S*K), factored, per layer
            assert shape == lead + ((tasks,) if field == "v_row" else (splits * skills,)), (path, shape)
  assert seen["sharded full moments"] > 0 and seen["full moments"] > 0, seen
  assert seen["v_row"] > 0 and seen["v_col"] > 0, seen


# ------------------------------------------------------------------------------ train steps

def test_t5x_training_steps_with_tfew_equal_the_projects_steps(mhr):
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
  model = bridge_model(loss_config=loss_cfg)
  batches = [choice_batch(seed=2), choice_batch(seed=3)]

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


def _run_under(partitioner, model, params, batches, predict_batch):
  """T5X's trainer (MhrTrainer) for len(batches) steps, then score_batch and greedy predict_batch
  partitioned as t5x.eval / t5x.infer do (unless predict_batch is None). Returns (losses, params,
  scores, tokens, train state axes, optimizer state), on the host."""
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
  opt_state = jax.tree.map(host, trainer.train_state.param_states)
  if predict_batch is None:
    return losses, params, None, None, axes, opt_state
  data = partitioner.data_partition_spec
  score = partitioner.partition(model.score_batch, in_axis_resources=(axes.params, data),
                                out_axis_resources=data)
  greedy = model.__class__(model.module, model.input_vocabulary, model.output_vocabulary,
                           model.optimizer_def, decode_fn=functools.partial(
                               t5x_decoding.temperature_sample, temperature=0.0))
  predict = partitioner.partition(lambda p, b: greedy.predict_batch_with_aux(p, b)[0],
                                  in_axis_resources=(axes.params, data), out_axis_resources=data)
  return (losses, params, host(score(trained, predict_batch)), host(predict(trained, predict_batch)), axes,
          opt_state)


def eight_device_check() -> None:
  """The bridge on 8 CPU devices (data 4 x model 2) against 1 device: T5X training with the T-Few
  objective and with T5X's LM loss, then (LM model) score_batch and greedy decoding, with every
  device holding rows of other tasks. Run in a process with 8 devices (test_sharded_task_ids_...)."""
  import flax.core
  import jax
  from flax import traverse_util
  from mhr_jax.training import losses
  assert jax.device_count() == 8, jax.devices()
  runs = {"tfew": (losses.LossConfig(kind="tfew"), [choice_batch(n=8, seed=s) for s in (4, 5, 6)],
                   None),
          "lm": (None, [lm_batch(n=8, seed=s) for s in (7, 8, 9)], lm_batch(n=8, lt=6, seed=11))}
  for name, (loss_config, batches, predict_batch) in runs.items():
    model = bridge_model(loss_config=loss_config)
    _, params = switched_on_params(model)
    one = _run_under(grid_partitioner(1, 1), model, params, batches, predict_batch)
    grid = grid_partitioner(4, 2)
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


def test_sharded_task_ids_under_t5x_partitioner_on_8_devices_match_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
  out = subprocess.run([sys.executable, "-c", "import test_t5x_training as t; t.eight_device_check()"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  print(out.stdout)
  assert out.stdout.count("losses on 1 device") == 2 and "greedy tokens equal" in out.stdout


def test_scanned_adafactor_trains_under_t5x_partitioner_on_8_devices_as_on_one():
  """Hugging Face's factoring ("last_two") on a scanned MHR model: an MhrTrainer step on a (data 4,
  model 2) grid, with the optimizer state partitioned as T5X derives it, gives the loss and the
  Adafactor moments of one device, and moves the same parameters.

  The parameter updates are not compared at UPDATE_RTOL: a factored update divides a gradient by its
  row's and column's RMS, so an element ~1e-3 of its leaf's largest gradient, whose float32 round-off
  differs between the two programs' reductions (~2e-4 relative), moves by a learning-rate-sized step
  that differs by ~2e-4 of the leaf's largest update."""
  import jax
  from flax import traverse_util
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated devices of tests/conftest.py")
  model = bridge_model(module_overrides={"scan_layers": True},
                       optimizer={"adafactor_factoring": "last_two"})
  _, params = switched_on_params(model)
  batches = [lm_batch(n=8, seed=7)]
  one = _run_under(grid_partitioner(1, 1), model, params, batches, None)
  eight = _run_under(grid_partitioner(4, 2), model, params, batches, None)
  np.testing.assert_allclose(eight[0], one[0], atol=LOSS_ATOL, rtol=0)
  want_state, got_state = jax.tree_util.tree_flatten_with_path(one[5])[0], jax.tree.leaves(eight[5])
  assert len(want_state) == len(got_state)
  moments = 0
  for (path, want), got in zip(want_state, got_state):
    if np.ndim(want) and np.issubdtype(np.asarray(want).dtype, np.floating):   # moments (no counts)
      assert np.abs(got - want).max() <= UPDATE_RTOL * max(np.abs(want).max(), 1e-30), path
      moments += bool(np.abs(want).max() > 1e-20)
  assert moments > 0
  start = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(params)))
  want, got = traverse_util.flatten_dict(one[1]), traverse_util.flatten_dict(eight[1])
  assert {p for p in want if (want[p] != start[p]).any()} == {p for p in got if (got[p] != start[p]).any()}
  assert any((want[p] != start[p]).any() for p in want)


# ------------------------------------------------------------------------------ checkpoints

def _logits(module, params, batch):
  return np.asarray(module.apply({"params": params}, batch["encoder_input_tokens"],
                                 batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                                 task_ids=batch["task_ids"], enable_dropout=False))


def test_checkpoints_convert_both_ways_with_equal_logits_and_optimizer_state(mhr, tmp_path):
  import flax.core
  import jax
  from mhr_jax.checkpoints import run_state as run_checkpoints
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  model, _, params = mhr
  tx = model.optimizer_def.optax_optimizer
  grads = jax.grad(lambda p: model.loss_fn(p, lm_batch(), None)[0])(params)
  _, opt_state = tx.update(grads, tx.init(params), params)   # a non-trivial optimizer state
  state = bridge_checkpoints.train_state_from_params(model, flax.core.unfreeze(params), 7, opt_state)
  t5x_path = bridge_checkpoints.save_t5x(state, str(tmp_path / "t5x"))
  assert t5x_path.endswith("checkpoint_7")

  step = bridge_checkpoints.t5x_to_run(t5x_path, model, str(tmp_path / "run"))
  assert step == 7
  run_params = run_checkpoints.restore_params(str(tmp_path / "run" / "checkpoints"), 7)
  batch = lm_batch()
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


def test_initial_checkpoints_for_few_shot_methods(mhr, tmp_path):
  import flax.core
  from flax import traverse_util
  from mhr_jax.adapters import transforms
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  model, _, params = mhr
  params = flax.core.unfreeze(params)
  pretrained = bridge_checkpoints.save_t5x(
      bridge_checkpoints.train_state_from_params(model, params, 20), str(tmp_path / "pre"))

  # MHR / MHR-z: two new tasks get fresh rows; the pre-trained rows and the inventory are kept.
  adapted = bridge_model(n_tasks=TASKS + 2, method="mhr-z", update_routing_rows_from=TASKS)
  path = bridge_checkpoints.initial_checkpoint(adapted, str(tmp_path / "z"), pretrained=pretrained,
                                               method="mhr-z")
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
  mu = bridge_model(kind="lora", method="mhr-mu")
  path = bridge_checkpoints.initial_checkpoint(mu, str(tmp_path / "mu"), pretrained=pretrained,
                                               method="mhr-mu")
  _, want = transforms.to_mu(model.config, params)
  got = traverse_util.flatten_dict(bridge_checkpoints.read_t5x_params(path))
  want = traverse_util.flatten_dict(want)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-7, rtol=0)

  with pytest.raises(ValueError, match="do not fit the model"):
    bridge_checkpoints.initial_checkpoint(bridge_model(kind="ia3"), str(tmp_path / "ia3"),
                                          pretrained=pretrained, method="ia3")
  with pytest.raises(ValueError, match="needs the fine-tuning method"):
    bridge_checkpoints.initial_checkpoint(adapted, str(tmp_path / "no_method"), pretrained=pretrained)

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


def test_fine_tuning_starts_are_the_method_records_starts(mhr):
  """`adaptation_start` builds what the method's record (adapters.methods) starts a pair from: new task j
  gets the row of the record's start with key fold_in(key(seed), j) (MHR-z: fresh near-uniform rows;
  mhr-meanrow: the pre-trained rows' mean), in either layer layout; mismatches are one-line errors."""
  import flax.core
  import jax
  from flax import traverse_util
  from mhr_jax import models
  from mhr_jax.adapters import methods
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  model, _, params = mhr
  params = flax.core.unfreeze(params)
  old = traverse_util.flatten_dict(params)
  routing = [p for p in old if p[-2:] == ("routing", "logits")]

  z_cfg = bridge_model(n_tasks=TASKS + 2, method="mhr-z").config
  got = traverse_util.flatten_dict(bridge_checkpoints.adaptation_start(params, z_cfg, "mhr-z", seed=5))
  record = methods.get("mhr-z")
  rows = [traverse_util.flatten_dict(record.start_params(model.config, params,
                                                         jax.random.fold_in(jax.random.key(5), j))[1])
          for j in range(2)]
  for path in routing:
    np.testing.assert_array_equal(got[path][:TASKS], old[path])
    for j in range(2):
      np.testing.assert_array_equal(got[path][TASKS + j], rows[j][path][0])
    assert np.abs(got[path][TASKS:]).max() <= 1e-3 and not np.array_equal(got[path][TASKS], got[path][TASKS + 1])
  assert all(np.array_equal(got[p], v) for p, v in old.items() if p not in routing)

  mean = traverse_util.flatten_dict(bridge_checkpoints.adaptation_start(params, z_cfg, "mhr-meanrow"))
  for path in routing:   # float32 means of 3 rows of logits of size ~2: round-off ~2e-7
    want_rows = np.broadcast_to(old[path].astype(np.float64).mean(0), (2,) + old[path].shape[1:])
    np.testing.assert_allclose(mean[path][TASKS:], want_rows, atol=1e-6, rtol=0)

  # The same start in the scanned layout (the transforms draw per layer in the unscanned order).
  scanned_cfg = z_cfg.replace(scan_layers=True)
  scanned = bridge_checkpoints.adaptation_start(params, scanned_cfg, "mhr-z", seed=5)
  want = traverse_util.flatten_dict(models.layout.to_scanned(scanned_cfg, traverse_util.unflatten_dict(got)))
  scanned = traverse_util.flatten_dict(scanned)
  assert set(scanned) == set(want)
  for path, value in want.items():
    np.testing.assert_array_equal(scanned[path], value)

  lora_cfg = bridge_model(kind="lora", method="mhr-mu").config
  with pytest.raises(ValueError, match=r"method 'mhr' \(METHOD\) fine-tunes a model of adapter kind \['mhr'\]"):
    bridge_checkpoints.adaptation_start(params, lora_cfg, "mhr", seed=0)
  shared = lora_cfg.replace(adapter=lora_cfg.adapter.replace(routing="shared"))
  with pytest.raises(ValueError, match=r"differs from the configured AdapterConfig at .*'routing': \('shared', 'layer'\)"):
    bridge_checkpoints.adaptation_start(params, shared, "mhr-mu", seed=0)
  with pytest.raises(ValueError, match=r"AdapterConfig.n_tasks=2 is below the checkpoint's 3 tasks"):
    bridge_checkpoints.adaptation_start(params, bridge_model(n_tasks=2).config, "mhr", seed=0)


# ------------------------------------------------------------------------------ command line

def test_gin_files_resolve_from_another_directory_which_stays_current(tmp_path, monkeypatch):
  from mhr_jax.t5x_bridge import checkpoints as bridge_checkpoints
  monkeypatch.chdir(tmp_path)
  model = bridge_checkpoints.load_gin_model(["configs/mhr.gin"], ["MODEL_DIR = '/unused'"])
  assert os.getcwd() == str(tmp_path)
  assert (model.config.adapter.kind, model.config.adapter.n_tasks) == ("mhr", 8)


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
