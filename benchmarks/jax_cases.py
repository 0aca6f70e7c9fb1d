"""The project's side of benchmarks/step.py: matmul peak, train steps, evaluation, adaptation pairs.

Every runner takes the benchmark settings (`Settings`) and returns result records (dicts, see
`record`); one device (the GPU lent, or the whole CPU). Weights are random and initialised one leaf
at a time (one small jit per leaf shape):
a single jit over the whole T5-XL tree took more than 95 s to compile on a GPU. Nothing here
imports TensorFlow, SeqIO, gin or mhr_jax.data / tasks, so it runs on the GPU image as it is.
"""
from __future__ import annotations

import functools
import gc
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from benchmarks.common import (Settings, Timed, adapter_config, compiled_peak_bytes,
                               forward_flops, record, synthetic_batch, time_cases, train_flops)
from mhr_jax.models import param_counts
from mhr_jax.evaluation import decoding
from mhr_jax.training import losses, optim
from mhr_jax import partitioning
from mhr_jax.training import train_step as ts
from mhr_jax.adapters import methods
from mhr_jax.adapters import params as param_groups
from mhr_jax.models import T5, preset

GB = 1e9


def model_config(s: Settings, method: str, n_tasks: int | None = None):
  """The T5Config of a case: the preset, its overrides, the method's adapter."""
  overrides = dict(dtype=s.dtype, dropout_rate=0.0, **s.model_overrides)
  return preset(s.preset, adapter=adapter_config(s, method, n_tasks), **overrides)


def _mesh():
  # One device: the benchmark measures one chip (the GPU lent, or the whole CPU).
  return partitioning.make_mesh(partitioning.MeshConfig(), devices=jax.devices()[:1])


@functools.lru_cache(maxsize=None)
def _leaf_init(shape, dtype, kind):
  """A jitted initialiser for one leaf shape: normal(0, std) (kind "normal") or ones."""
  def init(key, std):
    if kind == "ones":
      return jnp.ones(shape, dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return jax.jit(init)


def random_params(cfg, seed: int = 0) -> dict:
  """Unboxed random params of `models.T5(cfg)` on the default device, initialised leaf by leaf.

  Kernels get std fan_in**-0.5 (fan-in: the second-to-last dim), norm scales 1, everything else
  std 1 (embeddings, position biases) or 0.02 (adapters, routing): scales that keep a random
  model's activations finite in bf16; the values do not change the cost.
  """
  flat = traverse_util.flatten_dict(param_counts.abstract_params(cfg))
  root = jax.random.key(seed)
  out = {}
  for i, (path, leaf) in enumerate(sorted(flat.items())):
    name = path[-1]
    kind, std = "normal", 1.0
    if name == "scale":
      kind = "ones"
    elif name in ("lora_a", "lora_b", "logits", "ia3_scale"):
      std = 0.02
    elif name == "kernel":
      std = leaf.shape[-2] ** -0.5
    init = _leaf_init(tuple(leaf.shape), leaf.dtype, kind)
    out[path] = init(jax.random.fold_in(root, i), jnp.float32(std))
  return traverse_util.unflatten_dict(out)


def matmul_peak(s: Settings) -> list[dict]:
  """The best of a few timed (n x n) @ (n x n) matmuls in the benchmark's compute dtype."""
  n = s.matmul_n
  dtype = jnp.dtype(s.dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  t0 = time.perf_counter()
  f(a, a).block_until_ready()
  compile_s = time.perf_counter() - t0
  best = float("inf")
  for _ in range(max(s.steps + 2, 10)):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  flops = 2.0 * n ** 3
  return [record("peak", "jax", "matmul", "-", 0, s, compile_s=compile_s, step_s=best,
                 flops=flops, tflops_per_s=flops / best / 1e12,
                 note=f"{n}x{n} {dtype.name} matmul")]


def _timed_steps(fn, steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _train_state(s: Settings, method: str, n_tasks: int | None = None):
  cfg = model_config(s, method, n_tasks)
  model, mesh = T5(cfg), _mesh()
  params = random_params(cfg)
  labels = param_groups.param_labels(params, method)
  opt = optim.make_optimizer(optim.OptimizerConfig(name=s.optimizer, schedule="constant",
                                                   warmup_steps=0), labels, total_steps=1000)
  state = ts.init_train_state(model, params, labels, opt, mesh)
  del params
  return cfg, model, mesh, labels, opt, state


def _lower(step_fn, mesh, state, batch, rng):
  """Lowers the jitted program inside `train_step.make_train_step`'s wrapper for (state, batch).

  Ahead-of-time compilation gives the exact compile time and XLA's memory plan, and the compiled
  program is the one the wrapper runs: fn(frozen, (step, trainable, opt_state), batch, rng) ->
  ((step, trainable, opt_state), metrics), with the mutable part donated.
  """
  jitted = getattr(step_fn, "jitted", None)
  if jitted is None:   # the wrapper closes over it (train_step.make_train_step)
    cells = dict(zip(step_fn.__code__.co_freevars, step_fn.__closure__ or ()))
    if "jitted" not in cells:
      raise RuntimeError("train_step.make_train_step no longer exposes its jitted program")
    jitted = cells["jitted"].cell_contents
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_RULES):
    return jitted.lower(state.frozen, (state.step, state.trainable, state.opt_state), batch, rng)


def prepare_train(s: Settings, method: str, batch_size: int) -> list[Timed]:
  """The project's jitted train step (frozen base split out, state donated) of `method`, ready to
  time: kind mhr / poly also on a mixed-task batch, with the same compiled program.

  Compiled ahead of time (lower + compile), so compile time and XLA's memory plan are exact. Peak
  memory is what XLA's buffer assignment needs: arguments + outputs + temporaries - donated aliases.
  """
  cfg, model, mesh, labels, opt, state = _train_state(s, method)
  step_fn = ts.make_train_step(model, opt, losses.LossConfig(), mesh, ts.shardings_of(state))
  variants = [("single", False)] + ([("mixed", True)] if cfg.adapter.routed else [])
  batches = {tasks: partitioning.global_batch(
      synthetic_batch(cfg, batch_size, s.input_len, s.target_len, mixed), mesh)
      for tasks, mixed in variants}
  rng = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = _lower(step_fn, mesh, state, batches["single"], rng).compile()
  compile_s = time.perf_counter() - t0
  fields = dict(side="jax", kind="train", method=method, batch=batch_size, compile_s=compile_s,
                peak_memory_gb=compiled_peak_bytes(compiled) / GB,
                flops=train_flops(cfg, batch_size, s.input_len, s.target_len,
                                  trains_base=methods.get(method).trains_base),
                tokens=batch_size * (s.input_len + s.target_len))
  frozen, holder = state.frozen, {"mutable": (state.step, state.trainable, state.opt_state)}
  del state

  def once(batch):
    holder["mutable"], metrics = compiled(frozen, holder["mutable"], batch, rng)
    return jax.block_until_ready(metrics["loss"])

  return [Timed(f"train/{method}/{tasks}/b{batch_size}",
                functools.partial(once, batches[tasks]), dict(fields, tasks=tasks))
          for tasks, _ in variants]


def train(s: Settings, method: str, batch_size: int) -> list[dict]:
  """Records of `prepare_train`'s cases, timed one after the other."""
  out = time_cases(prepare_train(s, method, batch_size), s)
  _free()
  return out


def compile_only(s: Settings, method: str, batch_size: int) -> list[dict]:
  """Lower + compile the train step on ShapeDtypeStructs: no weights are ever allocated."""
  cfg = model_config(s, method)
  model, mesh = T5(cfg), _mesh()
  abstract = param_counts.abstract_params(cfg)
  labels = param_groups.param_labels(abstract, method)
  opt = optim.make_optimizer(optim.OptimizerConfig(name=s.optimizer, schedule="constant",
                                                   warmup_steps=0), labels, total_steps=1000)
  state = ts.abstract_train_state(model, labels, opt, mesh)
  step_fn = ts.make_train_step(model, opt, losses.LossConfig(), mesh, ts.shardings_of(state))
  host = synthetic_batch(cfg, batch_size, s.input_len, s.target_len, False)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioning.batch_sharding(mesh))
           for k, v in host.items()}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  t0 = time.perf_counter()
  lowered = _lower(step_fn, mesh, state, batch, rng)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s
  layout = f"scan_layers={cfg.scan_layers}, remat_policy={cfg.remat_policy}"
  return [record(f"compile/{method}/b{batch_size}", "jax", "compile", method, batch_size, s,
                 compile_s=compile_s, lower_s=lower_s,
                 peak_memory_gb=compiled_peak_bytes(compiled) / GB, note=layout)]


def _eval_setup(s: Settings, batch_size: int):
  cfg = model_config(s, s.eval_method)
  model = T5(cfg)
  params = random_params(cfg)
  host = synthetic_batch(cfg, batch_size, s.input_len, s.target_len, True)
  return cfg, model, params, host


def score(s: Settings, batch_size: int) -> list[dict]:
  """Rank classification: summed log-likelihood of `choices` targets per input (encoded once)."""
  cfg, model, params, host = _eval_setup(s, batch_size)
  rng = np.random.default_rng(1)
  targets = rng.integers(2, cfg.vocab_size, (batch_size, s.choices, s.choice_len)).astype(np.int32)
  enc, tids = jnp.asarray(host["encoder_input_tokens"]), jnp.asarray(host["task_ids"])
  run = lambda: jax.block_until_ready(decoding.score_sequences(model, params, enc, targets, tids))
  t0 = time.perf_counter()
  run()
  first_s = time.perf_counter() - t0
  times = _timed_steps(run, s.steps)
  flops = forward_flops(cfg, batch_size, s.input_len, s.choice_len, choices=s.choices)
  tokens = batch_size * (s.input_len + s.choices * s.choice_len)
  _free()
  return [record(f"score/{s.eval_method}/b{batch_size}", "jax", "score", s.eval_method,
                 batch_size, s, tasks="mixed", first_step_s=first_s, times=times, flops=flops,
                 tokens=tokens, note=f"{s.choices} choices x {s.choice_len} tokens")]


def greedy(s: Settings, batch_size: int) -> list[dict]:
  """Greedy decoding of exactly `decode_len` tokens (EOS disabled) with the KV cache."""
  cfg, model, params, host = _eval_setup(s, batch_size)
  enc, tids = jnp.asarray(host["encoder_input_tokens"]), jnp.asarray(host["task_ids"])
  run = lambda: jax.block_until_ready(decoding.greedy_decode(model, params, enc, s.decode_len,
                                                             task_ids=tids, eos_id=-1))
  t0 = time.perf_counter()
  run()
  first_s = time.perf_counter() - t0
  times = _timed_steps(run, s.steps)
  flops = forward_flops(cfg, batch_size, s.input_len, s.decode_len)
  _free()
  return [record(f"greedy/{s.eval_method}/b{batch_size}", "jax", "greedy", s.eval_method,
                 batch_size, s, tasks="mixed", first_step_s=first_s, times=times, flops=flops,
                 tokens=batch_size * s.decode_len,
                 note=f"{s.decode_len} new tokens per example; tokens/s counts generated tokens")]


def pairs(s: Settings, batch_size: int) -> list[dict]:
  """Few-shot adaptation: one vmapped step of 1 and of `n_pairs` (task, seed) pairs (method mhr),
  through adaptation.prepare_pairs / make_adaptation_step."""
  from mhr_jax.training import adaptation
  cfg = model_config(s, "mhr")
  params = jax.device_get(random_params(cfg))
  out = []
  for n in (1, s.n_pairs):
    keys = jax.random.split(jax.random.key(0), n)
    new_cfg, labels, frozen, trainable = adaptation.prepare_pairs("mhr", cfg, params, keys)
    opt = optim.make_optimizer(optim.OptimizerConfig(name=s.optimizer), labels, total_steps=100)
    opt_state = jax.vmap(opt.init)(trainable)
    step = adaptation.make_adaptation_step(T5(new_cfg), opt, losses.LossConfig())
    one = synthetic_batch(new_cfg, batch_size, s.input_len, s.target_len, False)
    batch = {k: np.stack([v] * n) for k, v in one.items()}
    holder = {"t": trainable, "o": opt_state, "i": 0}

    def once():
      holder["t"], holder["o"], metrics = step(frozen, holder["t"], holder["o"], batch, keys,
                                               holder["i"])
      holder["i"] += 1
      jax.block_until_ready(metrics["loss"])

    t0 = time.perf_counter()
    once()
    first_s = time.perf_counter() - t0
    times = _timed_steps(once, s.steps)
    out.append(record(f"pairs/mhr/n{n}/b{batch_size}", "jax", "pairs", "mhr", batch_size, s,
                      tasks=f"{n} pairs", first_step_s=first_s, times=times,
                      flops=n * train_flops(cfg, batch_size, s.input_len, s.target_len, False),
                      tokens=n * batch_size * (s.input_len + s.target_len)))
  out[-1]["vs_one_pair"] = out[-1]["step_s"] / out[0]["step_s"]
  _free()
  return out


def _free():
  gc.collect()
  jax.clear_caches()


RUNNERS = {"peak": matmul_peak, "train": train, "compile": compile_only, "score": score,
           "greedy": greedy, "pairs": pairs}
