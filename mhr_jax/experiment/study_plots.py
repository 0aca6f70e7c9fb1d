"""The study's figures: hypotheses as a forest plot, sweep curves and per-method bars, with their intervals.

NumPy and matplotlib (mhr_jax.plotting: a bare Agg figure, rendered in memory and written atomically), no
JAX: bad input or a plotting error writes nothing.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from mhr_jax.experiment.statistics import VERDICTS
from mhr_jax.plotting import figure, write_png

VERDICT_COLORS = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray"}
FOREST_KEYS = ("id", "comparison", "mean_diff", "ci_low", "ci_high", "verdict", "observations")


def _is_sequence(values, length: int) -> bool:
  return isinstance(values, (list, tuple, np.ndarray)) and len(values) == length


def _finite(value, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or not math.isfinite(value):
    raise ValueError(f"{where}: must be a finite number, got {value!r}")
  return float(value)


def _interval(values, where: str) -> tuple[float, float, float]:
  """(mean, ci_low, ci_high) as floats, checked: finite, ci_low <= ci_high."""
  if not _is_sequence(values, 3):
    raise ValueError(f"{where}: expected (mean, ci_low, ci_high), got {values!r}")
  mean, low, high = (_finite(v, f"{where}[{i}]") for i, v in enumerate(values))
  if low > high:
    raise ValueError(f"{where}: ci_low {low} exceeds ci_high {high}")
  return mean, low, high


def _check_forest_row(index: int, row) -> dict:
  where = f"forest_plot: row {index}"
  if not isinstance(row, Mapping):
    raise ValueError(f"{where}: expected a dict with keys {list(FOREST_KEYS)}, got {type(row).__name__}")
  missing = [k for k in FOREST_KEYS if k not in row]
  if missing:
    raise ValueError(f"{where} ({row.get('id', '?')}): missing key {missing[0]!r}")
  if row["verdict"] not in VERDICTS:
    raise ValueError(f"{where} ({row['id']}): 'verdict' must be one of {list(VERDICTS)}, got {row['verdict']!r}")
  mean, low, high = _interval([row["mean_diff"], row["ci_low"], row["ci_high"]], f"{where} ({row['id']}) "
                              "mean_diff, ci_low, ci_high")
  if not isinstance(row["observations"], (list, tuple)):
    raise ValueError(f"{where} ({row['id']}): 'observations' must be a list of {{'diff': ...}} dicts")
  diffs = []
  for j, obs in enumerate(row["observations"]):
    if not isinstance(obs, Mapping) or "diff" not in obs:
      raise ValueError(f"{where} ({row['id']}): observation {j} has no 'diff'")
    diffs.append(_finite(obs["diff"], f"{where} ({row['id']}): observation {j} 'diff'"))
  margin = _finite(row.get("margin", 0.0), f"{where} ({row['id']}) margin")
  threshold = -margin if row.get("test") == "non-inferiority" else margin
  return {"label": f"{row['id']}: {row['comparison']}", "mean": mean, "low": low, "high": high,
          "verdict": row["verdict"], "diffs": np.asarray(diffs, np.float64), "threshold": threshold,
          "metric": str(row.get("metric", "paired difference A - B"))}


def forest_plot(rows: Sequence[Mapping], path: str) -> None:
  """One line per hypothesis, top to bottom in the order of `rows`, in one panel per metric (differences of
  ROUGE-L points and of gradient cosines do not share a scale): its interval and mean (coloured by the
  verdict), its individual paired differences as faint dots, a line at zero and, where the test's
  threshold is elsewhere (a margin), a dotted line there.

  Args:
    rows: the study's hypothesis rows: dicts with "id", "comparison", "mean_diff", "ci_low", "ci_high",
      "verdict" (statistics.VERDICTS), "observations" (n dicts with at least "diff"), and optionally
      "metric" (the panel; default one panel), "test" and "margin" (the threshold).
    path: the PNG to write.
  """
  if not rows:
    raise ValueError("forest_plot: no rows")
  checked = [_check_forest_row(i, row) for i, row in enumerate(rows)]
  panels = list(dict.fromkeys(row["metric"] for row in checked))
  sizes = [sum(row["metric"] == m for row in checked) for m in panels]
  fig = figure(8, 0.6 * len(checked) + 1.2 * len(panels) + 0.4)
  grid = fig.add_gridspec(len(panels), 1, height_ratios=sizes)
  for p, metric in enumerate(panels):
    ax = fig.add_subplot(grid[p])
    mine = [row for row in checked if row["metric"] == metric]
    for i, row in enumerate(mine):
      y = len(mine) - 1 - i
      color = VERDICT_COLORS[row["verdict"]]
      # The dots are spread evenly over a band around the row (no random jitter: the figure is reproducible).
      spread = np.linspace(-0.2, 0.2, len(row["diffs"])) if len(row["diffs"]) > 1 else np.zeros(len(row["diffs"]))
      ax.scatter(row["diffs"], y + spread, s=10, color=color, alpha=0.25, linewidths=0)
      ax.hlines(y, row["low"], row["high"], color=color, lw=2.5)
      ax.plot([row["mean"]], [y], "o", color=color, ms=7)
      if row["threshold"] != 0.0:
        ax.plot([row["threshold"]] * 2, [y - 0.35, y + 0.35], color="black", lw=1.0, ls=":")
    ax.axvline(0.0, color="black", lw=0.8, ls="--")
    ax.set_yticks(np.arange(len(mine))[::-1], [row["label"] for row in mine])
    ax.set_ylim(-0.6, len(mine) - 0.4)
    ax.set_xlabel(f"paired difference A - B: {metric} (mean and bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    if p == 0:
      from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
      present = [v for v in VERDICTS if any(row["verdict"] == v for row in checked)]
      ax.legend(handles=[Patch(color=VERDICT_COLORS[v], label=v) for v in present], loc="best", fontsize=8)
  fig.tight_layout()
  write_png(fig, path)


def line_plot(xs: Sequence[float], series: Mapping[str, tuple], path: str, xlabel: str, ylabel: str,
              title: str, *, xscale: str = "linear") -> None:
  """A sweep: one line per series (its means, marked) with its interval as a shaded band.

  Args:
    xs: the N sweep values (x axis).
    series: {name: (means, ci_lows, ci_highs)}, each a length-N sequence of finite numbers.
    path: the PNG to write.
    xscale: matplotlib's x scale ("log" for a sweep over shots or sizes that double).
  """
  x = np.asarray([_finite(v, f"line_plot: xs[{i}]") for i, v in enumerate(xs)], np.float64)
  if x.size == 0 or not series:
    raise ValueError("line_plot: needs at least one x value and one series")
  lines = {}
  for name, values in series.items():
    if not _is_sequence(values, 3):
      raise ValueError(f"line_plot: series {name!r}: expected (means, ci_lows, ci_highs)")
    arrays = []
    for part, seq in zip(("means", "ci_lows", "ci_highs"), values):
      if not _is_sequence(seq, x.size):
        raise ValueError(f"line_plot: series {name!r}: {part} must hold {x.size} values (one per x), got {seq!r}")
      arrays.append(np.asarray([_finite(v, f"line_plot: series {name!r} {part}[{i}]") for i, v in enumerate(seq)]))
    if np.any(arrays[1] > arrays[2]):
      raise ValueError(f"line_plot: series {name!r}: a ci_low exceeds its ci_high")
    lines[name] = arrays
  fig = figure(7, 4.5)
  ax = fig.add_subplot()
  for name, (means, lows, highs) in lines.items():
    (line,) = ax.plot(x, means, "o-", lw=1.5, ms=4, label=name)
    ax.fill_between(x, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xscale(xscale)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  write_png(fig, path)


def bar_plot(bars: Mapping[str, tuple], path: str, ylabel: str, title: str) -> None:
  """One bar per method (e.g. gradient alignment), in the order of `bars`, with its interval drawn as a
  whisker; a line at zero, since a cosine can be negative.

  Args:
    bars: {method: (mean, ci_low, ci_high)}, finite numbers. The mean need not lie inside a percentile
      interval, so the whisker is drawn from ci_low to ci_high, not as mean +- an error.
    path: the PNG to write.
  """
  if not bars:
    raise ValueError("bar_plot: no bars")
  names = list(bars)
  values = np.asarray([_interval(bars[n], f"bar_plot: bar {n!r}") for n in names])  # (methods, 3)
  fig = figure(0.8 * len(names) + 2.5, 4)
  ax = fig.add_subplot()
  x = np.arange(len(names))
  ax.bar(x, values[:, 0], color="tab:blue", alpha=0.8)
  ax.vlines(x, values[:, 1], values[:, 2], color="black", lw=1.5)
  ax.plot(np.concatenate([x, x]), np.concatenate([values[:, 1], values[:, 2]]), "_", color="black", ms=12)
  ax.axhline(0.0, color="black", lw=0.8)
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  write_png(fig, path)
