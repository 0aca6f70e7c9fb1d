"""Run checkpoints (orbax): periodic saves, keep-N, resume, save-on-SIGTERM.

A checkpoint at step s holds the train state after s updates (linen boxes removed, so the tree
is plain arrays; its small replicated leaves packed into one array per dtype, with a JSON "layout"
item naming them: mhr_jax/checkpoints/packing.py) and a small JSON "progress" item with the data
position. With `frozen_once` the state's frozen part (the base model, which never changes during a run:
about 11 GB at T5-XL) is saved once per run, in RUN_DIR/frozen/ beside checkpoints/, and each step's
checkpoint holds the rest; its layout says so ("frozen_apart"). `RunCheckpointer.restore` and `restore_params` give the named tree back; checkpoints written
before packing (no "layout" item) restore as they are. The data iterator is
deterministic given its seed and skips ahead, so (state, batches consumed) makes resuming exact.
orbax writes each step into a temporary directory and renames it when complete (on Cloud Storage, where
nothing can be renamed, it writes a commit marker last), so a run killed mid-save leaves the previous
checkpoints intact. Directories may be gs:// URLs (mhr_jax/storage.py).
"""
from __future__ import annotations

import io
import json
import os
import signal
from typing import Any

import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.core import meta

from mhr_jax import storage
from mhr_jax.checkpoints import packing
from mhr_jax.logging_utils import log


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of an unboxed tree of arrays: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      meta.unbox(tree))


class RunCheckpointer:
  """orbax CheckpointManager for one run directory's `checkpoints/` folder.

  Args:
    directory: where step folders go (created on first save).
    save_every: save when step % save_every == 0 (and whenever `save(force=True)`).
    keep: number of most recent checkpoints kept (None: all).
    async_save: let orbax write in a background thread after copying arrays to host.
    frozen_once: save the state's frozen part once per run (RUN_DIR/frozen), and the rest at each step.
  Every process takes part in each save of global arrays; a process's own state in a multi-process run goes
  to checkpoints/process_local.py instead.
  """

  def __init__(self, directory: str, save_every: int, keep: int | None, async_save: bool = True,
               frozen_once: bool = False):
    self.directory = storage.absolute(directory)
    self._frozen = None
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # cleanup: leftovers of a killed run's unfinished save
    items = ("state", "progress", "layout")
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=items)
    if frozen_once:
      # Synchronous, so that no step checkpoint ever refers to a frozen part still being written.
      once = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False,
                                          cleanup_tmp_directories=True)
      self._frozen = ocp.CheckpointManager(frozen_store(self.directory), options=once, item_names=items)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, progress: dict[str, Any], force: bool = False) -> bool:
    """Saves (state, progress) at `step` if due (or forced); True when a save started."""
    if not (force or self._manager.should_save(step)):
      return False
    state = meta.unbox(state)
    # Full fine-tuning trains every weight: nothing is frozen, nothing to save apart.
    apart = self._frozen is not None and bool(jax.tree.leaves(_part(state, "frozen")))
    if apart:
      if self._frozen.latest_step() is None:
        self._frozen.save(0, args=_save_args({"frozen": _part(state, "frozen")}, {"step": step}), force=True)
      state = _replace_part(state, "frozen", None)
    return self._manager.save(step, args=_save_args(state, progress, frozen_apart=apart), force=force)

  def restore(self, step: int, abstract_state):
    """(state, progress) of checkpoint `step`, laid out like `abstract_state`.

    Args:
      abstract_state: the target tree (arrays or ShapeDtypeStructs with shardings, see
        `abstract_like`); restored arrays get its shapes, dtypes and shardings. NumPy leaves are
        restored as NumPy arrays (a process-local state).
    """
    target = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else abstract_like(x),
                          meta.unbox(abstract_state))
    layout = _layout(self.directory, step)
    if layout is None:  # written before packing
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
      return restored["state"], dict(restored["progress"])
    if not layout.get("frozen_apart"):
      return _restore_packed(self._manager, step, layout, target, f"{self.directory}/{step}")
    state, progress = _restore_packed(self._manager, step, layout, _replace_part(target, "frozen", None),
                                      f"{self.directory}/{step}")
    store = frozen_store(self.directory)
    frozen, _ = _restore_packed(self._frozen, 0, _layout(store, 0), {"frozen": _part(target, "frozen")},
                                f"{store}/0")
    return _replace_part(state, "frozen", frozen["frozen"]), progress

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (JAX's preemption service catches SIGTERM there)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
    if self._frozen is not None:
      self._frozen.close()


def frozen_store(directory: str) -> str:
  """Where a run's frozen part is saved once: RUN_DIR/frozen beside RUN_DIR/checkpoints."""
  return os.path.join(os.path.dirname(storage.absolute(directory)), "frozen")


def _save_args(state, progress: dict[str, Any], frozen_apart: bool = False) -> ocp.args.Composite:
  saved, layout = packing.pack(state)
  if frozen_apart:
    layout["frozen_apart"] = True
  return ocp.args.Composite(state=ocp.args.StandardSave(saved), progress=ocp.args.JsonSave(progress),
                            layout=ocp.args.JsonSave(layout))


def _restore_packed(manager, step: int, layout: dict, target, where: str):
  """(state, progress) of a packed checkpoint, laid out like `target`."""
  packing.check_layout(layout, target, where)
  targets, treedef = jax.tree.flatten(target)
  item = packing.saved_target(layout, {str(i): t for i, (t, e) in enumerate(zip(targets, layout["leaves"]))
                                       if e["group"] is None})
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(item), progress=ocp.args.JsonRestore()))
  leaves = packing.unpack(layout, restored["state"], targets)
  return jax.tree.unflatten(treedef, leaves), dict(restored["progress"])


def _part(state, name: str):
  return state[name] if isinstance(state, dict) else getattr(state, name)


def _replace_part(state, name: str, value):
  """`state` (a dict or a flax struct such as train_step.TrainState) with its field `name` replaced."""
  return {**state, name: value} if isinstance(state, dict) else state.replace(**{name: value})


def checkpoint_steps(directory: str) -> list[int]:
  """The complete checkpoint steps in `directory`, ascending; never writes."""
  if not storage.isdir(directory):
    return []
  manager = ocp.CheckpointManager(
      storage.absolute(directory), options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def latest_step(directory: str) -> int | None:
  """The latest complete checkpoint step in `directory` (None when there is none); never writes."""
  steps = checkpoint_steps(directory)
  return steps[-1] if steps else None


def restore_params(directory: str, step: int) -> dict:
  """The model params (trainable and frozen parts merged) of checkpoint `step` of a run, on one device.

  Reads only the parameter arrays (no optimizer state), so it works whatever optimizer, mesh or number
  of devices wrote the checkpoint.
  """
  path = os.path.join(storage.absolute(directory), str(step), "state")
  if storage.isfile(path + ".npz"):  # one process's own state of a multi-process run (process_local.py)
    return _process_local_params(directory, step)
  layout = _layout(directory, step)
  if layout is None:  # written before packing
    parts = restore_subtrees(path, ("trainable", "frozen"))
    merged = flax.traverse_util.flatten_dict(dict(parts["frozen"]))
    merged.update(flax.traverse_util.flatten_dict(dict(parts["trainable"])))
    return flax.traverse_util.unflatten_dict(merged)
  params = _packed_params(path, layout)
  if layout.get("frozen_apart"):
    store = frozen_store(directory)
    params.update(_packed_params(os.path.join(store, "0", "state"), _layout(store, 0)))
  return flax.traverse_util.unflatten_dict(params)


def _process_local_params(directory: str, step: int) -> dict:
  with np.load(io.BytesIO(storage.read_bytes(os.path.join(directory, str(step), "state.npz")))) as saved:
    dtypes = json.loads(storage.read_text(os.path.join(directory, str(step), "progress.json")))["dtypes"]
    device = _first_device()
    return flax.traverse_util.unflatten_dict({
        tuple(name.split("/")[1:]): jax.device_put(saved[name].view(np.dtype(dtypes[name])), device)
        for name in saved.files if name.split("/")[0] in ("trainable", "frozen")})


def _packed_params(path: str, layout: dict) -> dict[tuple[str, ...], jax.Array]:
  """{param path: array on one device} of the "trainable" and "frozen" leaves of a packed checkpoint."""
  device = _first_device()
  wanted = [i for i, e in enumerate(layout["leaves"]) if e["path"][0] in ("trainable", "frozen")]
  alone = {str(i): jax.ShapeDtypeStruct(tuple(layout["leaves"][i]["shape"]), layout["leaves"][i]["dtype"])
           for i in wanted if layout["leaves"][i]["group"] is None}
  item = packing.saved_target(layout, jax.tree.map(lambda m: _on_device(m, device), alone))
  restore_args = {"packed": {g: ocp.RestoreArgs(restore_type=np.ndarray) for g in item.get("packed", {})},
                  "leaves": jax.tree.map(lambda m: _device_arg(m, device), alone)}
  restore_args = {k: v for k, v in restore_args.items() if k in item}
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  params = {}
  for i in wanted:
    value = packing.leaf_value(layout, i, restored)
    params[tuple(layout["leaves"][i]["path"][1:])] = (
        jax.device_put(value, device) if isinstance(value, np.ndarray) else value)
  return params


def _first_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _on_device(m, device: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)


def _device_arg(m, device: jax.sharding.Sharding) -> ocp.ArrayRestoreArgs:
  return ocp.ArrayRestoreArgs(sharding=device, global_shape=m.shape, dtype=m.dtype)


def restore_subtrees(path: str, keys: tuple[str, ...]) -> dict:
  """Top-level subtrees `keys` of the orbax PyTree checkpoint at `path`, onto this process's first device
  (whatever mesh wrote them); the rest of the checkpoint is not read."""
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(path).item_metadata
  parts = {k: saved[k] for k in keys}
  device = _first_device()
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=jax.tree.map(lambda m: _on_device(m, device), parts),
      restore_args=jax.tree.map(lambda m: _device_arg(m, device), parts), partial_restore=True))
  return {k: restored[k] for k in keys}


def read_state(directory: str, step: int) -> dict[str, np.ndarray]:
  """Every leaf of checkpoint `step` on the host, by its path ("trainable/encoder/.../lora_a",
  "opt_state/..."): for inspecting a checkpoint without building the run's model or optimizer."""
  path = os.path.join(storage.absolute(directory), str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  on_host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                         checkpointer.metadata(path).item_metadata.tree)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=on_host))
  layout = _layout(directory, step)
  if layout is None:  # written before packing
    return {"/".join(packing.path_tokens(p)): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(restored)}
  leaves = {"/".join(e["path"]): np.asarray(packing.leaf_value(layout, i, restored))
            for i, e in enumerate(layout["leaves"])}
  if layout.get("frozen_apart"):
    leaves.update(read_state(frozen_store(directory), 0))
  return leaves


def _layout(directory: str, step: int) -> dict | None:
  """The packing layout of checkpoint `step` (None for a checkpoint written before packing)."""
  path = os.path.join(storage.absolute(directory), str(step), "layout")
  if not storage.isdir(path):
    return None
  # the handler alone: a Checkpointer would add a barrier, and process-local resumes restore unsynchronised
  return dict(ocp.JsonCheckpointHandler().restore(epath.Path(path)))


class StopSignal:
  """Turns SIGTERM into "save at the next step boundary, then exit".

  Single process, or `own_handler`: a Python handler sets a flag (with several processes the caller then
  agrees on it with the others, as few-shot adaptation does). Otherwise, with several processes, JAX's
  preemption service (started by jax.distributed.initialize) owns SIGTERM and all hosts agree on the step to
  stop at through `RunCheckpointer.reached_preemption` (pre-training, whose steps are collective anyway).
  """

  def __init__(self, own_handler: bool = False):
    self.received = False
    self._previous = None
    if own_handler or jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True
    log.info("SIGTERM received: saving a checkpoint after the current step")

  def should_stop(self, step: int, checkpointer: RunCheckpointer) -> bool:
    if jax.process_count() > 1:
      self.received = checkpointer.reached_preemption(step)
    return self.received

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
