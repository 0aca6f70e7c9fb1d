"""Losses as (sum, normaliser) pairs, so gradient accumulation and per-task averages are exact.

A training objective is a dict of named terms {name: (sum, count)}; its value is
sum over terms of total_sum / total_count, where the totals run over the whole update (every
micro-batch and device). Counts depend only on the batch, never on the model, so the train step
knows them before the forward pass.

Token losses use the usual shifted-target convention: `logits[b, t]` predicts `targets[b, t]`;
padding has weight 0.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_KINDS = ("lm", "tfew")
# T-Few's unlikelihood is -log(1 - p + 0.01) per token (their code and the MHR authors'): the 0.01 bounds
# a token's loss at -log(0.01) = 4.6 and its gradient in p at 100.
UL_OFFSET = 0.01
_ABSENT = -1e9


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Training objective.

  kind: "lm" (token cross-entropy on the targets) or "tfew" (answer-choice batches: LM loss on the
    gold answer + length-normalised choice cross-entropy + unlikelihood on wrong choices).
  label_smoothing: mass spread uniformly over the vocabulary (the authors' SuperNI runs: 0.1);
    lm kind only.
  """
  kind: str = "lm"
  label_smoothing: float = 0.0

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"LossConfig.kind={self.kind!r}: expected one of {_KINDS}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"LossConfig.label_smoothing={self.label_smoothing}: must be in [0, 1)")
    if self.kind == "tfew" and self.label_smoothing:
      raise ValueError("LossConfig.label_smoothing applies to kind 'lm' only")


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        label_smoothing: float = 0.0) -> jax.Array:
  """Per-token cross-entropy.

  With smoothing eps the target distribution is (1 - eps) one_hot + eps / V (as
  torch.nn.functional.cross_entropy(label_smoothing=eps) and Hugging Face's LabelSmoother).

  Args:
    logits: (..., V) float.  targets: (...) int.
  Returns:
    (...) float32 losses (not masked).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if not label_smoothing:
    return nll
  uniform = -jnp.mean(log_probs, axis=-1)
  return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
            label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Weighted token cross-entropy.

  Args:
    logits: (B, L, V).  targets: (B, L) int.  weights: (B, L) float, 0 on padding.
  Returns:
    (sum of weighted token losses, sum of weights): scalars; the mean loss is their ratio.
  """
  weights = weights.astype(jnp.float32)
  losses = token_cross_entropy(logits, targets, label_smoothing)
  return jnp.sum(losses * weights), jnp.sum(weights)


def per_task_lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                     task_ids: jax.Array, n_tasks: int,
                     label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """lm_loss split by the task of each example.

  Args:
    logits: (B, L, V).  targets, weights: (B, L).  task_ids: (B,) int in [0, n_tasks).
  Returns:
    (loss sums (n_tasks,), weight sums (n_tasks,)).
  """
  weights = weights.astype(jnp.float32)
  per_example = jnp.sum(token_cross_entropy(logits, targets, label_smoothing) * weights, axis=-1)
  sums = jax.ops.segment_sum(per_example, task_ids, num_segments=n_tasks)
  counts = jax.ops.segment_sum(jnp.sum(weights, axis=-1), task_ids, num_segments=n_tasks)
  return sums, counts


def choice_log_likelihoods(logits: jax.Array, targets: jax.Array,
                           weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed log-likelihood of each answer choice and its length.

  Args:
    logits: (B, C, L, V).  targets: (B, C, L) int.  weights: (B, C, L), 0 on padding; a choice
      with no tokens is an absent choice (examples may have fewer than C).
  Returns:
    (log-likelihood sums (B, C), lengths (B, C)) float32.
  """
  weights = weights.astype(jnp.float32)
  logp = -token_cross_entropy(logits, targets)
  return jnp.sum(logp * weights, axis=-1), jnp.sum(weights, axis=-1)


def _gold(x: jax.Array, labels: jax.Array) -> jax.Array:
  """x (B, C, ...) -> x[b, labels[b]] (B, ...)."""
  return jnp.take_along_axis(x, labels.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def gold_choice_lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                        labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """T-Few L_LM: cross-entropy on the gold answer's tokens.

  Args: logits (B, C, L, V); targets, weights (B, C, L); labels (B,) gold choice index.
  Returns: (sum of gold-token NLL, number of gold tokens).
  """
  return lm_loss(_gold(logits, labels), _gold(targets, labels), _gold(weights, labels))


def length_normalized_choice_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                                  labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """T-Few L_LN: softmax cross-entropy over the choices' mean token log-likelihoods.

  beta(y) = (1 / |y|) sum_t log p(y_t | x, y_<t);  loss = -log softmax_c(beta)[gold].
  Args: logits (B, C, L, V); targets, weights (B, C, L); labels (B,).
  Returns: (sum over examples, number of examples with at least one choice token).
  """
  sums, lengths = choice_log_likelihoods(logits, targets, weights)
  present = lengths > 0
  valid = jnp.any(present, axis=-1)
  # Absent choices get a large finite negative score (not -inf) and padding examples a dummy
  # row, so no NaN reaches the gradient through the masked branches.
  beta = jnp.where(present, sums / jnp.maximum(lengths, 1.0), _ABSENT)
  beta = jnp.where(valid[:, None], beta, 0.0)
  losses = -_gold(jax.nn.log_softmax(beta, axis=-1), labels)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid.astype(jnp.float32))


def unlikelihood_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                      labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """T-Few L_UL: -sum log(1 - p(token) + 0.01) over the tokens of the wrong choices.

  Args: logits (B, C, L, V); targets, weights (B, C, L); labels (B,).
  Returns: (sum over wrong-choice tokens, number of wrong-choice tokens). (T-Few's code also adds
  -log(1.01) for every masked position to its sum, a constant without gradient; it is left out here.)
  """
  weights = weights.astype(jnp.float32)
  wrong = (jnp.arange(targets.shape[1])[None, :] != labels[:, None]).astype(jnp.float32)
  weights = weights * wrong[:, :, None]
  p = jnp.exp(-token_cross_entropy(logits, targets))
  return -jnp.sum(jnp.log(1.0 - p + UL_OFFSET) * weights), jnp.sum(weights)


def tfew_terms(logits: jax.Array, targets: jax.Array, weights: jax.Array,
               labels: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
  """The three T-Few terms, {name: (sum, count)}; the loss is the sum of their ratios."""
  return {
      "lm": gold_choice_lm_loss(logits, targets, weights, labels),
      "choice_ce": length_normalized_choice_loss(logits, targets, weights, labels),
      "unlikelihood": unlikelihood_loss(logits, targets, weights, labels),
  }


def tfew_counts(weights: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """The `tfew_terms` normalisers from the batch alone (no model needed)."""
  weights = weights.astype(jnp.float32)
  gold = jnp.sum(_gold(weights, labels))
  examples = jnp.sum(jnp.any(weights > 0, axis=(1, 2)).astype(jnp.float32))
  return {"lm": gold, "choice_ce": examples, "unlikelihood": jnp.sum(weights) - gold}


def combine_terms(sums: dict[str, jax.Array], counts: dict[str, jax.Array]) -> jax.Array:
  """Objective value sum_k sums[k] / counts[k]; a term with count 0 contributes 0."""
  return sum(sums[k] / jnp.maximum(counts[k], 1e-9) for k in sorted(sums))
