r"""Multi-task pre-training and few-shot adaptation from gin configs, with T5X's flags, big_vision's layout.

  python -m mhr_jax.train --gin_file=configs/tiny.gin --gin.MODEL_DIR="'/tmp/tiny'" --gin.TRAIN_STEPS=40

Flags: --gin_file (repeatable; later files override earlier ones), --gin_search_paths (comma separated,
repeatable), --gin.KEY=VALUE and --gin_bindings='KEY = VALUE' (applied after the files, in order; values are
gin literals, so strings carry quotes). Multi-host: --coordinator_address, --num_processes, --process_id (or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or --multihost to let JAX detect the cluster
(TPU pods, SLURM).

The run directory (RunConfig.model_dir) receives config.gin (the operative config), metrics.jsonl (one JSON
object per logged step), TensorBoard events (tb/), orbax checkpoints (checkpoints/) and results.json. The
same command on the same directory resumes from its latest checkpoint, exactly (same data, same random
numbers); SIGTERM saves a checkpoint and exits. Configuration mistakes end the run with one `error:` line
before anything is written. RunConfig.mode="adapt" runs few-shot adaptation (mhr_jax/adaptation.py) from a
pre-training run directory (configs/adapt/). Exit status: 0 done, 2 bad configuration, 3 non-finite loss,
143 stopped by SIGTERM after saving. JAX_COMPILATION_CACHE_DIR=... makes repeated runs skip compilation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from mhr_jax import config as config_lib
from mhr_jax import models, optim, partitioning, train_step
from mhr_jax.adapters import params as params_lib
from mhr_jax.logging_utils import (MetricsJsonl, TensorBoard, Throughput, banner, format_metrics, log,
                                   peak_flops_total, progress_bar, setup_console,
                                   train_flops_per_step)
from mhr_jax.run_checkpoints import (RunCheckpointer, StopSignal, latest_step, restore_params,
                                     write_json_atomic, write_text_atomic)

EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM, after the checkpoint is written

# Which parameters train in pre-training, by adapter kind (rules: mhr_jax/adapters/params.py).
KIND_METHOD = {"none": "full", "lora": "lora", "private_lora": "private_lora", "ia3": "ia3",
               "poly": "poly", "mhr": "mhr"}


class RunError(Exception):
  """A run that cannot go on for a reason the user can fix; the message is one line."""


class NonFiniteLoss(Exception):
  """The loss or a gradient became NaN / inf; the message names the step and the groups."""


# ============================================================================== flags


def _env_int(name: str) -> int | None:
  return int(os.environ[name]) if os.environ.get(name) else None


def parse_flags(argv: list[str]) -> argparse.Namespace:
  """T5X flag habits: --gin.KEY=VALUE is shorthand for --gin_bindings='KEY = VALUE' (order kept)."""
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise config_lib.ConfigError(f"{arg}: expected --gin.KEY=VALUE")
      arg = f"--gin_bindings={key} = {value}"
    rewritten.append(arg)
  parser = argparse.ArgumentParser(prog="python -m mhr_jax.train", description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="comma-separated directories for gin files and includes")
  parser.add_argument("--gin_bindings", action="append", default=[], help="'KEY = VALUE' (repeatable)")
  parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
  parser.add_argument("--num_processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
  parser.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"))
  parser.add_argument("--multihost", action="store_true",
                      help="jax.distributed.initialize() with cluster auto-detection")
  args = parser.parse_args(rewritten)
  if not args.gin_file:
    parser.error("at least one --gin_file is required")
  args.gin_search_paths = [p for group in args.gin_search_paths for p in group.split(",") if p]
  return args


def init_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize() when a coordinator is given (or --multihost); before any JAX use."""
  explicit = args.coordinator_address is not None or args.num_processes not in (None, 1)
  if not (explicit or args.multihost):
    return
  if explicit and None in (args.coordinator_address, args.num_processes, args.process_id):
    raise config_lib.ConfigError(
        "multi-host: give all of --coordinator_address, --num_processes and --process_id "
        "(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # Collectives between CPU processes (tests, CPU clusters) need an explicit implementation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  else:
    jax.distributed.initialize()


# ============================================================================== configuration


def hf_architecture(init_checkpoint: str):
  """The T5Config of a Hugging Face directory's config.json (the weights are read later)."""
  from mhr_jax.checkpoints import hf_t5  # pylint: disable=g-import-not-at-top
  path = os.path.join(init_checkpoint, hf_t5.CONFIG_FILE)
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f"RunConfig.init_checkpoint={init_checkpoint!r}: no {hf_t5.CONFIG_FILE}")
  try:
    with open(path) as f:
      return hf_t5.config_from_hf(json.load(f), path)
  except ValueError as e:  # includes json.JSONDecodeError
    raise config_lib.ConfigError(f"RunConfig.init_checkpoint: {e}") from None


def load_run_config(args: argparse.Namespace) -> tuple[config_lib.ExperimentConfig, str]:
  """Parses gin, builds and validates every config, checks the run directory; writes nothing."""
  config_lib.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
  cfg = config_lib.load_config()
  if cfg.run.init_checkpoint:
    cfg = config_lib.load_config(base_model=hf_architecture(cfg.run.init_checkpoint))
  text = config_lib.operative_config()
  config_lib.check_run_dir(cfg.run.model_dir, text)
  return cfg, text


def make_mesh(cfg: config_lib.ExperimentConfig):
  """The device mesh, and a check that the global batch splits over its batch axes and processes."""
  try:
    mesh = partitioning.make_mesh(cfg.mesh)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch, accum = cfg.data.batch_size, cfg.optimizer.grad_accum_steps
  if batch % shards:
    raise config_lib.ConfigError(
        f"DataConfig.batch_size={batch} is not divisible by the mesh batch axes "
        f"(MeshConfig.data x MeshConfig.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  if batch % jax.process_count():
    raise config_lib.ConfigError(
        f"DataConfig.batch_size={batch} is not divisible by the {jax.process_count()} processes")
  eval_batch = cfg.adapt.eval_batch_size
  if cfg.run.mode == "adapt" and eval_batch and eval_batch % shards:
    raise config_lib.ConfigError(
        f"AdaptConfig.eval_batch_size={eval_batch} is not divisible by the mesh batch axes "
        f"(MeshConfig.data x MeshConfig.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  if batch % accum or (batch // accum) % shards:
    raise config_lib.ConfigError(
        f"OptimizerConfig.grad_accum_steps={accum}: DataConfig.batch_size={batch} must split into "
        f"{accum} micro-batches that divide over the {shards} mesh batch shards")
  return mesh


# ============================================================================== data


def register_data(cfg: config_lib.ExperimentConfig, **fewshot):
  """Registers the SeqIO tasks of DataConfig.source; returns their tasks.*.Registration.

  fewshot: fewshot_seeds (all sources) and fewshot_ks (SuperNI-format sources) of the adaptation splits.
  """
  from mhr_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow: only when training)
  d = cfg.data
  vocabulary = data.get_vocabulary(d.vocabulary)
  if vocabulary.vocab_size > cfg.model.vocab_size:
    raise config_lib.ConfigError(
        f"DataConfig.vocabulary={d.vocabulary!r} has {vocabulary.vocab_size} ids but the model's "
        f"vocab_size is {cfg.model.vocab_size}")
  if d.source == "synthetic":
    from tasks import synthetic  # pylint: disable=g-import-not-at-top
    out = d.data_dir or os.path.join(cfg.run.model_dir, "synthetic_data")
    # Deterministic files written atomically: every process may write them.
    registration = synthetic.register_synthetic(
        out, vocabulary, n_train_tasks=d.synthetic_train_tasks, n_test_tasks=d.synthetic_test_tasks,
        n_instances=d.synthetic_instances, seed=d.synthetic_seed, **fewshot)
    log.info("synthetic suite: %s", out)
  elif d.source == "superni":
    from tasks import superni  # pylint: disable=g-import-not-at-top
    registration = superni.register_superni(
        d.data_dir, vocabulary, max_train_instances=d.max_train_instances,
        input_format=superni.InputFormat(d.prompt, d.num_pos_examples, d.input_len), **fewshot)
  else:
    from tasks import t0  # pylint: disable=g-import-not-at-top
    seeds = fewshot.get("fewshot_seeds")
    registration = t0.register_t0(d.data_dir, vocabulary, catalog_path=d.catalog or t0.CATALOG,
                                  fewshot_seeds=None if seeds is None else tuple(seeds))
  names = registration.mixtures.get(d.task, ())
  ids = [registration.task_ids[n] for n in names if n in registration.task_ids]
  adapter = cfg.model.adapter
  if ids and adapter.uses_task_ids and max(ids) >= adapter.n_tasks:
    raise config_lib.ConfigError(
        f"AdapterConfig.n_tasks={adapter.n_tasks} but {d.task} has task ids up to {max(ids)}; "
        f"set AdapterConfig.n_tasks={max(ids) + 1}")
  log.info("data: %s/%s, %d tasks, vocabulary %s (%d ids)", d.task, d.split, len(names) or 1,
           d.vocabulary, vocabulary.vocab_size)
  return registration, vocabulary


def host_batches(cfg: config_lib.ExperimentConfig, skip: int):
  """This process's rows of each global batch, from batch number `skip` on (exact resume)."""
  from mhr_jax import data  # pylint: disable=g-import-not-at-top
  d, n, index = cfg.data, jax.process_count(), jax.process_index()
  local = d.batch_size // n
  common = dict(input_len=d.input_len, target_len=d.target_len, pack=d.pack, seed=cfg.run.seed)
  if d.host_input == "global":
    stream = data.train_batches(d.task, d.split, d.batch_size, **common)
    take = lambda b: {k: v[index * local:(index + 1) * local] for k, v in b.items()}  # noqa: E731
  else:
    stream = data.train_batches(d.task, d.split, local, shard_index=index, num_shards=n, **common)
    take = lambda b: b  # noqa: E731
  for _ in range(skip):
    next(stream)
  for batch in stream:
    yield take(batch)


# ============================================================================== state


def initial_params(cfg: config_lib.ExperimentConfig, model, mesh, key):
  """Unboxed params on the mesh: random init, then the HF base weights when init_checkpoint is set."""
  boxed = train_step.abstract_boxed_params(model)
  shardings = partitioning.param_shardings(boxed, mesh)
  inputs = train_step.dummy_inputs(model)

  def init(k):
    variables = model.init({"params": k, "dropout": k}, enable_dropout=False, **inputs)
    return nn.unbox(variables)["params"]

  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_RULES):
    params = jax.jit(init, out_shardings=shardings)(key)
  if not cfg.run.init_checkpoint:
    log.info("base weights: random init (seed %d)", cfg.run.seed)
    return params
  from mhr_jax.checkpoints import hf_t5  # pylint: disable=g-import-not-at-top
  try:
    _, base = hf_t5.load_hf_t5(cfg.run.init_checkpoint)
    params, report = hf_t5.merge_base_params(params, base)
  except ValueError as e:
    raise RunError(f"RunConfig.init_checkpoint={cfg.run.init_checkpoint!r}: {e}") from None
  log.info("base weights: %s (%s)", cfg.run.init_checkpoint, report)
  return params


def param_rules(cfg: config_lib.ExperimentConfig):
  if cfg.run.param_rules is not None:
    return [tuple(rule) for rule in cfg.run.param_rules]
  return params_lib.default_rules(KIND_METHOD[cfg.model.adapter.kind])


# ============================================================================== loop helpers


class MetricsSink:
  """Collects per-step device metrics without blocking; `flush` fetches them, stops on NaN/inf and
  writes the logged steps (JSONL, TensorBoard, console)."""

  def __init__(self, cfg, jsonl: MetricsJsonl, tb: TensorBoard, throughput: Throughput):
    self._cfg, self._jsonl, self._tb, self._throughput = cfg, jsonl, tb, throughput
    self._pending: list[tuple[int, dict]] = []
    self.last: dict = {}

  def add(self, step: int, metrics: dict, tokens: float) -> None:
    self._pending.append((step, metrics))
    self._throughput.add(1, tokens)

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

  def close(self) -> None:
    self._tb.close()


def _host_tokens(batch) -> float:
  """Non-padding input + target tokens of the global batch (this host's rows x processes)."""
  local = np.count_nonzero(batch["encoder_input_tokens"]) + np.count_nonzero(
      batch["decoder_target_tokens"])
  return float(local * jax.process_count())


# ============================================================================== pre-training


def pretrain(cfg: config_lib.ExperimentConfig, config_text: str, mesh) -> int:
  """Sections data -> state -> checkpoint -> loop; returns the exit status."""
  run_cfg, model_dir = cfg.run, cfg.run.model_dir
  start_time = time.time()
  write_text_atomic(os.path.join(model_dir, "config.gin"), config_text)

  banner("data")
  register_data(cfg)
  banner("state")
  model = models.T5(cfg.model)
  abstract = params_lib.abstract_params(cfg.model)
  labels = params_lib.param_labels(abstract, param_rules(cfg))
  optimizer = optim.make_optimizer(cfg.optimizer, labels, run_cfg.train_steps)
  abstract_state = train_step.abstract_train_state(model, labels, optimizer, mesh)
  counts = params_lib.count_params(abstract, param_rules(cfg))
  log.info("params: %s total, %s trainable %s", f"{counts['total']:,}", f"{counts['trainable']:,}",
           {g: counts[g] for g in optim.TRAINED_GROUPS if counts.get(g)})
  root = jax.random.key(run_cfg.seed)
  init_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)

  banner("checkpoint")
  checkpointer = RunCheckpointer(os.path.join(model_dir, "checkpoints"), run_cfg.checkpoint_every,
                                 run_cfg.keep_checkpoints, run_cfg.async_checkpoints)
  start = checkpointer.latest_step()
  if start is None:
    state = train_step.init_train_state(model, initial_params(cfg, model, mesh, init_key), labels,
                                        optimizer, mesh)
    start, skip = 0, 0
    log.info("no checkpoint in %s: starting at step 0", checkpointer.directory)
  else:
    state, progress = checkpointer.restore(start, abstract_state)
    skip = int(progress["batches_consumed"])
    if progress.get("host_input") == "sharded" and progress.get("processes") != jax.process_count():
      log.warning("resuming a host_input='sharded' run on %d processes (saved with %s): the data "
                  "order differs from an uninterrupted run", jax.process_count(), progress.get("processes"))
    log.info("resumed from %s/%d (data position: %d batches)", checkpointer.directory, start, skip)

  banner("loop")
  total = run_cfg.train_steps
  batches = host_batches(cfg, skip)
  step_fn = train_step.make_train_step(model, optimizer, cfg.loss, mesh,
                                       train_step.shardings_of(abstract_state),
                                       grad_accum_steps=cfg.optimizer.grad_accum_steps,
                                       total_steps=total)
  flops = train_flops_per_step(cfg.model, cfg.data.batch_size, cfg.data.input_len, cfg.data.target_len,
                               trains_base=counts.get("base", 0) > 0)
  sink = MetricsSink(cfg, MetricsJsonl(os.path.join(model_dir, "metrics.jsonl"), start if start else None),
                     TensorBoard(os.path.join(model_dir, "tb")),
                     Throughput(flops, peak_flops_total()))
  stop = StopSignal()

  def progress_of(step):  # the data position: one batch per step
    return {"step": step, "batches_consumed": skip + step - start, "seed": run_cfg.seed,
            "host_input": cfg.data.host_input, "processes": jax.process_count()}

  bar = progress_bar(start, total)
  status, done = 0, start
  try:
    for done in range(start + 1, total + 1):
      batch = next(batches)
      tokens = _host_tokens(batch)
      state, metrics = step_fn(state, partitioning.global_batch(batch, mesh),
                               jax.random.fold_in(step_key, done))
      sink.add(done, metrics, tokens)
      bar.update(1)
      due = done % run_cfg.checkpoint_every == 0 or done == total
      if done % run_cfg.log_every == 0 or due:
        sink.flush()
        bar.set_postfix(loss=f"{sink.last['loss']:.4f}", refresh=False)
      if due:
        checkpointer.save(done, state, progress_of(done), force=True)
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

  results = {"status": "preempted" if status else "done", "step": done, "train_steps": total,
             "resumed_from": start, "final_metrics": sink.last, "wall_time_s": time.time() - start_time,
             "model_dir": os.path.abspath(model_dir), "checkpoints": checkpointer.directory,
             "latest_checkpoint": checkpointer.latest_step(),
             "metrics": os.path.join(os.path.abspath(model_dir), "metrics.jsonl"),
             "tensorboard": os.path.join(os.path.abspath(model_dir), "tb"),
             "config": os.path.join(os.path.abspath(model_dir), "config.gin")}
  write_json_atomic(os.path.join(model_dir, "results.json"), results)
  if status == EXIT_PREEMPTED:
    log.info("SIGTERM: checkpoint saved at step %d; run the same command to resume", done)
  banner("results")
  log.info("step %d/%d; results: %s", done, total, os.path.join(results["model_dir"], "results.json"))
  log.info("checkpoints: %s (latest %s); metrics: %s; TensorBoard: tensorboard --logdir %s",
           results["checkpoints"], results["latest_checkpoint"], results["metrics"], results["tensorboard"])
  return status


# ============================================================================== few-shot adaptation


def check_adaptation(cfg: config_lib.ExperimentConfig, config_text: str) -> int:
  """The pre-training run to adapt from: present, checkpointed, same model; returns its latest step."""
  pre = cfg.run.pretrain_dir
  if not os.path.isfile(os.path.join(pre, "config.gin")):
    raise config_lib.ConfigError(f"RunConfig.pretrain_dir={pre!r}: no config.gin there (not a run directory)")
  step = latest_step(os.path.join(pre, "checkpoints"))
  if step is None:
    raise config_lib.ConfigError(f"RunConfig.pretrain_dir={pre!r}: no checkpoint in "
                                 f"{os.path.join(pre, 'checkpoints')} (run or resume its pre-training first)")
  config_lib.check_run_dir(pre, config_text, fix="adapt with the pre-training run's model config")
  loss_kind = "tfew" if cfg.data.source == "t0" else "lm"
  if cfg.loss.kind != loss_kind:
    raise config_lib.ConfigError(
        f"LossConfig.kind={cfg.loss.kind!r}: few-shot adaptation on DataConfig.source={cfg.data.source!r} "
        f"trains with LossConfig.kind={loss_kind!r}")
  if cfg.adapt.select_every and cfg.data.source == "t0":
    raise config_lib.ConfigError("AdaptConfig.select_every: the T0 protocol has no dev split (T-Few keeps "
                                 "the last step); use 0")
  if jax.process_count() > 1:
    raise config_lib.ConfigError("few-shot adaptation runs in one process (its pair batches are host-global)")
  return step


def adapt(cfg: config_lib.ExperimentConfig, config_text: str, mesh, pretrain_step: int) -> int:
  """Adapts every (task, seed) pair from the pre-trained checkpoint, evaluates, writes the results."""
  from mhr_jax import adaptation, fewshot_benchmarks  # pylint: disable=g-import-not-at-top
  a, run_cfg, model_dir = cfg.adapt, cfg.run, cfg.run.model_dir
  start_time = time.time()
  write_text_atomic(os.path.join(model_dir, "config.gin"), config_text)

  banner("data")
  fewshot = {"fewshot_seeds": a.seeds} if cfg.data.source == "t0" else {"fewshot_ks": (a.shots,),
                                                                        "fewshot_seeds": a.seeds}
  registration, vocabulary = register_data(cfg, **fewshot)
  benchmark = fewshot_benchmarks.fewshot_pairs(cfg, registration, vocabulary)
  pairs = benchmark.pairs
  log.info("%d pairs: %s", len(pairs), benchmark.description)

  banner("state")
  params = restore_params(os.path.join(run_cfg.pretrain_dir, "checkpoints"), pretrain_step)
  log.info("pre-trained params: %s/checkpoints/%d", run_cfg.pretrain_dir, pretrain_step)
  keys = jax.numpy.stack([jax.random.fold_in(jax.random.key(seed), i) for i, (_, seed) in enumerate(pairs)])

  banner("loop")
  steps = run_cfg.train_steps
  if not steps:
    log.info("RunConfig.train_steps=0: evaluating the %s starting point zero-shot", a.method)
  batches = (fewshot_benchmarks.PairBatches(benchmark.train_streams(), keep_all=a.method == "full")
             if steps else None)
  dev_batches = benchmark.dev_batches() if a.select_every and steps else None
  if dev_batches:
    log.info("best-on-dev: every %d steps on %d dev batches per pair", a.select_every, len(dev_batches))
  bar = progress_bar(0, steps * (len(pairs) if a.method == "full" else 1))
  try:
    result = adaptation.adapt(a.method, cfg.model, params, cfg.optimizer, cfg.loss, batches, keys, steps,
                              dev_batches=dev_batches, eval_every=a.select_every, mesh=mesh,
                              progress=bar.update)
  finally:
    bar.close()
  jsonl = MetricsJsonl(os.path.join(model_dir, "metrics.jsonl"))
  for step, losses in enumerate(result.losses, start=1):
    bad = [p for p, x in zip(pairs, losses) if not np.isfinite(x)]
    if bad:
      raise NonFiniteLoss(f"non-finite adaptation loss at step {step} for (task, seed) pairs {bad}")
    if step % run_cfg.log_every == 0 or step == steps:
      jsonl.write(step, {"loss": float(np.mean(losses)),
                         **{f"loss/{t}/seed{seed}": float(x) for (t, seed), x in zip(pairs, losses)}})
  rows = [{"task": t, "seed": seed} for t, seed in pairs]
  if steps:
    log.info("final training loss: %.4f (mean over pairs)", float(np.mean(result.losses[-1])))
    for i, row in enumerate(rows):
      row["final_loss"] = float(result.losses[-1, i])

  banner("evaluate")
  model = models.T5(result.model_cfg)
  if dev_batches:
    for i, row in enumerate(rows):
      row.update(best_step=int(result.best_step[i]), best_dev_loss=float(np.min(result.dev_losses[:, i])))
  if a.evaluate:
    with progress_bar(0, len(rows), unit="pair") as pair_bar:
      for i, row in enumerate(rows):
        row.update(benchmark.evaluate(model, result.pair_params(i), i, mesh))
        log.info("%s seed %d: %s", row["task"], row["seed"],
                 format_metrics({k: v for k, v in row.items() if isinstance(v, float)}))
        pair_bar.update(1)
  checkpointer = RunCheckpointer(os.path.join(model_dir, "checkpoints"), max(steps, 1), None,
                                 run_cfg.async_checkpoints)
  checkpointer.save(steps, {"trainable": result.trainable, "frozen": result.frozen},
                    {"pairs": [list(p) for p in pairs], "method": a.method}, force=True)
  checkpointer.wait()
  checkpointer.close()
  results = {"status": "done", "method": a.method, "source": cfg.data.source, "steps": steps,
             "pretrain_dir": os.path.abspath(run_cfg.pretrain_dir), "pretrain_step": pretrain_step,
             "pairs": rows, "wall_time_s": time.time() - start_time, "checkpoints": checkpointer.directory}
  if cfg.data.source != "t0":
    results["shots"] = a.shots
  if a.evaluate:
    results["table"], markdown = benchmark.summary(rows)
    write_text_atomic(os.path.join(model_dir, "results.md"),
                      f"# {a.method} few-shot adaptation ({cfg.data.source}); mean ± std over seeds "
                      f"{list(a.seeds)}\n\n{markdown}\n")
  write_json_atomic(os.path.join(model_dir, "results.json"), results)
  banner("results")
  if a.evaluate:
    log.info("results (mean ± std over seeds):\n%s", markdown)
  log.info("results: %s; adapted params: %s", os.path.join(os.path.abspath(model_dir), "results.json"),
           checkpointer.directory)
  return 0


# ============================================================================== main


def run(args: argparse.Namespace) -> int:
  """Everything after flag parsing; returns the process exit status."""
  banner("setup")
  cfg, config_text = load_run_config(args)
  log.info("config: %s", json.dumps(config_lib.describe(cfg)))
  log.info("run directory: %s", os.path.abspath(cfg.run.model_dir))

  pretrain_step = check_adaptation(cfg, config_text) if cfg.run.mode == "adapt" else None

  banner("mesh")
  mesh = make_mesh(cfg)
  log.info("%s", partitioning.describe(mesh))
  if cfg.run.mode == "adapt":
    return adapt(cfg, config_text, mesh, pretrain_step)
  return pretrain(cfg, config_text, mesh)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse_flags(argv)
    init_distributed(args)
    setup_console()  # tags lines with the process index: after jax.distributed is up
    return run(args)
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_NONFINITE
  except (config_lib.ConfigError, RunError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return EXIT_CONFIG_ERROR


if __name__ == "__main__":
  sys.exit(main())
