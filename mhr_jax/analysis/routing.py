"""Routing of a pre-trained Poly / MHR run: evaluation-time weights per routing matrix, task similarity from
them, and layer names in model order (NumPy on the host)."""
from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mhr_jax.adapters import layers as adapter_layers

ADAPTER_LEAVES = ("lora_a", "lora_b", "ia3_scale")
SHARED_ROUTING = "shared"  # routing_weights_by_layer's key for AdapterConfig.routing="shared"

# Model order of module names inside a block (sorted() would put decoder before encoder, wo before q).
_MODULE_RANK = {"encoder": 0, "decoder": 1, "self_attention": 0, "cross_attention": 1, "mlp": 2,
                "q": 0, "k": 1, "v": 2, "o": 3, "wi": 4, "wi_0": 5, "wi_1": 6, "wo": 7}


def _flat(tree) -> dict[tuple[str, ...], object]:
  return traverse_util.flatten_dict(dict(tree))


def _adapter_cfg(cfg):
  """The AdapterConfig of an ExperimentConfig, a T5Config or an AdapterConfig."""
  if hasattr(cfg, "model"):
    cfg = cfg.model
  return cfg.adapter if hasattr(cfg, "adapter") else cfg


def layer_sort_key(layer: str) -> tuple:
  """Sort key putting '/'-joined module paths in model order: encoder before decoder, blocks by number,
  self-attention, cross-attention, MLP, and q, k, v, o, wi*, wo within them."""
  key = []
  for part in layer.split("/"):
    numbered = re.fullmatch(r"(\D*?)_?(\d+)", part)
    if part in _MODULE_RANK:
      key.append((0, "", _MODULE_RANK[part]))
    elif numbered:
      key.append((1, numbered.group(1), int(numbered.group(2))))
    else:
      key.append((2, part, 0))
  return tuple(key)


def adapted_layers(params) -> list[str]:
  """'/'-joined paths of the layers that carry adapter weights (lora_a, lora_b, ia3_scale), in model order."""
  layers = {"/".join(path[:-1]) for path in _flat(params) if path[-1] in ADAPTER_LEAVES}
  return sorted(layers, key=layer_sort_key)


def routing_weights_by_layer(cfg, params) -> dict[str, np.ndarray]:
  """Evaluation-time routing weights of every task, per routing matrix.

  Args:
    cfg: ExperimentConfig, T5Config or AdapterConfig of the model (its adapter settings).
    params: unboxed params tree holding .../routing/logits leaves of shape (T, S, K).
  Returns:
    {layer path: (T, S, K) float32 array}: w = s / (sum_k s + 1e-12) with s = sigmoid(Z), per task and
    head, as adapters.layers.routing_weights computes them without training noise or annealing. Layers
    are in model order; shared routing (one matrix for the model) has the single key "shared". Empty for
    params without routing (non-routed adapter kinds).
  """
  acfg = _adapter_cfg(cfg)
  out = {}
  for path, logits in _flat(params).items():
    if path[-2:] != ("routing", "logits"):
      continue
    layer = "/".join(path[:-2]) or SHARED_ROUTING
    n_tasks = logits.shape[0]
    weights = adapter_layers.routing_weights(jnp.asarray(logits), np.arange(n_tasks), acfg,
                                             training=False, rng=None)
    out[layer] = np.asarray(weights, np.float32)
  return {layer: out[layer] for layer in sorted(out, key=layer_sort_key)}


def routing_similarity(weights: Mapping[str, np.ndarray]) -> np.ndarray:
  """Cosine similarity between tasks' routing vectors.

  Args:
    weights: {layer: (T, S, K)} routing weights (e.g. `routing_weights_by_layer`, rows restricted to
      the tasks of interest); every layer must have the same T.
  Returns:
    (T, T) float64: cos(v_i, v_j) where v_t concatenates task t's weights of every layer.
  """
  if not weights:
    raise ValueError("routing_similarity: no routing weights")
  vectors = np.concatenate([np.asarray(w, np.float64).reshape(w.shape[0], -1) for w in weights.values()],
                           axis=1)
  norms = np.linalg.norm(vectors, axis=1)
  return (vectors @ vectors.T) / np.outer(norms, norms)


def cluster_order(similarity: np.ndarray) -> list[int]:
  """Row order grouping similar tasks: the leaves of an average-linkage clustering on 1 - similarity."""
  n = similarity.shape[0]
  if n < 3:
    return list(range(n))
  from scipy.cluster import hierarchy  # pylint: disable=g-import-not-at-top
  from scipy.spatial import distance  # pylint: disable=g-import-not-at-top
  dist = np.clip(1.0 - np.nan_to_num(similarity, nan=0.0), 0.0, None)
  dist = (dist + dist.T) / 2
  np.fill_diagonal(dist, 0.0)
  linkage = hierarchy.linkage(distance.squareform(dist, checks=False), method="average")
  return [int(i) for i in hierarchy.leaves_list(linkage)]
