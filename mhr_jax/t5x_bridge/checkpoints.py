"""Checkpoints across trainers: T5X checkpoints <-> the project's run checkpoints, and the initial
checkpoints T5X fine-tuning starts from.

Both trainers hold the same parameter tree (`models.T5`) and the same optimizer recipe
(`t5x_bridge.optim.MhrOptimizer` has `optim.make_optimizer`'s chain), so a conversion moves the step,
the parameters and the optimizer state leaf for leaf; a run trained in one trainer is evaluated or
continued in the other with the same logits:
  T5X:  MODEL_DIR/checkpoint_<step>/state  (orbax, as `t5x.train` writes; legacy msgpack is read too)
        {target: params, state: {step, param_states: the optax state over all parameters}}
  run:  RUN_DIR/checkpoints/<step>/{state, progress}  (mhr_jax.checkpoints.run_state)
        state {step, trainable, frozen, opt_state: the optax state over the trainable part}
The optimizer state of the frozen group is empty in both, so the leaves correspond by their paths.
The data position is not portable (the trainers read SeqIO differently): a converted run checkpoint
records `batches_consumed = step` and so continues with the project's data order from there.

Fine-tuning in T5X starts from `initial_checkpoint(model, out_dir, ...)`, usually from gin
(`INITIAL_CHECKPOINT_PATH = @bridge_checkpoints.initial_checkpoint()`): the model's parameters built
from a pre-trained T5X checkpoint (or run directory) or from Hugging Face weights, with a fresh
optimizer state at step 0:
  pre-trained checkpoint   the start that the fine-tuning method's record makes (gin METHOD;
                           adapters.methods, `adaptation_start`): new tasks' routing rows (MHR,
                           MHR-z), the skills averaged into one LoRA (MHR-mu), as is (LoRA, (IA)^3)
  Hugging Face weights     fresh adapters on the given base

Command line (the model comes from the gin files of the T5X run):
  python -m mhr_jax.t5x_bridge.checkpoints --to=run --gin_file=configs/mhr.gin \
    --gin.MODEL_DIR="'/tmp/mhr_t5x'" --t5x_checkpoint=/tmp/mhr_t5x/checkpoint_20 --run_dir=/tmp/mhr_run
  python -m mhr_jax.t5x_bridge.checkpoints --to=t5x --gin_file=configs/mhr.gin \
    --run_dir=/tmp/mhr_run --t5x_dir=/tmp/mhr_t5x_again
"""
from __future__ import annotations

import os
import re
from typing import Any

import flax.core
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from t5x import checkpoints as t5x_checkpoints
from t5x import partitioning as t5x_partitioning
from t5x import train_state as t5x_train_state
from t5x import utils as t5x_utils

from mhr_jax.models import param_counts
from mhr_jax import cli, models, partitioning
from mhr_jax.checkpoints import run_state as run_checkpoints
from mhr_jax.training import optim, train_step
from mhr_jax.adapters import methods
from mhr_jax.adapters import params as param_groups
from mhr_jax.checkpoints.packing import path_tokens
from mhr_jax.checkpoints import hf_t5
from mhr_jax.errors import RunError
from mhr_jax.t5x_bridge import partitioning as bridge_partitioning
from mhr_jax.t5x_bridge.optim import MhrOptimizer

_STEP_DIR = re.compile(r"checkpoint_(\d+)$")
_DUMMY_SHAPES = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}


# ----------------------------------------------------------------------------- T5X side

class HostPartitioner(t5x_partitioning.PjitPartitioner):
  """T5X's partitioner on a single CPU device, for converting checkpoints in host memory.

  T5X's default CPU mesh puts every local device on the 'model' axis, which a small model's dims
  need not divide; a conversion computes nothing, so one device is enough and portable.
  """

  def __init__(self):
    super().__init__(num_partitions=1, logical_axis_rules=bridge_partitioning.logical_axis_rules())

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1), ("data", "model"))


def default_partitioner() -> t5x_partitioning.PjitPartitioner:
  return HostPartitioner()


def checkpoint_dir(path: str, step: int | None = None) -> str:
  """`path` itself when it is a checkpoint_<step> directory, else MODEL_DIR/checkpoint_<step>
  (the latest step by default)."""
  path = os.path.abspath(path)
  if _STEP_DIR.search(os.path.basename(path)):
    return path
  if step is None:
    step = t5x_checkpoints.latest_step(path)
    if step is None:
      raise ValueError(f"{path}: no T5X checkpoint_<step> directory")
  found = t5x_checkpoints.get_checkpoint_dir(path, step)
  if not os.path.isdir(found):
    raise ValueError(f"{found}: no such T5X checkpoint")
  return found


def _model_optimizer(model) -> MhrOptimizer:
  if not isinstance(model.optimizer_def, MhrOptimizer):
    raise TypeError("converting optimizer states needs t5x_bridge.optim.MhrOptimizer as the model's "
                    f"optimizer_def, got {type(model.optimizer_def).__name__}")
  return model.optimizer_def


def abstract_train_state(model, partitioner=None):
  """T5X's global train state of `model` as ShapeDtypeStructs (the restore target)."""
  initializer = t5x_utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
      input_shapes=_DUMMY_SHAPES, partitioner=partitioner or default_partitioner())
  return initializer.global_train_state_shape


def abstract_variables(model) -> dict:
  """`model.get_initial_variables` as ShapeDtypeStructs: {'params': ..., 'params_axes': ...}."""
  return jax.eval_shape(lambda key: model.get_initial_variables(key, _DUMMY_SHAPES), jax.random.key(0))


def train_state_from_params(model, params, step: int = 0, param_states=None):
  """A T5X FlaxOptimTrainState holding `params` (unboxed nested dict) at `step`.

  The optimizer state is freshly initialised, or `param_states` (same structure) when given.
  """
  axes = abstract_variables(model)["params_axes"]
  variables = flax.core.freeze({"params": jax.tree.map(jnp.asarray, flax.core.unfreeze(params)),
                                "params_axes": axes})
  state = t5x_train_state.FlaxOptimTrainState.create(model.optimizer_def, variables)
  state_dict = state.state_dict()
  state_dict["state"]["step"] = jnp.asarray(step, jnp.int32)
  if param_states is not None:
    state_dict["state"]["param_states"] = flax.serialization.to_state_dict(param_states)
  return state.restore_state(state_dict)


def save_t5x(train_state, model_dir: str, partitioner=None) -> str:
  """Writes `train_state` as MODEL_DIR/checkpoint_<step> in the format `t5x.train` writes."""
  os.makedirs(model_dir, exist_ok=True)  # T5X's manager takes the parent of a missing directory
  manager = t5x_checkpoints.OrbaxCheckpointManagerInterface(
      model_dir, train_state, partitioner or default_partitioner(), period=1)
  manager.save(train_state)
  manager.wait_until_finished()
  manager.close()
  return t5x_checkpoints.get_checkpoint_dir(model_dir, int(train_state.step))


def load_t5x(path: str, model, step: int | None = None, partitioner=None):
  """The T5X train state of a checkpoint (a checkpoint_<step> directory or a MODEL_DIR)."""
  path = checkpoint_dir(path, step)
  partitioner = partitioner or default_partitioner()
  manager = t5x_checkpoints.OrbaxCheckpointManagerInterface(
      os.path.dirname(path), abstract_train_state(model, partitioner), partitioner)
  try:
    return manager.restore(path=path)
  finally:
    manager.close()


def read_t5x_params(path: str, step: int | None = None) -> dict:
  """The parameters ("target") of a T5X checkpoint as numpy arrays; no model needed."""
  path = checkpoint_dir(path, step)
  if os.path.isfile(os.path.join(path, "checkpoint")):   # T5X's legacy msgpack + TensorStore format
    loaded = t5x_checkpoints.load_t5x_checkpoint(path)
    return jax.tree.map(np.asarray, flax.core.unfreeze(loaded["target"]))
  restored = run_checkpoints.restore_subtrees(os.path.join(path, "state"), ("target",))
  return jax.tree.map(np.asarray, dict(restored["target"]))


# ------------------------------------------------------------------------- optimizer states

def _by_path(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(path_tokens(path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def convert_opt_state(source, target):
  """`source`'s leaves in `target`'s structure, matched by their key paths.

  The optax states of the two trainers differ only in containers (dict / FrozenDict) and in the
  frozen parameters they skip (no leaves either way); anything else is a ValueError naming the paths.
  """
  src = _by_path(source)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  dst = [tuple(path_tokens(path)) for path, _ in leaves]
  missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
  if missing or extra:
    show = lambda paths: ["/".join(p) for p in paths[:4]]  # noqa: E731
    raise ValueError(f"optimizer states differ: missing {show(missing)}, unexpected {show(extra)} "
                     "(is the optimizer configured the same in both trainers?)")
  out = []
  for path, (_, want) in zip(dst, leaves):
    have = src[path]
    if tuple(np.shape(have)) != tuple(np.shape(want)):
      raise ValueError(f"optimizer state {'/'.join(path)}: shape {np.shape(have)}, expected "
                       f"{np.shape(want)}")
    out.append(jnp.asarray(have, dtype=want.dtype))
  return treedef.unflatten(out)


def _run_optimizer(model, params):
  """(labels, the project's optax optimizer) matching the model's MhrOptimizer."""
  opt = _model_optimizer(model)
  labels = param_groups.param_labels(params, list(opt.rules))
  mask = None
  if opt.update_routing_rows_from > 0:
    n_rows = max(v.shape[0] for p, v in traverse_util.flatten_dict(params).items()
                 if p[-2:] == ("routing", "logits"))
    mask = param_groups.routing_row_mask(params, range(opt.update_routing_rows_from, n_rows))
  return labels, optim.make_optimizer(opt.config, labels, opt.total_steps, update_mask=mask)


# --------------------------------------------------------------------------- conversions

def t5x_to_run(t5x_checkpoint: str, model, run_dir: str, step: int | None = None) -> int:
  """Writes a T5X checkpoint as a run checkpoint RUN_DIR/checkpoints/<step>; returns the step."""
  state = load_t5x(t5x_checkpoint, model, step)
  params = jax.tree.map(np.asarray, flax.core.unfreeze(state.params))
  step = int(state.step)
  labels, optimizer = _run_optimizer(model, params)
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  abstract = train_step.abstract_train_state(model.module, labels, optimizer, mesh)
  trainable, frozen = param_groups.partition(params, labels)
  opt_state = convert_opt_state(state.param_states, abstract.opt_state)
  place = lambda tree, like: jax.device_put(tree, train_step.shardings_of(like))  # noqa: E731
  run_state = train_step.TrainState(
      place(jnp.asarray(step, jnp.int32), abstract.step), place(trainable, abstract.trainable),
      place(frozen, abstract.frozen), place(opt_state, abstract.opt_state), abstract.labels)
  checkpointer = run_checkpoints.RunCheckpointer(os.path.join(run_dir, "checkpoints"), save_every=1,
                                                 keep=None, async_save=False)
  checkpointer.save(step, run_state, {"batches_consumed": step}, force=True)
  checkpointer.wait()
  checkpointer.close()
  return step


def run_to_t5x(run_dir: str, model, t5x_dir: str, step: int | None = None) -> str:
  """Writes a run checkpoint (latest, or `step`) as T5X's t5x_dir/checkpoint_<step>; returns it."""
  directory = os.path.join(run_dir, "checkpoints")
  step = run_checkpoints.latest_step(directory) if step is None else step
  if step is None:
    raise ValueError(f"{directory}: no run checkpoint")
  params = run_checkpoints.restore_params(directory, step)
  labels, optimizer = _run_optimizer(model, params)
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  abstract = train_step.abstract_train_state(model.module, labels, optimizer, mesh)
  checkpointer = run_checkpoints.RunCheckpointer(directory, save_every=1, keep=None, async_save=False)
  try:
    run_state, _ = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  params = param_groups.combine(run_state.trainable, run_state.frozen)
  state = train_state_from_params(model, params, int(run_state.step))
  state = train_state_from_params(model, params, int(run_state.step),
                                  convert_opt_state(run_state.opt_state, state.param_states))
  return save_t5x(state, t5x_dir)


# ------------------------------------------------------------------- initial checkpoints

def _is_run_dir(path: str) -> bool:
  return run_checkpoints.latest_step(os.path.join(path, "checkpoints")) is not None


def read_params(path: str) -> dict:
  """Parameters of a T5X checkpoint (checkpoint dir or MODEL_DIR) or of a run directory (latest)."""
  if _is_run_dir(path):
    directory = os.path.join(path, "checkpoints")
    return run_checkpoints.restore_params(directory, run_checkpoints.latest_step(directory))
  return read_t5x_params(path)


def _check_against(params, abstract) -> None:
  flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(abstract)
  missing = sorted("/".join(p) for p in set(want) - set(flat))
  extra = sorted("/".join(p) for p in set(flat) - set(want))
  wrong = sorted("/".join(p) for p in set(want) & set(flat)
                 if tuple(np.shape(flat[p])) != tuple(want[p].shape))
  if missing or extra or wrong:
    raise ValueError(f"the checkpoint's parameters do not fit the model: missing {missing[:4]}, "
                     f"unexpected {extra[:4]}, other shapes {wrong[:4]}")


def pretrained_kind(method: str, kind: str) -> str:
  """The adapter kind of the pre-training that a fine-tuning run of `method` starts from, for a model
  with an adapter of `kind`: the kind among the method record's `adapts` that the record turns into
  `kind` (`Method.adapted_kind`; e.g. MHR-mu's LoRA comes from "mhr", MHR's routed model from "mhr")."""
  record = methods.get(method)
  kinds = [k for k in record.adapts if record.adapted_kind(k) == kind]
  if not kinds:
    made = sorted({record.adapted_kind(k) for k in record.adapts})
    raise ValueError(f"AdapterConfig.kind={kind!r}: method {record.name!r} (METHOD) fine-tunes a model "
                     f"of adapter kind {made}, pre-trained as {list(record.adapts)}")
  return kinds[0]


def _task_rows(params: dict, cfg: models.T5Config) -> tuple[list, int | None]:
  """(paths of the per-task leaves that hold other task counts than the model `cfg`, that count or None).

  Per-task leaves (routing logits, private adapters) have the task axis third from last
  (transforms.select_task_rows): a leaf of `params` that differs from the model's only there is one.
  """
  want = traverse_util.flatten_dict(param_counts.abstract_params(cfg))
  have = traverse_util.flatten_dict(params)
  rows = {}
  for path, leaf in want.items():
    shape = tuple(np.shape(have[path])) if path in have else None
    if shape is None or shape == tuple(leaf.shape) or len(shape) != len(leaf.shape) or len(shape) < 3:
      continue   # equal, or a mismatch that the final check reports
    if shape[:-3] + shape[-2:] == tuple(leaf.shape[:-3] + leaf.shape[-2:]):
      rows[path] = shape[-3]
  counts = sorted(set(rows.values()))
  if len(counts) > 1:
    raise ValueError(f"the checkpoint's per-task leaves hold different task counts {counts}")
  return sorted(rows), (counts[0] if counts else None)


def _check_start(start_cfg: models.T5Config, cfg: models.T5Config, method: str) -> None:
  """The adapter of the record's start must be the configured one (the task count aside)."""
  got = start_cfg.adapter.replace(n_tasks=cfg.adapter.n_tasks)
  if got != cfg.adapter:
    diff = {f: (getattr(cfg.adapter, f), getattr(got, f)) for f in cfg.adapter.__dataclass_fields__
            if getattr(cfg.adapter, f) != getattr(got, f)}
    raise ValueError(f"method {method!r} starts from an adapter that differs from the configured "
                     f"AdapterConfig at {{field: (configured, method's)}} {diff}")


def adaptation_start(params: dict, cfg: models.T5Config, method: str, seed: int = 0) -> dict:
  """The parameters a T5X fine-tuning run of `method` starts from, in the layout of the model `cfg`.

  The method's record (adapters.methods.METHOD_TABLE, `Method.start_params`) makes the start, as it
  does for the project's trainer; the pre-trained model is `cfg`'s with the kind the record adapts
  (`pretrained_kind`). Where the adapted model reads task ids, it keeps the pre-trained tasks' rows
  and adds a row per new task up to cfg.adapter.n_tasks: new task j gets the row the record starts a
  pair with key fold_in(key(seed), j) from (MHR / MHR-z: near-uniform; mhr-meanrow: the mean row);
  with no new task the checkpoint is taken as is. Otherwise the record's start is the model
  (MHR-mu: each head's skills averaged into one LoRA; LoRA, (IA)^3: as pre-trained).

  Args:
    params: pre-trained unboxed params (either layer layout).
    cfg: the fine-tuned model's config (the T5X model's `config`).
    method: a method of adapters.methods (gin: METHOD).
    seed: for the new tasks' rows.
  """
  record = methods.get(method)
  acfg = cfg.adapter
  params = models.layout.to_layout(cfg, params)
  pre_cfg = cfg.replace(adapter=acfg.replace(kind=pretrained_kind(method, acfg.kind)))
  key = jax.random.key(seed)
  if not acfg.uses_task_ids:
    start_cfg, start = record.start_params(pre_cfg, params, key)
    _check_start(start_cfg, cfg, record.name)
    return start
  grown, n_pretrained = _task_rows(params, cfg)
  if n_pretrained is None:   # no new tasks (or a checkpoint that does not fit: _check_against says so)
    return params
  if n_pretrained > acfg.n_tasks:
    raise ValueError(f"AdapterConfig.n_tasks={acfg.n_tasks} is below the checkpoint's {n_pretrained} tasks")
  pre_cfg = pre_cfg.replace(adapter=pre_cfg.adapter.replace(n_tasks=n_pretrained))
  starts = [record.start_params(pre_cfg, params, jax.random.fold_in(key, j))
            for j in range(acfg.n_tasks - n_pretrained)]
  _check_start(starts[0][0], cfg, record.name)
  # Every start keeps the shared leaves (the inventory) as pre-trained; the per-task leaves gain the rows.
  news = [traverse_util.flatten_dict(start) for _, start in starts]
  pre = traverse_util.flatten_dict(params)
  out = dict(news[0])
  for path in grown:
    out[path] = jnp.concatenate([jnp.asarray(pre[path])] + [new[path] for new in news], axis=-3)
  return traverse_util.unflatten_dict(out)


def initial_checkpoint(model, out_dir: str, pretrained: str | None = None,
                       hf_checkpoint: str | None = None, method: str | None = None, seed: int = 0) -> str:
  """A T5X checkpoint at step 0 with `model`'s parameters, for T5X fine-tuning to start from.

  Args:
    model: the MhrEncoderDecoderModel being fine-tuned.
    out_dir: where checkpoint_0 goes; reused when it exists (T5X resumes from MODEL_DIR anyway).
    pretrained: a T5X checkpoint (or MODEL_DIR, latest step) or a project run directory.
    hf_checkpoint: a Hugging Face T5 directory: base weights under freshly initialised adapters.
    method: with `pretrained`, the fine-tuning method (gin: METHOD), whose record makes the start
      (`adaptation_start`).
    seed: for new routing rows and fresh adapters.
  Returns:
    out_dir/checkpoint_0, for utils.RestoreCheckpointConfig.path.
  """
  path = t5x_checkpoints.get_checkpoint_dir(out_dir, 0)
  if os.path.isdir(path):
    logging.info("initial checkpoint %s exists; reusing it", path)
    return path
  if (pretrained is None) == (hf_checkpoint is None):
    raise ValueError("initial_checkpoint: give exactly one of pretrained, hf_checkpoint")
  if pretrained is not None and method is None:
    raise ValueError("initial_checkpoint: pretrained needs the fine-tuning method (bind "
                     "initial_checkpoint.method = %METHOD)")
  # Built in host memory: a fresh init plus a base copy of a large model need not fit on a chip.
  with jax.default_device(jax.devices("cpu")[0]):
    return _write_initial_checkpoint(model, out_dir, pretrained, hf_checkpoint, method, seed)


def _write_initial_checkpoint(model, out_dir, pretrained, hf_checkpoint, method, seed) -> str:
  cfg = model.config
  abstract = flax.core.unfreeze(abstract_variables(model)["params"])
  if pretrained is not None:
    params = adaptation_start(read_params(pretrained), cfg, method, seed)
  else:
    _, base = hf_t5.load_hf_t5(hf_checkpoint)
    fresh = model.get_initial_variables(jax.random.key(seed), _DUMMY_SHAPES)["params"]
    fresh = flax.core.unfreeze(fresh)
    params, report = hf_t5.merge_base_params(fresh, base)
    logging.info("base weights from %s: %s", hf_checkpoint, report)
  _check_against(params, abstract)
  logging.info("writing the initial checkpoint in %s", out_dir)
  return save_t5x(train_state_from_params(model, params, 0), out_dir)


# ----------------------------------------------------------------------------- command line

def model_from_gin(model=None):
  """The `MODEL` of the parsed gin files (bound below by `load_gin_model`)."""
  if model is None:
    raise ValueError("the gin files define no MODEL")
  return model


def _unused_entry_point(**kwargs):
  del kwargs
  raise RuntimeError("only the MODEL of these gin files is used here")


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SEARCH_PATHS: set[str] = set()


def _add_search_paths(paths) -> None:
  """Adds gin search paths once each (gin keeps them for the life of the process)."""
  import gin  # pylint: disable=g-import-not-at-top
  for path in paths:
    if path not in _SEARCH_PATHS:
      _SEARCH_PATHS.add(path)
      gin.add_config_file_search_path(path)


def _find_gin_file(path: str, search_paths) -> str:
  """A gin file's absolute path: `path` itself when absolute, else the first of the current directory,
  `search_paths` and the repository root that holds it (gin's own lookup of a relative name fails
  on `configs/`, a namespace package)."""
  prefixes = [os.getcwd(), *search_paths, _REPO_ROOT]
  for prefix in prefixes:
    candidate = os.path.join(prefix, path)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise ValueError(f"--gin_file={path}: not found (searched {prefixes})")


def load_gin_model(gin_files, gin_bindings=(), search_paths=()):
  """Parses a T5X run's gin files and bindings and builds its MODEL.

  Files resolve against the current directory, `search_paths` and the repository root; `include`
  lines as in `t5x.train` (configs/t5x/ and t5x/configs/ are packages), or under the search paths.
  """
  import gin  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  files = [_find_gin_file(path, search_paths) for path in gin_files]
  _add_search_paths([*search_paths, _REPO_ROOT])
  gin.clear_config()
  # The run files bind `__main__.train` (t5x.train's entry point): give this process one.
  main_module = sys.modules["__main__"]
  for name in ("train", "evaluate"):
    if not hasattr(main_module, name):
      setattr(main_module, name, _unused_entry_point)
  gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=False)
  gin.parse_config(["from __gin__ import dynamic_registration",
                    "from mhr_jax.t5x_bridge import checkpoints as _bridge_checkpoints",
                    "_bridge_checkpoints.model_from_gin.model = %MODEL"])
  # By module name: under `python -m` this file is also __main__, which gin did not register.
  return gin.get_configurable(importlib.import_module(__spec__.name).model_from_gin)()


def _convert(args) -> int:
  if args.to == "run" and not args.t5x_checkpoint:
    raise RunError("--to=run needs --t5x_checkpoint")
  if args.to == "t5x" and not args.t5x_dir:
    raise RunError("--to=t5x needs --t5x_dir")
  try:
    model = load_gin_model(args.gin_file, args.gin_bindings, args.gin_search_paths)
    if args.to == "run":
      step = t5x_to_run(args.t5x_checkpoint, model, args.run_dir, args.step)
      print(f"wrote {os.path.join(args.run_dir, 'checkpoints', str(step))}")
    else:
      print(f"wrote {run_to_t5x(args.run_dir, model, args.t5x_dir, args.step)}")
  except (OSError, ValueError) as e:   # gin's errors and the conversions' checks: one line
    raise RunError(str(e)) from None
  return 0


def main(argv=None) -> int:
  """Command line, with the project's flags: --gin_file, --gin_search_paths, --gin.KEY=VALUE,
  --gin_bindings (the T5X run's gin files give the model and the optimizer)."""
  parser = cli.flag_parser("python -m mhr_jax.t5x_bridge.checkpoints",
                           "Convert between T5X checkpoints and the project's run checkpoints.")
  parser.add_argument("--to", choices=("run", "t5x"), required=True)
  parser.add_argument("--t5x_checkpoint", help="--to=run: checkpoint_<step> or MODEL_DIR (latest)")
  parser.add_argument("--run_dir", required=True, help="the project's run directory")
  parser.add_argument("--t5x_dir", help="--to=t5x: the T5X MODEL_DIR to write checkpoint_<step> in")
  parser.add_argument("--step", type=int, default=None)
  return cli.main(parser, _convert, argv)


if __name__ == "__main__":
  raise SystemExit(main())
