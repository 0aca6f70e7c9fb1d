"""Run configuration: gin binds a few small dataclasses; everything is validated before any work.

Bindable (gin selector names):
  ModelConfig     size preset + T5Config field overrides (the architecture)
  AdapterConfig   mhr_jax.adapters.config.AdapterConfig (method, rank, K, S, routing, ...)
  DataConfig      task / mixture, batch size, feature lengths, packing, data directories
  LossConfig      mhr_jax.losses.LossConfig
  OptimizerConfig mhr_jax.optim.OptimizerConfig
  MeshConfig      mhr_jax.partitioning.MeshConfig
  RunConfig       run directory, steps, logging / checkpoint cadence, seed, mode, start weights
  AdaptConfig     few-shot adaptation (mode "adapt"): method, tasks, shots, seeds
T5X-style macros (`MODEL_DIR`, `TRAIN_STEPS`) are ordinary gin macros that the config files use.
Errors are ConfigError (a ValueError) with one line naming the file, flag or key.

`load_run_config` turns gin files and flags into one checked `ExperimentConfig`. `load_config` builds one
from gin already parsed, with a gin scope (e.g. "pretrain": bindings written `pretrain/OptimizerConfig.
adapter_lr = ...` take precedence, which is how one experiment file configures its stages) and with values
given as arguments, which win over every binding (a stage's own settings). `to_gin` writes a config back as
explicit bindings. A run directory records its settings as data (`write_run_files`: config.gin and
run_config.json); `saved_model_config` / `read_run_config` read them back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import gin

from mhr_jax.adapters import methods
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.errors import ConfigError
from mhr_jax.training.losses import LossConfig
from mhr_jax.models.config import T5Config, preset
from mhr_jax.training.optim import OptimizerConfig
from mhr_jax.partitioning import MeshConfig
from mhr_jax import storage
from mhr_jax.storage import read_json, write_json_atomic, write_text_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("pretrain", "adapt")
SOURCES = ("synthetic", "superni", "t0")
SYNTHETIC_SUITES = ("demo", "study")  # tasks.synthetic.SUITES
HOST_INPUTS = ("global", "sharded")
PROMPTS = ("tk_instruct", "definition", "input_only", "authors")
T0_CAPS = ("authors", "t0")
SELECT_METRICS = ("rougeL", "loss")
INIT_TRANSFORMS = ("mu",)
# What a run directory records of its settings, as data: later stages read it instead of gin text.
RUN_RECORD = "run_config.json"


# Configurables owned elsewhere: calls through these apply gin bindings and return plain instances.
_ADAPTER = gin.external_configurable(AdapterConfig, name="AdapterConfig")
_LOSS = gin.external_configurable(LossConfig, name="LossConfig")
_OPTIMIZER = gin.external_configurable(OptimizerConfig, name="OptimizerConfig")
_MESH = gin.external_configurable(MeshConfig, name="MeshConfig")


def _check(checks: Sequence[tuple[bool, str]]) -> None:
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture: a `models.preset` name plus T5Config field overrides.

  With RunConfig.init_checkpoint (a Hugging Face directory) the architecture comes from its
  config.json instead; `overrides` (e.g. dtype, dropout_rate) still apply.
  """
  preset: str = "tiny"
  overrides: dict = dataclasses.field(default_factory=dict)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data (as T5X's DatasetConfig, plus where the tasks come from). Paths may be URLs
  (gs://BUCKET/path, ...: mhr_jax/storage.py).

  Attributes:
    source: which tasks/ module registers the data: "synthetic" (the embedded suite, generated into
      `data_dir`, default MODEL_DIR/synthetic_data), "superni" (a natural-instructions clone at
      `data_dir`) or "t0" (a bigscience/P3 copy at `data_dir`).
    task: registered SeqIO task or mixture name, e.g. "synthetic_train", "superni_train", "t0_train".
    split: dataset split.
    vocabulary: "byte" or a SentencePiece model (file, or a directory with spiece.model).
    batch_size: global batch size (examples per update); divisible by the mesh batch axes
      (MeshConfig.data * MeshConfig.fsdp) and by the number of processes.
    input_len, target_len: feature lengths (longer examples are truncated, keeping EOS).
    pack: pack several examples of one task per row (segment ids and positions).
    host_input: "global" (every process reads the global batch stream and keeps its own rows, so
      the data order does not depend on the number of processes) or "sharded" (each process reads
      its own shard of every task: less input work per host on large runs).
    data_dir: see `source`.
    synthetic_suite: which embedded suite (tasks/synthetic.py): "demo" (8 skills, tasks of 2) or
      "study" (16 skills, tasks of 2 or 3: tasks/synthetic_study.py).
    synthetic_train_tasks, synthetic_test_tasks, synthetic_instances, synthetic_seed: the
      synthetic suite's sizes and seed.
    max_train_instances: SuperNI instances per training task (docs/METHODS.md: <= 100).
    prompt, num_pos_examples: SuperNI-format input ("tk_instruct": the task definition and
      num_pos_examples positive examples before the instance; "authors": the MHR authors' string,
      "Task definition: ...", then the instance, no examples (tasks/superni.py); "definition": the
      definition, then the instance, without Tk-Instruct's boilerplate; "input_only": the instance
      input alone, so the task id is the only task signal). None: the source's default,
      "tk_instruct" for superni, "input_only" for the synthetic suite.
    test_task_list: SuperNI-format sources: a task-list file (one task per line) naming the held-out
      tasks that adaptation uses, instead of splits/default/test_tasks.txt; relative paths are also
      looked up in the repository (tasks/superni_val_tasks_20.txt: 20 of the 119 test tasks, the list
      the authors' pre-training scores zero-shot for early stopping, NIOnlineZeroShot.VAL_TASKS; a
      quicker partial evaluation, not the paper's test set).
    catalog: the T0 dataset/template list (source "t0"); None: tasks/t0_datasets.json.
    t0_cap: T0 training-mixture cap (docs/METHODS.md): "authors" (their code: every (dataset, template)
      task keeps at most 500k // (number of templates) examples) or "t0" (the original T0 rule: a
      dataset's templates are capped that way only when the dataset has more than 500k examples).
  """
  source: str = "synthetic"
  task: str = "synthetic_train"
  split: str = "train"
  vocabulary: str = "byte"
  batch_size: int = 8
  input_len: int = 64
  target_len: int = 16
  pack: bool = False
  host_input: str = "global"
  data_dir: str | None = None
  synthetic_suite: str = "demo"
  synthetic_train_tasks: int = 16
  synthetic_test_tasks: int = 4
  synthetic_instances: int = 200
  synthetic_seed: int = 0
  max_train_instances: int = 100
  prompt: str | None = None
  num_pos_examples: int = 0
  test_task_list: str | None = None
  catalog: str | None = None
  t0_cap: str = "authors"

  def __post_init__(self):
    storage.check_paths("DataConfig", self, ("data_dir", "vocabulary", "catalog", "test_task_list"))
    _check([
        (self.prompt is None or self.prompt in PROMPTS,
         f"DataConfig.prompt={self.prompt!r}: expected one of {PROMPTS} or None"),
        (self.prompt != "authors" or not self.num_pos_examples,
         f"DataConfig.num_pos_examples={self.num_pos_examples}: prompt 'authors' shows no positive examples"),
        (self.t0_cap in T0_CAPS, f"DataConfig.t0_cap={self.t0_cap!r}: expected one of {T0_CAPS}"),
        (self.synthetic_suite in SYNTHETIC_SUITES,
         f"DataConfig.synthetic_suite={self.synthetic_suite!r}: expected one of {SYNTHETIC_SUITES}"),
        (self.test_task_list is None or self.source != "t0",
         "DataConfig.test_task_list is for SuperNI-format sources; T0 held-out datasets come from "
         "the catalog (AdaptConfig.tasks selects some)"),
        (self.source in SOURCES, f"DataConfig.source={self.source!r}: expected one of {SOURCES}"),
        (bool(self.task), "DataConfig.task: must name a SeqIO task or mixture"),
        (self.batch_size >= 1, f"DataConfig.batch_size={self.batch_size}: must be >= 1"),
        (self.input_len >= 1, f"DataConfig.input_len={self.input_len}: must be >= 1"),
        (self.target_len >= 1, f"DataConfig.target_len={self.target_len}: must be >= 1"),
        (self.host_input in HOST_INPUTS,
         f"DataConfig.host_input={self.host_input!r}: expected one of {HOST_INPUTS}"),
        (self.source == "synthetic" or bool(self.data_dir),
         f"DataConfig.data_dir: required for source {self.source!r} (the dataset's copy)"),
    ])
    if self.source != "synthetic" and not storage.isdir(self.data_dir):
      raise ConfigError(f"DataConfig.data_dir={self.data_dir!r}: no such directory")
    if self.catalog is not None and (self.source != "t0" or not storage.isfile(self.catalog)):
      raise ConfigError(f"DataConfig.catalog={self.catalog!r}: " + (
          "no such file" if self.source == "t0" else "only used with DataConfig.source='t0'"))
    if self.test_task_list is not None:
      object.__setattr__(self, "test_task_list", _repo_file(self.test_task_list,
                                                            "DataConfig.test_task_list"))

  @property
  def input_prompt(self) -> str:
    """The effective SuperNI-format prompt (the source's default when `prompt` is None)."""
    if self.prompt is not None:
      return self.prompt
    return "input_only" if self.source == "synthetic" else "tk_instruct"


def _repo_file(path: str, key: str) -> str:
  """`path` as given when it exists, else relative to the repository root; ConfigError otherwise."""
  candidates = [path] if storage.is_url(path) else [path, os.path.join(REPO_ROOT, path)]
  for candidate in candidates:
    if storage.isfile(candidate):
      return storage.absolute(candidate)
  raise ConfigError(f"{key}={path!r}: no such file")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Where the run lives and how it proceeds.

  Path settings take local paths or URLs (mhr_jax/storage.py); run directories (model_dir, init_run,
  pretrain_dir) a local path or gs://BUCKET/path.

  Attributes:
    model_dir: run directory (config.gin, metrics.jsonl, TensorBoard events, checkpoints/, results).
    train_steps: optimizer updates in total (a resumed run continues up to this step).
    log_every: metrics cadence in steps.
    checkpoint_every: checkpoint cadence in steps (the last step is always saved).
    keep_checkpoints: most recent checkpoints kept.
    seed: model init, dropout / Gumbel noise and data order.
    mode: "pretrain" (multi-task training of the adapted model) or "adapt" (few-shot adaptation
      from `pretrain_dir` or `init_checkpoint`, see AdaptConfig).
    init_checkpoint: Hugging Face T5 directory with the base weights (None: random init). With mode
      "adapt", adaptation starts from these base weights (a fresh adapter, or full fine-tuning).
    init_run: pre-training only: a run directory whose latest checkpoint gives the starting weights
      (e.g. a trained base, or an inventory to average); leaves it lacks keep their fresh init.
    init_transform: with init_run: "mu" averages that run's Poly / MHR skills into one plain LoRA
      (transforms.to_mu) first: the start of zero-shot MHR-mu (AdapterConfig.kind 'lora').
    pretrain_dir: a pre-training run directory (its config.gin and latest checkpoint); adapt only.
    async_checkpoints: orbax writes in the background after copying arrays to host.
    param_rules: ((regex, group), ...) deciding which parameters train (groups: frozen, adapters,
      routing, base; first full match on the '/'-joined path wins); None: the adapter kind's rules
      (mhr_jax.adapters.params.default_rules).
  """
  model_dir: str = ""
  train_steps: int = 100
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  seed: int = 0
  mode: str = "pretrain"
  init_checkpoint: str | None = None
  init_run: str | None = None
  init_transform: str | None = None
  pretrain_dir: str | None = None
  async_checkpoints: bool = True
  param_rules: tuple | None = None

  def __post_init__(self):
    storage.check_paths("RunConfig", self, ("model_dir", "init_checkpoint", "init_run", "pretrain_dir"),
                        run_dirs=("model_dir", "init_run", "pretrain_dir"))
    _check([
        (bool(self.model_dir), "RunConfig.model_dir is empty: pass --gin.MODEL_DIR=\"'/path'\""),
        (self.train_steps >= (0 if self.mode == "adapt" else 1),
         f"RunConfig.train_steps={self.train_steps}: must be >= 1 (>= 0 with mode 'adapt': 0 evaluates "
         "the adapted starting point zero-shot)"),
        (self.log_every >= 1, f"RunConfig.log_every={self.log_every}: must be >= 1"),
        (self.checkpoint_every >= 1,
         f"RunConfig.checkpoint_every={self.checkpoint_every}: must be >= 1"),
        (self.keep_checkpoints >= 1,
         f"RunConfig.keep_checkpoints={self.keep_checkpoints}: must be >= 1"),
        (self.mode in MODES, f"RunConfig.mode={self.mode!r}: expected one of {MODES}"),
        (self.mode == "adapt" or self.pretrain_dir is None,
         "RunConfig.pretrain_dir is only used with RunConfig.mode='adapt'"),
        (self.mode == "pretrain" or bool(self.pretrain_dir) != bool(self.init_checkpoint),
         "RunConfig.mode='adapt' starts from RunConfig.pretrain_dir (a pre-training run directory) "
         "or RunConfig.init_checkpoint (a Hugging Face base): give exactly one"),
        (self.init_run is None or self.mode == "pretrain",
         "RunConfig.init_run is for pre-training; adaptation starts from RunConfig.pretrain_dir"),
        (self.init_run is None or self.init_checkpoint is None,
         "RunConfig.init_run and RunConfig.init_checkpoint both give starting weights: give one"),
        (self.init_transform is None or self.init_transform in INIT_TRANSFORMS,
         f"RunConfig.init_transform={self.init_transform!r}: expected one of {INIT_TRANSFORMS} or None"),
        (self.init_transform is None or self.init_run is not None,
         "RunConfig.init_transform applies to RunConfig.init_run; set init_run too"),
    ])
    if self.init_checkpoint is not None and not storage.isdir(self.init_checkpoint):
      raise ConfigError(f"RunConfig.init_checkpoint={self.init_checkpoint!r}: no such directory")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdaptConfig:
  """Few-shot adaptation of several (task, seed) pairs from one pre-training run (mode "adapt").

  Every pair trains its own copy of the adapter state for RunConfig.train_steps steps on its k-shot
  split (DataConfig.batch_size examples per step) as one vmapped program (mhr_jax/training/adaptation.py), then
  is evaluated on the task's test data: SuperNI-format sources by decoding (greedy or beam search;
  ROUGE-L and exact match), T0 by rank classification of every original-task template (accuracy;
  median over templates).

  Attributes:
    method: one of adapters.methods.METHODS, whose record says what trains and where a pair starts
      (poly/mhr: a fresh routing row per new task, routing and adapters train; *-z: only the new
      routing row trains; *-mu: the skills averaged into one LoRA, which trains; lora, ia3,
      private_lora: those baselines; full: every weight). AdapterConfig.kind must be one the record
      `adapts`; from a plain base (kind "none", or RunConfig.init_checkpoint) a method that allows
      `control` starts from a fresh adapter that AdapterConfig describes.
    tasks: SuperNI-format sources: task names (as in the data's task list); T0: held-out dataset
      names of the catalog (e.g. "super_glue/rte"). Empty: every test task / held-out dataset.
    shots: training examples per task (k) for SuperNI-format sources; one of the few-shot splits the
      data registers. T0 uses each dataset's T-Few shot count from the catalog instead.
    seeds: split / init seeds; every (task, seed) pair is one independent adaptation.
    evaluate: evaluate every pair on its test data after training.
    eval_batch_size: examples per evaluation batch (None: DataConfig.batch_size); a multiple of the
      mesh batch shards.
    select_every: best-on-dev: every this many steps (and at the end) score each pair on its
      dev_k<shots>_seed<seed> split and keep the parameters with the best score; 0 (the default)
      keeps the last step's. SuperNI-format sources only (T-Few's T0 protocol has no dev split).
    select_metric: the dev score: "rougeL" (decoding of the dev split, the authors' model selection)
      or "loss" (teacher-forced dev loss, lower is better; cheaper).
    num_beams: SuperNI-format sources: beams of the decoding that scores the test and dev splits (1:
      greedy; the authors: 4, Hugging Face `generate` with early_stopping=False, length penalty 1).
  """
  method: str = "mhr"
  tasks: tuple = ()
  shots: int = 32
  seeds: tuple = (13, 42, 58)
  evaluate: bool = True
  eval_batch_size: int | None = None
  select_every: int = 0
  select_metric: str = "rougeL"
  num_beams: int = 1

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "seeds", tuple(self.seeds))
    _check([
        (self.method in methods.METHODS,
         f"AdaptConfig.method={self.method!r}: expected one of {methods.METHODS}"),
        (self.select_metric in SELECT_METRICS,
         f"AdaptConfig.select_metric={self.select_metric!r}: expected one of {SELECT_METRICS}"),
        (self.shots >= 1, f"AdaptConfig.shots={self.shots}: must be >= 1"),
        (len(self.seeds) >= 1, "AdaptConfig.seeds: give at least one seed"),
        (self.eval_batch_size is None or self.eval_batch_size >= 1,
         f"AdaptConfig.eval_batch_size={self.eval_batch_size}: must be >= 1"),
        (self.select_every >= 0, f"AdaptConfig.select_every={self.select_every}: must be >= 0"),
        (self.num_beams >= 1, f"AdaptConfig.num_beams={self.num_beams}: must be >= 1"),
    ])


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a run needs, resolved from gin. `model` is the full T5Config (adapter included)."""
  model_cfg: ModelConfig
  model: T5Config
  data: DataConfig
  loss: LossConfig
  optimizer: OptimizerConfig
  mesh: MeshConfig
  run: RunConfig
  adapt: AdaptConfig

  @property
  def default_data_dir(self) -> str:
    """Where a run writes the synthetic suite when DataConfig.data_dir is unset."""
    return os.path.join(self.run.model_dir, "synthetic_data")


def one_line(e: BaseException) -> str:
  """gin appends context lines ("In file ...", "In call to configurable ..."); keep them short."""
  lines = [line.strip() for line in str(e).splitlines()
           if line.strip() and not line.strip().startswith(("In call to configurable", "In bindings string"))]
  required = re.match(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", lines[0] if lines else "")
  if required:
    name = required.group(1)
    return f"{name} is required: pass --gin.{name}=... (strings quoted, e.g. --gin.{name}=\"'/path'\")"
  return "; ".join(lines) if lines else type(e).__name__


_SEARCH_PATHS: set[str] = set()


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files then bindings (in order) into gin's global config.

  Relative file names and `include` lines resolve against `search_paths`, then the current
  directory, then the repository root (so `configs/tiny.gin` works from anywhere).
  Raises ConfigError naming the file or binding that failed.
  """
  gin.clear_config()
  prefixes = (*search_paths, os.getcwd(), REPO_ROOT)
  for prefix in prefixes:
    if prefix not in _SEARCH_PATHS:  # gin keeps its search paths for the life of the process
      _SEARCH_PATHS.add(prefix)
      gin.add_config_file_search_path(prefix)
  for path in gin_files:
    found = [p for p in ([path] if os.path.isabs(path) else [os.path.join(q, path) for q in prefixes])
             if os.path.isfile(p)]
    if not found:
      raise ConfigError(f"--gin_file={path}: not found (searched {list(prefixes)})")
    try:
      gin.parse_config_file(found[0])
    except (IOError, ValueError, SyntaxError, TypeError) as e:
      # gin's package-resource reader fails this way on a missing include under a directory
      # that Python sees as a namespace package (configs/).
      message = one_line(e).replace("expected str, bytes or os.PathLike object, not NoneType",
                                     "included file not found")
      raise ConfigError(f"--gin_file={path}: {message}") from None
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except (ValueError, SyntaxError, TypeError) as e:
      hint = ""
      if isinstance(e, SyntaxError):
        hint = " (gin literals: strings need quotes, e.g. --gin.MODEL_DIR=\"'/some/dir'\")"
      raise ConfigError(f"--gin.{binding}: {one_line(e)}{hint}") from None
  try:
    gin.finalize()  # fails on macros left at %gin.REQUIRED
  except ValueError as e:
    raise ConfigError(one_line(e)) from None


def _build_model(model_cfg: ModelConfig, adapter: AdapterConfig, base: T5Config | None) -> T5Config:
  overrides = dict(model_cfg.overrides)
  fields = {f.name for f in dataclasses.fields(T5Config)} - {"adapter"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"ModelConfig.overrides: unknown T5Config field(s) {unknown}")
  if base is None:
    return preset(model_cfg.preset, adapter=adapter, **overrides)
  return base.replace(adapter=adapter, **overrides)


# The gin-bound sections of a run's config: {argument name of `load_config`: (gin name, configurable)}.
SECTIONS: dict[str, tuple[str, Any]] = {
    "model": ("ModelConfig", ModelConfig), "adapter": ("AdapterConfig", _ADAPTER),
    "data": ("DataConfig", DataConfig), "loss": ("LossConfig", _LOSS),
    "optimizer": ("OptimizerConfig", _OPTIMIZER), "mesh": ("MeshConfig", _MESH),
    "run": ("RunConfig", RunConfig), "adapt": ("AdaptConfig", AdaptConfig)}


def load_config(base_model: T5Config | None = None, **explicit: Mapping[str, Any]) -> ExperimentConfig:
  """Instantiates every config dataclass from the parsed gin config (see `parse_gin`), and checks it.

  Called inside `gin.config_scope(scope)`, a binding `scope/Key.param` wins over `Key.param`.
  Args:
    base_model: the architecture of RunConfig.init_checkpoint when there is one (then
      ModelConfig.preset is not used).
    explicit: per section of SECTIONS, {field: value} passed to its dataclass as arguments, which win over
      every gin binding: how the experiment plan sets a stage's own settings without writing gin text.
  Raises ConfigError with the offending key.
  """
  unknown = sorted(set(explicit) - set(SECTIONS))
  if unknown:
    raise ValueError(f"load_config: unknown section(s) {unknown}; expected some of {sorted(SECTIONS)}")
  try:
    values = {name: factory(**dict(explicit.get(name, {}))) for name, (_, factory) in SECTIONS.items()}
    model = _build_model(values["model"], values["adapter"], base_model)
  except (ValueError, TypeError) as e:  # gin adds context lines to errors raised in calls
    raise ConfigError(one_line(e)) from None
  cfg = ExperimentConfig(model_cfg=values["model"], model=model, data=values["data"], loss=values["loss"],
                         optimizer=values["optimizer"], mesh=values["mesh"], run=values["run"],
                         adapt=values["adapt"])
  check_config(cfg)
  return cfg


def check_config(cfg: ExperimentConfig) -> None:
  """The rules that span sections (each section checks its own values); ConfigError names the key."""
  kind, adapter = cfg.model.adapter.kind, cfg.model.adapter
  if cfg.run.mode == "adapt":
    method = methods.get(cfg.adapt.method)
    if not method.accepts(kind):
      raise ConfigError(f"AdaptConfig.method={cfg.adapt.method!r} adapts an adapter of kind {method.adapts}, "
                        f"not AdapterConfig.kind={kind!r}")
  pretraining = cfg.run.mode == "pretrain"
  if pretraining and adapter.anneal_steps > cfg.run.train_steps:
    raise ConfigError(f"AdapterConfig.anneal_steps={adapter.anneal_steps} exceeds "
                      f"RunConfig.train_steps={cfg.run.train_steps}")
  if pretraining and adapter.uses_task_ids and adapter.n_tasks < 2:
    raise ConfigError(f"AdapterConfig.n_tasks={adapter.n_tasks}: multi-task "
                      f"pre-training of kind {kind!r} needs one row per task")
  known = cfg.data.source == "synthetic" and cfg.data.task == "synthetic_train"
  if pretraining and adapter.uses_task_ids and known and adapter.n_tasks < cfg.data.synthetic_train_tasks:
    raise ConfigError(f"AdapterConfig.n_tasks={adapter.n_tasks} but the synthetic suite has "
                      f"DataConfig.synthetic_train_tasks={cfg.data.synthetic_train_tasks} training tasks; set "
                      f"AdapterConfig.n_tasks={cfg.data.synthetic_train_tasks}")
  if cfg.run.init_transform == "mu" and kind != "lora":
    raise ConfigError(f"RunConfig.init_transform='mu' makes a plain LoRA: set AdapterConfig.kind='lora', "
                      f"not {kind!r}")


def hf_architecture(init_checkpoint: str) -> T5Config:
  """The T5Config of a Hugging Face directory's config.json (the weights are read later)."""
  from mhr_jax.checkpoints import hf_t5  # pylint: disable=g-import-not-at-top
  path = os.path.join(init_checkpoint, hf_t5.CONFIG_FILE)
  if not storage.isfile(path):
    raise ConfigError(f"RunConfig.init_checkpoint={init_checkpoint!r}: no {hf_t5.CONFIG_FILE}")
  try:
    return hf_t5.config_from_hf(json.loads(storage.read_text(path)), path)
  except ValueError as e:  # includes json.JSONDecodeError
    raise ConfigError(f"RunConfig.init_checkpoint: {e}") from None


def resolve_config(**explicit: Mapping[str, Any]) -> ExperimentConfig:
  """`load_config`, with the architecture of RunConfig.init_checkpoint when one is set."""
  cfg = load_config(**explicit)
  if cfg.run.init_checkpoint:
    cfg = load_config(base_model=hf_architecture(cfg.run.init_checkpoint), **explicit)
  return cfg


def load_run_config(gin_files: Sequence[str], bindings: Sequence[str] = (),
                    search_paths: Sequence[str] = (), scope: str | None = None
                    ) -> tuple[ExperimentConfig, str]:
  """Parses gin, builds and validates every config, checks the run directory; writes nothing.

  Args:
    gin_files, bindings, search_paths: as `parse_gin`.
    scope: a gin scope whose bindings take precedence (an experiment's stage), or None.
  Returns:
    (config, its text for MODEL_DIR/config.gin): gin's operative config without a scope, else the
    resolved bindings (`to_gin`), which rerun the stage with `python -m mhr_jax.train`.
  """
  parse_gin(gin_files, bindings, search_paths)
  with gin.config_scope(scope):
    cfg = resolve_config()
  text = operative_config() if scope is None else to_gin(cfg)
  storage.check_reachable(cfg.run.model_dir, "RunConfig.model_dir")
  check_run_dir(cfg.run.model_dir, cfg)
  return cfg, text


def param_rules(cfg: ExperimentConfig) -> list[tuple[str, str]]:
  """Which parameters pre-training trains: RunConfig.param_rules, else the adapter kind's rules."""
  if cfg.run.param_rules is not None:
    return [tuple(rule) for rule in cfg.run.param_rules]
  return list(methods.pretraining_rules(cfg.model.adapter.kind))


def mesh_plan(cfg: ExperimentConfig, devices: int, processes: int, local_devices: int) -> dict[str, Any]:
  """The mesh a run of `cfg` builds on `processes` processes with `devices` devices in all (`local_devices`
  each), checked before any device is touched; ConfigError names the key that does not fit.

  Pre-training (and the base) spans every device; few-shot adaptation on several processes builds one mesh
  per process over its own devices, each adapting its own pairs. Returns {"data", "fsdp", "model": sizes,
  "over": "all devices" | "each process's devices"}.
  """
  per_process = cfg.run.mode == "adapt" and processes > 1
  n = local_devices if per_process else devices
  where = f"each process's {local_devices} devices" if per_process else f"{devices} devices"
  try:
    data, fsdp, model = cfg.mesh.resolve(n)
  except ValueError as e:
    raise ConfigError(f"{e} (the mesh spans {where})") from None
  shards = data * fsdp
  axes = f"(MeshConfig.data x MeshConfig.fsdp = {data} x {fsdp}, over {where})"
  batch, accum = cfg.data.batch_size, cfg.optimizer.grad_accum_steps
  if batch % shards:
    raise ConfigError(f"DataConfig.batch_size={batch} is not divisible by the mesh batch axes {axes}")
  if cfg.run.mode == "pretrain" and batch % processes:  # adaptation spreads pairs, not rows
    raise ConfigError(f"DataConfig.batch_size={batch} is not divisible by the {processes} processes")
  eval_batch = cfg.adapt.eval_batch_size
  if cfg.run.mode == "adapt" and eval_batch and eval_batch % shards:
    raise ConfigError(f"AdaptConfig.eval_batch_size={eval_batch} is not divisible by the mesh batch axes {axes}")
  if batch % accum or (batch // accum) % shards:
    raise ConfigError(
        f"OptimizerConfig.grad_accum_steps={accum}: DataConfig.batch_size={batch} must split into "
        f"{accum} micro-batches that divide over the {shards} mesh batch shards")
  return {"data": data, "fsdp": fsdp, "model": model,
          "over": "each process's devices" if per_process else "all devices"}


def build_mesh(cfg: ExperimentConfig):
  """The device mesh of a run (`mesh_plan`, checked first): over all devices, or over this process's own
  devices for few-shot adaptation on several processes."""
  import jax  # pylint: disable=g-import-not-at-top
  from mhr_jax import partitioning  # pylint: disable=g-import-not-at-top
  plan = mesh_plan(cfg, jax.device_count(), jax.process_count(), jax.local_device_count())
  local = plan["over"] != "all devices"
  return partitioning.make_mesh(cfg.mesh, devices=jax.local_devices() if local else None)


def _sections_of(cfg: ExperimentConfig) -> dict[str, Any]:
  return {"model": cfg.model_cfg, "adapter": cfg.model.adapter, "data": cfg.data, "loss": cfg.loss,
          "optimizer": cfg.optimizer, "mesh": cfg.mesh, "run": cfg.run, "adapt": cfg.adapt}


def to_gin(cfg: ExperimentConfig, header: str = "") -> str:
  """The config as explicit gin bindings, one per line (every field, defaults included).

  Parsing the text back (`parse_gin`, no scope) gives an equal ExperimentConfig, so a stage of an
  experiment can be rerun alone with `python -m mhr_jax.train --gin_file=<its config.gin>`.
  """
  lines = [f"# {line}".rstrip() for line in header.splitlines()]
  for name, value in _sections_of(cfg).items():
    gin_name = SECTIONS[name][0]
    lines += ["", f"# Parameters for {gin_name}:"]
    lines += [f"{gin_name}.{f.name} = {getattr(value, f.name)!r}" for f in dataclasses.fields(value)]
  return "\n".join(lines).lstrip("\n") + "\n"


def operative_config() -> str:
  """The operative gin config (every parameter used, defaults included), one binding per line."""
  text = gin.operative_config_str(max_line_length=10**6)
  # No wrapping keeps one binding per line; gin sizes its "# ====" rules by that width.
  return re.sub(r"(?m)^# =+$", "# " + "=" * 78, text)


# ============================================================================== run directories


def write_run_files(cfg: ExperimentConfig, config_text: str) -> None:
  """MODEL_DIR/config.gin (the text that reruns the run) and MODEL_DIR/run_config.json (its settings as
  data, which later stages and the analysis read), each atomically."""
  record = {name: dataclasses.asdict(value) for name, value in _sections_of(cfg).items()}
  record["architecture"] = dataclasses.asdict(cfg.model)
  write_text_atomic(os.path.join(cfg.run.model_dir, "config.gin"), config_text)
  write_json_atomic(os.path.join(cfg.run.model_dir, RUN_RECORD), record)


def _tuples(value):
  """JSON lists back to the tuples the config dataclasses hold (dicts stay dicts)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _read_record(run_dir: str) -> dict:
  path = os.path.join(run_dir, RUN_RECORD)
  record = read_json(path)
  if record is None:
    what = ("a run written without it by an older mhr-jax" if storage.isfile(os.path.join(run_dir, "config.gin"))
            else "not a run directory")
    raise ConfigError(f"{run_dir}: no {RUN_RECORD} there ({what})")
  return record


def saved_model_config(run_dir: str) -> T5Config:
  """The model (with its adapter) a run directory was trained with, from its run_config.json."""
  record = _read_record(run_dir)
  try:
    return T5Config(**_tuples(record["architecture"]))
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{os.path.join(run_dir, RUN_RECORD)}: architecture: {e}") from None


def saved_adapter_config(run_dir: str) -> AdapterConfig:
  """The AdapterConfig a run directory was trained with."""
  return saved_model_config(run_dir).adapter


def read_run_config(run_dir: str) -> ExperimentConfig:
  """Every setting of a run directory, from its run_config.json, with RunConfig.model_dir = run_dir (so a
  moved run directory still finds its own files, e.g. the synthetic data)."""
  record = _tuples(_read_record(run_dir))
  try:  # every field is given, so no gin binding of this process applies
    values = {name: factory(**record[name]) for name, (_, factory) in SECTIONS.items()}
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{os.path.join(run_dir, RUN_RECORD)}: {one_line(e)}") from None
  values["run"] = dataclasses.replace(values["run"], model_dir=run_dir)
  return ExperimentConfig(model_cfg=values["model"], model=saved_model_config(run_dir), data=values["data"],
                          loss=values["loss"], optimizer=values["optimizer"], mesh=values["mesh"],
                          run=values["run"], adapt=values["adapt"])


def check_run_dir(model_dir: str, cfg: ExperimentConfig, fix: str = "use a new MODEL_DIR",
                  architecture_only: bool = False) -> None:
  """ConfigError when `model_dir` holds a run whose model (and adapter) differs from `cfg.model`.

  A directory without config.gin is fresh. `architecture_only`: compare the base model only (a fresh
  adapter on that run's base).
  """
  if not storage.exists(os.path.join(model_dir, "config.gin")):
    return
  saved, current = saved_model_config(model_dir), cfg.model
  if architecture_only:
    saved, current = saved.replace(adapter=AdapterConfig()), current.replace(adapter=AdapterConfig())
  diffs = _differences(dataclasses.asdict(saved), dataclasses.asdict(current))
  if diffs:
    key, before, now = diffs[0]
    raise ConfigError(
        f"{model_dir} holds a run with a different model/adapter config ({key}: saved {before!r}, now {now!r}"
        f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); {fix}")


def _differences(saved: dict, current: dict, prefix: str = "T5Config") -> list[tuple[str, Any, Any]]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    name = "AdapterConfig" if key == "adapter" else f"{prefix}.{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, name)
    elif _tuples(a) != _tuples(b):
      out.append((name, a, b))
  return out


def describe(cfg: ExperimentConfig) -> dict[str, Any]:
  """Flat summary for logs and results files."""
  a = cfg.model.adapter
  return {"mode": cfg.run.mode, "adapter": a.kind, "n_tasks": a.n_tasks, "n_skills": a.n_skills,
          "n_splits": a.n_splits, "rank": a.rank, "d_model": cfg.model.d_model,
          "layers": cfg.model.num_layers, "task": cfg.data.task, "batch_size": cfg.data.batch_size,
          "train_steps": cfg.run.train_steps}
