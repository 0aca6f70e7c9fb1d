r"""The study: the paper's findings tested with enough pre-training seeds, adaptation seeds and held-out tasks
to tell, with the hypotheses and their statistics fixed before anything runs.

  python -m mhr_jax.experiment.study --gin_file=configs/studies/embedded.gin --gin.MODEL_DIR="'runs/study'" [--dry_run]

A study is a set of cells, each an ordinary experiment run directory (mhr_jax/experiment/runner.py) below MODEL_DIR:
  MODEL_DIR/base/              the base, trained once (an experiment with only its base stage and the stages
                               of Study.shared, which do not depend on pre-training, e.g. the base's
                               zero-shot evaluation and full fine-tuning from the base); every other cell
                               starts from it (Experiment.base_run)
  MODEL_DIR/seed<s>/           the experiment with pre-training seed s (`pretrain/` and `mu/RunConfig.seed`),
                               every method adapted with every seed of Study.adapt_seeds
  MODEL_DIR/seed<s>-<k><v>/    the sweep: the experiment again with setting k = v (Study.sweep), restricted by
                               Study.sweep_bindings (e.g. to MHR alone)
Finished cells and stages are skipped and an interrupted one resumes (a stage's results file says whether it
is done), so the same command after a kill -9 goes on where the run stopped. The cells share one persistent
compilation cache, so each program compiles once.

Before the first cell runs, MODEL_DIR/study_plan.json records the cells and the hypotheses with their tests
(Study.hypotheses). After the last, `report(MODEL_DIR)` (NumPy and matplotlib only; `python -m
mhr_jax.experiment.study --report_only` reruns it) writes results.json (`hypotheses`: per hypothesis the paired
differences, their mean, a 95% crossed bootstrap interval over held-out tasks, pre-training seeds and
adaptation seeds, and a verdict), results.md, forest.png (the intervals and every paired difference),
sweep.png (the metric against the swept setting) and alignment.png (gradient alignment by method).

Quantities a hypothesis compares are stage names of the cells with a metric: "adapt/mhr" (few-shot: one
value per held-out task, pre-training seed and adaptation seed), "zeroshot/mhr-mu" (one per task and
pre-training seed), "analysis/mhr" (gradient alignment: one per pre-training seed). "max(a, b)" and
"mean(a, b)" combine quantities observation by observation. A stage in Study.tune is the candidate whose
mean dev score (the adaptation's best-on-dev ROUGE-L, over every pair of every main cell) is highest: the
only setting chosen from data, and from dev splits only.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import Any, Mapping, Sequence

import gin

from mhr_jax.errors import ConfigError
from mhr_jax.experiment import statistics
from mhr_jax.experiment.study_report import PLAN_FILE, report, stages_of
from mhr_jax import storage
from mhr_jax.storage import write_json_atomic

STAGE_KINDS = ("adapt", "zeroshot", "analysis")  # the stages a hypothesis can compare
_HYPOTHESIS_KEYS = ("id", "claim", "a", "b", "test")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Study:
  """A study over the experiment that the same gin files configure.

  Attributes:
    model_dir: the study directory (MODEL_DIR); every cell is an experiment directory below it.
    pretrain_seeds: one main cell per seed (the seed of pre-training and of the zero-shot MHR-mu stages).
    adapt_seeds: the adaptation seeds of every cell (AdaptConfig.seeds of the "adapt" scope).
    sweep: (gin key, values): one more cell per pre-training seed and value (besides the main cells, whose
      value is the experiment's own), e.g. ("AdapterConfig.n_splits", (1, 2, 8)).
    sweep_seeds: the pre-training seeds of the sweep cells (default: pretrain_seeds).
    sweep_bindings: gin bindings of the sweep cells only, e.g. restricting them to MHR.
    sweep_stages: the stages whose metric the sweep figure shows (e.g. ("adapt/mhr", "adapt/mhr-z")).
    shared: stages that start from the base and not from any pre-training ("zeroshot/base", "adapt/full"
      when full fine-tuning adapts the base, "control/<method>"): when the study trains its base, they run
      once, in the base cell, and stand for every pre-training seed.
    tune: {stage: (candidate stages, ...)}: the stage a hypothesis names is the candidate with the best mean
      dev score (see the module docstring).
    metric: the pairs' metric that few-shot and zero-shot quantities compare: "rougeL" or "exact_match"
      (SuperNI-format sources), "median_over_templates" or "mean_over_templates" (T0); analysis quantities
      compare gradient alignment.
    hypotheses: dicts with "id", "claim", "a", "b" (quantities), "test" ("superiority": a > b + margin;
      "non-inferiority": a > b - margin) and optionally "margin" (default 0, in the metric's units).
    n_resamples, confidence, bootstrap_seed: the crossed bootstrap (mhr_jax/experiment/statistics.py).
    device_tflops: for the dry run's estimate of device-hours: sustained TFLOP/s of one accelerator.
  """
  model_dir: str = ""
  pretrain_seeds: tuple = (0, 1, 2)
  adapt_seeds: tuple = (13, 42, 58)
  sweep: tuple = ()
  sweep_seeds: tuple | None = None
  sweep_bindings: tuple = ()
  sweep_stages: tuple = ()
  shared: tuple = ()
  tune: dict = dataclasses.field(default_factory=dict)
  metric: str = "rougeL"
  hypotheses: tuple = ()
  n_resamples: int = 10000
  confidence: float = 0.95
  bootstrap_seed: int = 0
  device_tflops: float = 400.0

  def __post_init__(self):
    if self.sweep_seeds is None:
      object.__setattr__(self, "sweep_seeds", self.pretrain_seeds)
    for name in ("pretrain_seeds", "adapt_seeds", "sweep", "sweep_seeds", "sweep_bindings", "sweep_stages",
                 "shared", "hypotheses"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for stage in self.shared:
      if not re.fullmatch(r"(zeroshot/base|(adapt|control)/[\w.@-]+)", stage):
        raise ConfigError(f"Study.shared: {stage!r}: expected 'zeroshot/base', 'adapt/<method>' or "
                          "'control/<method>' (stages that start from the base)")
    object.__setattr__(self, "tune", {k: tuple(v) for k, v in dict(self.tune).items()})
    if not self.model_dir:
      raise ConfigError("Study.model_dir is empty: pass --gin.MODEL_DIR=\"'/path'\"")
    if not self.pretrain_seeds or not self.adapt_seeds:
      raise ConfigError("Study.pretrain_seeds and Study.adapt_seeds: give at least one seed each")
    if len(set(self.pretrain_seeds)) != len(self.pretrain_seeds) or len(set(self.adapt_seeds)) != len(
        self.adapt_seeds):
      raise ConfigError(f"Study seeds must be distinct: pretrain_seeds={self.pretrain_seeds}, "
                        f"adapt_seeds={self.adapt_seeds}")
    if self.sweep and (len(self.sweep) != 2 or not isinstance(self.sweep[0], str) or not self.sweep[1]):
      raise ConfigError(f"Study.sweep={self.sweep!r}: expected (gin key, (values, ...))")
    if not 0 < self.confidence < 1 or self.n_resamples < 100:
      raise ConfigError(f"Study.confidence={self.confidence}, Study.n_resamples={self.n_resamples}: need "
                        "0 < confidence < 1 and at least 100 resamples")
    ids = set()
    for i, h in enumerate(self.hypotheses):
      missing = [k for k in _HYPOTHESIS_KEYS if k not in h]
      if missing:
        raise ConfigError(f"Study.hypotheses[{i}]: missing {missing[0]!r} (keys: {list(_HYPOTHESIS_KEYS)})")
      if h["test"] not in statistics.KINDS:
        raise ConfigError(f"Study.hypotheses[{i}] ({h['id']}): test={h['test']!r}: expected one of "
                          f"{statistics.KINDS}")
      if h["id"] in ids:
        raise ConfigError(f"Study.hypotheses: id {h['id']!r} appears twice")
      ids.add(h["id"])
      for side in ("a", "b"):
        try:
          stages = stages_of(h[side])
        except ValueError as e:
          raise ConfigError(str(e)) from None
        for stage in stages:
          if stage.split("/")[0] not in STAGE_KINDS:
            raise ConfigError(f"Study.hypotheses[{i}] ({h['id']}): {side}={h[side]!r}: {stage!r} is not a "
                              f"stage of kind {STAGE_KINDS}")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One experiment of the study: its name, directory, role ("base", "main", "sweep"), pre-training seed,
  swept value, and the gin bindings that make it (added to the study's own files and flags)."""
  name: str
  directory: str
  role: str
  seed: int | None
  value: Any
  bindings: tuple[str, ...]


def _value_name(value) -> str:
  return re.sub(r"[^\w.-]", "_", str(value))


_SHARED_LISTS = {"adapt": "adapt", "control": "controls", "zeroshot": "zero_shot"}  # stage kind -> Experiment field


def cells(study: Study, trains_base: bool = True, lists: Mapping[str, tuple] | None = None) -> list[Cell]:
  """The cells, in the order they run.

  Args:
    trains_base: the experiment trains its base (no Experiment.base_checkpoint): then a first cell trains it
      once (with the stages of Study.shared) and every other cell starts from it.
    lists: the experiment's Experiment.adapt, .controls and .zero_shot; needed when Study.shared names
      stages (the main cells then leave them out).
  """
  root = storage.absolute(study.model_dir)
  base_dir = os.path.join(root, "base")
  base_run = os.path.join(base_dir, "base")
  adapt_seeds = f"adapt/AdaptConfig.seeds = {tuple(study.adapt_seeds)!r}"
  shared = study.shared if trains_base else ()
  if shared and lists is None:
    raise ValueError("cells: Study.shared needs the experiment's adapt, controls and zero_shot lists")
  mine = {field: tuple(stage.split("/", 1)[1] for stage in shared if _SHARED_LISTS[stage.split("/")[0]] == field)
          for field in _SHARED_LISTS.values()}
  for field, entries in mine.items():
    missing = [e for e in entries if e not in lists[field]]
    if missing:
      raise ConfigError(f"Study.shared: {missing[0]!r} is not in Experiment.{field} {lists[field]}")
  out = []
  if trains_base:
    out.append(Cell("base", base_dir, "base", None, None, (
        f"Experiment.model_dir = {base_dir!r}", "Experiment.pretrain = ()", "Experiment.analysis = False",
        *(f"Experiment.{field} = {entries!r}" for field, entries in mine.items()), adapt_seeds)))
  rest = tuple(f"Experiment.{field} = {tuple(e for e in lists[field] if e not in mine[field])!r}"
               for field in _SHARED_LISTS.values()) if shared else ()

  def cell(name, seed, value, role, extra):
    directory = os.path.join(root, name)
    start = (f"Experiment.base_run = {base_run!r}",) if trains_base else ()
    return Cell(name, directory, role, seed, value, (
        f"Experiment.model_dir = {directory!r}", *start, f"pretrain/RunConfig.seed = {seed!r}",
        f"mu/RunConfig.seed = {seed!r}", adapt_seeds, *rest, *extra))

  out += [cell(f"seed{s}", s, None, "main", ()) for s in study.pretrain_seeds]
  if study.sweep:
    key, values = study.sweep
    for value in values:
      for s in study.sweep_seeds:
        out.append(cell(f"seed{s}-{key.split('.')[-1]}{_value_name(value)}", s, value, "sweep",
                        (f"{key} = {value!r}", *study.sweep_bindings)))
  return out


def load_study(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> Study:
  from mhr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mhr_jax.experiment import plan  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (registers Experiment)
  config_lib.parse_gin(gin_files, bindings, search_paths)
  try:
    return Study()
  except (ValueError, TypeError) as e:
    raise ConfigError(config_lib.one_line(e)) from None


def run_study(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
              dry_run: bool = False) -> int:
  """Plans the study, checks every cell's experiment (every stage's config) before anything is written, then
  runs the cells that are not done and writes the report; returns 0, or a stopped cell's exit status."""
  from mhr_jax.experiment import plan as experiment_plan, runner as experiment  # pylint: disable=g-import-not-at-top  (JAX)
  from mhr_jax.logging_utils import banner, log  # pylint: disable=g-import-not-at-top
  banner("study")
  study = load_study(gin_files, bindings, search_paths)
  exp = experiment_plan.Experiment()
  lists = {field: getattr(exp, field) for field in _SHARED_LISTS.values()}
  plan = cells(study, trains_base=exp.base_checkpoint is None, lists=lists)
  planned = []
  for cell in plan:  # every cell's stages, built and checked: nothing is written yet
    exp, configs = experiment.plan_stages(gin_files, [*bindings, *cell.bindings], search_paths)
    planned.append((cell, [(stage, configs.get(stage.name, (None,))[0]) for stage in experiment_plan.plan(exp)]))
  main_value = _swept_value(study, planned)
  total_hours = 0.0
  for cell, stages in planned:
    hours = sum(estimate_device_hours(cfg, study.device_tflops) for _, cfg in stages)
    total_hours += hours
    log.info("cell %-24s %-5s %s: %d stages, ~%.1f device-hours at %.0f TFLOP/s", cell.name, cell.role,
             cell.directory, len(stages), hours, study.device_tflops)
    if dry_run:
      for stage, cfg in stages:
        steps = "" if cfg is None else f", {cfg.run.train_steps} steps"
        log.info("    %-26s %s%s", stage.name, stage.kind, steps)
  log.info("%d cells; estimated %.1f device-hours in all (model FLOPs / %.0f TFLOP/s sustained; evaluation as "
           "one forward pass per test and dev instance)", len(plan), total_hours, study.device_tflops)
  if dry_run:
    return 0
  storage.makedirs(study.model_dir)
  root = storage.absolute(study.model_dir)
  experiment.share_compiled_programs(root)
  write_json_atomic(os.path.join(root, PLAN_FILE), {
      "model_dir": root, "hypotheses": list(study.hypotheses), "tune": study.tune, "metric": study.metric,
      "pretrain_seeds": list(study.pretrain_seeds), "adapt_seeds": list(study.adapt_seeds),
      "sweep": list(study.sweep), "sweep_main_value": main_value, "sweep_stages": list(study.sweep_stages),
      "shared": [s for s in study.shared if any(c.role == "base" for c in plan)],
      "statistics": {"n_resamples": study.n_resamples, "confidence": study.confidence,
                     "seed": study.bootstrap_seed},
      "cells": [{"name": c.name, "dir": c.directory, "role": c.role, "seed": c.seed, "value": c.value,
                 "command": experiment.command_line(gin_files, [*bindings, *c.bindings], search_paths)}
                for c in plan]})
  start = time.time()
  for cell in plan:
    banner(f"cell {cell.name}")
    status = experiment.run_experiment(gin_files, [*bindings, *cell.bindings], search_paths)
    if status:
      log.info("cell %s stopped (exit %d); run the same command to continue", cell.name, status)
      return status
  banner("report")
  files = report(root)
  log.info("study done in %.0f s (this run); results: %s", time.time() - start, files["markdown"])
  log.info("\n%s", storage.read_text(files["markdown"]))
  return 0


def _swept_value(study: Study, planned) -> Any:
  """The swept setting's value in the main cells (the experiment's own): read from a main cell's config of the
  first sweep stage; ConfigError when the sweep names no stage of the main cells."""
  if not study.sweep:
    return None
  from mhr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  key = study.sweep[0]
  section, _, field = key.partition(".")
  names = {gin_name: name for name, (gin_name, _) in config_lib.SECTIONS.items()}
  if section not in names or not study.sweep_stages:
    raise ConfigError(f"Study.sweep={study.sweep!r}: the key must be 'Section.field' of {sorted(names)}, and "
                      "Study.sweep_stages must name the stages to plot")
  for cell, stages in planned:
    for stage, cfg in stages:
      if cell.role == "main" and stage.name == study.sweep_stages[0] and cfg is not None:
        return getattr(_section(cfg, names[section]), field)
  raise ConfigError(f"Study.sweep_stages: {study.sweep_stages[0]!r} is not a stage of the main cells")


def _section(cfg, name: str):
  return cfg.model.adapter if name == "adapter" else getattr(cfg, {"model": "model_cfg"}.get(name, name))


def estimate_device_hours(cfg, device_tflops: float) -> float:
  """Device-hours of one stage at its model's size: training FLOPs of its steps (every pair's), plus one
  forward pass per evaluated instance (100 test instances per pair, dev instances at each selection)."""
  if cfg is None:
    return 0.0
  from mhr_jax.adapters import methods  # pylint: disable=g-import-not-at-top
  from mhr_jax.logging_utils import train_flops_per_step  # pylint: disable=g-import-not-at-top
  d, run = cfg.data, cfg.run
  if run.mode == "pretrain":
    trains_base = cfg.model.adapter.kind == "none"
    flops = run.train_steps * train_flops_per_step(cfg.model, d.batch_size, d.input_len, d.target_len, trains_base)
    return flops / (device_tflops * 1e12) / 3600
  method = methods.get(cfg.adapt.method)
  tasks = max(len(cfg.adapt.tasks), 1) if cfg.adapt.tasks else _heldout_count(cfg)
  pairs = tasks * len(cfg.adapt.seeds)
  train = run.train_steps * train_flops_per_step(cfg.model, d.batch_size, d.input_len, d.target_len,
                                                 method.trains_base)
  selections = run.train_steps // cfg.adapt.select_every if cfg.adapt.select_every else 0
  evaluated = 100 + selections * cfg.adapt.shots
  forward = train_flops_per_step(cfg.model, evaluated, d.input_len, d.target_len, False) / 2
  return pairs * (train + forward) / (device_tflops * 1e12) / 3600


def _heldout_count(cfg) -> int:
  """Held-out tasks of an adaptation config without an explicit task list."""
  d = cfg.data
  if d.source == "synthetic":
    return d.synthetic_test_tasks
  if d.test_task_list:
    return sum(1 for line in storage.read_text(d.test_task_list).splitlines() if line.strip())
  if d.source == "superni":
    return sum(1 for line in storage.read_text(os.path.join(d.data_dir, "splits", "default", "test_tasks.txt"))
               .splitlines() if line.strip())
  return 11  # the T0 protocol's held-out datasets


# ============================================================================== command


def main(argv: Sequence[str] | None = None) -> int:
  from mhr_jax import cli  # pylint: disable=g-import-not-at-top
  parser = cli.flag_parser("python -m mhr_jax.experiment.study", __doc__.split("\n")[0])
  parser.add_argument("--dry_run", action="store_true",
                      help="print every cell, its stages and an estimate of device-hours; run nothing")
  parser.add_argument("--report_only", action="store_true",
                      help="rewrite the report of a finished study from its files (runs no JAX)")

  def run(args: argparse.Namespace) -> int:
    if args.report_only:
      study = load_study(args.gin_file, args.gin_bindings, args.gin_search_paths)
      report(storage.absolute(study.model_dir))
      return 0
    return run_study(args.gin_file, args.gin_bindings, args.gin_search_paths, args.dry_run)
  try:
    return cli.main(parser, run, argv)
  finally:
    gin.clear_config()


if __name__ == "__main__":
  sys.exit(main())
