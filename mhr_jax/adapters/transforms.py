"""Pure transforms of adapted parameter trees (docs/METHODS.md "Few-shot adaptation variants").

Every function takes a config and an UNBOXED params tree (nested dicts, as `flax.linen.unbox`
returns them, without the "params" wrapper) and returns `(new_cfg, new_params)`; inputs are never
modified. `cfg` may be a `models.T5Config` (the adapter settings are its `.adapter`) or an
`AdapterConfig`; the returned config has the same type.

  add_task_rows      fresh routing rows (or private adapters) for new tasks: Poly / MHR / MHR-z
  to_mu              MHR-mu / Poly-mu: the skill-averaged inventory as one plain LoRA
  extract_task_lora  the single LoRA one task effectively uses at evaluation
  select_task_rows   keep (and reorder) some tasks' routing rows or private adapters
  merge_into_base    fold a LoRA / one task's adapter / (IA)^3 into the base kernels

Zero-shot MHR-mu is `to_mu` applied to the multi-task pre-trained params; the resulting plain
LoRA is trained a few more steps on the multi-task mixture (labels from `params.default_rules
("mhr-mu")`) and evaluated on unseen tasks without task ids.

Both parameter layouts are accepted (`T5Config.scan_layers`, see `models.layout`), and the result
keeps the layout it was given. In the scanned layout the leaves of `<stack>/layers/...` carry a
leading layer axis, so every shape below may have leading axes; random draws are made per layer in
the unscanned layer order, so a transform gives the same numbers in both layouts.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.adapters.layers import ROUTING_INIT_BOUND, lora_a_bound, routing_weights

Path = tuple[str, ...]
ADAPTER_LEAVES = ("lora_a", "lora_b", "ia3_scale")
ROUTING = ("routing", "logits")
_STACKS = ("encoder", "decoder")
_LAYERS = "layers"   # models.t5.LAYERS (not imported: models imports this package)


def _adapter_cfg(cfg) -> AdapterConfig:
  return cfg if isinstance(cfg, AdapterConfig) else cfg.adapter


def _with_adapter(cfg, acfg: AdapterConfig):
  return acfg if isinstance(cfg, AdapterConfig) else cfg.replace(adapter=acfg)


def _flat(params) -> dict[Path, Any]:
  return traverse_util.flatten_dict(dict(params))


def _unflat(flat: dict[Path, Any]) -> dict:
  return traverse_util.unflatten_dict(flat)


def adapted_layers(params) -> list[Path]:
  """Module paths (tuples) of the layers that carry adapter weights, in sorted order."""
  return sorted({p[:-1] for p in _flat(params) if p[-1] in ADAPTER_LEAVES})


def routing_paths(params) -> list[Path]:
  """Paths of every routing-logits leaf (per layer, or the root one for shared routing)."""
  return sorted(p for p in _flat(params) if p[-2:] == ROUTING)


def _layer_paths(path: Path, leaf) -> list[tuple[Path, int | None]]:
  """(unscanned path, layer index) of each layer a leaf holds: one (path, None) for an unscanned
  leaf; for a scanned leaf `<stack>/layers/<rest>` of leading size L, (<stack>/block_i/<rest>, i)."""
  if len(path) > 2 and path[0] in _STACKS and path[1] == _LAYERS:
    return [((path[0], f"block_{i}") + path[2:], i) for i in range(leaf.shape[0])]
  return [(path, None)]


def _draw_per_layer(flat, paths: list[Path], rng, draw) -> dict[Path, Any]:
  """{path: draw(key, one layer's leaf)} with the layers of scanned leaves stacked.

  Keys are split over the unscanned paths in sorted order, so both layouts draw the same numbers.
  """
  slots = sorted((upath, path, i) for path in paths for upath, i in _layer_paths(path, flat[path]))
  draws: dict[Path, dict] = {}
  for (_, path, i), key in zip(slots, jax.random.split(rng, len(slots))):
    leaf = flat[path]
    draws.setdefault(path, {})[i] = draw(key, leaf if i is None else leaf[i])
  return {p: d[None] if None in d else jnp.stack([d[i] for i in range(len(d))])
          for p, d in draws.items()}


def _check_task(acfg: AdapterConfig, task_id: int, what: str) -> None:
  if not 0 <= int(task_id) < acfg.n_tasks:
    raise ValueError(f"{what}: task_id={task_id} outside [0, adapter.n_tasks={acfg.n_tasks})")


def _routing_logits(flat, layer: Path, acfg: AdapterConfig):
  """(T, S, K) logits that route `layer`: its own, or the root table for shared routing."""
  key = layer + ROUTING if acfg.routing == "layer" else ROUTING
  if key not in flat:
    raise ValueError(f"params have no routing logits at {'/'.join(key)} "
                     f"(adapter.routing={acfg.routing!r})")
  return flat[key]


def _mix(a, b, w):
  """One head-mixed LoRA from an inventory (leading axes, e.g. layers, pass through).

  Args:
    a: (..., S, K, d_in/S, r).  b: (..., S, K, r, d_out/S).  w: (..., S, K) mixing weights.
  Returns:
    A (..., d_in, r): the S mixed blocks stacked along the input dim; B (..., r, d_out): the mixed
    blocks concatenated along the output dim (docs/METHODS.md: the rank is not split).
  """
  s, _, d_in_s, r = a.shape[-4:]
  d_out_s = b.shape[-1]
  lead = a.shape[:-4]
  a32, b32, w32 = (jnp.asarray(t, jnp.float32) for t in (a, b, w))
  w32 = jnp.broadcast_to(w32, lead + w32.shape[-2:])
  a_t = jnp.einsum("...sk,...skir->...sir", w32, a32).reshape(lead + (s * d_in_s, r))
  b_t = jnp.einsum("...sk,...skro->...rso", w32, b32).reshape(lead + (r, s * d_out_s))
  return a_t.astype(a.dtype), b_t.astype(b.dtype)


def _drop_routing(flat) -> dict:
  return {p: v for p, v in flat.items() if p[-2:] != ROUTING}


def _lora_cfg(acfg: AdapterConfig) -> AdapterConfig:
  """The plain-LoRA config a routed / private adapter collapses to (same targets, rank, alpha)."""
  return acfg.replace(kind="lora", n_splits=1, routing="layer")


def add_task_rows(cfg, params, n_new: int, rng: jax.Array, init: str = "uniform"):
  """Appends `n_new` tasks (ids T .. T + n_new - 1) to a routed or private-LoRA model.

  Poly / MHR: every routing-logits table (T, S, K) gets n_new rows, drawn U(-1e-3, 1e-3) (init
  "uniform": a near-uniform skill mix; docs/METHODS.md) or equal to the mean of its T rows (init "mean":
  the average routing of the known tasks); the inventory is unchanged. Private LoRA ("uniform" only):
  every layer gets n_new fresh adapters (A with the configured init, B = 0, so a new task starts as
  the base model).

  Returns:
    (cfg with adapter.n_tasks = T + n_new, params).
  """
  acfg = _adapter_cfg(cfg)
  if not acfg.uses_task_ids:
    raise ValueError(f"add_task_rows: adapter.kind={acfg.kind!r} has no per-task rows")
  if n_new < 1:
    raise ValueError(f"add_task_rows: n_new={n_new} must be >= 1")
  if init not in ("uniform", "mean") or (init == "mean" and not acfg.routed):
    raise ValueError(f"add_task_rows: init={init!r}: expected 'uniform', or 'mean' for a routed adapter")
  flat = dict(_flat(params))
  if acfg.routed:
    keys = routing_paths(params)
    if not keys:
      raise ValueError("add_task_rows: params have no routing logits")
    if init == "mean":
      rows_of = {key: jnp.repeat(jnp.mean(jnp.asarray(flat[key], jnp.float32), axis=-3, keepdims=True),
                                 n_new, axis=-3) for key in keys}
    else:
      draw = lambda key, z: jax.random.uniform(key, (n_new,) + z.shape[1:], jnp.float32,
                                               -ROUTING_INIT_BOUND, ROUTING_INIT_BOUND)
      rows_of = _draw_per_layer(flat, keys, rng, draw)
    for key, rows in rows_of.items():
      z = flat[key]                                            # (..., T, S, K)
      flat[key] = jnp.concatenate([z, rows.astype(z.dtype)], axis=-3)
  else:
    layers = adapted_layers(params)
    a_paths = [layer + ("lora_a",) for layer in layers]

    def draw(key, a):                                          # a: (T, d_in, r)
      bound = lora_a_bound(acfg.init_a, a.shape[1])
      return jax.random.uniform(key, (n_new,) + a.shape[1:], jnp.float32, -bound, bound)

    for path, new_a in _draw_per_layer(flat, a_paths, rng, draw).items():
      a, b = flat[path], flat[path[:-1] + ("lora_b",)]         # (..., T, d_in, r), (..., T, r, d_out)
      flat[path] = jnp.concatenate([a, new_a.astype(a.dtype)], axis=-3)
      zeros = jnp.zeros(b.shape[:-3] + (n_new,) + b.shape[-2:], b.dtype)
      flat[path[:-1] + ("lora_b",)] = jnp.concatenate([b, zeros], axis=-3)
  return _with_adapter(cfg, acfg.replace(n_tasks=acfg.n_tasks + n_new)), _unflat(flat)


def select_task_rows(cfg, params, task_ids: Sequence[int]):
  """Keeps the routing rows (or private adapters) of `task_ids`, in that order.

  New task i is old task task_ids[i]; e.g. keep one adapted task for export. Returns
  (cfg with adapter.n_tasks = len(task_ids), params).
  """
  acfg = _adapter_cfg(cfg)
  if not acfg.uses_task_ids:
    raise ValueError(f"select_task_rows: adapter.kind={acfg.kind!r} has no per-task rows")
  ids = [int(t) for t in task_ids]
  if not ids:
    raise ValueError("select_task_rows: task_ids is empty")
  for t in ids:
    _check_task(acfg, t, "select_task_rows")
  idx = np.asarray(ids)
  flat = dict(_flat(params))
  if acfg.routed:
    keys = routing_paths(params)
  else:
    keys = [layer + (leaf,) for layer in adapted_layers(params) for leaf in ("lora_a", "lora_b")]
  for key in keys:
    flat[key] = flat[key][..., idx, :, :]        # the task axis is third from last in every leaf
  return _with_adapter(cfg, acfg.replace(n_tasks=len(ids))), _unflat(flat)


def to_mu(cfg, params):
  """MHR-mu / Poly-mu: drop routing; each head's adapter becomes mean_k A[h,k], mean_k B[h,k].

  Per layer: A_mu (d_in, r) stacks the S head means of A along the input dim, B_mu (r, d_out)
  concatenates the head means of B along the output dim. This is the mean of A times the mean of
  B, not the mean of the products; it equals the routed model under uniform routing (w = 1/K).

  Returns:
    (cfg with adapter.kind = "lora", params with plain lora_a (d_in, r), lora_b (r, d_out) and no
    routing logits).
  """
  acfg = _adapter_cfg(cfg)
  if not acfg.routed:
    raise ValueError(f"to_mu: adapter.kind={acfg.kind!r} has no skill inventory to average (poly, mhr)")
  flat = _drop_routing(_flat(params))
  for layer in adapted_layers(params):
    a, b = flat[layer + ("lora_a",)], flat[layer + ("lora_b",)]
    uniform = jnp.full(a.shape[-4:-2], 1.0 / a.shape[-3], jnp.float32)
    flat[layer + ("lora_a",)], flat[layer + ("lora_b",)] = _mix(a, b, uniform)
  return _with_adapter(cfg, _lora_cfg(acfg)), _unflat(flat)


def extract_task_lora(cfg, params, task_id: int, anneal: float | None = None):
  """The plain LoRA that task `task_id` uses at evaluation.

  Poly / MHR: per layer, w = normalised sigmoid(Z[task_id]) (S, K) (optionally annealed, as the
  model's `routing_anneal`), A_t = stack_h sum_k w[h,k] A[h,k] (d_in, r), B_t = concat_h
  sum_k w[h,k] B[h,k] (r, d_out). Private LoRA: the task's own (A, B). A model with the result
  computes exactly what the routed model computes for that task with enable_dropout=False.

  Returns:
    (cfg with adapter.kind = "lora", params with plain lora_a / lora_b and no routing logits).
  """
  acfg = _adapter_cfg(cfg)
  if not acfg.uses_task_ids:
    raise ValueError(f"extract_task_lora: adapter.kind={acfg.kind!r} has no per-task adapter")
  _check_task(acfg, task_id, "extract_task_lora")
  full = _flat(params)
  flat = _drop_routing(full)
  tid = jnp.asarray([int(task_id)], jnp.int32)
  for layer in adapted_layers(params):
    a, b = flat[layer + ("lora_a",)], flat[layer + ("lora_b",)]
    if acfg.routed:
      weights = lambda z: routing_weights(z, tid, acfg, False, None, anneal)[0]   # (T, S, K) -> (S, K)
      logits = _routing_logits(full, layer, acfg)
      for _ in range(logits.ndim - 3):                          # scanned layers: one table each
        weights = jax.vmap(weights)
      flat[layer + ("lora_a",)], flat[layer + ("lora_b",)] = _mix(a, b, weights(logits))
    else:
      t = int(task_id)
      flat[layer + ("lora_a",)], flat[layer + ("lora_b",)] = a[..., t, :, :], b[..., t, :, :]
  return _with_adapter(cfg, _lora_cfg(acfg)), _unflat(flat)


def merge_into_base(cfg, params, task_id: int | None = None):
  """Folds the adapter into the base kernels, giving a base-model params tree.

  LoRA: W + A B (alpha / r). (IA)^3 output scale s: W diag(s). Private LoRA / Poly / MHR need
  `task_id` and merge `extract_task_lora(cfg, params, task_id)` (evaluation routing). The sums
  are formed in float32 and cast back to the kernel dtype.

  Returns:
    (cfg with adapter.kind = "none", params with only base weights).
  """
  acfg = _adapter_cfg(cfg)
  if acfg.kind == "none":
    raise ValueError("merge_into_base: adapter.kind='none' has no adapter to merge")
  if acfg.uses_task_ids:
    if task_id is None:
      raise ValueError(f"merge_into_base: adapter.kind={acfg.kind!r} needs task_id "
                       "(which task to merge)")
    cfg, params = extract_task_lora(cfg, params, task_id)
    acfg = _adapter_cfg(cfg)
  elif task_id is not None:
    raise ValueError(f"merge_into_base: adapter.kind={acfg.kind!r} has no tasks; pass task_id=None")
  flat = dict(_flat(params))
  for layer in adapted_layers(params):
    kernel = flat[layer + ("kernel",)]
    w = jnp.asarray(kernel, jnp.float32)
    if acfg.kind == "ia3":
      w = w * jnp.asarray(flat.pop(layer + ("ia3_scale",)), jnp.float32)[..., None, :]
    else:
      a = jnp.asarray(flat.pop(layer + ("lora_a",)), jnp.float32)
      b = jnp.asarray(flat.pop(layer + ("lora_b",)), jnp.float32)
      w = w + (a @ b) * (acfg.alpha / acfg.rank)
    flat[layer + ("kernel",)] = w.astype(kernel.dtype)
  return _with_adapter(cfg, acfg.replace(kind="none")), _unflat(flat)
