"""Settings, synthetic batches, FLOP counts and result records shared by benchmarks/step.py's sides.

Imports no framework at module level beyond numpy, so the PyTorch side and the orchestrator stay
free of JAX's device initialisation (JAX preallocates most of a GPU's memory when it starts).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable

import numpy as np

# Methods timed (records of mhr_jax.adapters.methods); the PyTorch side runs PEFT's equivalents (mhr and
# poly as PEFT `poly` with n_splits S and 1, lora as PEFT LoRA) and "full" as plain HF fine-tuning.
METHODS = ("lora", "mhr", "poly", "full")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a case needs besides its method and batch size (both sides read the same)."""
  preset: str = "xl"
  model_overrides: dict = dataclasses.field(default_factory=dict)   # T5Config fields
  dtype: str = "bfloat16"          # compute dtype (params stay float32 on both sides)
  optimizer: str = "adamw"
  n_tasks: int = 64
  n_skills: int = 8
  n_splits: int = 8
  rank: int = 1
  input_len: int = 512
  target_len: int = 128
  steps: int = 5
  matmul_n: int = 8192
  eval_method: str = "mhr"
  choices: int = 4
  choice_len: int = 16
  decode_len: int = 32
  n_pairs: int = 16

  def model_fields(self) -> dict:
    """The T5 dimensions of the preset with overrides (the PyTorch side builds the same model)."""
    from mhr_jax.models.config import preset
    return dataclasses.asdict(preset(self.preset, **self.model_overrides))


def adapter_config(s: Settings, method: str, n_tasks: int | None = None):
  """Our AdapterConfig of a benchmark method (the kind its record pre-trains; "none": no adapter): all 7
  linear kinds, rank r, T tasks, K skills, S heads for mhr."""
  from mhr_jax.adapters import AdapterConfig, methods
  kind = "none" if method == "none" else methods.get(method).pretrain_kind
  tasks = s.n_tasks if n_tasks is None else n_tasks
  return AdapterConfig(kind=kind, rank=s.rank, n_tasks=tasks, n_skills=s.n_skills,
                       n_splits=s.n_splits if kind == "mhr" else 1)


def synthetic_batch(cfg, batch: int, input_len: int, target_len: int, mixed: bool,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """Random full-length examples; task 3 for every row ("single") or random task ids ("mixed")."""
  rng = np.random.default_rng(seed)
  vocab = cfg.vocab_size if hasattr(cfg, "vocab_size") else cfg["vocab_size"]
  n_tasks = cfg.adapter.n_tasks if hasattr(cfg, "adapter") else cfg["n_tasks"]
  targets = rng.integers(2, vocab, (batch, target_len)).astype(np.int32)
  return {
      "encoder_input_tokens": rng.integers(2, vocab, (batch, input_len)).astype(np.int32),
      "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], 1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones((batch, target_len), np.float32),
      "task_ids": (rng.integers(0, n_tasks, (batch,)) if mixed
                   else np.full((batch,), min(3, n_tasks - 1))).astype(np.int32),
  }


def _forward(fields: dict, batch: int, input_len: int, target_len: int) -> float:
  """Matmul FLOPs of one forward pass (see mhr_jax.logging_utils.train_flops_per_step)."""
  d, inner, ff = fields["d_model"], fields["num_heads"] * fields["d_kv"], fields["d_ff"]
  gated = fields["feed_forward_proj"] == "gated-gelu"
  mlp = (3 if gated else 2) * d * ff
  proj = d * inner
  enc, dec = fields["num_layers"], fields["num_decoder_layers"] or fields["num_layers"]
  per_input = enc * (4 * proj + mlp + 2 * input_len * inner) + dec * 2 * proj
  per_target = dec * (6 * proj + mlp + 2 * target_len * inner + 2 * input_len * inner) + \
      d * fields["vocab_size"]
  return 2.0 * batch * (input_len * per_input + target_len * per_target)


def _fields(cfg) -> dict:
  return cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)


def train_flops(cfg, batch: int, input_len: int, target_len: int, trains_base: bool) -> float:
  """Needed FLOPs of a train step: 2 forward passes with a frozen base (no weight gradients for
  it; adapters are negligible), 3 when the base trains. Recomputation (remat) is not counted."""
  return (3.0 if trains_base else 2.0) * _forward(_fields(cfg), batch, input_len, target_len)


def forward_flops(cfg, batch: int, input_len: int, target_len: int, choices: int = 1) -> float:
  """Needed FLOPs of scoring `choices` targets per input: the encoder (and the cross-attention
  keys and values) once, the decoder once per choice. choices=1: one plain forward pass."""
  fields = _fields(cfg)
  full = _forward(fields, batch, input_len, target_len)
  shared = _forward(fields, batch, input_len, 0)
  return full + (choices - 1) * (full - shared)


def compiled_peak_bytes(compiled) -> float:
  """Device memory XLA's buffer assignment needs for a compiled program (nan when unknown)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return math.nan
  if ma is None:
    return math.nan
  return float(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)


FIELDS = ("name", "side", "kind", "method", "tasks", "batch", "input_len", "target_len", "status",
          "compile_s", "first_step_s", "step_s", "tokens_per_s", "peak_memory_gb", "flops",
          "tflops_per_s", "pct_of_peak", "note")


def record(name: str, side: str, kind: str, method: str, batch: int, s: Settings, *,
           tasks: str = "-", times=None, step_s=None, flops=None, tokens=None, **extra) -> dict:
  """One result row: the median of `times` as step_s, and the rates that follow from it."""
  if times:
    # The median is the reported step time; the minimum is kept too, since on a shared CPU the
    # fastest repeat is the best estimate of the uncontended cost.
    step_s = statistics.median(times)
    extra["min_step_s"] = min(times)
    extra["step_times_s"] = [round(t, 6) for t in times]
  row: dict[str, Any] = dict(name=name, side=side, kind=kind, method=method, tasks=tasks,
                             batch=batch, input_len=s.input_len, target_len=s.target_len,
                             status="ok", step_s=step_s, flops=flops)
  row["tokens_per_s"] = tokens / step_s if tokens and step_s else None
  row["tflops_per_s"] = flops / step_s / 1e12 if flops and step_s else None
  row.update(extra)
  return row


@dataclasses.dataclass
class Timed:
  """A prepared case: `once()` runs one step to completion (returns its loss or None); `fields`
  are the record's other fields (record() keywords: side, kind, method, batch, tasks, flops,
  tokens, compile_s, peak_memory_gb, ...)."""
  name: str
  once: Callable[[], Any]
  fields: dict


def time_cases(cases: list[Timed], s: Settings, interleave: bool = False) -> list[dict]:
  """Records of prepared cases: one untimed-for-the-median first step each, then `s.steps` timed
  steps, case after case, or round-robin across the cases when `interleave` (on a shared CPU,
  contention then hits every case alike, so their ratios stay meaningful)."""
  first, times, losses = {}, {c.name: [] for c in cases}, {}

  def run(case):
    t0 = time.perf_counter()
    loss = case.once()
    elapsed = time.perf_counter() - t0
    if loss is not None:
      losses[case.name] = float(loss)
    return elapsed

  if interleave:
    for case in cases:
      first[case.name] = run(case)
    for _ in range(s.steps):
      for case in cases:
        times[case.name].append(run(case))
  else:
    for case in cases:
      first[case.name] = run(case)
      times[case.name] = [run(case) for _ in range(s.steps)]
  out = []
  for case in cases:
    fields = dict(case.fields)
    side, kind, method, batch = (fields.pop(k) for k in ("side", "kind", "method", "batch"))
    if case.name in losses:
      fields["loss"] = losses[case.name]
    out.append(record(case.name, side, kind, method, batch, s, first_step_s=first[case.name],
                      times=times[case.name], **fields))
  return out
