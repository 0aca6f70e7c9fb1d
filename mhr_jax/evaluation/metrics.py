"""Evaluation metrics and result tables (NumPy and rouge-score only; no TensorFlow, no JAX).

- Super-NaturalInstructions, as the official evaluation (natural-instructions eval/automatic/evaluation.py,
  English "default" track) computes it on generated text: ROUGE-L F-measure from
  `rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)` and exact match after normalising
  both sides (lower-case, drop ASCII punctuation, collapse whitespace; articles are kept), each the max
  over an instance's references, averaged over instances, x100, rounded to 4 decimals.
- Rank classification (T0 / T-Few): each answer choice is scored by its length-normalised NLL (summed token
  NLL / number of target tokens); the lowest wins. Accuracy in percent.
- Tables: mean and population std (ddof=0) over seeds; for T0 also the median over templates.
"""
from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

import numpy as np
from rouge_score import rouge_scorer

_ROUNDING = 4  # the official script rounds every reported metric to 4 decimals
_PUNCTUATION = frozenset(string.punctuation)
_SCORER = None


def _rouge_scorer() -> rouge_scorer.RougeScorer:
  global _SCORER
  if _SCORER is None:
    _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  return _SCORER


def normalize_answer(text: str) -> str:
  """SQuAD-style normalisation without article removal: lower-case, drop punctuation, collapse spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F-measure of one prediction against one reference (rouge-score, Porter stemmer)."""
  return _rouge_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def _check_pairs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"superni_metrics: {len(predictions)} predictions but {len(references)} reference lists")
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    if not isinstance(pred, str):
      raise ValueError(f"superni_metrics: predictions[{i}] is {type(pred).__name__}, expected str")
    if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
      raise ValueError(f"superni_metrics: references[{i}] must be a non-empty list of str, got {refs!r}")


def superni_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """Official SuperNI metrics over a set of instances.

  Args:
    predictions: N generated strings.
    references: N non-empty lists of reference strings (an instance's "output" list).
  Returns:
    {"exact_match": float, "rougeL": float}: means over instances of the max over references, x100,
    rounded to 4 decimals. N must be >= 1.
  """
  _check_pairs(predictions, references)
  if not predictions:
    raise ValueError("superni_metrics: no predictions to score")
  em = sum(max(exact_match(p, r) for r in refs) for p, refs in zip(predictions, references))
  rouge = sum(max(rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references))
  n = len(predictions)
  return {"exact_match": round(100.0 * em / n, _ROUNDING), "rougeL": round(100.0 * rouge / n, _ROUNDING)}


def superni_metrics_by_group(predictions: Sequence[str], references: Sequence[Sequence[str]],
                             groups: Sequence[str]) -> dict[str, dict[str, float]]:
  """`superni_metrics` per group (e.g. per task or per category): {group: {"exact_match", "rougeL"}}."""
  if not len(predictions) == len(references) == len(groups):
    raise ValueError(f"superni_metrics_by_group: lengths differ: {len(predictions)} predictions, "
                     f"{len(references)} references, {len(groups)} groups")
  by_group: dict[str, list[int]] = {}
  for i, g in enumerate(groups):
    by_group.setdefault(g, []).append(i)
  return {g: superni_metrics([predictions[i] for i in idx], [references[i] for i in idx])
          for g, idx in by_group.items()}


# ---------------------------------------------------------------- rank classification


def length_normalized_nll(token_nll: np.ndarray, loss_weights: np.ndarray) -> np.ndarray:
  """Per-sequence summed token NLL divided by the number of target tokens.

  Args:
    token_nll: (..., Lt) float, NLL of every target token.
    loss_weights: (..., Lt), 1 on target tokens and 0 on padding.
  Returns:
    (...) float64; +inf where a sequence has no target token (it can never win).
  """
  token_nll = np.asarray(token_nll, dtype=np.float64)
  weights = np.asarray(loss_weights, dtype=np.float64)
  if token_nll.shape != weights.shape:
    raise ValueError(f"length_normalized_nll: token_nll {token_nll.shape} and loss_weights "
                     f"{weights.shape} differ")
  lengths = weights.sum(-1)
  total = (token_nll * weights).sum(-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(lengths > 0, total / np.maximum(lengths, 1.0), np.inf)


def choice_scores_from_rows(row_scores: np.ndarray, example_index: np.ndarray,
                            choice_index: np.ndarray) -> np.ndarray:
  """Regroup one-row-per-choice scores into an (N, C) matrix; missing choices get +inf.

  Args:
    row_scores: (R,) score of each (example, choice) row, lower is better (length-normalised NLL).
    example_index: (R,) int in [0, N), rows with a negative index (batch padding) are ignored.
    choice_index: (R,) int in [0, C).
  Returns:
    (N, C) float64 with N = max(example_index) + 1 and C = max(choice_index) + 1.
  """
  row_scores, example_index, choice_index = map(np.asarray, (row_scores, example_index, choice_index))
  keep = example_index >= 0
  row_scores, example_index, choice_index = row_scores[keep], example_index[keep], choice_index[keep]
  if row_scores.size == 0:
    raise ValueError("choice_scores_from_rows: no rows with example_index >= 0")
  n_choices = choice_index.max() + 1
  if np.unique(example_index * n_choices + choice_index).size != example_index.size:
    raise ValueError("choice_scores_from_rows: duplicate (example_index, choice_index) rows")
  scores = np.full((example_index.max() + 1, n_choices), np.inf)
  scores[example_index, choice_index] = row_scores
  return scores


def rank_classification_predictions(scores: np.ndarray) -> np.ndarray:
  """(N, C) length-normalised NLL (+inf for absent choices) -> (N,) index of the lowest (first on ties)."""
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 2:
    raise ValueError(f"rank classification scores: expected shape (examples, choices), got {scores.shape}")
  return np.argmin(scores, axis=-1)


def rank_classification_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
  """Accuracy in percent of argmin-NLL choices against gold labels.

  Args:
    scores: (N, C) length-normalised NLL per answer choice (+inf for absent choices).
    labels: (N,) gold choice index.
  Returns:
    100 * mean(argmin_c scores[n, c] == labels[n]).
  """
  labels = np.asarray(labels)
  predictions = rank_classification_predictions(scores)
  if labels.shape != predictions.shape:
    raise ValueError(f"rank_classification_accuracy: labels {labels.shape} do not match scores "
                     f"{np.shape(scores)}")
  if labels.size == 0:
    raise ValueError("rank_classification_accuracy: no examples")
  return float(100.0 * np.mean(predictions == labels))


# ---------------------------------------------------------------- tables


def mean_std(values: Sequence[float]) -> dict[str, float]:
  """{"mean", "std"} of a list of per-seed values; std is the population std (ddof=0)."""
  arr = np.asarray(list(values), dtype=np.float64)
  if arr.size == 0:
    raise ValueError("mean_std: no values")
  return {"mean": float(arr.mean()), "std": float(arr.std())}


def superni_table(per_seed: Mapping[int, Mapping[str, Mapping[str, float]]]) -> dict:
  """Per-task and aggregate SuperNI results over seeds.

  Args:
    per_seed: {seed: {task: {"exact_match": x, "rougeL": y}}}; every seed must cover the same tasks.
  Returns:
    {"per_task": {task: {metric: {"mean", "std"}}}, "aggregate": {metric: {"mean", "std"}}} where the
    aggregate is, per seed, the mean over tasks (equal to pooling instances when every task has the same
    number of test instances, as the 100-instance protocol does), then mean/std over seeds.
  """
  seeds = sorted(per_seed)
  if not seeds:
    raise ValueError("superni_table: no seeds")
  tasks = sorted(per_seed[seeds[0]])
  for s in seeds:
    if sorted(per_seed[s]) != tasks:
      raise ValueError(f"superni_table: seed {s} covers different tasks than seed {seeds[0]}")
  metric_names = ("exact_match", "rougeL")
  per_task = {t: {m: mean_std([per_seed[s][t][m] for s in seeds]) for m in metric_names} for t in tasks}
  aggregate = {m: mean_std([np.mean([per_seed[s][t][m] for t in tasks]) for s in seeds])
               for m in metric_names}
  return {"per_task": per_task, "aggregate": aggregate}


def t0_table(accuracy: Mapping[str, Mapping[str, Mapping[int, float]]]) -> dict:
  """T0 held-out results: per dataset, median and mean over templates, each as mean/std over seeds.

  Args:
    accuracy: {dataset: {template: {seed: accuracy}}}; all templates of a dataset share the seeds.
  Returns:
    {"per_dataset": {dataset: {"median_over_templates": {"mean", "std"},
                               "mean_over_templates": {"mean", "std"}}},
     "average": {"median_over_templates": {"mean", "std"}, "mean_over_templates": {"mean", "std"}}}
    where "average" is, per seed, the mean over datasets.
  """
  if not accuracy:
    raise ValueError("t0_table: no datasets")
  per_seed_median: dict[str, dict[int, float]] = {}
  per_seed_mean: dict[str, dict[int, float]] = {}
  seeds = None
  for dataset, by_template in accuracy.items():
    if not by_template:
      raise ValueError(f"t0_table: dataset {dataset!r} has no templates")
    template_seeds = {tuple(sorted(v)) for v in by_template.values()}
    if len(template_seeds) != 1 or (seeds is not None and template_seeds != {seeds}):
      raise ValueError(f"t0_table: dataset {dataset!r}: templates or datasets cover different seeds")
    seeds = template_seeds.pop()
    per_seed_median[dataset] = {s: float(np.median([v[s] for v in by_template.values()])) for s in seeds}
    per_seed_mean[dataset] = {s: float(np.mean([v[s] for v in by_template.values()])) for s in seeds}
  per_dataset = {d: {"median_over_templates": mean_std(per_seed_median[d].values()),
                     "mean_over_templates": mean_std(per_seed_mean[d].values())} for d in accuracy}
  average = {
      "median_over_templates": mean_std([np.mean([per_seed_median[d][s] for d in accuracy]) for s in seeds]),
      "mean_over_templates": mean_std([np.mean([per_seed_mean[d][s] for d in accuracy]) for s in seeds]),
  }
  return {"per_dataset": per_dataset, "average": average}


def markdown_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], digits: int = 2) -> str:
  """Render {row: {column: {"mean", "std"}}} as a Markdown table with "mean ± std" cells."""
  if not rows:
    raise ValueError("markdown_table: no rows")
  columns = list(next(iter(rows.values())))
  lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, cells in rows.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{cells[c]['mean']:.{digits}f} ± {cells[c]['std']:.{digits}f}" for c in columns) + " |")
  return "\n".join(lines)
