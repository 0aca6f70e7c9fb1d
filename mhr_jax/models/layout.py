"""The two parameter layouts of `models.T5` and the conversions between them.

  unscanned (T5Config.scan_layers=False): <stack>/block_{i}/<rest>, one subtree per layer.
  scanned   (T5Config.scan_layers=True):  <stack>/layers/<rest>, the same leaves stacked on a new
            leading axis (layer i at index i), as `nn.scan` creates and reads them.

with <stack> in {encoder, decoder}; everything outside the blocks (embeddings, relative position
biases, final norms, logits_dense, shared routing) is the same in both. The conversions work on
UNBOXED trees (nested dicts, as `flax.linen.unbox` gives them, without the "params" wrapper) whose
leaves are numpy arrays, jax arrays or `jax.ShapeDtypeStruct`s, and never modify their input:
numpy stays numpy (HF checkpoints are read to host memory), anything else becomes jax.

Checkpoint formats (Hugging Face, PEFT) name layers one by one, so `checkpoints` converts to the
unscanned layout on the way out and to the config's layout on the way in.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from mhr_jax.models.t5 import LAYERS

STACKS = ("encoder", "decoder")
_BLOCK = re.compile(r"block_(\d+)")


def _n_layers(cfg, stack: str) -> int | None:
  if cfg is None:
    return None
  return cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers


def _check_unboxed(params) -> None:
  boxed = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
           if isinstance(x, meta.AxisMetadata)]
  if boxed:
    raise ValueError("models.layout: params hold boxed leaves (LogicallyPartitioned); pass "
                     "flax.linen.unbox(params)")


def is_scanned(params) -> bool | None:
  """True for the scanned layout, False for the unscanned one, None when `params` has no blocks."""
  for stack in STACKS:
    sub = params.get(stack, {})
    if LAYERS in sub:
      return True
    if any(_BLOCK.fullmatch(k) for k in sub):
      return False
  return None


def _stack(*leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack([jnp.asarray(x) for x in leaves])


def _index(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
  return leaf[i]


def to_scanned(cfg, params) -> dict:
  """`params` in the scanned layout (identity when already scanned).

  Args:
    cfg: the model's T5Config (its layer counts are checked), or None to take them from the tree.
    params: unboxed params tree of either layout.
  Returns:
    A new tree: each stack's block_0 .. block_{L-1} replaced by `layers`, leaves (L, ...).
  Raises:
    ValueError: blocks missing or numbered with gaps, a count different from cfg's, or blocks
      whose subtrees differ (e.g. adapters on some layers only, which one scanned block cannot
      hold).
  """
  _check_unboxed(params)
  out = dict(params)
  for stack in STACKS:
    if stack not in out:
      continue
    sub = dict(out[stack])
    blocks = sorted((int(m.group(1)) for m in map(_BLOCK.fullmatch, sub) if m))
    if not blocks:
      continue
    if LAYERS in sub:
      raise ValueError(f"models.layout: {stack} holds both block_* and {LAYERS} subtrees")
    expected = _n_layers(cfg, stack)
    if blocks != list(range(len(blocks))) or (expected is not None and len(blocks) != expected):
      raise ValueError(f"models.layout: {stack} has blocks {blocks[:3]}...{blocks[-1:]} "
                       f"({len(blocks)}), the config asks for {expected or len(blocks)} numbered "
                       "from 0")
    per_layer = [sub.pop(f"block_{i}") for i in blocks]
    structure = jax.tree.structure(per_layer[0])
    for i, tree in enumerate(per_layer):
      if jax.tree.structure(tree) != structure:
        raise ValueError(f"models.layout: {stack}/block_{i} has other leaves than "
                         f"{stack}/block_0; the scanned layout needs every layer alike "
                         "(adapter.target_modules must adapt all layers of a stack the same way)")
    sub[LAYERS] = jax.tree.map(_stack, *per_layer)
    out[stack] = sub
  return out


def to_unscanned(cfg, params) -> dict:
  """`params` in the unscanned layout (identity when already unscanned).

  Args:
    cfg: the model's T5Config (its layer counts are checked), or None to take them from the
      leaves' leading axis.
    params: unboxed params tree of either layout.
  Returns:
    A new tree: each stack's `layers` replaced by block_0 .. block_{L-1}.
  """
  _check_unboxed(params)
  out = dict(params)
  for stack in STACKS:
    if stack not in out or LAYERS not in out[stack]:
      continue
    sub = dict(out[stack])
    stacked = sub.pop(LAYERS)
    lengths = {int(x.shape[0]) for x in jax.tree.leaves(stacked)}
    expected = _n_layers(cfg, stack)
    if len(lengths) != 1 or (expected is not None and lengths != {expected}):
      raise ValueError(f"models.layout: {stack}/{LAYERS} leaves have leading sizes "
                       f"{sorted(lengths)}; expected one size, {expected or 'the layer count'}")
    for i in range(lengths.pop()):
      sub[f"block_{i}"] = jax.tree.map(lambda x, i=i: _index(x, i), stacked)
    out[stack] = sub
  return out


def to_layout(cfg, params) -> dict:
  """`params` in the layout `cfg.scan_layers` asks for."""
  return to_scanned(cfg, params) if cfg.scan_layers else to_unscanned(cfg, params)


def layer_axes(path: tuple[str, ...]) -> int:
  """Leading layer axes of the leaf at `path`: 1 inside a scanned stack, else 0."""
  return int(len(path) > 2 and path[0] in STACKS and path[1] == LAYERS)

