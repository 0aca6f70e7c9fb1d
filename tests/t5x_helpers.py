"""Shared pieces of the T5X bridge's tests (tests/test_t5x_*.py): the skip marker, the oracle
tolerances, a tiny bridge model with its adapters switched on, and batches.

T5X is not on PyPI: the tests that need it skip when it is absent (the project's CI has no T5X). Nothing
here imports T5X or JAX at module level, so the test files import this module without T5X.
"""
import importlib.util
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_T5X = importlib.util.find_spec("t5x") is not None
NO_T5X = "T5X is not installed (it is not on PyPI; see README.md, section 'T5X')"
needs_t5x = pytest.mark.skipif(not HAS_T5X, reason=NO_T5X)

LOGITS_ATOL = 1e-5       # the same computation on both sides: float32 round-off only
SCORE_ATOL = 1e-4        # summed log-probabilities over up to 8 tokens
LOSS_ATOL = 1e-5         # float32 losses against a float64 formula or the project's own step
UPDATE_RTOL = 1e-4       # two Adafactor steps from float32 gradients that two programs sum in other
                         # orders (they agree to ~3e-6 relative; Adafactor's RMS scaling amplifies it)

TASKS, SKILLS, SPLITS = 3, 4, 4


def trained_like(params, seed=0):
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


def bridge_model(kind="mhr", n_tasks=TASKS, method=None, loss_config=None, optimizer=None,
                 module_overrides=None, **opt):
  """A tiny MhrEncoderDecoderModel with the byte vocabulary and Adafactor (routing at 100x).

  optimizer: OptimizerConfig fields over the default; module_overrides: T5Config fields (scan_layers,
  ...); opt: MhrOptimizer arguments.
  """
  import seqio
  from mhr_jax.adapters import AdapterConfig
  from mhr_jax.t5x_bridge import models as bridge_models
  from mhr_jax.t5x_bridge import optim as bridge_optim
  from mhr_jax.training import optim
  acfg = AdapterConfig(kind=kind, n_tasks=n_tasks, n_skills=SKILLS,
                       n_splits=SPLITS if kind == "mhr" else 1, rank=2)
  module = bridge_models.t5_module("tiny", acfg, **(module_overrides or {}))
  vocab = seqio.ByteVocabulary()
  config = optim.OptimizerConfig(**{"name": "adafactor", "adapter_lr": 1e-2, "routing_lr": 1.0,
                                    "warmup_steps": 0, "schedule": "constant", **(optimizer or {})})
  optimizer_def = bridge_optim.MhrOptimizer(config, method or kind, total_steps=10, **opt)
  return bridge_models.MhrEncoderDecoderModel(module, vocab, vocab, optimizer_def,
                                              loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
                                              loss_config=loss_config)


def switched_on_params(model):
  """(init variables, the init params with the adapters switched on (`trained_like`), frozen)."""
  import flax.core
  import jax
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 6)}
  variables = model.get_initial_variables(jax.random.key(0), shapes)
  return variables, flax.core.freeze(trained_like(flax.core.unfreeze(variables["params"])))


def mhr_setup():
  """(tiny MHR bridge model, its init variables, its switched-on params): the tests' usual model."""
  model = bridge_model()
  variables, params = switched_on_params(model)
  return model, variables, params


def lm_batch(n=4, li=8, lt=6, seed=1):
  """An LM batch of n rows (row 0 with 4 target tokens), task ids cycling over TASKS."""
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


def choice_batch(n=4, choices=3, li=8, lt=6, seed=2):
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


def grid_partitioner(data: int, model: int, parameter_partitioning_dims: int = 1):
  """T5X's PjitPartitioner (the bridge's axis rules) on a (data, model) grid of the CPU devices:
  on CPU T5X's own mesh puts every device on 'model', so the task ids would not be split.
  parameter_partitioning_dims=2: T5X's 2-D parameter sharding ('embed' over 'data' as well)."""
  import jax
  from t5x import partitioning as t5x_partitioning
  from mhr_jax.t5x_bridge import partitioning as bridge_partitioning

  class GridPartitioner(t5x_partitioning.PjitPartitioner):

    @property
    def mesh(self):
      return jax.sharding.Mesh(np.asarray(jax.devices()[:data * model]).reshape(data, model),
                               ("data", "model"))
  return GridPartitioner(num_partitions=model, logical_axis_rules=bridge_partitioning.logical_axis_rules(
      parameter_partitioning_dims=parameter_partitioning_dims))


def hf_dir(tmp_path, size="tiny") -> str:
  """A Hugging Face directory holding only config.json of a `models.preset(size)` T5 (no weights):
  what gin files that read HF_CHECKPOINT's architecture need."""
  import json
  from mhr_jax import models
  from mhr_jax.checkpoints import hf_t5
  path = tmp_path / f"hf_{size}"
  path.mkdir(exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf_t5.config_to_hf(models.preset(size))))
  return str(path)
