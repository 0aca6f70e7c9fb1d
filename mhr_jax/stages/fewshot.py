"""The few-shot adaptation stage: every (held-out task, seed) pair adapted from one starting point,
evaluated, and written as one run directory.

`adapt(cfg, config_text, mesh)` (RunConfig.mode="adapt") starts from a pre-training run's latest
checkpoint (RunConfig.pretrain_dir), or from a plain base (a run of kind "none", or a Hugging Face
directory in RunConfig.init_checkpoint) with a fresh adapter: the no-pre-training control. All pairs train
as one vmapped program (mhr_jax/training/adaptation.py); each is then evaluated on its test data
(mhr_jax/data/fewshot.py and mhr_jax/evaluation/fewshot.py). The run directory holds config.gin, metrics.jsonl, resume/ (the training
state, saved every RunConfig.checkpoint_every steps: a rerun continues exactly), pairs/ (one result file
per evaluated pair, with its predictions: a rerun skips them), checkpoints/ (the adapted parameters) and,
written last, results.json and results.md. SIGTERM saves the state and ends with status 143. With several
processes (jax.distributed), every process adapts and evaluates every process_count-th pair on its own
devices (resume/ and checkpoints/ get a process_<i> folder each) and process 0 writes the gathered results.
"""
from __future__ import annotations

import json
import os
import time
import zlib

import jax
import numpy as np

from mhr_jax.training import adaptation
from mhr_jax import models, partitioning
from mhr_jax import config as config_lib
from mhr_jax.adapters import methods
from mhr_jax.errors import NonFiniteLoss, RunError
from mhr_jax.logging_utils import MetricsJsonl, banner, format_metrics, log, progress_bar
from mhr_jax.checkpoints.process_local import ProcessLocalCheckpointer
from mhr_jax.checkpoints.run_state import RunCheckpointer, StopSignal, latest_step, restore_params
from mhr_jax import storage
from mhr_jax.storage import read_json, write_json_atomic, write_text_atomic

EXIT_PREEMPTED = 143


class Preempted(Exception):
  """SIGTERM arrived; the state is saved."""


def starting_point(cfg: config_lib.ExperimentConfig) -> dict:
  """Checks where adaptation starts and returns {"kind", "dir", "step"} (kind: the pre-trained
  adapter kind, "none" for a plain base); ConfigError names the key when it does not fit."""
  run, method = cfg.run, methods.get(cfg.adapt.method)
  if run.init_checkpoint:
    start = {"kind": "none", "dir": run.init_checkpoint, "step": None}
  else:
    pre = run.pretrain_dir
    if not storage.isfile(os.path.join(pre, "config.gin")):
      raise config_lib.ConfigError(f"RunConfig.pretrain_dir={pre!r}: no config.gin there (not a run directory)")
    step = latest_step(os.path.join(pre, "checkpoints"))
    if step is None:
      raise config_lib.ConfigError(f"RunConfig.pretrain_dir={pre!r}: no checkpoint in "
                                   f"{os.path.join(pre, 'checkpoints')} (run or resume its pre-training first)")
    start = {"kind": config_lib.saved_adapter_config(pre).kind, "dir": pre, "step": step}
  kind = cfg.model.adapter.kind
  if start["kind"] == kind:
    if start["step"] is not None:
      config_lib.check_run_dir(start["dir"], cfg, fix="adapt with the pre-training run's model config")
  elif start["kind"] == "none" and method.control:
    if start["step"] is not None:  # a fresh adapter on that run's base: only the architecture must match
      config_lib.check_run_dir(start["dir"], cfg, fix="adapt with the base run's model config",
                               architecture_only=True)
  else:
    where = (f"RunConfig.pretrain_dir={run.pretrain_dir!r} holds a pre-trained adapter of kind {start['kind']!r}"
             if run.pretrain_dir else "RunConfig.init_checkpoint is a plain base")
    fresh = " (or a plain base, with a fresh adapter)" if method.control else ""
    raise config_lib.ConfigError(f"{where}; AdaptConfig.method={cfg.adapt.method!r} with "
                                 f"AdapterConfig.kind={kind!r} starts from kind {kind!r}{fresh}")
  loss_kind = "tfew" if cfg.data.source == "t0" else "lm"
  if cfg.loss.kind != loss_kind:
    raise config_lib.ConfigError(
        f"LossConfig.kind={cfg.loss.kind!r}: few-shot adaptation on DataConfig.source={cfg.data.source!r} "
        f"trains with LossConfig.kind={loss_kind!r}")
  if cfg.adapt.select_every and cfg.data.source == "t0":
    raise config_lib.ConfigError("AdaptConfig.select_every: the T0 protocol has no dev split (T-Few keeps "
                                 "the last step); use 0")
  return start


def _start_params(cfg: config_lib.ExperimentConfig, start: dict) -> dict:
  """The starting weights, in the layer layout of this run's model (T5Config.scan_layers)."""
  if start["step"] is not None:
    params = restore_params(os.path.join(start["dir"], "checkpoints"), start["step"])
    log.info("starting params: %s/checkpoints/%d (kind %s)", start["dir"], start["step"], start["kind"])
  else:
    from mhr_jax.checkpoints import hf_t5  # pylint: disable=g-import-not-at-top
    try:
      _, params = hf_t5.load_hf_t5(start["dir"])
    except ValueError as e:
      raise RunError(f"RunConfig.init_checkpoint={start['dir']!r}: {e}") from None
    log.info("starting params: Hugging Face base %s", start["dir"])
  return models.layout.to_layout(cfg.model, params)


class _OrbaxResume:
  """adaptation.Resume backed by an orbax manager in MODEL_DIR/resume (the latest state only; one directory
  per process when pairs are spread over processes). A SIGTERM saves and ends the run; with several
  processes, a SIGTERM reaching any of them stops all at the same step: after every step they share their
  flags (a one-integer all-gather; their pairs train independently, so nothing else synchronises them)."""

  def __init__(self, directory: str, every: int, num_steps: int, stop: StopSignal, async_save: bool):
    self.every, self._num_steps, self._stop = every, num_steps, stop
    self._stopping = False
    self._manager = _own_checkpointer(directory, 1, async_save)

  def restore(self, target: dict):
    step = self._manager.latest_step()
    if step is None:
      return None
    trees = _host_if_shared({k: v for k, v in target.items() if k in _TREES and v is not None})
    restored, progress = self._manager.restore(step, trees)
    state = dict(target, **restored)
    for key in _LOGS:
      state[key] = np.asarray(progress[key], target[key].dtype).reshape(target[key].shape)
    log.info("resumed adaptation from %s/%d (pair group %d, step %d)", self._manager.directory, step,
             progress["group"], progress["step"])
    return int(progress["group"]), int(progress["step"]), state

  def save(self, group: int, step: int, state: dict) -> None:
    progress = {"group": group, "step": step}
    progress.update({k: np.asarray(state[k]).tolist() for k in _LOGS})
    trees = _host_if_shared({k: state[k] for k in _TREES if state[k] is not None})
    self._manager.save(group * self._num_steps + step, trees, _json_safe(progress), force=True)
    if self._stopping:
      self._manager.wait()
      raise Preempted(f"SIGTERM: adaptation state saved at pair group {group}, step {step}")

  def stop_requested(self, step_id: int) -> bool:
    del step_id  # every process asks after the same steps (adaptation.adapt's sync_groups)
    self._stopping = _agreed_stop(self._stop)
    return self._stopping

  def close(self) -> None:
    self._manager.wait()
    self._manager.close()


_TREES = ("trainable", "opt_state", "best")
_LOGS = ("best_score", "best_step", "losses", "scores")


def _own_checkpointer(directory: str, keep: int | None, async_save: bool):
  """Where this process saves its own pairs' state: an orbax run checkpointer, or with several processes
  (each adapting its own pairs, with no other process involved) a process-local store."""
  if jax.process_count() > 1:
    return ProcessLocalCheckpointer(directory, keep)
  return RunCheckpointer(directory, 1, keep, async_save)


def _host_if_shared(tree):
  """With several processes a process's state is saved by the process-local store, from host arrays."""
  return jax.device_get(tree) if jax.process_count() > 1 else tree


def _json_safe(value):
  """NaN / inf -> None (strict JSON), recursively; `restore` turns None back into NaN."""
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def finished(model_dir: str, key: str, steps: int) -> bool:
  """Whether a run directory's results.json says it is done with `steps` (under `key`: "step" for
  pre-training, "steps" for adaptation)."""
  results = read_json(os.path.join(model_dir, "results.json"))
  return results is not None and results.get("status") == "done" and results.get(key) == steps


def pair_key(task: str, seed: int) -> jax.Array:
  """The PRNG key of the (task, seed) pair: a function of the pair alone, so adding a seed or a task to a run
  (or spreading pairs over processes) changes no other pair's fresh routing row, noise or result."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(task.encode("utf-8")) & 0x7FFFFFFF)


def _pair_file(model_dir: str, index: int) -> str:
  return os.path.join(model_dir, "pairs", f"{index:04d}.json")


def adapt(cfg: config_lib.ExperimentConfig, config_text: str, mesh) -> int:
  """Adapts every (task, seed) pair, evaluates, writes the results; returns 0 or EXIT_PREEMPTED. On a run
  directory whose results say it is done at these steps, it does nothing and returns 0."""
  start = starting_point(cfg)
  if finished(cfg.run.model_dir, "steps", cfg.run.train_steps):
    log.info("%s: done (results.json, %d steps); nothing to do", cfg.run.model_dir, cfg.run.train_steps)
    return 0
  stop = StopSignal(own_handler=True)
  try:
    return _adapt(cfg, config_text, mesh, start, stop)
  finally:
    stop.restore_handler()


def _allgather_json(value) -> list:
  """[value of process 0, value of process 1, ...] on every process (JSON-serialisable values)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  payload = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int32))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(gathered[p, :int(sizes[p])]).decode("utf-8")) for p in range(len(sizes))]


def _adapt(cfg: config_lib.ExperimentConfig, config_text: str, mesh, start: dict, stop: StopSignal) -> int:
  from mhr_jax.data import pipeline as data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from mhr_jax.data import fewshot as fewshot_data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from mhr_jax.evaluation import fewshot as fewshot_eval  # pylint: disable=g-import-not-at-top
  a, run_cfg, model_dir = cfg.adapt, cfg.run, cfg.run.model_dir
  start_time = time.time()
  config_lib.write_run_files(cfg, config_text)

  banner("data")
  fewshot = {"fewshot_seeds": a.seeds} if cfg.data.source == "t0" else {"fewshot_ks": (a.shots,),
                                                                        "fewshot_seeds": a.seeds}
  registration, vocabulary = data.register_data(cfg.data, cfg.default_data_dir, vocab_size=cfg.model.vocab_size,
                                               **fewshot)
  benchmark = fewshot_data.fewshot_pairs(cfg, registration, vocabulary)
  pairs = benchmark.pairs
  log.info("%d pairs: %s", len(pairs), benchmark.description)
  # Pairs are independent: with several processes each adapts and evaluates every process_count-th pair
  # on its own devices, and process 0 writes the gathered results.
  multi = jax.process_count() > 1
  mine = list(range(jax.process_index(), len(pairs), jax.process_count()))
  # A process without a pair of its own (more processes than pairs) trains a copy of pair 0 and discards it,
  # so that every process takes part in the same collectives (the stop agreement, the gathering).
  work = mine or [0]
  if multi:
    log.info("this process adapts pairs %s on %s", mine or "none (a discarded copy of pair 0)",
             partitioning.describe(mesh))

  banner("state")
  params = _start_params(cfg, start)
  keys = jax.numpy.stack([pair_key(*pairs[i]) for i in work])

  banner("loop")
  steps = run_cfg.train_steps
  if not steps:
    log.info("RunConfig.train_steps=0: evaluating the %s starting point zero-shot", a.method)
  sequential = not methods.get(a.method).vmapped
  batches = (fewshot_data.PairBatches(benchmark.train_streams(work), keep_all=sequential)
             if steps else None)
  select = {}
  if a.select_every and steps:
    select = ({"dev_batches": benchmark.dev_batches(work)} if a.select_metric == "loss"
              else {"select": fewshot_eval.dev_scorer(benchmark, mesh, work)})
    log.info("best-on-dev: every %d steps by dev %s", a.select_every, a.select_metric)
  own = f"process_{jax.process_index()}" if multi else ""
  resume = _OrbaxResume(os.path.join(model_dir, "resume", own), run_cfg.checkpoint_every, steps, stop,
                        run_cfg.async_checkpoints) if steps else None
  bar = progress_bar(0, steps * (len(work) if sequential else 1))
  try:
    # Sequential pairs make one group each; a process with fewer than the most steps through the rest.
    most = -(-len(pairs) // jax.process_count()) if sequential else 1
    result = adaptation.adapt(a.method, cfg.model, params, cfg.optimizer, cfg.loss, batches, keys, steps,
                              eval_every=a.select_every, mesh=mesh, progress=bar.update, resume=resume,
                              sync_groups=most, **select)
  except Preempted as e:
    log.info("%s; run the same command to resume", e)
    return EXIT_PREEMPTED
  finally:
    bar.close()
    if resume is not None:
      resume.close()
  rows = []
  for j, i in enumerate(mine):
    row = {"index": i, "task": pairs[i][0], "seed": pairs[i][1]}
    if steps:
      row["final_loss"] = float(result.losses[-1, j])
      row["losses"] = result.losses[:, j].tolist()
    if result.dev_scores is not None:
      row.update(best_step=int(result.best_step[j]), best_dev_score=float(np.max(result.dev_scores[:, j])),
                 dev_metric=a.select_metric)
    rows.append(row)

  banner("evaluate")
  model = models.T5(result.model_cfg)
  counts = _trainable_per_pair(result, steps)
  if a.evaluate:
    status = _evaluate_pairs(benchmark, model, result, rows, model_dir, mesh, stop,
                             slots=-(-len(pairs) // jax.process_count()))
    if status:
      return status
  rows = sorted((r for rows_of in _allgather_json(rows) for r in rows_of), key=lambda r: r["index"])
  checkpoints = None
  if steps and mine:  # the adapted parameters (zero-shot evaluation trains nothing: its start is kept elsewhere)
    checkpointer = _own_checkpointer(os.path.join(model_dir, "checkpoints", own), None, run_cfg.async_checkpoints)
    # A run stopped after this save but before results.json has it already: the same parameters (they come
    # from the resumed final state), so it is kept.
    if checkpointer.latest_step() != steps:
      checkpointer.save(steps, _host_if_shared({"trainable": result.trainable, "frozen": result.frozen}),
                        {"pairs": [list(pairs[i]) for i in mine], "method": a.method}, force=True)
    checkpointer.wait()
    checkpointer.close()
    checkpoints = os.path.dirname(checkpointer.directory) if multi else checkpointer.directory
  _write_losses(os.path.join(model_dir, "metrics.jsonl"), rows, steps, run_cfg.log_every)
  for row in rows:
    path = _pair_file(model_dir, row["index"])
    if a.evaluate and not storage.isfile(path):  # evaluated on another process
      write_json_atomic(path, row)
    for key in ("predictions", "losses", "index"):
      row.pop(key, None)
  results = {"status": "done", "mode": "adapt", "method": a.method, "source": cfg.data.source, "steps": steps,
             "start": {"kind": start["kind"], "dir": storage.absolute(start["dir"]), "step": start["step"]},
             "pretrain_dir": storage.absolute(run_cfg.pretrain_dir) if run_cfg.pretrain_dir else None,
             "pretrain_step": start["step"], "trainable_params_per_pair": counts, "pairs": rows,
             "processes": jax.process_count(), "wall_time_s": time.time() - start_time,
             "checkpoints": checkpoints}
  if cfg.data.source != "t0":
    results["shots"] = a.shots
  if a.evaluate:
    results["table"], markdown = fewshot_eval.summary(cfg.data.source, rows)
    write_text_atomic(os.path.join(model_dir, "results.md"),
                      f"# {a.method} few-shot adaptation ({cfg.data.source}); mean ± std over seeds "
                      f"{list(a.seeds)}\n\n{markdown}\n")
  write_json_atomic(os.path.join(model_dir, "results.json"), results)
  banner("results")
  if a.evaluate:
    log.info("results (mean ± std over seeds):\n%s", markdown)
  log.info("results: %s; adapted params: %s", os.path.join(storage.absolute(model_dir), "results.json"),
           checkpoints or "none (zero-shot)")
  return 0


def _write_losses(path: str, rows: list[dict], steps: int, log_every: int) -> None:
  """metrics.jsonl: every logged step's mean loss over pairs and each pair's loss; NonFiniteLoss names
  the pairs whose loss became NaN / inf."""
  jsonl = MetricsJsonl(path)
  for step in range(1, steps + 1):
    step_losses = [r["losses"][step - 1] for r in rows]
    bad = [(r["task"], r["seed"]) for r, x in zip(rows, step_losses) if not np.isfinite(x)]
    if bad:
      raise NonFiniteLoss(f"non-finite adaptation loss at step {step} for (task, seed) pairs {bad}")
    if step % log_every == 0 or step == steps:
      jsonl.write(step, {"loss": float(np.mean(step_losses)),
                         **{f"loss/{r['task']}/seed{r['seed']}": float(x) for r, x in zip(rows, step_losses)}})
  jsonl.close()
  if steps:
    log.info("final training loss: %.4f (mean over pairs)", float(np.mean([r["final_loss"] for r in rows])))


def _trainable_per_pair(result: adaptation.AdaptationResult, steps: int) -> int:
  """Parameters one pair trains (-z methods: the new task's routing row only; zero-shot: none)."""
  return int(sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(result.trainable))) if steps else 0


def _agreed_stop(stop: StopSignal) -> bool:
  """Whether a SIGTERM has reached this process or, with several, any process (all ask at the same points)."""
  if jax.process_count() == 1:
    return stop.received
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray([stop.received]))))


def _evaluate_pairs(benchmark, model, result, rows, model_dir: str, mesh, stop: StopSignal, slots: int) -> int:
  """Evaluates this process's pairs (rows: their index, task, seed, final loss), reusing pairs/<i>.json
  written for the same training; adds each pair's metrics and predictions to its row. Returns 0, or
  EXIT_PREEMPTED after a SIGTERM (the evaluated pairs are kept). `slots`: the most pairs a process has; every
  process asks whether to stop after each slot, so that all stop together."""
  from mhr_jax.evaluation import fewshot as fewshot_eval  # pylint: disable=g-import-not-at-top  (TensorFlow)
  with progress_bar(0, len(rows), unit="pair") as pair_bar:
    for j in range(slots):
      if j < len(rows):
        row = rows[j]
        path = _pair_file(model_dir, row["index"])
        saved = read_json(path)
        if saved is None or any(saved.get(k) != row.get(k) for k in ("task", "seed", "final_loss")):
          saved = {**row, **fewshot_eval.evaluate(benchmark, model, result.pair_params(j), row["index"], mesh)}
          write_json_atomic(path, saved)  # with the predictions, for error analysis
        row.update({k: v for k, v in saved.items() if k not in row})
        log.info("%s seed %d: %s", row["task"], row["seed"],
                 format_metrics({k: v for k, v in row.items() if isinstance(v, float)}))
        pair_bar.update(1)
      if j + 1 < slots and _agreed_stop(stop):
        log.info("SIGTERM: %d of %d pairs evaluated (kept in %s); run the same command to resume",
                 min(j + 1, len(rows)), len(rows), os.path.join(model_dir, "pairs"))
        return EXIT_PREEMPTED
  return 0
