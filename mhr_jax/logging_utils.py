"""Run logging: console banners, a metrics JSONL file, TensorBoard scalars, progress, throughput/MFU.

Only process 0 writes files; every process logs to its own console. TensorBoard events go through
clu's metric writers when TensorFlow is installed (clu's SummaryWriter needs it); without it the run
still writes metrics.jsonl and says so once. In a URL run directory (gs://...) both files are uploaded whole
at checkpoints (objects cannot be appended to).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import tqdm

from mhr_jax import storage
from mhr_jax.models.config import T5Config

log = logging.getLogger("mhr_jax")
# How often at most a URL run directory's growing files (metrics.jsonl, TensorBoard events) are uploaded
# between checkpoints: each upload rewrites the whole object.
UPLOAD_EVERY_S = 60.0

# Dense peak FLOP/s per device (bf16) by `device_kind` prefix; MFU is left out for unknown devices.
_PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12), ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12), ("NVIDIA L4", 121e12),
)


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever sys.stderr is at the time (tqdm and test harnesses swap it)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value


def setup_console() -> None:
  """Process-tagged INFO logging to stderr (once), e.g. `I 12:00:01 [p0] message`."""
  if log.handlers:
    return
  handler = _StderrHandler()
  handler.setFormatter(logging.Formatter(
      f"%(levelname).1s %(asctime)s [p{jax.process_index()}] %(message)s", "%H:%M:%S"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


def banner(title: str) -> None:
  """A section separator in the log, as big_vision's train.py prints them."""
  log.info("%s %s %s", "=" * 8, title, "=" * max(8, 64 - len(title)))


def peak_flops_per_device(device=None) -> float | None:
  """Dense bf16 peak FLOP/s of `device` (default: the first device), None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, flops in _PEAK_FLOPS:
    if kind.startswith(prefix):
      return flops
  return None


def measured_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """The machine's float32 matmul FLOP/s, measured: the CPU peak has no datasheet value here."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(a).block_until_ready()
  return 2.0 * n ** 3 * repeats / (time.perf_counter() - start)


def peak_flops_total() -> float | None:
  """Peak FLOP/s of all devices for MFU: the datasheet peak times the device count on accelerators;
  on CPU the measured matmul rate of the whole machine (simulated CPU devices share its cores)."""
  if jax.devices()[0].platform == "cpu":
    return measured_cpu_matmul_flops()
  peak = peak_flops_per_device()
  return peak * jax.device_count() if peak else None


def train_flops_per_step(cfg: T5Config, batch_size: int, input_len: int, target_len: int,
                         trains_base: bool) -> float:
  """Model FLOPs of one training step on a padded (batch_size, input_len -> target_len) batch.

  Matmul FLOPs (2 per multiply-add) of the base model: projections, attention scores and values,
  MLP, logits. Training costs 3 forward passes when the base trains (activation and weight
  gradients) and 2 when it is frozen (no weight gradients for it); adapter matmuls (rank r << d)
  are left out.
  """
  d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
  mlp = (3 if cfg.gated else 2) * d * ff
  proj = d * inner
  # Multiply-adds per input token: encoder layers, plus the cross-attention keys and values that
  # every decoder layer computes from the encoder output.
  per_input = cfg.num_layers * (4 * proj + mlp + 2 * input_len * inner) + cfg.num_decoder_layers * 2 * proj
  # Per target token: self-attention, cross-attention queries and outputs, scores against both, MLP, logits.
  per_target = cfg.num_decoder_layers * (
      6 * proj + mlp + 2 * target_len * inner + 2 * input_len * inner) + d * cfg.vocab_size
  forward = 2 * batch_size * (input_len * per_input + target_len * per_target)
  return (3.0 if trains_base else 2.0) * forward


class Throughput:
  """Step time, steps/s, tokens/s and MFU over the interval since the previous `measure`."""

  def __init__(self, flops_per_step: float, peak_flops_total: float | None):
    self._flops = flops_per_step
    self._peak = peak_flops_total
    self._t = time.perf_counter()
    self._steps = 0
    self._tokens = 0.0

  def add(self, steps: int, tokens: float) -> None:
    self._steps += steps
    self._tokens += tokens

  def measure(self) -> dict[str, float]:
    now = time.perf_counter()
    elapsed, steps = now - self._t, self._steps
    self._t, self._steps, tokens, self._tokens = now, 0, self._tokens, 0.0
    if steps == 0 or elapsed <= 0:
      return {}
    out = {"step_time_s": elapsed / steps, "steps_per_s": steps / elapsed,
           "tokens_per_s": tokens / elapsed}
    if self._peak:
      out["mfu"] = self._flops * steps / elapsed / self._peak
    return out


def _jsonable(value: Any) -> Any:
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the line parseable.
  return value


class MetricsJsonl:
  """One JSON object per logged step in `path` (process 0 only).

  A local file gets each line appended as it is logged. An object (a URL) cannot be appended to: the lines
  are kept here and `sync` rewrites the object whole, at each checkpoint (`sync()`), at most every
  UPLOAD_EVERY_S seconds otherwise (`sync(force=False)`) and at `close`. Lines a killed run never uploaded
  come after its last checkpoint: a resume drops those anyway.
  Resuming from checkpoint step `resume_step` first drops the lines written after it, so the
  file holds each step once, exactly as an uninterrupted run would.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    self._active = jax.process_index() == 0
    self._whole = storage.is_url(path)  # rewritten whole by `sync`
    self._lines: list[str] = []
    self._unsynced = False
    self._synced_at = time.monotonic()
    if not self._active or not storage.exists(path):
      return
    keep = []
    for line in storage.read_text(path).splitlines():
      try:
        step = json.loads(line)["step"]
      except (json.JSONDecodeError, KeyError):
        continue  # a line cut short by a killed run
      if resume_step is not None and step <= resume_step:
        keep.append(line + "\n")
    storage.write_text_atomic(path, "".join(keep))
    self._lines = keep if self._whole else []

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self._active:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    if not self._whole:
      storage.append_text(self.path, line)
      return
    self._lines.append(line)
    self._unsynced = True

  def sync(self, force: bool = True) -> None:
    """Uploads the lines of an object (a no-op for a local file, written as it goes); `force=False`: only when
    UPLOAD_EVERY_S seconds have passed since the last upload."""
    if not (self._active and self._whole and self._unsynced):
      return
    if force or time.monotonic() - self._synced_at >= UPLOAD_EVERY_S:
      storage.write_text_atomic(self.path, "".join(self._lines))
      self._unsynced, self._synced_at = False, time.monotonic()

  def close(self) -> None:
    self.sync()


class TensorBoard:
  """Scalar metrics as TensorBoard events under `logdir` through clu (process 0 only).

  TensorFlow's event writer reaches local paths (its own Cloud Storage client has no endpoint setting, so it
  could not reach a loopback server): for a URL it writes into a local scratch directory, and `sync` uploads
  the event files whole, on MetricsJsonl's schedule. A resumed run adds its own event file, as locally.
  """

  def __init__(self, logdir: str):
    self._writer = None
    self._remote = logdir if storage.is_url(logdir) else None
    self._local = logdir
    self._synced_at = time.monotonic()
    if jax.process_index() != 0:
      return
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      log.info("TensorBoard events off (clu metric writers need TensorFlow: %s)", e)
      return
    if self._remote is not None:
      self._local = storage.local_scratch_dir("mhr_jax_tensorboard_")
    self._writer = metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(self._local)])

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self._writer is not None:
      self._writer.write_scalars(int(step), {k: float(v) for k, v in metrics.items()})

  def sync(self, force: bool = True) -> None:
    """Uploads the event files when `logdir` is a URL; `force=False`: only every UPLOAD_EVERY_S seconds."""
    if self._writer is None or self._remote is None:
      return
    if force or time.monotonic() - self._synced_at >= UPLOAD_EVERY_S:
      self._writer.flush()
      self._upload()

  def _upload(self) -> None:
    for name in storage.listdir(self._local):
      storage.upload(os.path.join(self._local, name), os.path.join(self._remote, name))
    self._synced_at = time.monotonic()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
      if self._remote is not None:
        self._upload()
        storage.rmtree(self._local)
      self._writer = None


def progress_bar(start_step: int, total_steps: int, unit: str = "step") -> tqdm.tqdm:
  """tqdm over training steps (or other units; rate per second, with ETA); only process 0 draws it."""
  return tqdm.tqdm(total=total_steps, initial=start_step, unit=unit, dynamic_ncols=True,
                   disable=jax.process_index() != 0, file=sys.stderr, mininterval=1.0)


def format_metrics(metrics: Mapping[str, Any]) -> str:
  """'loss=2.3013 grad_norm/adapters=0.12 ...' with 4 significant digits."""
  parts = []
  for key, value in metrics.items():
    value = _jsonable(value)
    parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
  return " ".join(parts)
