"""Adapter transforms (new task rows, MHR-mu, per-task LoRA, merging) checked through the model."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from mhr_jax.adapters import transforms
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.adapters.layers import lora_a_bound
from test_adapters import BATCH, logits, model_cfg, random_params

TOL = 1e-6         # parameter values, and logits computed by the same contractions
MODEL_TOL = 1e-5   # logits of an equivalent model whose float32 contractions run in another order


def _flat(params):
  return traverse_util.flatten_dict(params)


def _base_only(cfg, params):
  flat = {p: v for p, v in _flat(params).items()
          if p[-1] not in ("lora_a", "lora_b", "ia3_scale", "logits")}
  return cfg.replace(adapter=AdapterConfig()), traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("routing", ["layer", "shared"])
def test_add_task_rows_routed(routing):
  cfg = model_cfg(kind="mhr", n_splits=2, n_skills=3, n_tasks=2, routing=routing)
  params = random_params(cfg)
  new_cfg, new = transforms.add_task_rows(cfg, params, 2, jax.random.key(0))
  assert new_cfg.adapter.n_tasks == 4 and cfg.adapter.n_tasks == 2
  old_flat, new_flat = _flat(params), _flat(new)
  assert set(old_flat) == set(new_flat)
  for path, z in new_flat.items():
    if path[-1] == "logits":
      assert z.shape == (4, 2, 3)
      np.testing.assert_array_equal(z[:2], old_flat[path])
      assert 0 < np.abs(z[2:]).max() <= 1e-3
    else:
      assert z is old_flat[path]                                   # inventory untouched
  ids = np.array([0, 1, 3, 2])
  out = logits(new_cfg, new, ids)
  np.testing.assert_allclose(out[:2], logits(cfg, params, np.array([0, 1, 1, 0]))[:2],
                             rtol=TOL, atol=TOL)
  # A new row is a near-uniform mix: much closer to uniform routing (anneal=0) than old tasks are.
  uniform = logits(cfg, params, np.zeros(BATCH, np.int32), anneal=0.0)
  old_gap = np.abs(logits(cfg, params, np.array([0, 1, 0, 1])) - uniform).max()
  assert np.abs(out[2:] - uniform[2:]).max() < 0.01 * old_gap


def test_add_task_rows_private_lora_starts_at_the_base_model():
  cfg = model_cfg(kind="private_lora", n_tasks=2, rank=2)
  params = random_params(cfg)
  new_cfg, new = transforms.add_task_rows(cfg, params, 1, jax.random.key(1))
  a = new["encoder"]["block_0"]["mlp"]["wo"]["lora_a"]
  assert a.shape == (3, 64, 2)
  assert 0 < np.abs(a[2]).max() <= lora_a_bound("authors", 64)
  assert not np.any(new["encoder"]["block_0"]["mlp"]["wo"]["lora_b"][2])
  out = logits(new_cfg, new, np.array([2, 0, 2, 1]))
  base = logits(*_base_only(cfg, params))
  np.testing.assert_allclose(out[[0, 2]], base[[0, 2]], rtol=TOL, atol=TOL)
  assert np.abs(out[1] - base[1]).max() > 1e-3


def test_to_mu_is_mean_a_times_mean_b_and_equals_uniform_routing():
  cfg = model_cfg(kind="mhr", n_splits=4, n_skills=3, n_tasks=2, rank=2)
  params = random_params(cfg)
  mu_cfg, mu = transforms.to_mu(cfg, params)
  assert mu_cfg.adapter.kind == "lora" and mu_cfg.adapter.rank == 2
  assert not any(p[-1] == "logits" for p in _flat(mu))
  layer = params["decoder"]["block_1"]["cross_attention"]["v"]
  a, b = layer["lora_a"], layer["lora_b"]                  # (S, K, d_in/S, r), (S, K, r, d_out/S)
  a_mu = np.concatenate([a[h].mean(0) for h in range(4)], axis=0)
  b_mu = np.concatenate([b[h].mean(0) for h in range(4)], axis=1)
  got = mu["decoder"]["block_1"]["cross_attention"]["v"]
  np.testing.assert_allclose(got["lora_a"], a_mu, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got["lora_b"], b_mu, rtol=TOL, atol=TOL)
  # Not the mean of the per-skill products.
  mean_products = sum(np.concatenate([a[h, k] for h in range(4)], 0) @
                      np.concatenate([b[h, k] for h in range(4)], 1) for k in range(3)) / 3
  assert np.abs(a_mu @ b_mu - mean_products).max() > 1e-3
  out = logits(mu_cfg, mu)                                   # a plain LoRA model: no task ids
  np.testing.assert_allclose(out, logits(cfg, params, np.array([0, 1, 1, 0]), anneal=0.0),
                             rtol=MODEL_TOL, atol=MODEL_TOL)


@pytest.mark.parametrize("kind,routing", [("mhr", "layer"), ("mhr", "shared"), ("poly", "layer"),
                                          ("private_lora", "layer")])
def test_extract_task_lora_reproduces_each_task(kind, routing):
  cfg = model_cfg(kind=kind, n_splits=2 if kind == "mhr" else 1, n_skills=3, n_tasks=3, rank=2,
                  routing=routing)
  params = random_params(cfg)
  ids = np.array([2, 0, 1, 2])
  routed = logits(cfg, params, ids)
  for t in range(3):
    lora_cfg, lora = transforms.extract_task_lora(cfg, params, t)
    assert lora_cfg.adapter.kind == "lora"
    assert lora["encoder"]["block_0"]["self_attention"]["q"]["lora_a"].shape == (32, 2)
    out = logits(lora_cfg, lora)
    np.testing.assert_allclose(out[ids == t], routed[ids == t], rtol=MODEL_TOL, atol=MODEL_TOL)
  with pytest.raises(ValueError, match=r"task_id=3 outside \[0, adapter.n_tasks=3\)"):
    transforms.extract_task_lora(cfg, params, 3)


@pytest.mark.parametrize("kind", ["lora", "ia3", "mhr", "private_lora"])
def test_merge_into_base_is_exact(kind):
  cfg = model_cfg(kind=kind, n_splits=2 if kind == "mhr" else 1, n_skills=3, n_tasks=2, rank=2,
                  alpha=2.0)
  params = random_params(cfg)
  task = 1 if cfg.adapter.uses_task_ids else None
  merged_cfg, merged = transforms.merge_into_base(cfg, params, task)
  assert merged_cfg.adapter.kind == "none"
  assert set(_flat(merged)) == set(_flat(_base_only(cfg, params)[1]))
  ids = np.full(BATCH, 1) if task is not None else None
  adapted = logits(cfg, params, ids)
  np.testing.assert_allclose(logits(merged_cfg, merged), adapted, rtol=MODEL_TOL, atol=MODEL_TOL)
  assert np.abs(adapted - logits(*_base_only(cfg, params))).max() > 1e-2
  if task is not None:
    with pytest.raises(ValueError, match="needs task_id"):
      transforms.merge_into_base(cfg, params)


def test_select_task_rows_keeps_and_reorders_tasks():
  cfg = model_cfg(kind="mhr", n_splits=2, n_skills=3, n_tasks=3)
  params = random_params(cfg)
  sel_cfg, sel = transforms.select_task_rows(cfg, params, [2, 0])
  assert sel_cfg.adapter.n_tasks == 2
  np.testing.assert_allclose(logits(sel_cfg, sel, np.array([0, 1, 1, 0])),
                             logits(cfg, params, np.array([2, 0, 0, 2])), rtol=TOL, atol=TOL)


def test_transform_kind_errors():
  cfg = model_cfg(kind="lora")
  params = random_params(cfg)
  with pytest.raises(ValueError, match="to_mu: adapter.kind='lora' has no skill inventory"):
    transforms.to_mu(cfg, params)
  with pytest.raises(ValueError, match="add_task_rows: adapter.kind='lora'"):
    transforms.add_task_rows(cfg, params, 1, jax.random.key(0))
  with pytest.raises(ValueError, match="has no tasks; pass task_id=None"):
    transforms.merge_into_base(cfg, params, 0)
  # The AdapterConfig form works as well as the T5Config form.
  acfg, _ = transforms.merge_into_base(cfg.adapter, params)
  assert isinstance(acfg, AdapterConfig) and acfg.kind == "none"
