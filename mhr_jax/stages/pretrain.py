"""Multi-task pre-training: one run directory, resumable exactly, as big_vision's and T5X's loops.

`pretrain(cfg, config_text, mesh)` runs sections data -> state -> checkpoint -> loop -> results. The run
directory (RunConfig.model_dir) receives config.gin, metrics.jsonl (one JSON object per logged step),
TensorBoard events (tb/), orbax checkpoints (checkpoints/) and, last, results.json (status "done", or
"preempted" after SIGTERM). The same config on the same directory resumes from its latest checkpoint,
exactly (same data, same random numbers). Starting weights: random, a Hugging Face base
(RunConfig.init_checkpoint), or another run's latest checkpoint (RunConfig.init_run, optionally
skill-averaged: init_transform "mu").
"""
from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import numpy as np

from mhr_jax.models import param_counts
from mhr_jax import config as config_lib
from mhr_jax import models, partitioning
from mhr_jax.training import optim, train_step
from mhr_jax.adapters import params as params_lib
from mhr_jax.adapters import transforms
from mhr_jax.errors import NonFiniteLoss, RunError
from mhr_jax.logging_utils import (MetricsJsonl, TensorBoard, Throughput, banner, format_metrics, log,
                                   peak_flops_total, progress_bar, train_flops_per_step)
from mhr_jax.checkpoints.run_state import RunCheckpointer, StopSignal, latest_step, restore_params
from mhr_jax import storage
from mhr_jax.storage import read_json, write_json_atomic

EXIT_PREEMPTED = 143  # cli.EXIT_PREEMPTED: 128 + SIGTERM, after the checkpoint is written


# ============================================================================== state


def check_start(cfg: config_lib.ExperimentConfig) -> None:
  """ConfigError unless RunConfig.init_run (when set) is a run directory with a checkpoint."""
  run_dir = cfg.run.init_run
  if run_dir is None:
    return
  if not storage.isfile(os.path.join(run_dir, "config.gin")):
    raise config_lib.ConfigError(f"RunConfig.init_run={run_dir!r}: no config.gin there (not a run directory)")
  if latest_step(os.path.join(run_dir, "checkpoints")) is None:
    raise config_lib.ConfigError(f"RunConfig.init_run={run_dir!r}: no checkpoint in "
                                 f"{os.path.join(run_dir, 'checkpoints')} (run it first)")


def run_weights(run_dir: str, transform: str | None = None) -> tuple[dict, str]:
  """(params, description) of a run directory's latest checkpoint, optionally skill-averaged ("mu")."""
  checkpoints = os.path.join(run_dir, "checkpoints")
  step = latest_step(checkpoints)
  if step is None:
    raise RunError(f"RunConfig.init_run={run_dir!r}: no checkpoint in {checkpoints} (run it first)")
  params = restore_params(checkpoints, step)
  if transform == "mu":
    source = config_lib.saved_adapter_config(run_dir)
    try:
      _, params = transforms.to_mu(source, params)
    except ValueError as e:
      raise RunError(f"RunConfig.init_transform='mu' on {run_dir}: {e}") from None
  return params, f"{checkpoints}/{step}" + (" (skills averaged)" if transform else "")


def initial_params(cfg: config_lib.ExperimentConfig, model, mesh, key):
  """Unboxed params on the mesh: random init, then the starting weights of RunConfig.init_checkpoint
  (Hugging Face base) or RunConfig.init_run (a run's latest checkpoint) where they have the leaf."""
  boxed = train_step.abstract_boxed_params(model)
  shardings = partitioning.param_shardings(boxed, mesh)
  inputs = train_step.dummy_inputs(model)

  def init(k):
    variables = model.init({"params": k, "dropout": k}, enable_dropout=False, **inputs)
    return nn.unbox(variables)["params"]

  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_RULES):
    params = jax.jit(init, out_shardings=shardings)(key)
  run = cfg.run
  if not (run.init_checkpoint or run.init_run):
    log.info("starting weights: random init (seed %d)", run.seed)
    return params
  from mhr_jax.checkpoints import hf_t5  # pylint: disable=g-import-not-at-top
  key_name = "RunConfig.init_checkpoint" if run.init_checkpoint else "RunConfig.init_run"
  try:
    if run.init_checkpoint:
      source, where = hf_t5.load_hf_t5(run.init_checkpoint)[1], run.init_checkpoint
    else:
      source, where = run_weights(run.init_run, run.init_transform)
    params, report = hf_t5.merge_base_params(params, source)
  except ValueError as e:
    raise RunError(f"{key_name}={run.init_checkpoint or run.init_run!r}: {e}") from None
  log.info("starting weights: %s (%s)", where, report)
  return params  # init_train_state places the merged (host) leaves by the logical rules


# ============================================================================== loop helpers


class MetricsSink:
  """Collects per-step device metrics without blocking; `flush` fetches them, stops on NaN/inf and
  writes the logged steps (JSONL, TensorBoard, console); `sync` makes the written steps durable (for a URL
  run directory, the files are uploaded whole: logging_utils)."""

  def __init__(self, cfg, jsonl: MetricsJsonl, tb: TensorBoard, throughput: Throughput):
    self._cfg, self._jsonl, self._tb, self._throughput = cfg, jsonl, tb, throughput
    self._pending: list[tuple[int, dict]] = []
    self.last: dict = {}

  def add(self, step: int, metrics: dict, tokens: float) -> None:
    self._pending.append((step, metrics))
    self._throughput.add(1, tokens)

  def pending_logged(self) -> bool:
    """Whether a pending step is due for logging (fetching it then costs no extra device wait)."""
    return any(step % self._cfg.run.log_every == 0 for step, _ in self._pending)

  def flush(self) -> None:
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    steps = [s for s, _ in self._pending]
    self._pending = []
    for step, metrics in zip(steps, fetched):
      message = train_step.nonfinite_message(metrics, step)
      if message:
        raise NonFiniteLoss(message)
      if step % self._cfg.run.log_every == 0 or step == self._cfg.run.train_steps:
        record = {k: float(v) for k, v in metrics.items() if k != "nonfinite"}
        record.update(self._throughput.measure())
        self._jsonl.write(step, record)
        self._tb.write(step, record)
        log.info("step %d: %s", step, format_metrics(record))
      self.last = {"step": step, **{k: float(v) for k, v in metrics.items() if k != "nonfinite"}}
    self._jsonl.sync(force=False)
    self._tb.sync(force=False)

  def sync(self) -> None:
    self._jsonl.sync()
    self._tb.sync()

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()


def _host_tokens(batch) -> float:
  """Non-padding input + target tokens of the global batch (this host's rows x processes)."""
  local = np.count_nonzero(batch["encoder_input_tokens"]) + np.count_nonzero(batch["decoder_target_tokens"])
  return float(local * jax.process_count())


# ============================================================================== pre-training


def pretrain(cfg: config_lib.ExperimentConfig, config_text: str, mesh) -> int:
  """Sections data -> state -> checkpoint -> loop -> results; returns 0, or EXIT_PREEMPTED. On a run
  directory whose results say it is done at RunConfig.train_steps, it does nothing and returns 0."""
  from mhr_jax.data import pipeline as data  # pylint: disable=g-import-not-at-top  (TensorFlow: only when training)
  run_cfg, model_dir = cfg.run, cfg.run.model_dir
  results = read_json(os.path.join(model_dir, "results.json"))
  if results and results.get("status") == "done" and results.get("step") == run_cfg.train_steps:
    log.info("%s: done (results.json, step %d); nothing to do", model_dir, run_cfg.train_steps)
    return 0
  start_time = time.time()
  config_lib.write_run_files(cfg, config_text)

  banner("data")
  registration, _ = data.register_data(cfg.data, cfg.default_data_dir, vocab_size=cfg.model.vocab_size)
  if cfg.model.adapter.uses_task_ids:
    data.check_task_rows(cfg.data, registration, cfg.model.adapter.n_tasks)
  banner("state")
  model = models.T5(cfg.model)
  rules = config_lib.param_rules(cfg)
  abstract = param_counts.abstract_params(cfg.model)
  labels = params_lib.param_labels(abstract, rules)
  optimizer = optim.make_optimizer(cfg.optimizer, labels, run_cfg.train_steps)
  abstract_state = train_step.abstract_train_state(model, labels, optimizer, mesh)
  counts = param_counts.count_params(abstract, rules)
  log.info("params: %s total, %s trainable %s", f"{counts['total']:,}", f"{counts['trainable']:,}",
           {g: counts[g] for g in optim.TRAINED_GROUPS if counts.get(g)})
  root = jax.random.key(run_cfg.seed)
  init_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)

  banner("checkpoint")
  checkpointer = RunCheckpointer(os.path.join(model_dir, "checkpoints"), run_cfg.checkpoint_every,
                                 run_cfg.keep_checkpoints, run_cfg.async_checkpoints, frozen_once=True)
  start = checkpointer.latest_step()
  if start is None:
    state = train_step.init_train_state(model, initial_params(cfg, model, mesh, init_key), labels,
                                        optimizer, mesh)
    start, skip, elapsed = 0, 0, 0.0
    log.info("no checkpoint in %s: starting at step 0", checkpointer.directory)
  else:
    state, progress = checkpointer.restore(start, abstract_state)
    skip, elapsed = int(progress["batches_consumed"]), float(progress.get("elapsed_s", 0.0))
    if progress.get("host_input") == "sharded" and progress.get("processes") != jax.process_count():
      log.warning("resuming a host_input='sharded' run on %d processes (saved with %s): the data "
                  "order differs from an uninterrupted run", jax.process_count(), progress.get("processes"))
    log.info("resumed from %s/%d (data position: %d batches)", checkpointer.directory, start, skip)

  banner("loop")
  total = run_cfg.train_steps
  batches = data.host_batches(cfg.data, run_cfg.seed, skip, jax.process_index(), jax.process_count())
  step_fn = train_step.make_train_step(model, optimizer, cfg.loss, mesh,
                                       train_step.shardings_of(abstract_state),
                                       grad_accum_steps=cfg.optimizer.grad_accum_steps,
                                       total_steps=total)
  flops = train_flops_per_step(cfg.model, cfg.data.batch_size, cfg.data.input_len, cfg.data.target_len,
                               trains_base=counts.get("base", 0) > 0)
  sink = MetricsSink(cfg, MetricsJsonl(os.path.join(model_dir, "metrics.jsonl"), start if start else None),
                     TensorBoard(os.path.join(model_dir, "tb")), Throughput(flops, peak_flops_total()))
  stop = StopSignal()

  def progress_of(step):  # the data position (one batch per step) and the run's time so far
    return {"step": step, "batches_consumed": skip + step - start, "seed": run_cfg.seed,
            "host_input": cfg.data.host_input, "processes": jax.process_count(),
            "elapsed_s": elapsed + time.time() - start_time}

  bar = progress_bar(start, total)
  status, done = 0, start
  try:
    for done in range(start + 1, total + 1):
      batch = next(batches)
      tokens = _host_tokens(batch)
      # Dispatch returns at once; the host then writes the earlier steps' metrics (and reads the next
      # batch) while the device computes this one, so logging never stalls the device.
      state, metrics = step_fn(state, batch, jax.random.fold_in(step_key, done))
      if sink.pending_logged():
        sink.flush()
        bar.set_postfix(loss=f"{sink.last['loss']:.4f}", refresh=False)
      sink.add(done, metrics, tokens)
      bar.update(1)
      due = done % run_cfg.checkpoint_every == 0 or done == total
      if due:
        sink.flush()  # a NaN / inf step is never saved
        checkpointer.save(done, state, progress_of(done), force=True)
        sink.sync()  # the metrics of every step up to the checkpoint are kept with it
      if stop.should_stop(done, checkpointer):
        sink.flush()
        if not due:
          checkpointer.save(done, state, progress_of(done), force=True)
        status = EXIT_PREEMPTED
        break
    sink.flush()
  finally:
    bar.close()
    stop.restore_handler()
    checkpointer.wait()
    checkpointer.close()
    sink.close()

  model_dir_abs = storage.absolute(model_dir)
  results = {"status": "preempted" if status else "done", "mode": "pretrain", "step": done,
             "train_steps": total, "resumed_from": start, "final_metrics": sink.last,
             "wall_time_s": elapsed + time.time() - start_time, "model_dir": model_dir_abs,
             "checkpoints": checkpointer.directory, "latest_checkpoint": checkpointer.latest_step(),
             "adapter": cfg.model.adapter.kind, "params": counts,
             "metrics": os.path.join(model_dir_abs, "metrics.jsonl"),
             "tensorboard": os.path.join(model_dir_abs, "tb"), "config": os.path.join(model_dir_abs, "config.gin")}
  write_json_atomic(os.path.join(model_dir, "results.json"), results)
  if status == EXIT_PREEMPTED:
    log.info("SIGTERM: checkpoint saved at step %d; run the same command to resume", done)
  banner("results")
  log.info("step %d/%d; results: %s", done, total, os.path.join(model_dir_abs, "results.json"))
  log.info("checkpoints: %s (latest %s); metrics: %s; TensorBoard: tensorboard --logdir %s",
           results["checkpoints"], results["latest_checkpoint"], results["metrics"], results["tensorboard"])
  return status
