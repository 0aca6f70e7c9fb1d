"""mhr_jax.experiment.statistics: the crossed bootstrap against scipy.stats.bootstrap (one varying factor) and against an
exact enumeration of every resample (2x2 by hand, 2x2x2 by brute force), determinism, verdict boundaries, and
one-line errors for bad input."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from mhr_jax.experiment import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# scipy and we draw different resamples, so the two percentile intervals differ by Monte Carlo error only.
# With B resamples, the standard error of an estimated q-quantile is sqrt(q (1 - q) / B) / f(x_q), f the
# density of the bootstrap distribution, here close to normal with sd s = std(x) / sqrt(n): at q = 0.025 and
# B = 100000 that is 0.0085 s per estimate, 0.012 s for the difference of two independent ones. The
# tolerance is 5 of those.
ONE_FACTOR_RESAMPLES = 100_000
ONE_FACTOR_ATOL_IN_SD = 5 * np.sqrt(2) * np.sqrt(0.025 * 0.975 / ONE_FACTOR_RESAMPLES) / scipy.stats.norm.pdf(
    scipy.stats.norm.ppf(0.025))


def _observations(values: np.ndarray, tasks=True, adapt_seeds=True):
  """Observations of a (tasks, pretrain seeds, adapt seeds) array; task names "t<i>", seeds 10 + index."""
  out = []
  for (t, p, a), diff in np.ndenumerate(values):
    out.append({"diff": float(diff), "task": f"t{t}" if tasks else None,
                "seeds": [10 + p, 20 + a] if adapt_seeds else [10 + p]})
  return out


@pytest.mark.parametrize("shape", [(20, 1, 1), (1, 20, 1), (1, 1, 20)], ids=["tasks", "pretrain", "adapt"])
def test_one_varying_factor_is_scipys_percentile_bootstrap(shape):
  x = np.random.default_rng(3).normal(0.5, 2.0, size=20)
  ours = statistics.paired_bootstrap(_observations(x.reshape(shape)), n_resamples=ONE_FACTOR_RESAMPLES, seed=1)
  theirs = scipy.stats.bootstrap((x,), np.mean, n_resamples=ONE_FACTOR_RESAMPLES, confidence_level=0.95,
                                 method="percentile", rng=np.random.default_rng(2)).confidence_interval
  sd = x.std() / np.sqrt(x.size)
  assert ours.n == 20 and ours.mean_diff == pytest.approx(x.mean(), rel=1e-12)
  assert ours.ci_low == pytest.approx(theirs.low, abs=ONE_FACTOR_ATOL_IN_SD * sd)
  assert ours.ci_high == pytest.approx(theirs.high, abs=ONE_FACTOR_ATOL_IN_SD * sd)


def test_pretrain_seed_only_observations_without_task():
  x = np.random.default_rng(4).normal(size=6)
  obs = _observations(x.reshape(1, 6, 1), tasks=False, adapt_seeds=False)
  assert obs[0]["task"] is None and obs[0]["seeds"] == [10]
  with_task = statistics.paired_bootstrap(_observations(x.reshape(1, 6, 1)), seed=5)
  assert statistics.paired_bootstrap(obs, seed=5) == with_task  # a single-level factor changes nothing


def test_two_by_two_by_hand():
  """Tasks a, b x pre-training seeds 0, 1 with differences [[0, 1], [2, 4]]. A resample draws each factor's
  2 levels with replacement: counts (2, 0), (1, 1), (0, 2) with probabilities 1/4, 1/2, 1/4, independently
  for tasks and seeds, and its mean is sum_ts c_t c_s x_ts / 4. The 9 count pairs give
      mean      0     0.5   1     1.75  2     2.5   3     4
      P        1/16  2/16  3/16  4/16  1/16  2/16  2/16  1/16
      P(<=)    .0625 .1875 .375  .625  .6875 .8125 .9375 1
  so the 25% and 75% quantiles are 1 and 2.5 (confidence 0.5), the 10% and 90% are 0.5 and 3 (confidence
  0.8); each level lies at least 0.0375 from a jump of the distribution, over 10 Monte Carlo standard errors
  at B = 10000, so the sampled quantiles land on these values exactly."""
  x = {("a", 0): 0.0, ("a", 1): 1.0, ("b", 0): 2.0, ("b", 1): 4.0}
  obs = [{"diff": d, "task": t, "seeds": [s]} for (t, s), d in x.items()]
  assert statistics.paired_bootstrap(obs, confidence=0.5) == (1.75, 1.0, 2.5, 4)
  assert statistics.paired_bootstrap(obs, confidence=0.8) == (1.75, 0.5, 3.0, 4)


def test_three_crossed_factors_against_every_resample():
  """2 tasks x 2 pre-training seeds x 2 adaptation seeds: all 4 x 4 x 4 equally likely index draws,
  each resample the plain mean over the product of the drawn indices (np.ix_ repeats an index drawn twice)."""
  values = np.array([[[0.3, -1.2], [2.5, 0.7]], [[-0.4, 1.9], [3.1, -2.2]]])
  draws = list(itertools.product(range(2), repeat=2))
  exact = np.sort([values[np.ix_(t, p, a)].mean() for t in draws for p in draws for a in draws])
  atoms, counts = np.unique(np.round(exact, 12), return_counts=True)
  cdf = np.cumsum(counts) / exact.size
  confidence, n_resamples = 0.5, 100_000
  wanted = []
  for q in ((1 - confidence) / 2, (1 + confidence) / 2):
    k = int(np.searchsorted(cdf, q))  # the smallest atom with P(<=) >= q
    # q is far (over 10 Monte Carlo standard errors) from the jumps on either side of that atom, so the
    # sampled quantile is the atom itself
    assert min(cdf[k] - q, q - cdf[k - 1]) > 10 * np.sqrt(q * (1 - q) / n_resamples)
    wanted.append(atoms[k])
  result = statistics.paired_bootstrap(_observations(values), n_resamples=n_resamples, confidence=confidence)
  assert (result.ci_low, result.ci_high) == pytest.approx(wanted, abs=1e-12)
  assert result.mean_diff == pytest.approx(values.mean(), abs=1e-15) and result.n == 8


def test_replicates_that_repeat_a_tasks_value_add_no_precision():
  """Every seed of a task gives the same difference: the interval is the one over the 4 task values alone
  (the task counts are drawn first, so the same seed gives the same task draws), while resampling the 36
  observations as if independent would give one about 3 times narrower."""
  task_values = np.array([1.0, -0.5, 2.0, 0.25])
  values = np.repeat(np.repeat(task_values[:, None, None], 3, axis=1), 3, axis=2)
  crossed = statistics.paired_bootstrap(_observations(values), seed=7)
  tasks_alone = statistics.paired_bootstrap(_observations(task_values.reshape(4, 1, 1)), seed=7)
  assert (crossed.ci_low, crossed.ci_high) == pytest.approx((tasks_alone.ci_low, tasks_alone.ci_high), abs=1e-12)
  naive = scipy.stats.bootstrap((values.ravel(),), np.mean, method="percentile",
                                rng=np.random.default_rng(0)).confidence_interval
  assert naive.high - naive.low < 0.5 * (crossed.ci_high - crossed.ci_low)


def test_same_seed_same_numbers_in_any_order():
  obs = _observations(np.random.default_rng(8).normal(size=(5, 3, 2)))
  first = statistics.paired_bootstrap(obs, n_resamples=2000, seed=11)
  assert statistics.paired_bootstrap(obs, n_resamples=2000, seed=11) == first
  assert statistics.paired_bootstrap(obs[::-1], n_resamples=2000, seed=11) == first  # levels are sorted
  assert statistics.paired_bootstrap(obs, n_resamples=2000, seed=12) != first
  assert first.ci_low < first.mean_diff < first.ci_high


def test_a_single_observation_is_its_own_interval():
  assert statistics.paired_bootstrap([{"diff": 2.5, "task": "t", "seeds": [1, 2]}]) == (2.5, 2.5, 2.5, 1)


@pytest.mark.parametrize("ci, margin, kind, expected", [
    ((0.1, 2.0), 0.0, "superiority", "supported"),
    ((0.0, 2.0), 0.0, "superiority", "inconclusive"),  # touching the threshold includes it
    ((-1.0, 1.0), 0.0, "superiority", "inconclusive"),
    ((-1.0, 0.0), 0.0, "superiority", "inconclusive"),
    ((-1.0, -0.1), 0.0, "superiority", "contradicted"),
    ((0.6, 2.0), 0.5, "superiority", "supported"),
    ((0.4, 2.0), 0.5, "superiority", "inconclusive"),
    ((-1.0, 0.4), 0.5, "superiority", "contradicted"),
    ((-0.9, 2.0), 1.0, "non-inferiority", "supported"),
    ((-1.0, 2.0), 1.0, "non-inferiority", "inconclusive"),
    ((-3.0, -1.0), 1.0, "non-inferiority", "inconclusive"),
    ((-3.0, -1.1), 1.0, "non-inferiority", "contradicted"),
    ((-0.5, -0.2), 0.0, "non-inferiority", "contradicted"),  # margin 0: the same as superiority
])
def test_verdict_boundaries(ci, margin, kind, expected):
  assert statistics.verdict(*ci, margin=margin, kind=kind) == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="equivalence"), "kind must be one of"),
    (dict(margin=-0.1), "margin must be a finite number >= 0"),
    (dict(margin=float("nan")), "margin must be"),
])
def test_verdict_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    statistics.verdict(0.0, 1.0, **kwargs)
  with pytest.raises(ValueError, match="ci_low <= ci_high"):
    statistics.verdict(1.0, 0.0)


def _good(i=0):
  return {"diff": 0.5, "task": f"t{i}", "seeds": [1, 2]}


@pytest.mark.parametrize("observations, match", [
    ([], "^no observations"),
    ([{"task": "t", "seeds": [1, 2]}], "^observation 0: missing key 'diff'"),
    ([_good(), {"diff": 1.0, "seeds": [1, 2]}], "^observation 1: missing key 'task'"),
    ([{"diff": 1.0, "task": "t"}], "^observation 0: missing key 'seeds'"),
    ([_good(), {**_good(1), "diff": float("nan")}], r"^observation 1: 'diff' must be a finite number, got nan"),
    ([{**_good(), "diff": float("inf")}], "'diff' must be a finite number, got inf"),
    ([{**_good(), "diff": "0.5"}], "'diff' must be a finite number"),
    ([{**_good(), "diff": True}], "'diff' must be a finite number"),
    ([{**_good(), "task": 3}], "'task' must be a task name or None"),
    ([{**_good(), "seeds": [1, 2, 3]}], r"'seeds' must be \[pretrain_seed, adapt_seed\]"),
    ([{**_good(), "seeds": 1}], "'seeds' must be"),
    ([{**_good(), "seeds": [1.5]}], "'seeds' must be"),
    ([1.0], "^observation 0: expected a dict"),
    ([_good(0), {**_good(1), "seeds": [1]}], "^observation 1: 'seeds' has 1 elements, observation 0's has 2"),
    ([_good(0), {**_good(1), "task": None}], "^observation 1: 'task' is None but observation 0's is 't0'"),
    ([_good(0), _good(0)], r"^observation 1 repeats the cell task='t0', seeds=\[1, 2\] of observation 0"),
    ([_good(0), _good(1), {**_good(0), "seeds": [3, 2]}],
     r"^no observation for the cell task='t1', seeds=\[3, 2\]: the crossed bootstrap needs every combination"),
])
def test_bad_observations_are_one_line_errors(observations, match):
  with pytest.raises(ValueError, match=match) as error:
    statistics.paired_bootstrap(observations)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_resamples=0), "n_resamples must be a positive integer"),
    (dict(n_resamples=10.5), "n_resamples must be a positive integer"),
    (dict(confidence=1.0), "confidence must lie strictly between 0 and 1"),
    (dict(confidence=0.0), "confidence must lie"),
])
def test_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    statistics.paired_bootstrap([_good()], **kwargs)


def test_imports_without_jax_tensorflow_or_seqio():
  """The report code that uses it runs without JAX."""
  code = ("import sys\n"
          "for name in ('jax', 'jaxlib', 'flax', 'tensorflow', 'seqio'):\n"
          "  sys.modules[name] = None\n"
          "from mhr_jax.experiment import report, statistics, study, study_plots, study_report\n"
          "statistics.paired_bootstrap([{'diff': 1.0, 'task': None, 'seeds': [0]}])\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
