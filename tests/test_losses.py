"""Losses against PyTorch: token cross-entropy (label smoothing), per-task sums, T-Few terms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mhr_jax import losses

_RNG = np.random.default_rng(0)
# Jitted once each: eager op-by-op dispatch of many tiny ops is slower than one compile on CPU.
_lm_loss = jax.jit(losses.lm_loss, static_argnums=3)
_per_task = jax.jit(losses.per_task_lm_loss, static_argnums=(4, 5))
_tfew_terms = jax.jit(losses.tfew_terms)
_tfew_counts = jax.jit(losses.tfew_counts)


def _logits(*shape):
  return (_RNG.normal(size=shape) * 2).astype(np.float32)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_loss_matches_torch_cross_entropy(smoothing):
  b, length, v = 3, 5, 11
  logits = _logits(b, length, v)
  targets = _RNG.integers(1, v, (b, length)).astype(np.int32)
  targets[0, 3:] = 0
  targets[2, 1:] = 0
  weights = (targets > 0).astype(np.float32)
  total, count = _lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                label_smoothing=smoothing)
  ref = F.cross_entropy(torch.tensor(logits).reshape(-1, v),
                        torch.tensor(targets).long().masked_fill(torch.tensor(targets) == 0, -100)
                        .reshape(-1), ignore_index=-100, reduction="sum", label_smoothing=smoothing)
  assert float(count) == weights.sum()
  np.testing.assert_allclose(float(total), float(ref), rtol=1e-5)


def test_per_task_sums_partition_the_batch_loss():
  b, length, v = 6, 4, 9
  logits = jnp.asarray(_logits(b, length, v))
  targets = jnp.asarray(_RNG.integers(0, v, (b, length)), jnp.int32)
  weights = (targets > 0).astype(jnp.float32)
  task_ids = jnp.asarray([2, 0, 2, 1, 0, 2], jnp.int32)
  sums, counts = _per_task(logits, targets, weights, task_ids, 4, 0.1)
  for t in range(4):
    rows = np.asarray(task_ids) == t
    # Zero weights outside task t: the same batch shape, so one compiled program.
    s, c = _lm_loss(logits, targets, weights * jnp.asarray(rows)[:, None], 0.1)
    np.testing.assert_allclose(float(sums[t]), float(s), rtol=1e-6, atol=1e-6)
    assert float(counts[t]) == float(c)
  assert float(counts[3]) == 0.0


def _tfew_batch(b=3, c=3, length=4, v=13):
  logits = _logits(b, c, length, v)
  targets = _RNG.integers(1, v, (b, c, length)).astype(np.int32)
  targets[0, 1, 2:] = 0
  targets[1, 2, 1:] = 0
  targets[2, 2, :] = 0              # example 2 has only two choices
  weights = (targets > 0).astype(np.float32)
  labels = np.array([1, 0, 1], np.int32)
  return logits, targets, weights, labels


def _torch_tfew(logits, targets, weights, labels):
  """T-Few's three terms, written per example and choice."""
  logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
  tok = torch.gather(logp, -1, torch.tensor(targets).long()[..., None])[..., 0]
  w = torch.tensor(weights, dtype=torch.float64)
  lm_sum = lm_n = ul_sum = ul_n = ce_sum = 0.0
  for i, gold in enumerate(labels):
    scores = []
    for j in range(targets.shape[1]):
      n = float(w[i, j].sum())
      if n == 0:
        continue
      ll = float((tok[i, j] * w[i, j]).sum())
      scores.append((j, ll / n))
      if j == gold:
        lm_sum, lm_n = lm_sum - ll, lm_n + n
      else:
        p = torch.exp(tok[i, j])
        ul_sum -= float((torch.log(1 - p) * w[i, j]).sum())
        ul_n += n
    betas = torch.tensor([s for _, s in scores])
    pos = [j for j, _ in scores].index(gold)
    ce_sum -= float(torch.log_softmax(betas, 0)[pos])
  return {"lm": (lm_sum, lm_n), "unlikelihood": (ul_sum, ul_n), "choice_ce": (ce_sum, len(labels))}


def test_tfew_terms_match_a_direct_torch_computation():
  logits, targets, weights, labels = _tfew_batch()
  terms = _tfew_terms(*(jnp.asarray(x) for x in (logits, targets, weights, labels)))
  ref = _torch_tfew(logits, targets, weights, labels)
  counts = _tfew_counts(jnp.asarray(weights), jnp.asarray(labels))
  for name, (s, n) in ref.items():
    np.testing.assert_allclose(float(terms[name][0]), s, rtol=1e-5)
    assert float(terms[name][1]) == n
    assert float(counts[name]) == n


def test_choice_log_likelihoods_and_padding_examples_stay_finite():
  logits, targets, weights, labels = _tfew_batch()
  sums, lengths = jax.jit(losses.choice_log_likelihoods)(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_array_equal(np.asarray(lengths), weights.sum(-1))
  logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
  want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(sums), (want * weights).sum(-1), rtol=1e-5)
  # A padding example (no choice tokens) adds nothing and keeps gradients finite.
  weights[2] = 0.0

  def total(lg):
    terms = losses.tfew_terms(lg, jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(labels))
    counts = losses.tfew_counts(jnp.asarray(weights), jnp.asarray(labels))
    return losses.combine_terms({k: v[0] for k, v in terms.items()}, counts)

  value, grad = jax.jit(jax.value_and_grad(total))(jnp.asarray(logits))
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  assert float(_tfew_counts(jnp.asarray(weights), jnp.asarray(labels))["choice_ce"]) == 2.0
  assert np.all(np.asarray(grad)[2] == 0.0)


def test_loss_config_validation():
  with pytest.raises(ValueError, match="LossConfig.kind"):
    losses.LossConfig(kind="mse")
  with pytest.raises(ValueError, match="LossConfig.label_smoothing"):
    losses.LossConfig(label_smoothing=1.0)
