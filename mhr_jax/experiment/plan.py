"""The experiment's plan: which stages run, in which directories, with which settings (nothing here runs JAX).

The paper's experiment is a chain of ordinary runs, each a run directory that `python -m mhr_jax.train`
could have made (T5X chains pretrain.gin -> finetune.gin the same way, by paths):

  MODEL_DIR/base/                 multi-task full fine-tuning of the base on the training tasks (only
                                  without Experiment.base_checkpoint, a Hugging Face base, or
                                  Experiment.base_run)
  MODEL_DIR/pretrain/<kind>/      multi-task pre-training of each adapter kind in Experiment.pretrain
                                  ("full": multi-task full fine-tuning of the base, where `full` adapts from)
  MODEL_DIR/pretrain/<kind>-mu/   zero-shot MHR-mu: the skills averaged, trained Experiment.mu_steps more
  MODEL_DIR/adapt/<method>/       few-shot adaptation of every (held-out task, seed) pair, per method
  MODEL_DIR/control/<method>/     the same from the base with a fresh adapter (no multi-task pre-training)
  MODEL_DIR/zeroshot/<name>/      held-out evaluation without any task data (0 adaptation steps)
  MODEL_DIR/analysis/<kind>/      routing heatmaps, task similarity, gradient alignment of pre-training runs

A stage's config is built as objects: the experiment's gin files are parsed once; each stage instantiates
the config dataclasses under its gin scope (base; pretrain/<kind>, so that `pretrain/` bindings apply to
every pre-training stage and `pretrain/ia3/` ones to (IA)^3's only; mu; adapt, or adapt/<variant>), and
passes its own settings
(mode, adapter kind, where it starts, its directory) as arguments, which win over every binding
(`Stage.settings`, `config.load_config`). Which pre-training a method needs, and whether it can be a
control, comes from the method table (adapters.methods).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import gin

from mhr_jax import config as config_lib
from mhr_jax.adapters import methods
from mhr_jax.adapters.config import KIND_TABLE
from mhr_jax.errors import ConfigError
from mhr_jax import storage
from mhr_jax.storage import read_json



FULL = "full"  # Experiment.pretrain's name for multi-task full fine-tuning of the base (adapter kind "none")


def _adapter_kind(pretrained: str) -> str:
  """The adapter kind of an Experiment.pretrain entry."""
  return "none" if pretrained == FULL else pretrained


def _zero_shot_names(pretrain: tuple[str, ...]) -> tuple[str, ...]:
  """What Experiment.zero_shot may name, given the pre-trained kinds."""
  adapters = [k for k in pretrain if k != FULL]
  plain = [k for k in adapters if not KIND_TABLE[k].task_ids]   # a held-out task can use them as they are
  averaged = [f"{k}-mu" for k in adapters if KIND_TABLE[k].routed]
  return ("base", *plain, *averaged)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Experiment:
  """The experiment (`python -m mhr_jax.experiment`): base -> pre-training -> adaptation -> tables.

  Attributes:
    model_dir: the experiment directory (MODEL_DIR); every stage is a run directory below it.
    base_checkpoint: a Hugging Face T5 directory as the base; None (and no base_run) trains one first
      (stage "base": multi-task full fine-tuning on the training tasks, settings under the gin scope "base").
    base_run: a finished run directory of adapter kind "none" (e.g. another experiment's base stage) whose
      latest checkpoint is the base: experiments that share one base need not train it again.
    pretrain: adapter kinds pre-trained multi-task from the base (adapters.methods.pretrainable_kinds()), and
      "full": multi-task full fine-tuning of the base (every weight, no adapter), the authors' starting point
      for the `full` baseline.
    adapt: few-shot methods (adapters.methods.METHODS); each starts from the pre-training run of its
      record's `pretrain_kind` (mhr, mhr-z, mhr-mu from "mhr"; full from "full" when it is pre-trained,
      else from the base). An entry
      "<method>@<variant>" adapts the method with the settings of the gin scope adapt/<variant> as well
      (e.g. `adapt/fast/OptimizerConfig.routing_lr = 1.0`): its own stage adapt/<method>@<variant> and row.
    controls: methods adapted from the base with a fresh adapter, as the no-pre-training control (those
      whose record allows `control`).
    zero_shot: held-out evaluation with no task data: "base", a pre-trained kind without task ids
      ("lora", "ia3"), or "<kind>-mu" for zero-shot MHR-mu / Poly-mu (the averaged skills, trained
      `mu_steps` more multi-task steps; scope "mu").
    mu_steps: the multi-task steps of each "<kind>-mu" stage.
    analysis: analyse pre-training runs (mhr_jax.analysis: routing, task similarity, gradient alignment).
    analysis_kinds: the pre-trained kinds analysed; None: those with routing.
    analysis_grad_batches: batches per task for the gradient alignment of the analysis.
  """
  model_dir: str = ""
  base_checkpoint: str | None = None
  base_run: str | None = None
  pretrain: tuple = ("poly", "mhr", "lora")
  adapt: tuple = ("poly", "poly-z", "poly-mu", "mhr", "mhr-z", "mhr-mu", "lora")
  controls: tuple = ("lora",)
  zero_shot: tuple = ("base",)
  mu_steps: int = 0
  analysis: bool = True
  analysis_kinds: tuple | None = None
  analysis_grad_batches: int = 2

  def __post_init__(self):
    for name in ("pretrain", "adapt", "controls", "zero_shot"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.analysis_kinds is None:
      object.__setattr__(self, "analysis_kinds", tuple(k for k in self.pretrain if k != FULL and KIND_TABLE[k].routed))
    object.__setattr__(self, "analysis_kinds", tuple(self.analysis_kinds))
    if not self.model_dir:
      raise ConfigError("Experiment.model_dir is empty: pass --gin.MODEL_DIR=\"'/path'\"")
    storage.check_paths("Experiment", self, ("model_dir", "base_checkpoint", "base_run"),
                        run_dirs=("model_dir", "base_run"))
    if self.base_checkpoint is not None and not storage.isdir(self.base_checkpoint):
      raise ConfigError(f"Experiment.base_checkpoint={self.base_checkpoint!r}: no such directory")
    if self.base_checkpoint is not None and self.base_run is not None:
      raise ConfigError("Experiment.base_checkpoint and Experiment.base_run both give the base: give one")
    for kind in self.analysis_kinds if self.analysis else ():
      if kind not in self.pretrain:
        raise ConfigError(f"Experiment.analysis_kinds: {kind!r} is not pre-trained (Experiment.pretrain)")
    kinds = (*methods.pretrainable_kinds(), FULL)
    for kind in self.pretrain:
      if kind not in kinds:
        raise ConfigError(f"Experiment.pretrain: unknown adapter kind {kind!r}; expected some of {kinds}")
    for key in ("adapt", "controls"):
      for entry in getattr(self, key):
        method, variant = split_entry(entry)
        if method not in methods.METHOD_TABLE:
          raise ConfigError(f"Experiment.{key}: unknown method {method!r}; expected some of {methods.METHODS}")
        if variant is not None and (key == "controls" or not re.fullmatch(r"[A-Za-z_]\w*", variant)):
          raise ConfigError(f"Experiment.{key}: {entry!r}: a variant is '<method>@<gin scope name>' (letters, "
                            "digits, '_'), for Experiment.adapt")
    for method in (split_entry(e)[0] for e in self.adapt):
      kind = methods.METHOD_TABLE[method].pretrain_kind
      if kind != "none" and kind not in self.pretrain:
        raise ConfigError(f"Experiment.adapt: {method!r} adapts a pre-trained {kind!r} adapter; add {kind!r} "
                          f"to Experiment.pretrain")
    for method in self.controls:
      if not methods.METHOD_TABLE[method].control:
        raise ConfigError(f"Experiment.controls: {method!r} cannot start from a plain base; use one of "
                          f"{methods.controls()}")
    allowed = _zero_shot_names(self.pretrain)
    for name in self.zero_shot:
      if name not in allowed:
        raise ConfigError(f"Experiment.zero_shot: {name!r}: expected one of {allowed} ('base', a pre-trained "
                          "kind without task ids, or '<poly|mhr>-mu' of a pre-trained inventory)")
    if self.mu_steps < 0:
      raise ConfigError(f"Experiment.mu_steps={self.mu_steps}: must be >= 0")
    if self.analysis_grad_batches < 1:
      raise ConfigError(f"Experiment.analysis_grad_batches={self.analysis_grad_batches}: must be >= 1")


def check_base_run(run_dir: str) -> None:
  """ConfigError unless `run_dir` is a finished pre-training run of the plain base (adapter kind "none");
  checked when the experiment starts running (a study plans its cells before their base is trained)."""
  results = read_json(os.path.join(run_dir, "results.json"))
  if results is None or results.get("status") != "done" or results.get("mode") != "pretrain":
    raise ConfigError(f"Experiment.base_run={run_dir!r}: not a finished pre-training run directory "
                      "(no results.json with status 'done')")
  kind = config_lib.saved_adapter_config(run_dir).kind
  if kind != "none":
    raise ConfigError(f"Experiment.base_run={run_dir!r}: holds adapter kind {kind!r}; a base is kind 'none'")


def split_entry(entry: str) -> tuple[str, str | None]:
  """An Experiment.adapt entry "<method>[@<variant>]" as (method, variant or None)."""
  method, _, variant = entry.partition("@")
  return method, (variant or None) if "@" in entry else None


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: a run directory below MODEL_DIR.

  kind: "train" (pre-training / base), "adapt" (adaptation or evaluation) or "analysis".
  scope: the gin scope its settings come from.
  directory: its run directory (absolute).
  settings: {config section: {field: value}}, the stage's own settings (`config.load_config`'s arguments).
  row: for "adapt" stages, the results row name; row_kind "few-shot", "control" or "zero-shot".
  after: the names of the stages whose output it starts from (for "analysis": the run it analyses).
  """
  name: str
  kind: str
  scope: str
  directory: str
  settings: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  row: str | None = None
  row_kind: str | None = None
  after: tuple[str, ...] = ()


def _adapter(kind: str) -> dict[str, Any]:
  # Poly is MHR with one head; every other setting of the adapter is shared by the stages.
  return {"kind": kind, **({"n_splits": 1} if kind == "poly" else {})}


def _run(directory: str, mode: str, **start) -> dict[str, Any]:
  """RunConfig settings of a stage: every start field explicit, so no user binding can add another."""
  fields = {"init_checkpoint": None, "init_run": None, "init_transform": None, "pretrain_dir": None}
  return {"model_dir": directory, "mode": mode, **fields, **start}


def plan(exp: Experiment) -> list[Stage]:
  """The stages of `exp`, in the order they run."""
  root = storage.absolute(exp.model_dir)
  where = lambda name: os.path.join(root, *name.split("/"))  # noqa: E731
  stages: list[Stage] = []

  if exp.base_run is not None:
    base = storage.absolute(exp.base_run)
    base_start, adapt_from_base, base_after = {"init_run": base}, {"pretrain_dir": base}, ()
  elif exp.base_checkpoint is None:
    stages.append(Stage("base", "train", "base", where("base"),
                        {"run": _run(where("base"), "pretrain"), "adapter": _adapter("none")}))
    base_start, adapt_from_base, base_after = ({"init_run": where("base")}, {"pretrain_dir": where("base")},
                                               ("base",))
  else:
    base_start = adapt_from_base = {"init_checkpoint": storage.absolute(exp.base_checkpoint)}
    base_after = ()

  for kind in exp.pretrain:
    name = f"pretrain/{kind}"
    stages.append(Stage(name, "train", name, where(name),
                        {"run": _run(where(name), "pretrain", **base_start), "adapter": _adapter(_adapter_kind(kind))},
                        after=base_after))
  for entry in exp.zero_shot:
    if entry.endswith("-mu"):
      name, source = f"pretrain/{entry}", f"pretrain/{entry[:-3]}"
      stages.append(Stage(name, "train", "mu", where(name), {
          "run": _run(where(name), "pretrain", init_run=where(source), init_transform="mu",
                      train_steps=exp.mu_steps or 1),
          "adapter": _adapter("lora")}, after=(source,)))

  def adapt_stage(name, method, kind, start, after, row, row_kind, steps=None, variant=None):
    run = _run(where(name), "adapt", **start, **({} if steps is None else {"train_steps": steps}))
    return Stage(name, "adapt", "adapt" if variant is None else f"adapt/{variant}", where(name),
                 {"run": run, "adapter": _adapter(kind), "adapt": {"method": method}},
                 row=row, row_kind=row_kind, after=after)

  for entry in exp.zero_shot:
    name = f"zeroshot/{entry}"
    if entry == "base":
      stages.append(adapt_stage(name, "full", "none", adapt_from_base, base_after, "base (zero-shot)",
                                "zero-shot", steps=0))
    else:  # a pre-trained kind without task ids, or the averaged inventory (a plain LoRA)
      source = f"pretrain/{entry}"
      method = "lora" if entry.endswith("-mu") else entry
      stages.append(adapt_stage(name, method, method, {"pretrain_dir": where(source)}, (source,),
                                f"{entry} (zero-shot)", "zero-shot", steps=0))
  for entry in exp.adapt:
    method, variant = split_entry(entry)
    kind = methods.METHOD_TABLE[method].pretrain_kind
    if kind == "none" and FULL in exp.pretrain:
      start, after = {"pretrain_dir": where(f"pretrain/{FULL}")}, (f"pretrain/{FULL}",)
    elif kind == "none":
      start, after = adapt_from_base, base_after
    else:
      start, after = {"pretrain_dir": where(f"pretrain/{kind}")}, (f"pretrain/{kind}",)
    stages.append(adapt_stage(f"adapt/{entry}", method, kind, start, after, entry, "few-shot", variant=variant))
  for method in exp.controls:
    stages.append(adapt_stage(f"control/{method}", method, methods.METHOD_TABLE[method].pretrain_kind,
                              adapt_from_base, base_after, f"{method} (no pre-training)", "control"))
  if exp.analysis:
    for kind in exp.analysis_kinds:
      stages.append(Stage(f"analysis/{kind}", "analysis", "pretrain", where(f"analysis/{kind}"),
                          after=(f"pretrain/{kind}",)))
  return stages


def stage_config(exp: Experiment, stage: Stage) -> tuple[config_lib.ExperimentConfig, str]:
  """The stage's checked config and its config.gin text (explicit bindings, with the command that reruns it
  alone). The gin files must be parsed (`config.parse_gin`); nothing is written."""
  settings = {section: dict(values) for section, values in stage.settings.items()}
  with gin.config_scope(stage.scope):
    try:
      data, adapt = config_lib.DataConfig(), config_lib.AdaptConfig()
    except (ValueError, TypeError) as e:
      raise ConfigError(config_lib.one_line(e)) from None
    if data.source == "synthetic" and not data.data_dir:  # one copy of the suite for every stage
      settings.setdefault("data", {})["data_dir"] = os.path.join(storage.absolute(exp.model_dir), "synthetic_data")
    if stage.row_kind == "zero-shot" and len(adapt.seeds) > 1:  # nothing trains: one evaluation
      settings.setdefault("adapt", {})["seeds"] = adapt.seeds[:1]
    cfg = config_lib.resolve_config(**settings)
  config_lib.check_run_dir(cfg.run.model_dir, cfg, fix=f"delete {cfg.run.model_dir} to run stage {stage.name} "
                           "with the new settings")
  header = (f"Stage {stage.name} of the experiment in {storage.absolute(exp.model_dir)}. Rerun it alone:\n"
            f"  python -m mhr_jax.train --gin_file={os.path.join(stage.directory, 'config.gin')}")
  return cfg, config_lib.to_gin(cfg, header)
