r"""The paper's experiment in one command: base -> multi-task pre-training -> few-shot adaptation of the
held-out tasks with every method -> evaluation -> tables and plots.

  python -m mhr_jax.experiment --gin_file=configs/experiments/demo.gin --gin.MODEL_DIR="'runs/demo'"

Flags as `python -m mhr_jax.train` (mhr_jax/cli.py), plus --dry_run: print the plan (stages, their run
directories, step counts, and which are done) and run nothing. The stages and their gin scopes are
mhr_jax/experiment_plan.py's; each stage is a run directory with its own config.gin, which reruns that stage
alone (`python -m mhr_jax.train --gin_file=MODEL_DIR/<stage>/config.gin`). A stage is done when its
results.json says so (written atomically, last); running the same command again skips finished stages and
continues an interrupted one from its own checkpoint. Every stage config is built and checked before
anything runs. At the end MODEL_DIR holds results.md, results.csv, results.json (`summary`: one row per
method) and plots (mhr_jax/report.py, which `python -m mhr_jax.report --model_dir=...` reruns without JAX).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import gin
import jax

from mhr_jax import cli, fewshot, partitioning, pretrain, report
from mhr_jax import config as config_lib
from mhr_jax import experiment_plan as plan_lib
from mhr_jax.errors import RunError
from mhr_jax.logging_utils import banner, log
from mhr_jax.run_checkpoints import write_json_atomic


def load_experiment(args: argparse.Namespace) -> plan_lib.Experiment:
  config_lib.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
  try:
    return plan_lib.Experiment()
  except (ValueError, TypeError) as e:
    raise config_lib.ConfigError(config_lib.one_line(e)) from None


def stage_config(args: argparse.Namespace, exp: plan_lib.Experiment, stage: plan_lib.Stage
                 ) -> tuple[config_lib.ExperimentConfig, str]:
  """The stage's checked config and its config.gin text (explicit bindings, with the rerun command)."""
  extra: tuple = ()
  for _ in range(2):
    bindings = [*args.gin_bindings, *plan_lib.stage_bindings(stage, exp.model_dir, extra)]
    cfg, _ = config_lib.load_run_config(args.gin_file, bindings, args.gin_search_paths, scope=stage.scope)
    wanted = []
    if cfg.data.source == "synthetic" and not cfg.data.data_dir:  # one copy of the suite for every stage
      wanted.append(("DataConfig.data_dir", os.path.join(exp.model_dir, "synthetic_data")))
    if stage.row_kind == "zero-shot" and len(cfg.adapt.seeds) > 1:  # nothing trains: one evaluation
      wanted.append(("AdaptConfig.seeds", cfg.adapt.seeds[:1]))
    if not wanted or extra:
      break
    extra = tuple(wanted)
  header = (f"Stage {stage.name} of the experiment in {os.path.abspath(exp.model_dir)}. Rerun it alone:\n"
            f"  python -m mhr_jax.train --gin_file={os.path.join(os.path.abspath(cfg.run.model_dir), 'config.gin')}")
  return cfg, config_lib.to_gin(cfg, header)


def _steps(cfg: config_lib.ExperimentConfig) -> int:
  return cfg.run.train_steps


def stage_done(stage: plan_lib.Stage, directory: str, cfg: config_lib.ExperimentConfig | None) -> bool:
  """Whether the stage's results file says it finished, with the steps its config asks for."""
  results = report.read_json(os.path.join(directory, "results.json" if stage.kind != "analysis"
                                          else "analysis.json"))
  if results is None:
    return False
  if stage.kind == "analysis":
    return True
  if results.get("status") != "done":
    return False
  return results.get("step" if stage.kind == "train" else "steps") == _steps(cfg)


def run(args: argparse.Namespace) -> int:
  banner("plan")
  exp = load_experiment(args)
  stages = plan_lib.plan(exp)
  configs = {}
  for stage in stages:  # every config error before anything is written
    if stage.kind != "analysis":
      configs[stage.name] = stage_config(args, exp, stage)
  rows = []
  for stage in stages:
    directory = stage.directory(exp.model_dir)
    cfg = configs[stage.name][0] if stage.name in configs else None
    done = stage_done(stage, directory, cfg)
    steps = "" if cfg is None else f", {_steps(cfg)} steps"
    rows.append({"name": stage.name, "kind": stage.kind, "dir": os.path.abspath(directory), "row": stage.row,
                 "row_kind": stage.row_kind, "after": list(stage.after),
                 "steps": None if cfg is None else _steps(cfg)})
    log.info("%-28s %-7s %s%s%s", stage.name, stage.kind, os.path.abspath(directory), steps,
             " (done)" if done else "")
  if args.dry_run:
    return 0
  os.makedirs(exp.model_dir, exist_ok=True)
  _share_compiled_programs(exp.model_dir)
  write_json_atomic(os.path.join(exp.model_dir, "plan.json"),
                    {"model_dir": os.path.abspath(exp.model_dir), "stages": rows,
                     "command": " ".join(["python -m mhr_jax.experiment", *sys.argv[1:]])})
  start = time.time()
  for stage in stages:
    directory = stage.directory(exp.model_dir)
    cfg, text = configs.get(stage.name, (None, None))
    if stage_done(stage, directory, cfg):
      log.info("stage %s: done (%s); delete that directory to run it again", stage.name, directory)
      continue
    banner(f"stage {stage.name}")
    status = _run_stage(exp, stage, cfg, text)
    if status:
      log.info("stage %s stopped (exit %d); run the same command to continue", stage.name, status)
      return status
  banner("tables")
  files = report.write_report(exp.model_dir)
  log.info("experiment done in %.0f s (this run); results: %s", time.time() - start, files["markdown"])
  log.info("\n%s", report.console_table(exp.model_dir))
  return 0


def _share_compiled_programs(model_dir: str) -> None:
  """A persistent compilation cache for the stages: many compile the same programs (every LoRA-kind
  adaptation's step and decoder, for one), and each stage builds its own jitted functions, so without it
  they would compile again. JAX_COMPILATION_CACHE_DIR, when set, wins."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(model_dir), "compilation_cache"))
    log.info("compiled programs are shared between stages through %s", jax.config.jax_compilation_cache_dir)


def _run_stage(exp: plan_lib.Experiment, stage: plan_lib.Stage, cfg, text) -> int:
  if stage.kind == "analysis":
    from mhr_jax import analysis  # pylint: disable=g-import-not-at-top
    source = os.path.join(exp.model_dir, *stage.after[0].split("/"))
    return analysis.analyze(source, out=stage.directory(exp.model_dir), grad_batches=exp.analysis_grad_batches)
  for before in stage.after:
    if not os.path.isfile(os.path.join(exp.model_dir, *before.split("/"), "results.json")):
      raise RunError(f"stage {stage.name} starts from stage {before}, which has not finished")
  mesh = config_lib.build_mesh(cfg)
  log.info("%s", partitioning.describe(mesh))
  if cfg.run.mode == "adapt":
    return fewshot.adapt(cfg, text, mesh)
  pretrain.check_start(cfg)
  return pretrain.pretrain(cfg, text, mesh)


def main(argv: list[str] | None = None) -> int:
  parser = cli.flag_parser("python -m mhr_jax.experiment", __doc__.split("\n")[0])
  parser.add_argument("--dry_run", action="store_true",
                      help="print the stages, their run directories and step counts; run nothing")
  try:
    return cli.main(parser, run, argv)
  finally:
    gin.clear_config()


if __name__ == "__main__":
  sys.exit(main())
