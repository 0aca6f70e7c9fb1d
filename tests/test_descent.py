"""Training goes downhill for every method of the paper: on a fixed batch, the first update moves each
trainable leaf against its gradient, and five steps lower the loss (a negated or mis-scaled update fails)."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from mhr_jax.models import param_counts
from mhr_jax.training import adaptation, losses, optim
from mhr_jax import models, partitioning
from mhr_jax.training import train_step as ts
from mhr_jax.adapters import AdapterConfig, methods
from mhr_jax.adapters.config import KINDS
from mhr_jax.adapters import params as param_groups

BASE = models.preset("tiny", num_layers=1)
ROUTED = dict(n_tasks=3, n_skills=3, n_splits=2, rank=2, gumbel=False, target_modules=r".*/(q|v|wi_1)")
# The paper's optimizer (Adafactor as the authors run it), no warmup so the first update moves.
OPT_CFG = optim.OptimizerConfig(name="adafactor", adafactor_factoring="last_two", adapter_lr=1e-2,
                                routing_lr=0.3, base_lr=1e-3, schedule="constant", warmup_steps=0,
                                clip_norm=1.0)
STEPS = 5

# Multi-task pre-training of every adapter kind ("none": the whole base), and few-shot adaptation with every
# record of the method table from the kind it pre-trains (a new record is covered without a change here).
CASES = {**{f"pretrain {kind}": (kind, None) for kind in KINDS},
         **{f"adapt {m.name}": (m.pretrain_kind, m.name) for m in methods.METHOD_TABLE.values()}}


def _random(cfg, seed=0):
  # Every leaf random (B too), so every trainable leaf has a gradient from the first step.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.3).astype(np.float32),
                      param_counts.abstract_params(cfg))


def _batch(b=4, li=6, lt=5):
  rng = np.random.default_rng(1)
  targets = rng.integers(2, BASE.vocab_size, (b, lt)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(2, BASE.vocab_size, (b, li)).astype(np.int32),
          "decoder_target_tokens": targets,
          "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
          "decoder_loss_weights": np.ones((b, lt), np.float32),
          "task_ids": np.array([0, 1, 2, 1], np.int32)}


def _start(case):
  kind, method = CASES[case]
  extra = dict(ROUTED, n_splits=1) if kind == "poly" else ROUTED
  cfg = BASE.replace(adapter=AdapterConfig(kind=kind, **extra))
  params = _random(cfg)
  if method is None:
    return cfg, params, param_groups.param_labels(params, methods.pretraining_rules(kind))
  new_cfg, labels, frozen, trainable = adaptation.prepare_pairs(method, cfg, params, jax.random.key(0)[None])
  return new_cfg, param_groups.combine(jax.tree.map(lambda x: x[0], trainable), frozen), labels


@pytest.mark.parametrize("method", list(CASES))
def test_first_update_descends_and_loss_falls(method):
  cfg, params, labels = _start(method)
  model = models.T5(cfg)
  batch = _batch()
  if cfg.adapter.uses_task_ids and cfg.adapter.n_tasks == 1:
    batch["task_ids"] = np.zeros_like(batch["task_ids"])
  if not cfg.adapter.uses_task_ids:
    batch.pop("task_ids")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(), devices=jax.devices()[:1])
  tx = optim.make_optimizer(OPT_CFG, labels, STEPS)
  state = ts.init_train_state(model, params, labels, tx, mesh)
  trainable0 = jax.tree.map(np.asarray, state.trainable)
  grads, loss0, _, _ = jax.jit(lambda t, f, b: ts.compute_gradients(
      model, losses.LossConfig(), t, f, b, jax.random.key(0)))(state.trainable, state.frozen, batch)
  step = ts.make_train_step(model, tx, losses.LossConfig(), mesh, ts.shardings_of(state))
  state, _ = step(state, batch, jax.random.key(0))
  moved = traverse_util.flatten_dict(jax.tree.map(lambda a, b: np.asarray(a) - b, state.trainable, trainable0))
  start = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  for path, g in traverse_util.flatten_dict(jax.tree.map(np.asarray, grads)).items():
    if not np.any(g):
      # Only a fresh LoRA's A has no first gradient: its B starts at zero (docs/METHODS.md "Init").
      assert path[-1] == "lora_a" and not np.any(start[path[:-1] + ("lora_b",)]), \
          f"{method}: no gradient for {'/'.join(path)}"
      continue
    assert float(np.sum(moved[path] * g)) < 0, f"{method}: {'/'.join(path)} did not move against its gradient"
  for _ in range(STEPS):  # the metrics' loss is the one before each update: the last is after STEPS updates
    state, metrics = step(state, batch, jax.random.key(0))
  final = float(metrics["loss"])
  assert final < float(loss0) - 1e-3, f"{method}: loss {float(loss0):.4f} -> {final:.4f} after {STEPS} steps"
