"""A checkpointer for one process's own state in a multi-process run (few-shot adaptation spreads independent
pairs over processes, each saving and restoring only its own pairs' state, with no other process involved).

orbax writes a host NumPy array only from process 0 (its NumPy type handler), so the state of process 1 and
later would be left out of an orbax checkpoint. This store writes each process's host arrays itself:
DIR/<step>/state.npz (every leaf by its path; dtypes NumPy cannot name, such as bfloat16, as their bits, with
the dtype recorded), DIR/<step>/progress.json, and DIR/<step>/COMMITTED last, so a step without it is
ignored. It has the interface of run_state.RunCheckpointer that few-shot adaptation uses.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import numpy as np

from mhr_jax import storage
from mhr_jax.checkpoints.packing import path_tokens
from mhr_jax.storage import write_bytes_atomic

COMMITTED = "COMMITTED"


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
  return [("/".join(path_tokens(path)), np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


class ProcessLocalCheckpointer:
  """Saves and restores this process's host-array state tree at integer steps, keeping the last `keep`."""

  def __init__(self, directory: str, keep: int | None):
    self.directory = storage.absolute(directory)
    self._keep = keep

  def all_steps(self) -> list[int]:
    if not storage.isdir(self.directory):
      return []
    return sorted(int(name) for name in storage.listdir(self.directory)
                  if name.isdigit() and storage.isfile(os.path.join(self.directory, name, COMMITTED)))

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, progress: dict[str, Any], force: bool = True) -> bool:
    del force  # every save is asked for explicitly
    where = os.path.join(self.directory, str(step))
    arrays, dtypes = {}, {}
    for name, leaf in _leaves(state):
      dtypes[name] = leaf.dtype.name
      # np.savez names only NumPy's own dtypes: others (bfloat16) are stored as their bits.
      arrays[name] = leaf if leaf.dtype.isbuiltin == 1 else leaf.view(f"u{leaf.dtype.itemsize}")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(os.path.join(where, "state.npz"), buffer.getvalue(), every_process=True)
    write_bytes_atomic(os.path.join(where, "progress.json"),
                       json.dumps({"progress": progress, "dtypes": dtypes}).encode(), every_process=True)
    write_bytes_atomic(os.path.join(where, COMMITTED), b"", every_process=True)
    if self._keep is not None:
      for old in self.all_steps()[:-self._keep]:
        storage.rmtree(os.path.join(self.directory, str(old)))
    return True

  def restore(self, step: int, target):
    """(state laid out like `target`, progress) of checkpoint `step`: NumPy arrays of the saved dtypes."""
    where = os.path.join(self.directory, str(step))
    meta = json.loads(storage.read_text(os.path.join(where, "progress.json")))
    with np.load(io.BytesIO(storage.read_bytes(os.path.join(where, "state.npz")))) as saved:
      names = [name for name, _ in _leaves(target)]
      missing = [name for name in names if name not in saved.files]
      if missing:
        raise ValueError(f"{where}: the saved state has no leaf {missing[0]!r}")
      leaves = [saved[name].view(np.dtype(meta["dtypes"][name])) for name in names]
    return jax.tree.unflatten(jax.tree.structure(target), leaves), meta["progress"]

  def wait(self) -> None:
    """Saves are synchronous."""

  def close(self) -> None:
    """Nothing is held open."""
