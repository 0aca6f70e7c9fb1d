"""Paired differences of two methods: a crossed bootstrap interval of their mean, and a verdict (NumPy only).

An observation is one paired difference, as the study's results.json stores it:
  {"diff": metric of method A - metric of method B on the same held-out task, pre-training seed and
   adaptation seed, "task": the held-out task, "seeds": [pretrain_seed, adapt_seed]}
A hypothesis about pre-training alone has one seed per observation ("seeds": [pretrain_seed]) and may have
no task ("task": None). Imports nothing but NumPy, so the tables and plots need no JAX.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, NamedTuple, Sequence

import numpy as np

KINDS = ("superiority", "non-inferiority")
VERDICTS = ("supported", "contradicted", "inconclusive")
_KEYS = ("diff", "task", "seeds")


class BootstrapResult(NamedTuple):
  """The mean paired difference, its percentile bootstrap interval, and the number of observations."""
  mean_diff: float
  ci_low: float
  ci_high: float
  n: int


def _check_observation(index: int, obs) -> tuple[float, str | None, tuple[int, ...]]:
  """(diff, task, seeds) of one observation, or a one-line ValueError naming it and the field."""
  where = f"observation {index}"
  if not isinstance(obs, Mapping):
    raise ValueError(f"{where}: expected a dict with keys {list(_KEYS)}, got {type(obs).__name__}")
  missing = [k for k in _KEYS if k not in obs]
  if missing:
    raise ValueError(f"{where}: missing key {missing[0]!r} (an observation has keys {list(_KEYS)})")
  diff, task, seeds = obs["diff"], obs["task"], obs["seeds"]
  if isinstance(diff, bool) or not isinstance(diff, numbers.Real) or not math.isfinite(diff):
    raise ValueError(f"{where}: 'diff' must be a finite number, got {diff!r}")
  if task is not None and not isinstance(task, str):
    raise ValueError(f"{where}: 'task' must be a task name or None, got {task!r}")
  if (not isinstance(seeds, (list, tuple)) or len(seeds) not in (1, 2)
      or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in seeds)):
    raise ValueError(f"{where}: 'seeds' must be [pretrain_seed, adapt_seed] or [pretrain_seed] (integers), "
                     f"got {seeds!r}")
  return float(diff), task, tuple(int(s) for s in seeds)


def _describe(task, seeds) -> str:
  return f"task={task!r}, seeds={list(seeds)}"


def design_array(observations: Sequence[Mapping]) -> np.ndarray:
  """The observations as one array over the crossed factors, checked.

  Returns:
    (tasks, pretrain seeds, adapt seeds) float64 array of the differences: levels in sorted order; a
    factor that the observations do not have (no task, or one seed per observation) has size 1.
  Raises:
    ValueError (one line): no observations, a malformed observation (index and field), observations of
    different shapes (a task or an adaptation seed in some but not others), a repeated cell, or a missing
    one: every combination of the levels must be observed exactly once.
  """
  if len(observations) == 0:
    raise ValueError("no observations: a paired bootstrap needs at least one paired difference")
  checked = [_check_observation(i, obs) for i, obs in enumerate(observations)]
  _, task0, seeds0 = checked[0]
  for i, (_, task, seeds) in enumerate(checked):
    if len(seeds) != len(seeds0):
      raise ValueError(f"observation {i}: 'seeds' has {len(seeds)} elements, observation 0's has {len(seeds0)}")
    if (task is None) != (task0 is None):
      raise ValueError(f"observation {i}: 'task' is {task!r} but observation 0's is {task0!r} (either every "
                       "observation names its task or none does)")
  cells = {}
  for i, (diff, task, seeds) in enumerate(checked):
    key = (task, seeds[0], seeds[1] if len(seeds) == 2 else None)
    if key in cells:
      raise ValueError(f"observation {i} repeats the cell {_describe(task, seeds)} of observation {cells[key][0]}")
    cells[key] = (i, diff)
  levels = [sorted({key[f] for key in cells}, key=lambda v: (v is None, v)) for f in range(3)]
  values = np.empty([len(lv) for lv in levels], np.float64)
  for a, task in enumerate(levels[0]):
    for b, pretrain in enumerate(levels[1]):
      for c, adapt in enumerate(levels[2]):
        if (task, pretrain, adapt) not in cells:
          seeds = (pretrain,) if adapt is None else (pretrain, adapt)
          raise ValueError(f"no observation for the cell {_describe(task, seeds)}: the crossed bootstrap needs "
                           "every combination of held-out task, pre-training seed and adaptation seed")
        values[a, b, c] = cells[task, pretrain, adapt][1]
  return values


def paired_bootstrap(observations: Sequence[Mapping], *, n_resamples: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> BootstrapResult:
  """The mean of paired differences and its percentile interval from a crossed (multi-way) bootstrap.

  Observations that share a held-out task, or a pre-training seed, or an adaptation seed, are correlated:
  a hard task lowers both methods' scores on every seed, and an unlucky pre-training run is one draw for
  every task adapted from it. Resampling the observations one by one treats the n of them as independent
  and gives intervals that are too narrow. Here each crossed factor is resampled on its own: one resample
  draws len(tasks) tasks, len(pretrain seeds) pre-training seeds and len(adapt seeds) adaptation seeds,
  each with replacement and independently, and takes the mean over every observation in the product of
  the drawn levels, counted as often as its levels were drawn (the "pigeonhole" bootstrap of Owen, 2007,
  for crossed random effects; its variance is slightly conservative, and no resampling of a crossed design
  is exactly unbiased: McCullagh, 2000). A factor with a single level is always drawn as itself, so with
  one varying factor this is the ordinary percentile bootstrap of the mean over that factor's levels.

  The design must be balanced: every (task, pretrain seed, adapt seed) combination observed exactly once
  (a missing cell raises a ValueError naming it; filling it in would invent data, and dropping it would
  change which factor levels are compared).

  Args:
    observations: n dicts {"diff": float, "task": str | None, "seeds": [pretrain, adapt] or [pretrain]}.
    n_resamples: bootstrap resamples B.
    confidence: coverage of the two-sided interval (0.95: the 2.5% and 97.5% percentiles).
    seed: the NumPy generator's seed: the same arguments give the same interval.
  Returns:
    BootstrapResult(mean_diff: the mean of the n differences, ci_low and ci_high: the (1 - confidence) / 2
    and (1 + confidence) / 2 quantiles of the B resample means (NumPy's linear interpolation), n).
  """
  if isinstance(n_resamples, bool) or not isinstance(n_resamples, numbers.Integral) or n_resamples < 1:
    raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")
  values = design_array(observations)  # (T, P, A)
  rng = np.random.default_rng(seed)
  # How often each level is drawn in each resample: (B, size) per factor; a multinomial draw of `size`
  # items with equal probabilities is `size` draws with replacement, counted.
  counts = [rng.multinomial(size, np.full(size, 1.0 / size), size=int(n_resamples)).astype(np.float64)
            for size in values.shape]
  means = np.einsum("bt,bp,ba,tpa->b", *counts, values, optimize=True) / values.size  # (B,)
  alpha = 1.0 - confidence
  low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
  return BootstrapResult(float(values.mean()), float(low), float(high), len(observations))


def verdict(ci_low: float, ci_high: float, *, margin: float = 0.0, kind: str = "superiority") -> str:
  """The verdict on a hypothesis about A - B from where its interval lies against a threshold.

  kind "superiority" (A beats B by more than `margin`; margin 0: A > B): threshold +margin.
  kind "non-inferiority" (A is worse than B by less than `margin`, i.e. at least as good up to margin):
  threshold -margin.
  The hypothesis is "supported" when ci_low > threshold (the whole interval above it), "contradicted" when
  ci_high < threshold (the whole interval below it: for non-inferiority, A is worse by more than the margin),
  and "inconclusive" when ci_low <= threshold <= ci_high (an interval touching the threshold includes it).

  Args:
    ci_low, ci_high: the interval of the mean difference A - B, ci_low <= ci_high.
    margin: a finite margin >= 0, in the metric's units.
    kind: "superiority" or "non-inferiority".
  Returns:
    "supported", "contradicted" or "inconclusive".
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
  if not (math.isfinite(margin) and margin >= 0):
    raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
  if not (math.isfinite(ci_low) and math.isfinite(ci_high) and ci_low <= ci_high):
    raise ValueError(f"the interval must be finite with ci_low <= ci_high, got [{ci_low!r}, {ci_high!r}]")
  threshold = margin if kind == "superiority" else -margin
  if ci_low > threshold:
    return "supported"
  if ci_high < threshold:
    return "contradicted"
  return "inconclusive"
