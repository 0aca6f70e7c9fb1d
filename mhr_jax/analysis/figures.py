"""The analysis' figures and files: routing heatmaps, task matrices, CSV and NPZ, each written atomically."""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

from mhr_jax.plotting import figure, write_png
from mhr_jax.storage import write_bytes_atomic

MAX_TICK_LABELS = 80       # more tasks than this: label every n-th row only


def save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes_atomic(path, buffer.getvalue())


def _task_ticks(ax, labels: Sequence[str], axis: str) -> None:
  n = len(labels)
  every = max(1, math.ceil(n / MAX_TICK_LABELS))
  ticks = list(range(0, n, every))
  size = 7 if n <= 40 else 5
  if axis == "y":
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=size)
  else:
    ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=size, rotation=90)


def plot_routing(weights: np.ndarray, tasks: Sequence[str], title: str, path: str) -> None:
  """Heatmap of (T, S, K) routing weights: tasks x (head, skill) columns, head boundaries as lines."""
  n_tasks, n_heads, n_skills = weights.shape
  columns = n_heads * n_skills
  fig = figure(min(24.0, 3.0 + 0.12 * columns), min(40.0, 2.0 + 0.2 * n_tasks))
  ax = fig.add_subplot()
  image = ax.imshow(weights.reshape(n_tasks, columns), aspect="auto", interpolation="nearest",
                    cmap="viridis")
  for h in range(1, n_heads):
    ax.axvline(h * n_skills - 0.5, color="white", linewidth=0.8)
  if n_heads > 1:
    every = max(1, math.ceil(n_heads / 32))
    heads = range(0, n_heads, every)
    ax.set_xticks([h * n_skills + (n_skills - 1) / 2 for h in heads], [f"h{h}" for h in heads], fontsize=7)
    ax.set_xlabel(f"head (S={n_heads}) x skill (K={n_skills}); column = head * K + skill")
  else:
    every = max(1, math.ceil(n_skills / 32))
    ax.set_xticks(range(0, n_skills, every), [f"s{k}" for k in range(0, n_skills, every)], fontsize=7)
    ax.set_xlabel(f"skill (K={n_skills})")
  _task_ticks(ax, tasks, "y")
  ax.set_ylabel("training task")
  ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax, label="routing weight (per head, sums to 1 over skills)")
  write_png(fig, path)


def plot_task_matrix(matrix: np.ndarray, tasks: Sequence[str], title: str, path: str, *,
                     colorbar_label: str, symmetric: bool = False) -> None:
  """Tasks x tasks heatmap, coloured over the range of the off-diagonal entries (the diagonal, 1, would
  otherwise flatten the scale); symmetric=True centres a diverging colour map on 0."""
  n = matrix.shape[0]
  size = min(30.0, 3.0 + 0.25 * n)
  fig = figure(size + 1.5, size)
  ax = fig.add_subplot()
  off = matrix[~np.eye(n, dtype=bool)]
  off = off[np.isfinite(off)]
  if symmetric:
    limit = float(np.abs(off).max()) if off.size and np.abs(off).max() > 0 else 1.0
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
  else:
    low, high = (float(off.min()), float(off.max())) if off.size else (None, None)
    if low is not None and not low < high:
      low, high = None, None
    image = ax.imshow(matrix, cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
  _task_ticks(ax, tasks, "x")
  _task_ticks(ax, tasks, "y")
  ax.set_xlabel("task")
  ax.set_ylabel("task")
  ax.set_title(title, fontsize=9)
  colorbar = fig.colorbar(image, ax=ax, label=colorbar_label)
  colorbar.formatter.set_useOffset(False)  # near-1 cosines: full tick values, no offset text
  colorbar.update_ticks()
  write_png(fig, path)


def similarity_csv(matrix: np.ndarray, tasks: Sequence[str]) -> str:
  """CSV text: header row and first column are the task names; values at full float precision."""
  quote = lambda s: f'"{s}"' if any(c in s for c in ',"\n') else s  # noqa: E731
  names = [quote(str(t).replace('"', '""')) for t in tasks]
  lines = [",".join(["task"] + names)]
  for name, row in zip(names, matrix):
    lines.append(",".join([name] + [repr(float(v)) for v in row]))
  return "\n".join(lines) + "\n"


def json_float(x: float):
  return float(x) if np.isfinite(x) else None  # JSON has no NaN


def heatmap_file(layer: str) -> str:
  return f"routing_{layer.replace('/', '.')}.png"


def plotted_layers(layers: Sequence[str]) -> list[str]:
  """The first, middle and last of `layers` (model order), without repeats."""
  if not layers:
    return []
  picks = [layers[0], layers[len(layers) // 2], layers[-1]]
  return list(dict.fromkeys(picks))
