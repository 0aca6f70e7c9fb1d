"""Gumbel-sigmoid routing noise against torch's RelaxedBernoulli, at temperatures other than 1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.adapters.layers import routing_weights

N = 20000
P_SAME = 1e-3       # a two-sample test of equal distributions must not reject at this level
P_DIFFERENT = 1e-6  # ... and must reject a wrong temperature far below it
LOGITS = [0.8, -0.5, 0.2]


def _ours(tau: float) -> np.ndarray:
  cfg = AdapterConfig(kind="poly", n_skills=len(LOGITS), n_tasks=1, temperature=tau)
  z = jnp.asarray([[LOGITS]], jnp.float32)
  return np.asarray(routing_weights(z, jnp.zeros((N,), jnp.int32), cfg, True, jax.random.key(0)))[:, 0]


def _torch(tau: float) -> np.ndarray:
  """Samples s ~ RelaxedBernoulli(tau, logits) per skill, normalised per head as the paper does."""
  torch.manual_seed(0)
  dist = torch.distributions.RelaxedBernoulli(torch.tensor(tau), logits=torch.tensor(LOGITS))
  s = dist.sample((N,)).double().numpy()
  return s / (s.sum(-1, keepdims=True) + 1e-12)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gumbel_sigmoid_weights_match_relaxed_bernoulli(tau):
  ours, ref = _ours(tau), _torch(tau)
  for k in range(len(LOGITS)):
    assert stats.ks_2samp(ours[:, k], ref[:, k]).pvalue > P_SAME, f"skill {k} at tau={tau}"
  other = _torch(2.0 if tau == 0.5 else 0.5)   # the test can tell temperatures apart
  assert stats.ks_2samp(ours[:, 0], other[:, 0]).pvalue < P_DIFFERENT
