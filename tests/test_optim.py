"""Optimizers against PyTorch / Hugging Face oracles; schedules, groups, clipping, update masks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from flax import traverse_util

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


# Leaves as the model holds them -> the authors' PyTorch parameter of one layer (their SkilledLoRA lora_a
# (S, K, d_in/S, r) and lora_b (S, K, r, d_out/S), PolytroponSelector.module_logits (T, S*K), LoRA
# (d_in, r) / (r, d_out), IA3 (d_out,)). MHR with S = K = 8, r = 1 and the T0 mixture's 313 tasks;
# "encoder/layers" is a scanned stack of L = 3 layers, the decoder block is unscanned.
L, T, S, K = 3, 313, 8, 8
AUTHORS_LEAVES = {
    ("encoder", "layers", "self_attention", "q", "lora_a"): ((L, S, K, 32, 1), (S, K, 32, 1)),
    ("encoder", "layers", "self_attention", "q", "lora_b"): ((L, S, K, 1, 32), (S, K, 1, 32)),
    ("encoder", "layers", "self_attention", "q", "routing", "logits"): ((L, T, S, K), (T, S * K)),
    ("encoder", "layers", "mlp", "wi_1", "ia3_scale"): ((L, 80), (80,)),
    ("decoder", "block_0", "mlp", "wi_0", "lora_b"): ((S, K, 1, 80), (S, K, 1, 80)),
    ("decoder", "block_0", "mlp", "wi_0", "routing", "logits"): ((T, S, K), (T, S * K)),
    ("decoder", "block_0", "self_attention", "k", "lora_a"): ((256, 1), (256, 1)),
}
HF_STEPS, SPIKE_STEP = 5, 3


def _paper_optimizer_config(tmp_path, stage):
  """The (OptimizerConfig, TRAIN_STEPS = 10) of configs/experiments/t0_mhr.gin ("pretrain") or of its T0
  adaptation with configs/adapt/{mhr,t0}.gin ("adapt")."""
  from mhr_jax import config as config_lib
  files = ["configs/experiments/t0_mhr.gin"]
  if stage == "adapt":
    files += ["configs/adapt/mhr.gin", "configs/adapt/t0.gin"]
  config_lib.parse_gin(files, [f"{m} = '{tmp_path}'" for m in ("MODEL_DIR", "DATA_DIR", "HF_CHECKPOINT",
                                                              "PRETRAIN_DIR")] + ["TRAIN_STEPS = 10"])
  cfg = config_lib.load_config()
  return cfg.optimizer, cfg.run.train_steps


def _authors_params_and_grads():
  """Params and HF_STEPS gradients of AUTHORS_LEAVES (nested dicts). Stacked layers differ in scale
  (per-layer parameter RMS) and layer 0 of every stack gets a gradient spike at SPIKE_STEP (per-layer
  update clipping): an optimizer that mixes the layers of a stack gives other numbers."""
  layer_scale = np.asarray([1.0, 4.0, 0.25], np.float32)
  flat, grads = {}, [{} for _ in range(HF_STEPS)]
  for path, (shape, _) in AUTHORS_LEAVES.items():
    stacked = path[1] == "layers"
    scale = layer_scale.reshape((L,) + (1,) * (len(shape) - 1)) if stacked else np.float32(1.0)
    flat[path] = (_RNG.normal(size=shape) * 0.05 * scale).astype(np.float32)
    for step in range(HF_STEPS):
      g = _RNG.normal(size=shape).astype(np.float32) * 0.05
      if stacked and step == SPIKE_STEP:
        g[0] *= 100.0
      grads[step][path] = g
  unflat = traverse_util.unflatten_dict
  return unflat(flat), [unflat(g) for g in grads]


def _hf_adafactor_per_layer(params, grads, labels, opt_cfg, total_steps, scale_parameter):
  """Hugging Face's Adafactor (the authors' optimizer) on the authors' parameters: every layer of a
  stack a parameter of its own, in the authors' shape; global-norm clipping first (their
  gradient_clip_val), a param group per learning rate. Returns the final params in our layout."""
  schedules = {g: optim.lr_schedule(opt_cfg.peak_lr(g), opt_cfg, total_steps) for g in ("adapters", "routing")}
  flat_params, flat_labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
  tparams = {}  # (path, layer or None) -> torch parameter in the authors' shape
  for path, value in flat_params.items():
    authors_shape = AUTHORS_LEAVES[path][1]
    for layer in (range(L) if path[1] == "layers" else [None]):
      tparams[path, layer] = torch.nn.Parameter(torch.tensor(
          (value if layer is None else value[layer]).reshape(authors_shape)))
  groups = [{"params": [p for (path, _), p in tparams.items() if flat_labels[path] == g], "lr": 0.0, "name": g}
            for g in schedules]
  opt = HFAdafactor(groups, lr=0.0, scale_parameter=scale_parameter, relative_step=False, warmup_init=False,
                    clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0)
  for step, g in enumerate(grads):
    flat_g = traverse_util.flatten_dict(g)
    for (path, layer), p in tparams.items():
      p.grad = torch.tensor((flat_g[path] if layer is None else flat_g[path][layer]).reshape(p.shape))
    torch.nn.utils.clip_grad_norm_(list(tparams.values()), opt_cfg.clip_norm)
    for group in opt.param_groups:
      group["lr"] = float(schedules[group["name"]](step))
    opt.step()
  out = {}
  for path, value in flat_params.items():
    if path[1] == "layers":
      out[path] = np.stack([tparams[path, i].detach().numpy().reshape(value.shape[1:]) for i in range(L)])
    else:
      out[path] = tparams[path, None].detach().numpy().reshape(value.shape)
  return out


@pytest.mark.parametrize("stage, scale_parameter", [("pretrain", False), ("adapt", True)])
def test_adafactor_as_the_authors_run_it(tmp_path, stage, scale_parameter):
  """The paper configs' Adafactor against Hugging Face's (the authors' optimizer) for 5 steps on the
  authors' parameters: last-two-dims factoring of (S, K, d/S, r) blocks, routing factored as the 2-D
  (T, S*K), a scanned stack trained as its layers one by one (moments, update clipping, parameter
  scaling), two learning rates, global clipping, warmup. MHR pre-training runs without parameter
  scaling ([authors] poly_lora.json); T0 adaptation with it (their finetune.json keeps HF's default)."""
  opt_cfg, total_steps = _paper_optimizer_config(tmp_path, stage)
  assert (opt_cfg.name, opt_cfg.adafactor_factoring) == ("adafactor", "last_two")
  assert opt_cfg.adafactor_scale_parameter is scale_parameter
  params, grads = _authors_params_and_grads()
  labels = param_groups.param_labels(params, "mhr")
  assert traverse_util.flatten_dict(labels)[("decoder", "block_0", "mlp", "wi_0", "routing", "logits")] == "routing"
  ours, _ = _run_optax(optim.make_optimizer(opt_cfg, labels, total_steps), params, grads)
  want = _hf_adafactor_per_layer(params, grads, labels, opt_cfg, total_steps, scale_parameter)
  start = traverse_util.flatten_dict(params)
  for path, value in traverse_util.flatten_dict(ours).items():
    moved = want[path] - start[path]
    assert np.abs(moved).max() > 0
    # Deltas of float32 params: exact up to the rounding of the params themselves (a few ulps).
    np.testing.assert_allclose(value - start[path], moved, rtol=1e-4,
                               atol=4 * np.finfo(np.float32).eps * np.abs(start[path]).max(),
                               err_msg="/".join(path))


def test_routing_moments_are_those_of_the_authors_2d_parameter():
  """Factored second moments of routing logits (T, S, K), scanned (L, T, S, K): rows over T and
  columns over S*K, as Hugging Face keeps them for the authors' (T, S*K) module_logits."""
  params = {"encoder": {"layers": {"q": {"routing": {"logits": np.zeros((L, T, S, K), np.float32)}}}},
            "routing": {"logits": np.zeros((T, S, K), np.float32)}}
  state = optim.scale_by_factored_rms("last_two").init(params)
  assert state.v_row["encoder"]["layers"]["q"]["routing"]["logits"].shape == (L, T)
  assert state.v_col["encoder"]["layers"]["q"]["routing"]["logits"].shape == (L, S * K)
  assert (state.v_row["routing"]["logits"].shape, state.v_col["routing"]["logits"].shape) == ((T,), (S * K,))


def test_largest_factoring_is_optax_adafactor_per_layer():
  """"largest" (optax's and T5X's factoring) equals optax's Adafactor scaling, update clipping and
  parameter scaling applied to each layer of a stack on its own, and to an unscanned leaf bit for bit.
  The (L, 130, 140) stack and the (L, 130) norm scales would otherwise share one update clipping."""
  tx = optax.chain(optim.scale_by_factored_rms("largest", min_dim_to_factor=128),
                   optim.clip_by_layer_rms(1.0), optim.scale_by_param_layer_rms(1e-3))
  reference = optax.chain(optax.scale_by_factored_rms(min_dim_size_to_factor=128, epsilon=1e-30),
                          optax.clip_by_block_rms(1.0), optax.scale_by_param_block_rms(1e-3))
  shapes = {("encoder", "layers", "mlp", "wi_0", "kernel"): (L, 130, 140),
            ("encoder", "layers", "pre_mlp_norm", "scale"): (L, 130),
            ("decoder", "block_0", "mlp", "wo", "kernel"): (140, 130)}
  flat = {p: (_RNG.normal(size=s) * np.float32(0.05)).astype(np.float32) for p, s in shapes.items()}
  grads = [{p: (_RNG.normal(size=s) * (100.0 if i == 2 else 1.0)).astype(np.float32) for p, s in shapes.items()}
           for i in range(4)]
  for g in grads:
    for p, s in shapes.items():
      if len(s) == 3:
        g[p][1] *= 0.01  # the stack's layers differ in gradient scale
  unflat = traverse_util.unflatten_dict
  ours, _ = _run_optax(tx, unflat(flat), [unflat(g) for g in grads])
  ours = traverse_util.flatten_dict(ours)
  for path, value in flat.items():
    layers = range(L) if path[1] == "layers" else [None]
    for layer in layers:
      pick = (lambda x: x) if layer is None else (lambda x, i=layer: x[i])
      want, _ = _run_optax(reference, pick(value), [pick(g[path]) for g in grads])
      if layer is None:
        np.testing.assert_array_equal(ours[path], want)
      else:
        np.testing.assert_allclose(ours[path][layer], want, rtol=1e-6, atol=1e-7, err_msg="/".join(path))


@pytest.mark.parametrize("shape", [(313, 8, 8), (8, 8, 128, 16)])
def test_optax_factoring_differs_from_the_authors_on_mhr_leaves(tmp_path, shape):
  """The reason for the option: optax keeps a full moment for routing tables (T, S*K) and rank-16 blocks
  (S, K, d/S, r), whose small dims are under its threshold; Hugging Face factors their last two dims."""
  import dataclasses
  cfg, _ = _paper_optimizer_config(tmp_path, "pretrain")
  path = ("q", "routing", "logits") if len(shape) == 3 else ("q", "lora_a")
  params = traverse_util.unflatten_dict({path: (_RNG.normal(size=shape) * 0.05).astype(np.float32)})
  labels = traverse_util.unflatten_dict({path: "adapters"})
  grads = [traverse_util.unflatten_dict({path: _RNG.normal(size=shape).astype(np.float32)}) for _ in range(4)]
  runs = [traverse_util.flatten_dict(_run_optax(optim.make_optimizer(
      dataclasses.replace(cfg, adafactor_factoring=f, clip_norm=None), labels, 10), params, grads)[0])[path]
          for f in ("last_two", "largest")]
  assert np.max(np.abs(runs[0] - runs[1])) > 1e-2 * np.max(np.abs(runs[1] - traverse_util.flatten_dict(params)[path]))


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
