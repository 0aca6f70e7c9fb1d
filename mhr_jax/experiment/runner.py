r"""The paper's experiment in one command: base -> multi-task pre-training -> few-shot adaptation of the
held-out tasks with every method -> evaluation -> tables and plots.

  python -m mhr_jax.experiment --gin_file=configs/experiments/demo.gin --gin.MODEL_DIR="'runs/demo'"

Flags as `python -m mhr_jax.train` (mhr_jax/cli.py), plus --dry_run: print the plan (stages, their run
directories, step counts, and which are done) and run nothing. The stages and their gin scopes are
mhr_jax/experiment/plan.py's; each stage is a run directory with its own config.gin, which reruns that stage
alone (`python -m mhr_jax.train --gin_file=MODEL_DIR/<stage>/config.gin`). A stage is done when its
results.json says so (written atomically, last); running the same command again skips finished stages and
continues an interrupted one from its own checkpoint. Every stage config is built and checked before
anything runs. At the end MODEL_DIR holds results.md, results.csv, results.json (`summary`: one row per
method) and plots (mhr_jax/experiment/report.py, which `python -m mhr_jax.experiment.report --model_dir=...` reruns without JAX).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Sequence

import gin
import jax

from mhr_jax import cli, partitioning
from mhr_jax.stages import fewshot, pretrain
from mhr_jax.experiment import report
from mhr_jax import config as config_lib
from mhr_jax.experiment import plan as plan_lib
from mhr_jax.errors import ConfigError, RunError
from mhr_jax.logging_utils import banner, log
from mhr_jax import storage
from mhr_jax.storage import read_json, write_json_atomic


def load_experiment(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()
                    ) -> plan_lib.Experiment:
  """Parses the experiment's gin files and bindings (once: every stage's config is built from them)."""
  config_lib.parse_gin(gin_files, bindings, search_paths)
  try:
    return plan_lib.Experiment()
  except (ValueError, TypeError) as e:
    raise ConfigError(config_lib.one_line(e)) from None


def stage_done(stage: plan_lib.Stage, cfg: config_lib.ExperimentConfig | None) -> bool:
  """Whether the stage's results file says it finished, with the steps its config asks for."""
  results = read_json(os.path.join(stage.directory, "results.json" if stage.kind != "analysis"
                                   else "analysis.json"))
  if results is None:
    return False
  if stage.kind == "analysis":
    return True
  if results.get("status") != "done":
    return False
  return results.get("step" if stage.kind == "train" else "steps") == cfg.run.train_steps


def plan_stages(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()
                ) -> tuple[plan_lib.Experiment, dict[str, tuple[config_lib.ExperimentConfig, str]]]:
  """The experiment and {stage name: (its checked config, its config.gin text)} of every stage but the
  analyses: everything a run checks before it writes anything."""
  exp = load_experiment(gin_files, bindings, search_paths)
  storage.check_reachable(exp.model_dir, "Experiment.model_dir")
  return exp, {s.name: plan_lib.stage_config(exp, s) for s in plan_lib.plan(exp) if s.kind != "analysis"}


def stage_meshes(configs: dict, devices: int, processes: int) -> dict[str, dict]:
  """{stage: its mesh (config.mesh_plan)} on `processes` processes with `devices` devices in all (as many on
  each); ConfigError naming the stage and the key of the first that does not fit."""
  if devices % processes:
    raise ConfigError(f"{devices} devices do not split evenly over {processes} processes")
  meshes = {}
  for name, (cfg, _) in configs.items():
    try:
      meshes[name] = config_lib.mesh_plan(cfg, devices, processes, devices // processes)
    except ConfigError as e:
      raise ConfigError(f"stage {name}: {e}") from None
  return meshes


def run_experiment(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
                   dry_run: bool = False, devices: int | None = None, processes: int | None = None) -> int:
  """Plans and runs the experiment that the gin files and bindings describe; returns 0 when done (then
  MODEL_DIR holds the tables), else the exit status of the stage that stopped (143 after SIGTERM). With
  `dry_run`, logs the plan (every stage's directory, steps and mesh) and runs nothing; `devices` and
  `processes` plan it for another machine (a dry run only; default: this one). ConfigError / RunError for
  what the user can fix, before anything is written: every stage's config and mesh are checked first."""
  banner("plan")
  if (devices or processes) and not dry_run:
    raise ConfigError("--devices and --processes plan for another machine: use them with --dry_run")
  exp, configs = plan_stages(gin_files, bindings, search_paths)
  devices, processes = devices or jax.device_count(), processes or jax.process_count()
  meshes = stage_meshes(configs, devices, processes)
  log.info("%d processes, %d devices", processes, devices)
  stages = plan_lib.plan(exp)
  by_name = {stage.name: stage for stage in stages}
  rows = []
  for stage in stages:
    cfg = configs[stage.name][0] if stage.name in configs else None
    steps = None if cfg is None else cfg.run.train_steps
    mesh = meshes.get(stage.name)
    rows.append({"name": stage.name, "kind": stage.kind, "dir": stage.directory, "row": stage.row,
                 "row_kind": stage.row_kind, "after": list(stage.after), "steps": steps, "mesh": mesh})
    described = "" if mesh is None else (f", mesh data={mesh['data']} fsdp={mesh['fsdp']} model={mesh['model']} "
                                         f"over {mesh['over']}")
    log.info("%-28s %-7s %s%s%s%s", stage.name, stage.kind, stage.directory,
             "" if steps is None else f", {steps} steps", described, " (done)" if stage_done(stage, cfg) else "")
  if dry_run:
    return 0
  if exp.base_run is not None:
    plan_lib.check_base_run(exp.base_run)
  storage.makedirs(exp.model_dir)
  share_compiled_programs(exp.model_dir)
  write_json_atomic(os.path.join(exp.model_dir, "plan.json"),
                    {"model_dir": storage.absolute(exp.model_dir), "stages": rows,
                     "command": command_line(gin_files, bindings, search_paths)})
  _all_processes_at("plan written")
  start = time.time()
  for stage in stages:
    cfg, text = configs.get(stage.name, (None, None))
    if stage_done(stage, cfg):
      log.info("stage %s: done (%s); delete that directory to run it again", stage.name, stage.directory)
      continue
    banner(f"stage {stage.name}")
    for before in stage.after:
      if not storage.isfile(os.path.join(by_name[before].directory, "results.json")):
        raise RunError(f"stage {stage.name} starts from stage {before}, which has not finished")
    status = _run_stage(exp, stage, by_name, cfg, text)
    _all_processes_at(f"end of stage {stage.name}")  # process 0 has written its results
    if status:
      log.info("stage %s stopped (exit %d); run the same command to continue", stage.name, status)
      return status
  banner("tables")
  files = report.write_report(exp.model_dir)
  log.info("experiment done in %.0f s (this run); results: %s", time.time() - start, files["markdown"])
  log.info("\n%s", report.console_table(exp.model_dir))
  return 0


def _all_processes_at(point: str) -> None:
  """A barrier: with several processes, process 0 writes the shared files (a stage's results), which the
  others must see before they read them."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(point)


def share_compiled_programs(model_dir: str) -> None:
  """A persistent compilation cache for the stages: many compile the same programs (every LoRA-kind
  adaptation's step and decoder, for one), and each stage builds its own jitted functions, so without it
  they would compile again. MODEL_DIR/compilation_cache, or, for a URL MODEL_DIR, a local folder (the cache
  is read and written per program, a round trip each on object storage; its entries are keyed by the
  program, so experiments can share one). JAX_COMPILATION_CACHE_DIR, when set, wins."""
  if not jax.config.jax_compilation_cache_dir:
    cache = (os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mhr_jax",
                          "compilation_cache") if storage.is_url(model_dir)
             else os.path.join(storage.absolute(model_dir), "compilation_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    log.info("compiled programs are shared between stages through %s", jax.config.jax_compilation_cache_dir)


def _run_stage(exp: plan_lib.Experiment, stage: plan_lib.Stage, by_name: dict, cfg, text) -> int:
  if stage.kind == "analysis":
    from mhr_jax.analysis import run as analysis  # pylint: disable=g-import-not-at-top
    analysis.analyze(by_name[stage.after[0]].directory, out=stage.directory,
                     grad_batches=exp.analysis_grad_batches)
    return 0
  mesh = config_lib.build_mesh(cfg)
  log.info("%s", partitioning.describe(mesh))
  if cfg.run.mode == "adapt":
    return fewshot.adapt(cfg, text, mesh)
  pretrain.check_start(cfg)
  return pretrain.pretrain(cfg, text, mesh)


def command_line(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> str:
  """The `python -m mhr_jax.experiment` command that runs these gin files and bindings."""
  flags = ([f"--gin_search_paths={p}" for p in search_paths] + [f"--gin_file={f}" for f in gin_files]
           + [f"--gin_bindings={b}" for b in bindings])
  return " ".join(["python -m mhr_jax.experiment", *map(shlex.quote, flags)])


def run(args: argparse.Namespace) -> int:
  return run_experiment(args.gin_file, args.gin_bindings, args.gin_search_paths, args.dry_run, args.devices,
                        args.processes)


def main(argv: list[str] | None = None) -> int:
  parser = cli.flag_parser("python -m mhr_jax.experiment", __doc__.split("\n")[0])
  parser.add_argument("--dry_run", action="store_true",
                      help="print the stages, their run directories, step counts and meshes; run nothing")
  parser.add_argument("--devices", type=int, default=None,
                      help="with --dry_run: plan for this many devices in all (e.g. 16 on a v4-32 slice)")
  parser.add_argument("--processes", type=int, default=None,
                      help="with --dry_run: plan for this many processes (hosts), e.g. 4 on a v4-32 slice")
  try:
    return cli.main(parser, run, argv)
  finally:
    gin.clear_config()


if __name__ == "__main__":
  sys.exit(main())
