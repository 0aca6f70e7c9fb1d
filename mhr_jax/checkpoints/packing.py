"""Saving a state tree's small leaves packed: one flat array per dtype instead of one array per leaf.

orbax spends about a millisecond of host time on every array it saves, whatever its size, and the loop
waits for it. An adapter run's state is mostly small leaves (adapters, routing logits and their
optimizer moments: hundreds on a tiny model, thousands at T5-XL), so saving them one by one costs about a
second per checkpoint. Leaves that are fully replicated (or host NumPy arrays) and at most PACK_MAX_BYTES
are concatenated into one flat array per dtype for saving; the others (the sharded frozen base, large
optimizer moments) are saved as they are. The layout (each leaf's path, shape, dtype and place) is saved
as JSON beside them, and restoring rebuilds the named tree on any mesh.

Saved tree: {"packed": {group: flat array}, "leaves": {"<leaf index>": array}} (either part left out
when empty). Layout: {"format": FORMAT, "groups": {group: {"dtype", "size"}},
"leaves": [{"path": [str], "shape": [int], "dtype": str, "group": str | None, "offset": int}]}.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "packed-v1"
PACK_MAX_BYTES = 1 << 20


def path_tokens(path) -> list[str]:
  """A jax key path as plain strings: dict keys, attribute names, sequence indices."""
  tokens = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        tokens.append(str(getattr(key, attr)))
        break
    else:
      tokens.append(str(key))
  return tokens


@jax.jit
def _concat(leaves):
  return jnp.concatenate([jnp.ravel(x) for x in leaves])


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype: np.dtype) -> str:
  return dtype.name


@functools.lru_cache(maxsize=256)
def _replicated_on(sharding) -> frozenset | None:
  """The devices of a fully replicated sharding (None when it is not replicated)."""
  return frozenset(sharding.device_set) if sharding.is_fully_replicated else None


def _group(leaf, devices: dict) -> str | None:
  """The packed group of a leaf, or None when it is saved on its own."""
  dtype = getattr(leaf, "dtype", None)
  # extended dtypes (typed PRNG keys) are not numpy dtypes
  if not isinstance(leaf, (np.ndarray, jax.Array)) or not isinstance(dtype, np.dtype):
    return None
  if leaf.size * dtype.itemsize > PACK_MAX_BYTES:
    return None
  if isinstance(leaf, np.ndarray):
    return f"{_dtype_name(dtype)}_host"
  placed = _replicated_on(leaf.sharding)
  if placed is None:
    return None
  group = _dtype_name(dtype)
  if devices.setdefault(group, placed) != placed:
    return None  # one concatenation per group: its leaves must live on the same devices
  return group


def pack(tree) -> tuple[dict, dict]:
  """(the tree to save, its layout) for a tree of arrays (jax or NumPy)."""
  with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  devices: dict = {}
  members: dict[str, list[int]] = {}
  entries = []
  for i, (path, leaf) in enumerate(with_paths):
    group = _group(leaf, devices)
    dtype = getattr(leaf, "dtype", None)
    dtype = (_dtype_name(dtype) if isinstance(dtype, np.dtype)
             else str(dtype) if dtype is not None else str(np.asarray(leaf).dtype))
    entries.append({"path": path_tokens(path), "shape": list(np.shape(leaf)), "dtype": dtype,
                    "group": group, "offset": 0})
    if group is not None:
      members.setdefault(group, []).append(i)
  saved: dict[str, Any] = {}
  groups = {}
  for group, indices in members.items():
    offset = 0
    for i in indices:
      entries[i]["offset"] = offset
      offset += math.prod(entries[i]["shape"])
    leaves = [with_paths[i][1] for i in indices]
    flat = (np.concatenate([np.ravel(x) for x in leaves]) if group.endswith("_host") else _concat(leaves))
    saved.setdefault("packed", {})[group] = flat
    groups[group] = {"dtype": entries[indices[0]]["dtype"], "size": offset}
  alone = {str(i): leaf for i, (_, leaf) in enumerate(with_paths) if entries[i]["group"] is None}
  if alone:
    saved["leaves"] = alone
  return saved, {"format": FORMAT, "groups": groups, "leaves": entries}


def check_layout(layout: dict, tree, where: str) -> None:
  """Raises ValueError when the saved layout's leaves are not the paths and shapes of `tree`."""
  if layout.get("format") != FORMAT:
    raise ValueError(f"{where}: unknown checkpoint layout format {layout.get('format')!r} (this code "
                     f"reads {FORMAT!r})")
  with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  saved = [(e["path"], tuple(e["shape"])) for e in layout["leaves"]]
  wanted = [(path_tokens(p), tuple(np.shape(x))) for p, x in with_paths]
  if saved != wanted:
    diff = next((s, w) for s, w in zip(saved + [None] * len(wanted), wanted + [None] * len(saved))
                if s != w)
    raise ValueError(f"{where}: the saved state differs from this run's: saved leaf {diff[0]}, this run "
                     f"expects {diff[1]} ({len(saved)} saved leaves, {len(wanted)} expected)")


def saved_target(layout: dict, alone: dict) -> dict:
  """The restore target of a packed checkpoint's saved tree: its packed arrays (as host NumPy) and the
  leaves saved on their own that are wanted (`alone`: {"<leaf index>": target})."""
  target = {}
  if layout["groups"]:
    target["packed"] = {g: np.empty((info["size"],), np.dtype(info["dtype"]))
                        for g, info in layout["groups"].items()}
  if alone:
    target["leaves"] = alone
  return target


def leaf_value(layout: dict, index: int, restored: dict):
  """Leaf `index` as NumPy from a packed group, or the array restored on its own."""
  entry = layout["leaves"][index]
  if entry["group"] is None:
    return restored["leaves"][str(index)]
  size = math.prod(entry["shape"])
  flat = restored["packed"][entry["group"]]
  return np.asarray(flat[entry["offset"]:entry["offset"] + size]).reshape(entry["shape"])


def place(value: np.ndarray, like):
  """A packed leaf's value laid out like the restore target `like` (NumPy, or an array's sharding)."""
  dtype = getattr(like, "dtype", value.dtype)
  value = value.astype(dtype, copy=True)
  sharding = getattr(like, "sharding", None)
  if isinstance(like, np.ndarray) or sharding is None:
    return value if isinstance(like, np.ndarray) else jnp.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def unpack(layout: dict, restored: dict, targets: Sequence) -> list:
  """The flat leaves of the saved tree, each laid out like its target."""
  return [leaf_value(layout, i, restored) if e["group"] is None
          else place(leaf_value(layout, i, restored), targets[i])
          for i, e in enumerate(layout["leaves"])]
