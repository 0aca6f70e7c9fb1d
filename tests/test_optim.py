"""Optimizers against PyTorch / Hugging Face oracles; schedules, groups, clipping, update masks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from mhr_jax.training import optim
from mhr_jax.adapters import params as param_groups

_RNG = np.random.default_rng(0)
SHAPES = {"w": (6, 5), "v": (7,)}


def _grads(steps, scales=None):
  scales = scales or [1.0] * steps
  return [{k: (_RNG.normal(size=s) * c).astype(np.float32) for k, s in SHAPES.items()}
          for c in scales[:steps]]


def _run_optax(tx, params, grads):
  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return jax.tree.map(np.asarray, params), state


def _run_torch(make_opt, params, grads, clip=None):
  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  opt = make_opt(list(tparams.values()))
  for g in grads:
    for k, p in tparams.items():
      p.grad = torch.tensor(g[k])
    if clip is not None:
      torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
    opt.step()
  return {k: p.detach().numpy() for k, p in tparams.items()}


def _params():
  return {k: _RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def test_adafactor_matches_hugging_face_t0_setting():
  # Paper's T0 setting: HF Adafactor(lr, scale_parameter=False, relative_step=False). HF factors
  # every matrix, so the factoring threshold is lowered to match.
  cfg = optim.OptimizerConfig(name="adafactor", adapter_lr=1e-2, schedule="constant",
                              warmup_steps=0, clip_norm=None, adafactor_min_dim_to_factor=1)
  params = _params()
  grads = _grads(4)
  labels = {k: "adapters" for k in params}
  ours, _ = _run_optax(optim.make_optimizer(cfg, labels, 10), params, grads)
  ref = _run_torch(lambda ps: HFAdafactor(ps, lr=1e-2, scale_parameter=False, relative_step=False,
                                          warmup_init=False), params, grads)
  for k in params:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours[k], params[k])


# T5-XL leaves of MHR (S = 8, K = 8, r = 1, 313 tasks): q's A and B, wi_0's B, and a routing table.
MHR_LEAVES = {("q", "lora_a"): (8, 8, 256, 1), ("q", "lora_b"): (8, 8, 1, 256),
              ("wi_0", "lora_b"): (8, 8, 1, 640), ("q", "routing", "logits"): (313, 8, 8)}


def _t0_mhr_optimizer_config(tmp_path):
  """The OptimizerConfig that configs/experiments/t0_mhr.gin loads (TRAIN_STEPS=10 for larger steps)."""
  from mhr_jax import config as config_lib
  config_lib.parse_gin(["configs/experiments/t0_mhr.gin"], [
      f"MODEL_DIR = '{tmp_path}/run'", f"DATA_DIR = '{tmp_path}'", f"HF_CHECKPOINT = '{tmp_path}'",
      "TRAIN_STEPS = 10"])
  return config_lib.load_config()


@pytest.mark.parametrize("scale_parameter", [False, True])
def test_adafactor_as_the_authors_run_it_on_mhr_leaves(tmp_path, scale_parameter):
  """t0_mhr.gin's optimizer against Hugging Face's Adafactor (the authors' optimizer) for 5 steps:
  factoring the last two dims of every (S, K, d/S, r) leaf, two learning rates, clipping, warmup."""
  import dataclasses
  cfg = _t0_mhr_optimizer_config(tmp_path)
  opt_cfg = dataclasses.replace(cfg.optimizer, adafactor_scale_parameter=scale_parameter)
  assert (opt_cfg.name, opt_cfg.adafactor_factoring) == ("adafactor", "last_two")
  assert cfg.optimizer.adafactor_scale_parameter is False  # the authors' setting
  steps = 5
  params = {"/".join(k): (_RNG.normal(size=s) * 0.05).astype(np.float32) for k, s in MHR_LEAVES.items()}
  grads = [{k: _RNG.normal(size=v.shape).astype(np.float32) * 0.05 for k, v in params.items()} for _ in range(steps)]
  labels = {k: "routing" if k.endswith("logits") else "adapters" for k in params}
  ours, _ = _run_optax(optim.make_optimizer(opt_cfg, labels, cfg.run.train_steps), params, grads)

  schedules = {g: optim.lr_schedule(opt_cfg.peak_lr(g), opt_cfg, cfg.run.train_steps) for g in ("adapters", "routing")}
  names = sorted(params)
  tparams = {k: torch.nn.Parameter(torch.tensor(params[k])) for k in names}
  groups = [{"params": [tparams[k] for k in names if labels[k] == g], "lr": 0.0, "name": g} for g in schedules]
  opt = HFAdafactor(groups, lr=0.0, scale_parameter=scale_parameter, relative_step=False, warmup_init=False,
                    clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0)
  for step, g in enumerate(grads):
    for k in names:
      tparams[k].grad = torch.tensor(g[k])
    torch.nn.utils.clip_grad_norm_(list(tparams.values()), opt_cfg.clip_norm)
    for group in opt.param_groups:
      group["lr"] = float(schedules[group["name"]](step))
    opt.step()
  for k in names:
    moved = tparams[k].detach().numpy() - params[k]
    assert np.abs(moved).max() > 0
    # Deltas of float32 params: exact up to the rounding of the params themselves (a few ulps).
    np.testing.assert_allclose(ours[k] - params[k], moved, rtol=1e-4,
                               atol=4 * np.finfo(np.float32).eps * np.abs(params[k]).max())


@pytest.mark.parametrize("shape", [(313, 8, 8), (8, 8, 128, 16)])
def test_optax_factoring_differs_from_the_authors_on_mhr_leaves(tmp_path, shape):
  """The reason for the option: optax keeps a full moment for routing tables (T, S, K) and rank-16 blocks
  (S, K, d/S, r), whose small dims are under its threshold; Hugging Face factors their last two dims."""
  import dataclasses
  cfg = _t0_mhr_optimizer_config(tmp_path).optimizer
  params = {"a": (_RNG.normal(size=shape) * 0.05).astype(np.float32)}
  grads = [{"a": _RNG.normal(size=shape).astype(np.float32)} for _ in range(4)]
  runs = [_run_optax(optim.make_optimizer(dataclasses.replace(cfg, adafactor_factoring=f, clip_norm=None),
                                          {"a": "adapters"}, 10), params, grads)[0]["a"] - params["a"]
          for f in ("last_two", "largest")]
  assert np.max(np.abs(runs[0] - runs[1])) > 1e-2 * np.max(np.abs(runs[1]))


def test_adamw_with_clipping_matches_torch():
  cfg = optim.OptimizerConfig(name="adamw", routing_lr=1e-2, schedule="constant", warmup_steps=0,
                              clip_norm=1.0, weight_decay=0.1)
  params = _params()
  grads = _grads(3, scales=[10.0, 0.1, 3.0])   # first and last get clipped, not the middle one
  labels = {k: "routing" for k in params}
  ours, _ = _run_optax(optim.make_optimizer(cfg, labels, 10), params, grads)
  ref = _run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                                weight_decay=0.1), params, grads, clip=1.0)
  unclipped = _run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), params, grads)
  for k in params:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6)
  assert not np.allclose(ref["w"], unclipped["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_warmup_then_decay(schedule):
  cfg = optim.OptimizerConfig(schedule=schedule, warmup_fraction=0.06)
  fn = optim.lr_schedule(2.0, cfg, total_steps=100)        # 6 warmup steps
  decay = {"linear": lambda f: 1 - f, "cosine": lambda f: 0.5 * (1 + math.cos(math.pi * f)),
           "constant": lambda f: 1.0}[schedule]
  for step in (0, 3, 6, 30, 99, 100, 150):
    want = 2.0 * step / 6 if step < 6 else 2.0 * decay(min((step - 6) / 94, 1.0))
    assert float(fn(step)) == pytest.approx(want, rel=1e-6, abs=1e-7), step
  assert optim.warmup_steps(optim.OptimizerConfig(warmup_steps=3), 100) == 3


def test_groups_get_their_own_learning_rates_and_frozen_gets_nothing():
  cfg = optim.OptimizerConfig(name="adamw", adapter_lr=1e-3, routing_lr=0.1, base_lr=1e-2,
                              schedule="constant", warmup_steps=0, clip_norm=None)
  params = {"a": np.ones((3, 4), np.float32), "r": np.ones((2, 2), np.float32),
            "b": np.ones((5,), np.float32), "f": np.ones((4, 4), np.float32)}
  labels = {"a": "adapters", "r": "routing", "b": "base", "f": "frozen"}
  grads = {k: _RNG.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  tx = optim.make_optimizer(cfg, labels, 10)
  new, state = _run_optax(tx, params, [grads])
  # Adam's first step moves each entry by lr * g / (|g| + eps), i.e. lr up to eps.
  for key, lr in (("a", 1e-3), ("r", 0.1), ("b", 1e-2)):
    np.testing.assert_allclose(new[key] - params[key], -lr * np.sign(grads[key]), rtol=1e-4)
  np.testing.assert_array_equal(new["f"], params["f"])
  rates = optim.learning_rates(state)
  assert set(rates) == {"adapters", "routing", "base"}
  assert float(rates["routing"]) == pytest.approx(0.1)
  # The frozen leaf allocates no optimizer state: same state size as without it.
  sizes = lambda s: sum(x.size for x in jax.tree.leaves(s))
  trained = {k: v for k, v in params.items() if k != "f"}
  assert sizes(tx.init(params)) == sizes(tx.init(trained))


def test_routing_row_mask_keeps_other_rows_fixed():
  cfg = optim.OptimizerConfig(name="adamw", routing_lr=0.1, schedule="constant", warmup_steps=0,
                              weight_decay=0.5)
  params = {"layer": {"routing": {"logits": np.ones((4, 2, 3), np.float32)},
                      "lora_a": np.ones((2, 3), np.float32)}}
  labels = param_groups.param_labels(params, "mhr")
  mask = param_groups.routing_row_mask(params, [1, 3])
  grads = jax.tree.map(lambda x: _RNG.normal(size=x.shape).astype(np.float32), params)
  new, _ = _run_optax(optim.make_optimizer(cfg, labels, 10, update_mask=mask), params, [grads] * 2)
  z_old, z_new = params["layer"]["routing"]["logits"], new["layer"]["routing"]["logits"]
  np.testing.assert_array_equal(z_new[[0, 2]], z_old[[0, 2]])
  assert np.all(np.abs(z_new[[1, 3]] - z_old[[1, 3]]) > 1e-3)
  assert not np.allclose(new["layer"]["lora_a"], params["layer"]["lora_a"])


def test_config_and_label_errors_name_the_key():
  with pytest.raises(ValueError, match="OptimizerConfig.name"):
    optim.OptimizerConfig(name="sgd")
  with pytest.raises(ValueError, match="OptimizerConfig.schedule"):
    optim.OptimizerConfig(schedule="step")
  with pytest.raises(ValueError, match="OptimizerConfig.grad_accum_steps"):
    optim.OptimizerConfig(grad_accum_steps=0)
  with pytest.raises(ValueError, match="warmup_steps=20 exceeds total_steps=10"):
    optim.lr_schedule(1.0, optim.OptimizerConfig(warmup_steps=20), 10)
  with pytest.raises(ValueError, match="param label 'train' of x/y"):
    optim.make_optimizer(optim.OptimizerConfig(), {"x": {"y": "train"}}, 10)


def test_group_map_norms():
  tree = {"a": jnp.full((2,), 3.0), "b": jnp.full((1,), 4.0), "c": jnp.ones((4,))}
  labels = {"a": "adapters", "b": "adapters", "c": "routing"}
  norms = optim.group_map(optax.tree.norm, tree, labels)
  assert float(norms["adapters"]) == pytest.approx(math.sqrt(9 + 9 + 16))
  assert float(norms["routing"]) == pytest.approx(2.0)
