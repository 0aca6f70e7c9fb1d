"""The experiment's plan: which stages run, in which directories, from which gin scope (no JAX here).

The paper's experiment is a chain of ordinary runs, each a run directory that `python -m mhr_jax.train`
could have made (T5X chains pretrain.gin -> finetune.gin the same way, by paths):

  MODEL_DIR/base/                 multi-task full fine-tuning of the base on the training tasks (only
                                  without Experiment.base_checkpoint, a Hugging Face base)
  MODEL_DIR/pretrain/<kind>/      multi-task pre-training of each adapter kind in Experiment.pretrain
                                  ("full": multi-task full fine-tuning of the base, where `full` adapts from)
  MODEL_DIR/pretrain/<kind>-mu/   zero-shot MHR-mu: the skills averaged, trained Experiment.mu_steps more
  MODEL_DIR/adapt/<method>/       few-shot adaptation of every (held-out task, seed) pair, per method
  MODEL_DIR/control/<method>/     the same from the base with a fresh adapter (no multi-task pre-training)
  MODEL_DIR/zeroshot/<name>/      held-out evaluation without any task data (0 adaptation steps)
  MODEL_DIR/analysis/<kind>/      routing heatmaps, task similarity, gradient alignment of routed runs

Each stage reads the experiment's gin files under its gin scope, so `pretrain/OptimizerConfig.adapter_lr`
applies to the pre-training stages only; the stage's own settings (mode, adapter kind, where it starts)
are bound over them. Scopes: base, pretrain/<kind> (a pre-training stage of one kind; `pretrain/` bindings
apply to every kind, `pretrain/ia3/` ones to (IA)^3 only), mu, adapt (adapt, control and zeroshot stages).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import gin

from mhr_jax.adapters import params as params_lib
from mhr_jax.config import ConfigError, check_local_paths

PRETRAIN_KINDS = ("poly", "mhr", "lora", "private_lora", "ia3", "full")
NO_TASK_ID_KINDS = ("lora", "ia3")  # pre-trained kinds a held-out task can use as they are


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Experiment:
  """The experiment (`python -m mhr_jax.experiment`): base -> pre-training -> adaptation -> tables.

  Attributes:
    model_dir: the experiment directory (MODEL_DIR); every stage is a run directory below it.
    base_checkpoint: a Hugging Face T5 directory as the base; None trains one first (stage "base":
      multi-task full fine-tuning on the training tasks, settings under the gin scope "base").
    pretrain: adapter kinds pre-trained multi-task from the base (PRETRAIN_KINDS); "full" is multi-task
      full fine-tuning of the base (every weight, no adapter), the authors' starting point for `full`.
    adapt: few-shot methods (adapters.params.METHODS); each starts from the pre-training run of its
      method's kind (mhr, mhr-z, mhr-mu from "mhr"; full from "full" when pre-trained, else the base).
    controls: methods adapted from the base with a fresh adapter, as the no-pre-training control.
    zero_shot: held-out evaluation with no task data: "base", a pre-trained kind that needs no task
      id ("lora", "ia3"), or "<kind>-mu" for zero-shot MHR-mu / Poly-mu (the averaged skills, trained
      `mu_steps` more multi-task steps; scope "mu").
    mu_steps: the multi-task steps of each "<kind>-mu" stage.
    analysis: analyse each routed pre-training run (mhr_jax.analysis).
    analysis_grad_batches: batches per task for the gradient alignment of the analysis.
  """
  model_dir: str = ""
  base_checkpoint: str | None = None
  pretrain: tuple = ("poly", "mhr", "lora")
  adapt: tuple = ("poly", "poly-z", "poly-mu", "mhr", "mhr-z", "mhr-mu", "lora")
  controls: tuple = ("lora",)
  zero_shot: tuple = ("base",)
  mu_steps: int = 0
  analysis: bool = True
  analysis_grad_batches: int = 2

  def __post_init__(self):
    for name in ("pretrain", "adapt", "controls", "zero_shot"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not self.model_dir:
      raise ConfigError("Experiment.model_dir is empty: pass --gin.MODEL_DIR=\"'/path'\"")
    check_local_paths("Experiment", self, ("model_dir", "base_checkpoint"))
    if self.base_checkpoint is not None and not os.path.isdir(self.base_checkpoint):
      raise ConfigError(f"Experiment.base_checkpoint={self.base_checkpoint!r}: no such directory")
    for kind in self.pretrain:
      if kind not in PRETRAIN_KINDS:
        raise ConfigError(f"Experiment.pretrain: unknown adapter kind {kind!r}; expected some of {PRETRAIN_KINDS}")
    for key in ("adapt", "controls"):
      for method in getattr(self, key):
        if method not in params_lib.METHODS:
          raise ConfigError(f"Experiment.{key}: unknown method {method!r}; expected some of {params_lib.METHODS}")
    for method in self.adapt:
      kind = params_lib.METHOD_TABLE[method].kind
      if kind != "none" and kind not in self.pretrain:
        raise ConfigError(f"Experiment.adapt: {method!r} adapts a pre-trained {kind!r} adapter; add {kind!r} "
                          f"to Experiment.pretrain")
    for method in self.controls:
      if "none" not in params_lib.METHOD_TABLE[method].starts_from or method == "full":
        raise ConfigError(f"Experiment.controls: {method!r} cannot start from a plain base; use one of "
                          f"{tuple(m for m, i in params_lib.METHOD_TABLE.items() if 'none' in i.starts_from and m != 'full')}")
    for name in self.zero_shot:
      kind = name[:-3] if name.endswith("-mu") else name
      if name == "base":
        continue
      if name.endswith("-mu"):
        if kind not in ("poly", "mhr") or kind not in self.pretrain:
          raise ConfigError(f"Experiment.zero_shot: {name!r} averages a pre-trained Poly / MHR inventory; "
                            f"add {kind!r} to Experiment.pretrain")
        if self.mu_steps < 0:
          raise ConfigError(f"Experiment.mu_steps={self.mu_steps}: must be >= 0")
      elif kind not in NO_TASK_ID_KINDS or kind not in self.pretrain:
        raise ConfigError(f"Experiment.zero_shot: {name!r}: expected 'base', a pre-trained kind of "
                          f"{NO_TASK_ID_KINDS} or '<poly|mhr>-mu'")
    if self.analysis_grad_batches < 1:
      raise ConfigError(f"Experiment.analysis_grad_batches={self.analysis_grad_batches}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: a run directory MODEL_DIR/<name>.

  kind: "train" (pre-training / base), "adapt" (adaptation or evaluation) or "analysis".
  scope: the gin scope its settings come from.  bindings: ((key, value), ...) bound over them.
  row: for "adapt" stages, the results row name; row_kind "few-shot", "control" or "zero-shot".
  after: the stages whose output it starts from.
  """
  name: str
  kind: str
  scope: str
  bindings: tuple[tuple[str, Any], ...] = ()
  row: str | None = None
  row_kind: str | None = None
  after: tuple[str, ...] = ()

  def directory(self, model_dir: str) -> str:
    return os.path.join(model_dir, *self.name.split("/"))


def _adapter(kind: str) -> tuple[tuple[str, Any], ...]:
  # Poly is MHR with one head; every other setting of the adapter is shared by the stages.
  return (("AdapterConfig.kind", kind),) + ((("AdapterConfig.n_splits", 1),) if kind == "poly" else ())


def plan(exp: Experiment) -> list[Stage]:
  """The stages of `exp`, in the order they run."""
  stages: list[Stage] = []
  root = exp.model_dir
  run_binds = (("RunConfig.init_checkpoint", None), ("RunConfig.init_run", None),
               ("RunConfig.init_transform", None), ("RunConfig.pretrain_dir", None))

  def where(name: str) -> str:
    return os.path.join(root, *name.split("/"))

  if exp.base_checkpoint is None:
    stages.append(Stage("base", "train", "base", run_binds + _adapter("none") + (("RunConfig.mode", "pretrain"),)))
    base_start = (("RunConfig.init_run", where("base")),)
    base_after: tuple[str, ...] = ("base",)
    adapt_from_base = (("RunConfig.pretrain_dir", where("base")),)
  else:
    base_start = (("RunConfig.init_checkpoint", exp.base_checkpoint),)
    base_after = ()
    adapt_from_base = (("RunConfig.init_checkpoint", exp.base_checkpoint),)

  for kind in exp.pretrain:
    stages.append(Stage(f"pretrain/{kind}", "train", f"pretrain/{kind}",
                        run_binds + base_start + _adapter("none" if kind == "full" else kind)
                        + (("RunConfig.mode", "pretrain"),), after=base_after))
  for name in exp.zero_shot:
    if name.endswith("-mu"):
      source = f"pretrain/{name[:-3]}"
      stages.append(Stage(f"pretrain/{name}", "train", "mu", run_binds + _adapter("lora") + (
          ("RunConfig.mode", "pretrain"), ("RunConfig.init_run", where(source)), ("RunConfig.init_transform", "mu"),
          ("RunConfig.train_steps", exp.mu_steps if exp.mu_steps else 1)), after=(source,)))

  def adapt_stage(name, method, kind, start, after, row, row_kind, extra=()):
    return Stage(name, "adapt", "adapt", run_binds + start + _adapter(kind) + (
        ("RunConfig.mode", "adapt"), ("AdaptConfig.method", method)) + extra, row=row, row_kind=row_kind,
                 after=after)

  zero = (("RunConfig.train_steps", 0),)
  for name in exp.zero_shot:
    if name == "base":
      stages.append(adapt_stage("zeroshot/base", "full", "none", adapt_from_base, base_after, "base (zero-shot)",
                                "zero-shot", zero))
    elif name.endswith("-mu"):
      source = f"pretrain/{name}"
      stages.append(adapt_stage(f"zeroshot/{name}", "lora", "lora", (("RunConfig.pretrain_dir", where(source)),),
                                (source,), f"{name} (zero-shot)", "zero-shot", zero))
    else:
      source = f"pretrain/{name}"
      stages.append(adapt_stage(f"zeroshot/{name}", name, name, (("RunConfig.pretrain_dir", where(source)),),
                                (source,), f"{name} (zero-shot)", "zero-shot", zero))
  for method in exp.adapt:
    kind = params_lib.METHOD_TABLE[method].kind
    if kind == "none" and "full" in exp.pretrain:
      start, after = (("RunConfig.pretrain_dir", where("pretrain/full")),), ("pretrain/full",)
    elif kind == "none":
      start, after = adapt_from_base, base_after
    else:
      start, after = (("RunConfig.pretrain_dir", where(f"pretrain/{kind}")),), (f"pretrain/{kind}",)
    stages.append(adapt_stage(f"adapt/{method}", method, kind, start, after, method, "few-shot"))
  for method in exp.controls:
    stages.append(adapt_stage(f"control/{method}", method, params_lib.METHOD_TABLE[method].kind, adapt_from_base,
                              base_after, f"{method} (no pre-training)", "control"))
  if exp.analysis:
    for kind in exp.pretrain:
      if kind in ("poly", "mhr"):
        stages.append(Stage(f"analysis/{kind}", "analysis", "pretrain", after=(f"pretrain/{kind}",)))
  return stages


def stage_bindings(stage: Stage, model_dir: str, extra: tuple[tuple[str, Any], ...] = ()) -> list[str]:
  """The stage's settings as scoped gin binding strings (they win over the experiment's own)."""
  values = dict(stage.bindings)
  values["RunConfig.model_dir"] = stage.directory(model_dir)
  values.update(extra)
  return [f"{stage.scope}/{key} = {value!r}" for key, value in values.items()]
