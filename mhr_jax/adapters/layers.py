"""Adapter computations inside a T5 linear layer: LoRA, private LoRA, (IA)^3, and the routed
Poly / MHR inventory (docs/METHODS.md "Routing").

The adapter parameters live next to the layer's `kernel`, so paths read
  .../q/kernel, .../q/lora_a, .../q/lora_b, .../q/routing/logits, .../k/ia3_scale
and freezing by path regex is obvious.

Routing is per example (a batch may mix tasks). The routed delta never forms a (d_in, d_out)
matrix, per example or otherwise: it mixes the inventory into per-example (d_in, r) and
(r, d_out) factors and applies them as two thin matmuls.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mhr_jax.adapters.config import AdapterConfig

# Logical axis names of adapter parameters (partitioning.py maps them; replicated by default).
LORA_A_AXES = ("adapter_splits", "adapter_skills", "adapter_in", "adapter_rank")
LORA_B_AXES = ("adapter_splits", "adapter_skills", "adapter_rank", "adapter_out")
ROUTING_AXES = ("routing_tasks", "adapter_splits", "adapter_skills")

ROUTING_INIT_BOUND = 1e-3   # logits ~ U(-1e-3, 1e-3): a near-uniform mix of skills
NORM_EPS = 1e-12            # w = s / (sum_k s + eps), as the reference implementations


class AdapterContext(NamedTuple):
  """Per-call inputs every adapted layer needs.

  task_ids: (batch,) int32 or None.
  training: draw Gumbel-sigmoid routing noise (T5X's `enable_dropout`).
  shared_weights: (batch, S, K) routing weights when routing="shared", else None.
  anneal: scalar a in [0, 1]: w <- a w + (1 - a) / K (anneal toward uniform), or None.
  """
  task_ids: jax.Array | None
  training: bool
  shared_weights: jax.Array | None = None
  anneal: jax.Array | float | None = None


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def lora_a_bound(init_a: str, d_in: int, n_splits: int = 1) -> float:
  """Half-width b of A's U(-b, b) init (docs/METHODS.md "Init"); plain LoRA uses n_splits=1.

  "authors": b = sqrt(1/3) / sqrt(d_in) (full fan-in, the authors' code);
  "kaiming": b = 1 / sqrt(d_in / S) (PEFT's kaiming-uniform, a = sqrt(5), on each (d_in/S, r) block).
  """
  if init_a == "authors":
    return math.sqrt(1.0 / 3.0) / math.sqrt(d_in)
  return 1.0 / math.sqrt(d_in // n_splits)


def anneal_factor(step, total_steps: int, anneal_steps: int) -> jax.Array:
  """Routing annealing coefficient a for `AdapterContext.anneal` (w <- a w + (1 - a) / K).

  a = 1 until the last `anneal_steps` steps, then follows a half cosine from 1 down to 0 at step
  `total_steps`: a = (1 + cos(pi * p)) / 2, p = (step - (total_steps - anneal_steps)) / anneal_steps.
  `step` may be a traced scalar; anneal_steps = 0 gives a = 1 (no annealing).
  """
  if anneal_steps <= 0:
    return jnp.ones((), jnp.float32)
  start = total_steps - anneal_steps
  progress = jnp.clip((jnp.asarray(step, jnp.float32) - start) / anneal_steps, 0.0, 1.0)
  return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def routing_weights(logits: jax.Array, task_ids: jax.Array, cfg: AdapterConfig, training: bool,
                    rng: jax.Array | None, anneal=None) -> jax.Array:
  """Per-example mixing weights from routing logits.

  Args:
    logits: (T, S, K) routing logits.
    task_ids: (B,) task of each example.
    training: relaxed-Bernoulli sample (if cfg.gumbel) instead of the plain sigmoid.
    rng: PRNG key for the Gumbel noise (training with cfg.gumbel only).
    anneal: optional scalar a: w <- a w + (1 - a) / K (a = 0: uniform routing).
  Returns:
    (B, S, K) float32 weights, each head's row summing to 1 (up to the 1e-12 guard).
  """
  z = logits.astype(jnp.float32)[task_ids]
  if training and cfg.gumbel:
    tiny = jnp.finfo(jnp.float32).tiny
    # Relaxed Bernoulli: logistic noise log u - log(1 - u), u in (0, 1) kept off both ends.
    u = jax.random.uniform(rng, z.shape, jnp.float32, tiny, 1.0 - 1e-7)
    z = (z + jnp.log(u) - jnp.log1p(-u)) / cfg.temperature
  s = jax.nn.sigmoid(z)
  w = s / (jnp.sum(s, axis=-1, keepdims=True) + NORM_EPS)
  if anneal is not None:
    w = anneal * w + (1.0 - anneal) / cfg.n_skills
  return w


class Routing(nn.Module):
  """Routing logits Z (T, S, K) and the per-example weights they give."""
  cfg: AdapterConfig

  @nn.compact
  def __call__(self, task_ids: jax.Array, training: bool, anneal=None) -> jax.Array:
    cfg = self.cfg
    check_task_ids(task_ids, cfg.n_tasks)
    logits = self.param(
        "logits", nn.with_logical_partitioning(_uniform(ROUTING_INIT_BOUND), ROUTING_AXES),
        (cfg.n_tasks, cfg.n_splits, cfg.n_skills), jnp.float32)
    rng = self.make_rng("dropout") if (training and cfg.gumbel) else None
    w = routing_weights(logits, task_ids, cfg, training, rng, anneal)
    # Pin the weights to the batch sharding: without it XLA's partitioner mis-shards the per-example
    # mixing on (data, fsdp, model) meshes with n_splits > 1 (wrong logits, not just slow).
    return nn.with_logical_constraint(w, ("activation_batch", None, None))


def check_task_ids(task_ids, n_tasks: int) -> None:
  """ValueError for out-of-range task ids when they are concrete (gathers would clamp silently)."""
  if isinstance(task_ids, jax.core.Tracer):
    return
  ids = np.asarray(task_ids)
  if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_tasks):
    raise ValueError(f"task_ids must lie in [0, adapter.n_tasks={n_tasks}); got "
                     f"min {int(ids.min())}, max {int(ids.max())}")


def routed_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, w: jax.Array, scale: float):
  """MHR delta for a batch that may mix tasks, without forming any (d_in, d_out) matrix.

  Args:
    x: (B, L, d_in) inputs.
    a: (S, K, d_in/S, r) inventory A.  b: (S, K, r, d_out/S) inventory B.
    w: (B, S, K) per-example routing weights.
  Returns:
    (B, L, d_out): x A_t B_t * scale, per example, with A_t = stack_h sum_k w[h,k] A[h,k] (d_in, r)
    and B_t = concat_h sum_k w[h,k] B[h,k] (r, d_out); the rank is not split across heads.
  """
  bsz, length, d_in = x.shape
  rank = a.shape[-1]
  w = w.astype(x.dtype)
  # Stacking the S mixed A blocks along d_in is a reshape of (B, S, d_in/S, r); concatenating the
  # B blocks along d_out needs the rank axis first. Both per-example factors are tiny (B r d).
  a_t = jnp.einsum("bsk,skir->bsir", w, a).reshape(bsz, d_in, rank)
  b_t = jnp.einsum("bsk,skro->brso", w, b).reshape(bsz, rank, -1)
  # Pin the factors to the batch sharding: without it XLA's partitioner mis-shards the scanned
  # per-example product on (data, fsdp, model) meshes with n_splits > 1 (wrong values).
  a_t = nn.with_logical_constraint(a_t, ("activation_batch", None, None))
  b_t = nn.with_logical_constraint(b_t, ("activation_batch", None, None))
  return batched_lora(x, a_t, b_t, scale)


def batched_lora(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """x A_b B_b * scale with one (A_b, B_b) per example.

  Args:
    x: (B, L, d_in).  a: (B, d_in, r).  b: (B, r, d_out).
  Returns:
    (B, L, d_out). The scale multiplies the rank-r intermediate, not the d_out-wide output. The
    batched form (an explicit example axis on both factors, also for a shared LoRA) is what XLA's
    CPU backend runs fastest: with a plain (x @ a) @ b it transposes the backward's (tokens, d_out)
    gradients before the rank-1 products (measured: ~15% of a LoRA step at T5-base width).
  """
  h = jnp.einsum("bli,bir->blr", x, a) * scale
  return jnp.einsum("blr,bro->blo", h, b)


def apply_adapter(module: nn.Module, path: str, x: jax.Array, y: jax.Array, d_out: int,
                  cfg: AdapterConfig, ctx: AdapterContext, dtype, param_dtype) -> jax.Array:
  """Adds the configured adapter to y = x W; called from inside `module`'s compact __call__.

  Args:
    x: (B, L, d_in) layer input (compute dtype).  y: (B, L, d_out) base output.
  Returns:
    (B, L, d_out) adapted output.
  """
  d_in = x.shape[-1]
  scale = cfg.alpha / cfg.rank
  part = nn.with_logical_partitioning
  if cfg.kind == "ia3":
    s = module.param("ia3_scale", part(nn.initializers.ones, ("adapter_out",)), (d_out,),
                     param_dtype)
    return y * s.astype(dtype)

  task_ids = ctx.task_ids
  if cfg.uses_task_ids and task_ids is None:
    if cfg.n_tasks != 1:
      raise ValueError(f"adapter.kind={cfg.kind!r} with adapter.n_tasks={cfg.n_tasks} needs task_ids "
                       "(one per example)")
    task_ids = jnp.zeros((x.shape[0],), jnp.int32)

  if cfg.kind == "lora":
    a = module.param("lora_a", part(_uniform(lora_a_bound(cfg.init_a, d_in)),
                                    ("adapter_in", "adapter_rank")), (d_in, cfg.rank), param_dtype)
    b = module.param("lora_b", part(nn.initializers.zeros, ("adapter_rank", "adapter_out")),
                     (cfg.rank, d_out), param_dtype)
    bsz = x.shape[0]
    return y + batched_lora(x, jnp.broadcast_to(a.astype(dtype), (bsz,) + a.shape),
                            jnp.broadcast_to(b.astype(dtype), (bsz,) + b.shape), scale)

  if cfg.kind == "private_lora":
    a = module.param("lora_a", part(_uniform(lora_a_bound(cfg.init_a, d_in)),
                                    ("adapter_tasks", "adapter_in", "adapter_rank")),
                     (cfg.n_tasks, d_in, cfg.rank), param_dtype)
    b = module.param("lora_b", part(nn.initializers.zeros,
                                    ("adapter_tasks", "adapter_rank", "adapter_out")),
                     (cfg.n_tasks, cfg.rank, d_out), param_dtype)
    check_task_ids(task_ids, cfg.n_tasks)
    return y + batched_lora(x, a.astype(dtype)[task_ids], b.astype(dtype)[task_ids], scale)

  # poly / mhr: the routed inventory (T5Config has checked that S divides d_in and d_out; the reference code
  # does not check).
  s_, k_, r_ = cfg.n_splits, cfg.n_skills, cfg.rank
  a = module.param("lora_a", part(_uniform(lora_a_bound(cfg.init_a, d_in, s_)), LORA_A_AXES),
                   (s_, k_, d_in // s_, r_), param_dtype)
  b = module.param("lora_b", part(nn.initializers.zeros, LORA_B_AXES),
                   (s_, k_, r_, d_out // s_), param_dtype)
  if cfg.routing == "shared":
    if ctx.shared_weights is None:
      raise ValueError(f"layer {path}: adapter.routing='shared' needs AdapterContext.shared_weights")
    w = ctx.shared_weights
  else:
    w = Routing(cfg, name="routing")(task_ids, ctx.training, ctx.anneal)
  return y + routed_lora_delta(x, a.astype(dtype), b.astype(dtype), w, scale)
