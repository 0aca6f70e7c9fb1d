"""Adapter math (docs/METHODS.md "Routing") against naive numpy references, on single layers and tiny T5s."""
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mhr_jax.adapters.config import ALL_LINEAR, ATTENTION_ONLY, AdapterConfig
from mhr_jax.adapters.layers import (AdapterContext, anneal_factor, apply_adapter, lora_a_bound,
                                     routed_lora_delta, routing_weights)
from mhr_jax.models.param_counts import abstract_params
from mhr_jax.models import T5, preset

TOL = 1e-6


# ----------------------------------------------------------------------------- helpers

class _Layer(nn.Module):
  """y = x W plus the configured adapter, as models.t5.Linear wires it."""
  cfg: AdapterConfig
  d_out: int

  @nn.compact
  def __call__(self, x, task_ids, training=False, anneal=None):
    kernel = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.d_out))
    ctx = AdapterContext(task_ids, training, None, anneal)
    return apply_adapter(self, "enc/q", x, x @ kernel, self.d_out, self.cfg, ctx, jnp.float32,
                         jnp.float32)


def _layer_params(cfg, d_in, d_out, seed, zero_b=False):
  """Layer params (unboxed) from a real init, with B (and routing) made random unless zero_b."""
  layer = _Layer(cfg, d_out)
  params = nn.unbox(layer.init(jax.random.key(seed), jnp.ones((1, 1, d_in)),
                               jnp.zeros((1,), jnp.int32)))["params"]
  rng = np.random.default_rng(seed)
  if not zero_b:
    for name in ("lora_b", "ia3_scale"):
      if name in params:
        params[name] = rng.normal(0, 0.5, params[name].shape).astype(np.float32)
    if "routing" in params:
      params["routing"]["logits"] = rng.normal(0, 2, params["routing"]["logits"].shape).astype(
          np.float32)
  return layer, params


def _np_weights(z, task_ids, eps=1e-12):
  s = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)[task_ids]))
  return s / (s.sum(-1, keepdims=True) + eps)


def _naive_routed(x, a, b, w, scale):
  """Per example: A_t (d_in, r) stacks head mixes along d_in, B_t (r, d_out) concatenates them."""
  x, a, b, w = (np.asarray(t, np.float64) for t in (x, a, b, w))
  out = []
  for i in range(x.shape[0]):
    a_t = np.concatenate([np.einsum("k,kir->ir", w[i, h], a[h]) for h in range(a.shape[0])], 0)
    b_t = np.concatenate([np.einsum("k,kro->ro", w[i, h], b[h]) for h in range(b.shape[0])], 1)
    out.append(x[i] @ a_t @ b_t * scale)
  return np.stack(out)


def model_cfg(**adapter):
  return preset("tiny", vocab_size=64).replace(adapter=AdapterConfig(**adapter))


def random_params(cfg, seed=0, adapters_seed=1):
  """Params of models.T5(cfg) from its shapes: base leaves depend only on (seed, path), so every
  adapter config shares one base; adapter leaves are random and non-zero."""
  flat = traverse_util.flatten_dict(abstract_params(cfg))
  out = {}
  for path, leaf in flat.items():
    name = "/".join(path)
    adapter = path[-1] in ("lora_a", "lora_b", "ia3_scale", "logits")
    rng = np.random.default_rng([adapters_seed if adapter else seed, zlib.crc32(name.encode())])
    if path[-1] == "kernel":
      value = rng.normal(0, leaf.shape[0] ** -0.5, leaf.shape)
    elif path[-1] == "scale":
      value = 1.0 + 0.2 * rng.normal(size=leaf.shape)
    elif path[-1] == "ia3_scale":
      value = rng.uniform(0.3, 2.0, leaf.shape)
    elif path[-1] == "logits":
      value = rng.normal(0, 2.0, leaf.shape)
    elif path[-1] == "lora_a":
      value = rng.normal(0, leaf.shape[-2] ** -0.5, leaf.shape)
    elif path[-1] == "lora_b":    # deltas about 30% of the base kernels: visible, realistic
      value = rng.normal(0, 0.3 * leaf.shape[-2] ** -0.5, leaf.shape)
    else:
      value = rng.normal(0, 1.0, leaf.shape)
    out[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(out)


BATCH = 4


def batch(vocab=64, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (BATCH, 6)).astype(np.int32)
  enc[1, 4:] = 0
  tgt = rng.integers(2, vocab, (BATCH, 4)).astype(np.int32)
  dec = np.concatenate([np.zeros((BATCH, 1), np.int32), tgt[:, :-1]], 1)
  return enc, dec, tgt


def logits(cfg, params, task_ids=None, training=False, rng=None, anneal=None, seed=0):
  enc, dec, tgt = batch(cfg.vocab_size, seed)
  rngs = {"dropout": rng} if rng is not None else {}
  return np.asarray(T5(cfg).apply({"params": params}, enc, dec, tgt, task_ids=task_ids,
                                  enable_dropout=training, routing_anneal=anneal, rngs=rngs))


# ----------------------------------------------------------------------------- routed delta

@pytest.mark.parametrize("n_splits", [1, 2, 4])
def test_routed_delta_matches_naive_per_example_reference(n_splits):
  rng = np.random.default_rng(n_splits)
  bsz, length, d_in, d_out, k, r = 3, 5, 16, 24, 3, 2
  x = rng.normal(size=(bsz, length, d_in)).astype(np.float32)
  a = rng.normal(0, 0.3, (n_splits, k, d_in // n_splits, r)).astype(np.float32)
  b = rng.normal(0, 0.3, (n_splits, k, r, d_out // n_splits)).astype(np.float32)
  w = rng.dirichlet(np.ones(k), (bsz, n_splits)).astype(np.float32)
  ours = np.asarray(routed_lora_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b),
                                      jnp.asarray(w), 0.5))
  np.testing.assert_allclose(ours, _naive_routed(x, a, b, w, 0.5), rtol=TOL, atol=TOL)


def test_routed_delta_never_forms_a_d_in_by_d_out_array():
  bsz, length, d_in, d_out, n_splits, k, r = 2, 3, 48, 40, 4, 3, 2
  jaxpr = jax.make_jaxpr(lambda *t: routed_lora_delta(*t, 1.0))(
      jnp.ones((bsz, length, d_in)), jnp.ones((n_splits, k, d_in // n_splits, r)),
      jnp.ones((n_splits, k, r, d_out // n_splits)), jnp.ones((bsz, n_splits, k)))
  shapes = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
  assert shapes
  assert all(np.prod(s) < d_in * d_out for s in shapes), shapes


@pytest.mark.parametrize("n_splits", [1, 4])
def test_layer_eval_matches_naive_reference_for_a_mixed_task_batch(n_splits):
  cfg = AdapterConfig(kind="mhr", n_splits=n_splits, n_skills=3, n_tasks=4, rank=2, alpha=3.0)
  layer, params = _layer_params(cfg, 16, 8, seed=n_splits)
  x = np.random.default_rng(0).normal(size=(4, 5, 16)).astype(np.float32)
  task_ids = np.array([3, 0, 3, 1])
  ours = np.asarray(layer.apply({"params": params}, x, task_ids))
  w = _np_weights(params["routing"]["logits"], task_ids)
  ref = x @ params["kernel"] + _naive_routed(x, params["lora_a"], params["lora_b"], w, 1.5)
  np.testing.assert_allclose(ours, ref, rtol=TOL, atol=TOL)


def test_poly_is_mhr_with_one_head():
  poly = AdapterConfig(kind="poly", n_skills=4, n_tasks=2, rank=2)
  mhr = poly.replace(kind="mhr")
  layer_p, params = _layer_params(poly, 12, 6, seed=0)
  layer_m, params_m = _layer_params(mhr, 12, 6, seed=0)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, params_m)
  x = np.random.default_rng(1).normal(size=(2, 3, 12)).astype(np.float32)
  np.testing.assert_array_equal(layer_p.apply({"params": params}, x, np.array([1, 0])),
                                layer_m.apply({"params": params}, x, np.array([1, 0])))
  with pytest.raises(ValueError, match="adapter.n_splits=2: kind 'poly'"):
    AdapterConfig(kind="poly", n_splits=2)


def test_private_lora_picks_the_task_adapter_and_lora_ia3_match_reference():
  x = np.random.default_rng(2).normal(size=(3, 4, 10)).astype(np.float32)
  cfg = AdapterConfig(kind="private_lora", n_tasks=3, rank=2, alpha=4.0)
  layer, p = _layer_params(cfg, 10, 6, seed=2)
  ids = np.array([2, 0, 2])
  ref = np.stack([x[i] @ p["kernel"] + x[i] @ p["lora_a"][t] @ p["lora_b"][t] * 2.0
                  for i, t in enumerate(ids)])
  np.testing.assert_allclose(layer.apply({"params": p}, x, ids), ref, rtol=TOL, atol=TOL)
  layer, p = _layer_params(AdapterConfig(kind="lora", rank=2, alpha=1.0), 10, 6, seed=3)
  np.testing.assert_allclose(layer.apply({"params": p}, x, None),
                             x @ p["kernel"] + x @ p["lora_a"] @ p["lora_b"] / 2, rtol=TOL, atol=TOL)
  layer, p = _layer_params(AdapterConfig(kind="ia3"), 10, 6, seed=4)
  np.testing.assert_allclose(layer.apply({"params": p}, x, None), (x @ p["kernel"]) * p["ia3_scale"],
                             rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------- routing weights

def test_eval_routing_is_normalised_sigmoid_and_gumbel_switch():
  cfg = AdapterConfig(kind="mhr", n_splits=2, n_skills=3, n_tasks=2)
  z = jnp.asarray(np.random.default_rng(0).normal(0, 2, (2, 2, 3)), jnp.float32)
  ids = jnp.array([1, 0, 1])
  w_eval = routing_weights(z, ids, cfg, False, None)
  np.testing.assert_allclose(w_eval, _np_weights(z, np.asarray(ids)), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(np.asarray(w_eval).sum(-1), 1.0, rtol=TOL)
  w1 = routing_weights(z, ids, cfg, True, jax.random.key(1))
  w2 = routing_weights(z, ids, cfg, True, jax.random.key(2))
  assert np.abs(np.asarray(w1) - np.asarray(w2)).max() > 1e-3       # noise depends on the rng
  np.testing.assert_allclose(np.asarray(w1).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(routing_weights(z, ids, cfg, True, jax.random.key(1)), w1)
  off = cfg.replace(gumbel=False)                                     # T0 setting: plain sigmoid
  np.testing.assert_array_equal(routing_weights(z, ids, off, True, jax.random.key(1)), w_eval)


@pytest.mark.parametrize("z1,tau", [(-1.0, 1.0), (0.7, 1.0), (0.7, 0.5)])
def test_gumbel_sigmoid_is_a_relaxed_bernoulli(z1, tau):
  """P(sigmoid((z + logistic) / tau) > 1/2) = sigmoid(z) for every temperature. A second skill with
  logit +60 has s = 1, so w1 = s1 / (s1 + 1) > 1/3 exactly when s1 > 1/2."""
  cfg = AdapterConfig(kind="poly", n_skills=2, n_tasks=1, temperature=tau)
  z = jnp.asarray([[[z1, 60.0]]], jnp.float32)
  w = routing_weights(z, jnp.zeros((40000,), jnp.int32), cfg, True, jax.random.key(0))
  frac = float((np.asarray(w)[:, 0, 0] > 1 / 3).mean())
  assert abs(frac - 1 / (1 + np.exp(-z1))) < 0.01


def test_annealing_toward_uniform_and_cosine_schedule():
  cfg = AdapterConfig(kind="mhr", n_splits=2, n_skills=4, n_tasks=1)
  z = jnp.asarray(np.random.default_rng(0).normal(0, 3, (1, 2, 4)), jnp.float32)
  ids = jnp.zeros((2,), jnp.int32)
  w = np.asarray(routing_weights(z, ids, cfg, False, None))
  np.testing.assert_allclose(routing_weights(z, ids, cfg, False, None, anneal=0.0), 0.25, rtol=TOL)
  np.testing.assert_allclose(routing_weights(z, ids, cfg, False, None, anneal=0.3),
                             0.3 * w + 0.7 * 0.25, rtol=TOL)
  a = jax.jit(lambda s: anneal_factor(s, 100, 20))
  for step, expected in ((0, 1.0), (80, 1.0), (85, (1 + np.cos(np.pi / 4)) / 2), (90, 0.5),
                         (100, 0.0), (130, 0.0)):
    np.testing.assert_allclose(float(a(step)), expected, atol=1e-6)
  assert float(anneal_factor(99, 100, 0)) == 1.0


# ----------------------------------------------------------------------------- inits

@pytest.mark.parametrize("kind", ["lora", "private_lora", "ia3", "poly", "mhr"])
def test_fresh_layer_computes_the_base_layer_exactly(kind):
  cfg = AdapterConfig(kind=kind, n_splits=4 if kind == "mhr" else 1, n_tasks=2, rank=2)
  layer, params = _layer_params(cfg, 16, 8, seed=0, zero_b=True)
  x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32)
  base = np.asarray(jnp.asarray(x) @ params["kernel"])
  for training in (False, True):
    out = layer.apply({"params": params}, x, np.array([1, 0]), training,
                      rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize("init_a,n_splits", [("authors", 1), ("authors", 4), ("kaiming", 4)])
def test_a_init_bounds(init_a, n_splits):
  d_in = 64
  cfg = AdapterConfig(kind="mhr", n_splits=n_splits, n_skills=8, rank=4, init_a=init_a)
  _, params = _layer_params(cfg, d_in, 8, seed=0, zero_b=True)
  bound = np.sqrt(1 / 3) / np.sqrt(d_in) if init_a == "authors" else 1 / np.sqrt(d_in / n_splits)
  assert lora_a_bound(init_a, d_in, n_splits) == pytest.approx(bound)
  a = np.abs(params["lora_a"])
  assert a.max() <= bound and a.max() > 0.9 * bound
  assert not np.any(params["lora_b"])
  z = params["routing"]["logits"]
  assert z.shape == (1, n_splits, 8) and np.abs(z).max() <= 1e-3 and np.abs(z).max() > 0


def test_fresh_t5_equals_base_t5_exactly():
  cfg = model_cfg(kind="mhr", n_splits=2, n_skills=3, n_tasks=2, rank=2)
  tok = jnp.ones((1, 1), jnp.int32)
  params = nn.unbox(T5(cfg).init(jax.random.key(0), tok, tok, tok, task_ids=jnp.zeros(1, jnp.int32),
                                 enable_dropout=False))["params"]
  flat = traverse_util.flatten_dict(params)
  base = traverse_util.unflatten_dict({p: v for p, v in flat.items()
                                       if p[-1] not in ("lora_a", "lora_b", "logits")})
  ids = np.array([1, 0, 0, 1])
  np.testing.assert_array_equal(logits(cfg, params, ids),
                                logits(cfg.replace(adapter=AdapterConfig()), base))


# ----------------------------------------------------------------------------- in the model

def test_mixed_task_batch_rows_equal_single_task_batches():
  cfg = model_cfg(kind="mhr", n_splits=4, n_skills=3, n_tasks=3, rank=2)
  params = random_params(cfg)
  mixed = np.array([2, 0, 1, 2])
  out = logits(cfg, params, mixed)
  for t in range(3):
    single = logits(cfg, params, np.full(BATCH, t))
    rows = mixed == t
    np.testing.assert_allclose(out[rows], single[rows], rtol=TOL, atol=TOL)
  assert np.abs(logits(cfg, params, np.full(BATCH, 0)) - out).max() > 1e-3


def test_shared_routing_is_one_table_and_equals_copied_layer_tables():
  shared = model_cfg(kind="mhr", n_splits=2, n_skills=3, n_tasks=2, routing="shared")
  layer = shared.replace(adapter=shared.adapter.replace(routing="layer"))
  ps, pl = abstract_params(shared), abstract_params(layer)
  routing_s = [p for p in traverse_util.flatten_dict(ps) if p[-1] == "logits"]
  routing_l = [p for p in traverse_util.flatten_dict(pl) if p[-1] == "logits"]
  n_layers = 2 * 7 + 2 * 11       # tiny: 2 encoder blocks (4 attn + 3 mlp), 2 decoder (+4 cross)
  assert routing_s == [("routing", "logits")] and len(routing_l) == n_layers
  assert all(traverse_util.flatten_dict(pl)[p].shape == (2, 2, 3) for p in routing_l)
  params_s = random_params(shared)
  flat = {p: v for p, v in traverse_util.flatten_dict(params_s).items() if p != ("routing", "logits")}
  for p in routing_l:
    flat[p] = params_s["routing"]["logits"]
  ids = np.array([1, 0, 1, 1])
  np.testing.assert_allclose(logits(shared, params_s, ids),
                             logits(layer, traverse_util.unflatten_dict(flat), ids),
                             rtol=TOL, atol=TOL)


def test_model_gumbel_training_noise_and_eval_determinism():
  cfg = model_cfg(kind="mhr", n_splits=2, n_skills=3, n_tasks=2)
  params = random_params(cfg)
  ids = np.array([0, 1, 0, 1])
  train1 = logits(cfg, params, ids, training=True, rng=jax.random.key(1))
  train2 = logits(cfg, params, ids, training=True, rng=jax.random.key(2))
  assert np.abs(train1 - train2).max() > 1e-4
  evals = logits(cfg, params, ids)
  np.testing.assert_array_equal(evals, logits(cfg, params, ids))
  off = cfg.replace(adapter=cfg.adapter.replace(gumbel=False))     # tiny has dropout_rate 0
  np.testing.assert_allclose(logits(off, params, ids, training=True, rng=jax.random.key(1)), evals,
                             rtol=TOL, atol=TOL)
  # Fully annealed routing is uniform: the task id no longer matters.
  np.testing.assert_allclose(logits(cfg, params, ids, anneal=0.0),
                             logits(cfg, params, 1 - ids, anneal=0.0), rtol=TOL, atol=TOL)
  assert np.abs(evals - logits(cfg, params, 1 - ids)).max() > 1e-3


# ----------------------------------------------------------------------------- errors and config

def test_divisibility_and_task_id_errors():
  with pytest.raises(ValueError, match=r"adapter.n_splits=3 must divide the widths of every adapted layer; "
                                       r"encoder/block_0/self_attention/q has d_in=32, d_out=32"):
    abstract_params(model_cfg(kind="mhr", n_splits=3))
  cfg = model_cfg(kind="mhr", n_splits=2, n_skills=2, n_tasks=2)
  params = random_params(cfg)
  with pytest.raises(ValueError, match="needs task_ids"):
    logits(cfg, params, None)
  with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=2\)"):
    logits(cfg, params, np.array([0, 1, 2, 0]))


def test_config_validation_and_targets():
  for kw, message in ((dict(kind="dora"), "adapter.kind='dora'"), (dict(rank=0), "adapter.rank=0"),
                      (dict(alpha=0.0), "adapter.alpha=0.0"), (dict(routing="x"), "adapter.routing"),
                      (dict(target_modules="("), "adapter.target_modules='\\('"),
                      (dict(anneal_steps=-1), "adapter.anneal_steps=-1")):
    with pytest.raises(ValueError, match=message):
      AdapterConfig(**kw)
  cfg = AdapterConfig(kind="mhr")
  assert cfg.target_regex == ALL_LINEAR and cfg.targets("decoder/block_3/cross_attention/o")
  assert cfg.targets("encoder/block_0/mlp/wi_1") and not cfg.targets("logits_dense")
  assert not AdapterConfig().targets("encoder/block_0/self_attention/q")     # kind none
  ia3 = AdapterConfig(kind="ia3")
  assert ia3.targets("encoder/block_0/mlp/wi_1") and not ia3.targets("encoder/block_0/mlp/wi_0")
  attn = AdapterConfig(kind="lora", target_modules=ATTENTION_ONLY)
  assert attn.targets("encoder/block_0/self_attention/k") and not attn.targets("encoder/block_0/mlp/wo")
