"""Metrics against hand-computed values and a direct rouge-score oracle."""
import numpy as np
import pytest
from rouge_score import rouge_scorer

from mhr_jax.evaluation import metrics


def _f(p, r):
  return 2 * p * r / (p + r)


# Hand-computed ROUGE-L F (rouge-score tokenisation: lower-case alphanumeric tokens, Porter stem on
# tokens longer than 3 characters):
#  1. "the cat sat on the mat" vs "the cat is on the mat": LCS the-cat-on-the-mat = 5 of 6 and 6 -> 5/6.
#  2. "running dogs" vs "the dog runs": stems [run, dog] vs [the, dog, run], LCS 1 -> P 1/2, R 1/3.
#  3. "A B C D" vs "a x c y d": LCS a-c-d = 3 -> P 3/4, R 3/5.
HAND = [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
    ("running dogs", "the dog runs", _f(1 / 2, 1 / 3)),
    ("A B C D", "a x c y d", _f(3 / 4, 3 / 5)),
]


@pytest.mark.parametrize("prediction,reference,expected", HAND)
def test_rouge_l_hand_values_and_oracle(prediction, reference, expected):
  oracle = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)
  assert metrics.rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)
  assert oracle["rougeL"].fmeasure == pytest.approx(expected, abs=1e-12)


def test_exact_match_normalisation_keeps_articles():
  assert metrics.exact_match("The  Cat.", "the cat") == 1.0
  assert metrics.exact_match("don't stop!", "dont stop") == 1.0
  assert metrics.exact_match("the cat", "cat") == 0.0  # articles are kept, unlike SQuAD
  assert metrics.normalize_answer("  A,  b\n C ") == "a b c"


def test_superni_metrics_max_over_references_mean_and_rounding():
  predictions = ["the cat sat on the mat", "running dogs", "Yes."]
  references = [["the cat is on the mat"], ["the dog runs", "dogs running"], ["no", "yes"]]
  # rougeL per instance: 5/6; max(0.4, stems [dog, run] vs [run, dog] LCS 1 -> 1/2) = 1/2; 1.
  expected_rouge = 100 * (5 / 6 + 0.5 + 1.0) / 3
  result = metrics.superni_metrics(predictions, references)
  assert result["rougeL"] == round(expected_rouge, 4) == 77.7778
  assert result["exact_match"] == round(100 / 3, 4) == 33.3333


def test_superni_metrics_by_group_and_bad_input():
  by_task = metrics.superni_metrics_by_group(["a", "b", "c"], [["a"], ["x"], ["c"]], ["t1", "t1", "t2"])
  assert by_task == {"t1": {"exact_match": 50.0, "rougeL": 50.0}, "t2": {"exact_match": 100.0, "rougeL": 100.0}}
  with pytest.raises(ValueError, match="2 predictions but 1 reference"):
    metrics.superni_metrics(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
    metrics.superni_metrics(["a"], ["a"])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.superni_metrics([], [])


def test_rank_classification_helpers():
  token_nll = np.array([[1.0, 3.0, 0.0], [0.5, 0.5, 0.5], [9.0, 9.0, 9.0]])
  weights = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
  np.testing.assert_allclose(metrics.length_normalized_nll(token_nll, weights), [2.0, 0.5, np.inf])
  # Rows: example 0 has choices (0: 2.0, 1: 0.5); example 1 (0: 1.0, 1: 3.0, 2: 0.1); a padding row.
  scores = metrics.choice_scores_from_rows([2.0, 0.5, 1.0, 3.0, 0.1, 7.0], [0, 0, 1, 1, 1, -1],
                                           [0, 1, 0, 1, 2, 0])
  np.testing.assert_array_equal(scores, [[2.0, 0.5, np.inf], [1.0, 3.0, 0.1]])
  np.testing.assert_array_equal(metrics.rank_classification_predictions(scores), [1, 2])
  assert metrics.rank_classification_accuracy(scores, [1, 0]) == 50.0
  assert metrics.rank_classification_accuracy(scores, [1, 2]) == 100.0
  with pytest.raises(ValueError, match="duplicate"):
    metrics.choice_scores_from_rows([1.0, 2.0], [0, 0], [1, 1])


def test_tables():
  per_seed = {13: {"a": {"exact_match": 10.0, "rougeL": 20.0}, "b": {"exact_match": 30.0, "rougeL": 40.0}},
              42: {"a": {"exact_match": 20.0, "rougeL": 20.0}, "b": {"exact_match": 50.0, "rougeL": 60.0}}}
  table = metrics.superni_table(per_seed)
  assert table["per_task"]["a"]["exact_match"] == {"mean": 15.0, "std": 5.0}
  # Aggregate: per seed mean over tasks (20, 35) -> mean 27.5, population std 7.5.
  assert table["aggregate"]["exact_match"] == {"mean": 27.5, "std": 7.5}
  assert table["aggregate"]["rougeL"] == {"mean": 35.0, "std": 5.0}

  acc = {"rte": {"t1": {0: 50.0, 1: 60.0}, "t2": {0: 70.0, 1: 80.0}, "t3": {0: 90.0, 1: 40.0}}}
  t0 = metrics.t0_table(acc)
  # Seed 0: median(50, 70, 90) = 70, mean 70; seed 1: median(60, 80, 40) = 60, mean 60.
  assert t0["per_dataset"]["rte"]["median_over_templates"] == {"mean": 65.0, "std": 5.0}
  assert t0["average"]["mean_over_templates"] == {"mean": 65.0, "std": 5.0}
  text = metrics.markdown_table(t0["per_dataset"])
  assert "| rte | 65.00 ± 5.00 | 65.00 ± 5.00 |" in text
  with pytest.raises(ValueError, match="different seeds"):
    metrics.t0_table({"rte": {"t1": {0: 1.0}, "t2": {1: 1.0}}})
