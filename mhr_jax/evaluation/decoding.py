"""Decoding (greedy, beam search) with the KV cache, and sequence scoring for rank classification.

Everything here is pure JAX: one jit-compiled program per (model, shapes, static settings), batch-parallel,
and free of device-specific code, so inputs sharded over a mesh work as they come. Adapted models take
per-example `task_ids`; beam search repeats them for every beam.

Beam search reproduces Hugging Face `generate(num_beams=N, length_penalty=alpha, early_stopping=...)` for
encoder-decoders step for step:
  - every step keeps the top 2N candidates (one EOS token id) over all beams' summed log-probabilities;
  - the best N candidates that do not end (EOS, or the length limit) continue as the running beams;
  - candidates among the top N that end become finished hypotheses scored sum_logprob / len ** alpha, where
    len counts the generated tokens including EOS (the decoder start token is not counted); the N best
    finished hypotheses are kept;
  - an example stops accepting hypotheses once its N slots are full and the best running beam cannot beat
    the worst finished one (early_stopping=False: judged at the current length; "never": at the maximum
    length when alpha > 0), or, with early_stopping=True, as soon as its N slots are full;
  - at the length limit every candidate ends, so the result is always a finished hypothesis.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mhr_jax.adapters.layers import check_task_ids

# Hugging Face's beam-search mask value; kept identical so that ties and comparisons behave the same.
_MASK = -1.0e9


def _apply(model, params, *args, method, cache=None, **kwargs):
  variables = {"params": params} if cache is None else {"params": params, "cache": cache}
  return model.apply(variables, *args, enable_dropout=False, method=method, **kwargs)


def _init_cache(model, params, encoded, encoder_input_tokens, task_ids, max_len: int):
  """An empty KV cache for decoding `encoded.shape[0]` sequences of up to `max_len` tokens.

  The structure comes from tracing the cache-building decode call (no compute); keys, values and the
  decode-step indices start at zero. Every leaf but the () `cache_index` of each stack has the batch
  on axis 0, in both parameter layouts (see models/t5.py).
  """
  dummy = jnp.zeros((encoded.shape[0], max_len), jnp.int32)

  def build():
    _, variables = _apply(model, params, encoded, encoder_input_tokens, dummy, task_ids=task_ids,
                          method=model.decode, decode=True, max_decode_length=max_len,
                          mutable=["cache"])
    return variables["cache"]

  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(build))


def _decode_step(model, params, cache, encoded, encoder_input_tokens, tokens, task_ids, max_len):
  """One cached decoder step: tokens (B,) -> (float32 logits (B, V), updated cache)."""
  logits, variables = _apply(model, params, encoded, encoder_input_tokens, tokens[:, None],
                             task_ids=task_ids, method=model.decode, cache=cache, decode=True,
                             max_decode_length=max_len, mutable=["cache"])
  return logits[:, 0].astype(jnp.float32), variables["cache"]


def _check_task_ids(model, encoder_input_tokens, task_ids):
  """Shape, and range when the ids are concrete: under jit a routing gather would clamp an id outside
  [0, n_tasks) to the last row silently."""
  if task_ids is None:
    return
  if jnp.shape(task_ids) != (encoder_input_tokens.shape[0],):
    raise ValueError(f"task_ids: expected shape ({encoder_input_tokens.shape[0]},), got "
                     f"{jnp.shape(task_ids)}")
  if model.config.adapter.uses_task_ids:
    check_task_ids(task_ids, model.config.adapter.n_tasks)


def _check_inputs(model, encoder_input_tokens, max_decode_length, task_ids):
  if encoder_input_tokens.ndim != 2:
    raise ValueError(f"encoder_input_tokens: expected shape (batch, length), got "
                     f"{encoder_input_tokens.shape}")
  if int(max_decode_length) < 1:
    raise ValueError(f"max_decode_length={max_decode_length}: must be >= 1")
  _check_task_ids(model, encoder_input_tokens, task_ids)


# ---------------------------------------------------------------------------------------------- greedy

@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id"))
def _greedy(model, params, encoder_input_tokens, task_ids, *, max_decode_length, eos_id):
  params = nn.meta.unbox(params)
  batch = encoder_input_tokens.shape[0]
  encoded = _apply(model, params, encoder_input_tokens, task_ids=task_ids, method=model.encode)
  cache = _init_cache(model, params, encoded, encoder_input_tokens, task_ids, max_decode_length)
  start = jnp.full((batch,), model.config.decoder_start_token_id, jnp.int32)
  init = (jnp.array(0, jnp.int32), start, jnp.zeros((batch,), bool),
          jnp.zeros((batch, max_decode_length), jnp.int32), cache)

  def cond(state):
    step, _, ended, _, _ = state
    return (step < max_decode_length) & ~jnp.all(ended)

  def body(state):
    step, last, ended, tokens, cache = state
    logits, cache = _decode_step(model, params, cache, encoded, encoder_input_tokens, last, task_ids,
                                 max_decode_length)
    nxt = jnp.where(ended, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
    return step + 1, nxt, ended | (nxt == eos_id), tokens, cache

  return lax.while_loop(cond, body, init)[3]


def greedy_decode(model, params, encoder_input_tokens, max_decode_length: int, task_ids=None,
                  eos_id: int | None = None) -> jax.Array:
  """Greedy decoding with the KV cache.

  Args:
    model: a `models.T5`.
    params: its parameters (boxed or unboxed, without the "params" wrapper).
    encoder_input_tokens: (B, Li) int, padding 0.
    max_decode_length: Lmax, the most tokens generated (EOS included); static.
    task_ids: (B,) int task of each example, for adapters that route by task; or None.
    eos_id: end-of-sequence id; default `model.config.eos_token_id`.
  Returns:
    (B, Lmax) int32 generated tokens (no start token); after EOS, padding 0.
  """
  _check_inputs(model, encoder_input_tokens, max_decode_length, task_ids)
  return _greedy(model, params, encoder_input_tokens, task_ids,
                 max_decode_length=int(max_decode_length),
                 eos_id=int(model.config.eos_token_id if eos_id is None else eos_id))


# ------------------------------------------------------------------------------------------ beam search

def _gather(x, idx):
  """x (B, M, ...) gathered along axis 1 with idx (B, K) -> (B, K, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "num_beams",
                                             "early_stopping", "eos_id"))
def _beam(model, params, encoder_input_tokens, task_ids, length_penalty, *, max_decode_length,
          num_beams, early_stopping, eos_id):
  params = nn.meta.unbox(params)
  batch, n, max_len = encoder_input_tokens.shape[0], num_beams, max_decode_length
  n_cand = 2 * n        # enough candidates that n of them continue even if n end at EOS
  encoded = _apply(model, params, encoder_input_tokens, task_ids=task_ids, method=model.encode)
  # Beam b of example i lives at flat row i * n + b.
  repeat = lambda x: None if x is None else jnp.repeat(x, n, axis=0)
  encoded, enc_tokens, beam_task_ids = repeat(encoded), repeat(encoder_input_tokens), repeat(task_ids)
  cache = _init_cache(model, params, encoded, enc_tokens, beam_task_ids, max_len)

  # Only beam 0 is live at the start, so the first step does not pick the same token n times.
  running_scores = jnp.where(jnp.arange(n) == 0, 0.0, _MASK)
  init = dict(
      step=jnp.array(0, jnp.int32),
      running_seqs=jnp.zeros((batch, n, max_len), jnp.int32),
      running_scores=jnp.broadcast_to(running_scores, (batch, n)).astype(jnp.float32),
      seqs=jnp.zeros((batch, n, max_len), jnp.int32),
      scores=jnp.full((batch, n), _MASK, jnp.float32),
      finished=jnp.zeros((batch, n), bool),
      improvable=jnp.ones((batch,), bool),
      go_on=jnp.array(True),
      cache=cache)
  rows = jnp.arange(batch)[:, None] * n
  first_n = jnp.arange(n_cand) < n

  def body(s):
    step = s["step"]
    prev = lax.dynamic_index_in_dim(s["running_seqs"], jnp.maximum(step - 1, 0), axis=2,
                                    keepdims=False)
    last = jnp.where(step == 0, model.config.decoder_start_token_id, prev).reshape(-1)
    logits, cache = _decode_step(model, params, s["cache"], encoded, enc_tokens, last,
                                 beam_task_ids, max_len)
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(batch, n, -1)
    vocab = logp.shape[-1]
    total = (logp + s["running_scores"][:, :, None]).reshape(batch, n * vocab)
    cand_scores, cand_idx = lax.top_k(total, n_cand)                       # (B, 2n), best first
    cand_beam, cand_tok = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
    cand_seqs = _gather(s["running_seqs"], cand_beam)
    at_step = (jnp.arange(max_len) == step)[None, None, :]
    cand_seqs = jnp.where(at_step, cand_tok[:, :, None], cand_seqs)
    ends = (cand_tok == eos_id) | (step + 1 >= max_len)

    # Running beams for the next step: the n best candidates that do not end.
    running_scores, pick = lax.top_k(cand_scores + ends.astype(jnp.float32) * _MASK, n)
    running_seqs = _gather(cand_seqs, pick)
    running_src = _gather(cand_beam, pick)

    # Finished hypotheses: candidates among the top n that end, length-penalised, merged with the
    # kept ones; masked out where the example no longer accepts hypotheses.
    just_ended = ends & first_n[None, :]
    length = (step + 1).astype(jnp.float32)             # generated tokens, EOS included
    hyp_scores = cand_scores / length ** length_penalty
    if early_stopping is True:
      full = jnp.all(s["finished"], axis=-1, keepdims=True)
      hyp_scores = hyp_scores + full.astype(jnp.float32) * _MASK
    hyp_scores = hyp_scores + (~s["improvable"])[:, None].astype(jnp.float32) * _MASK
    hyp_scores = hyp_scores + (~just_ended).astype(jnp.float32) * _MASK
    merged_scores = jnp.concatenate([s["scores"], hyp_scores], axis=1)
    scores, keep = lax.top_k(merged_scores, n)
    seqs = _gather(jnp.concatenate([s["seqs"], cand_seqs], axis=1), keep)
    finished = _gather(jnp.concatenate([s["finished"], just_ended], axis=1), keep)

    # Reorder the cache rows to follow their beams; scalar leaves (cache indices) are shared.
    flat_src = (running_src + rows).reshape(-1)
    cache = jax.tree.map(lambda x: x[flat_src] if x.ndim else x, cache)

    # Can the best running beam still beat the worst kept hypothesis?
    best_length = length
    if early_stopping == "never":
      best_length = jnp.where(length_penalty > 0.0, jnp.float32(max_len), length)
    best_running = running_scores[:, :1] / best_length ** length_penalty
    worst_kept = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _MASK)
    improvable = s["improvable"] & jnp.any(best_running > worst_kept, axis=-1)
    go_on = jnp.any(improvable) & ~jnp.all(ends)
    if early_stopping is True:
      go_on &= ~jnp.all(finished)
    return dict(step=step + 1, running_seqs=running_seqs, running_scores=running_scores, seqs=seqs,
                scores=scores, finished=finished, improvable=improvable, go_on=go_on, cache=cache)

  out = lax.while_loop(lambda s: s["go_on"], body, init)
  return out["seqs"][:, 0], out["scores"][:, 0]


def beam_search(model, params, encoder_input_tokens, max_decode_length: int, num_beams: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False, task_ids=None,
                eos_id: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Beam search with the KV cache; the same result as Hugging Face `generate(num_beams=...)`.

  Args:
    model, params, encoder_input_tokens (B, Li), task_ids (B,) or None, eos_id: as `greedy_decode`.
    max_decode_length: Lmax, the most tokens generated (HF `max_new_tokens`); static.
    num_beams: N beams per example; static.
    length_penalty: alpha; a finished hypothesis scores sum_logprob / len ** alpha.
    early_stopping: True, False or "never" (Hugging Face's meanings, see the module docstring); static.
  Returns:
    tokens: (B, Lmax) int32, the best hypothesis of each example (no start token; after EOS, padding 0).
    scores: (B,) float32, its length-penalised score (HF `sequences_scores`).
  """
  _check_inputs(model, encoder_input_tokens, max_decode_length, task_ids)
  if int(num_beams) < 1:
    raise ValueError(f"num_beams={num_beams}: must be >= 1")
  if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
    raise ValueError(f"early_stopping={early_stopping!r}: expected True, False or 'never'")
  return _beam(model, params, encoder_input_tokens, task_ids, jnp.float32(length_penalty),
               max_decode_length=int(max_decode_length), num_beams=int(num_beams),
               early_stopping=early_stopping,
               eos_id=int(model.config.eos_token_id if eos_id is None else eos_id))


# ---------------------------------------------------------------------------------------------- scoring

def shift_right(targets: jax.Array, start_id: int = 0) -> jax.Array:
  """Teacher-forcing decoder inputs: (..., Lt) targets shifted right by one, `start_id` first."""
  pad = [(0, 0)] * (targets.ndim - 1) + [(1, 0)]
  return jnp.pad(targets[..., :-1], pad, constant_values=start_id)


@functools.partial(jax.jit, static_argnames=("model",))
def _score(model, params, encoder_input_tokens, decoder_target_tokens, task_ids):
  params = nn.meta.unbox(params)
  targets = decoder_target_tokens.astype(jnp.int32)
  lead = targets.shape[:-1]                                  # (B,) or (B, C)
  encoded = _apply(model, params, encoder_input_tokens, task_ids=task_ids, method=model.encode)
  if targets.ndim == 3:
    # Several targets per input: encode once, decode each (input, target) pair.
    n_choices = targets.shape[1]
    rep = lambda x: None if x is None else jnp.repeat(x, n_choices, axis=0)
    encoded, encoder_input_tokens, task_ids = rep(encoded), rep(encoder_input_tokens), rep(task_ids)
    targets = targets.reshape(-1, targets.shape[-1])
  inputs = shift_right(targets, model.config.decoder_start_token_id)
  logits = _apply(model, params, encoded, encoder_input_tokens, inputs, targets, task_ids=task_ids,
                  method=model.decode)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  valid = targets > 0
  total = jnp.sum(jnp.where(valid, token_logp, 0.0), axis=-1)
  lengths = jnp.sum(valid, axis=-1).astype(jnp.int32)
  mean = total / jnp.maximum(lengths, 1)
  return total.reshape(lead), mean.reshape(lead), lengths.reshape(lead)


def score_sequences(model, params, encoder_input_tokens, decoder_target_tokens, task_ids=None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Teacher-forced log-likelihood of target sequences (rank classification scores).

  Decoder inputs are the targets shifted right with the decoder start id; padding (id 0) is excluded.
  Rank classification (docs/METHODS.md) picks the choice with the lowest length-normalised NLL, i.e. the
  highest `mean_logprob`.

  Args:
    model, params, task_ids (B,) or None: as `greedy_decode`.
    encoder_input_tokens: (B, Li) int, padding 0.
    decoder_target_tokens: (B, Lt) targets, or (B, C, Lt) for C answer choices per input (the input is
      encoded once).
  Returns:
    sum_logprob: (B,) or (B, C) float32, summed log-probability of the target tokens.
    mean_logprob: same shape, sum_logprob / number of target tokens (0 for empty targets).
    lengths: same shape, int32 number of target tokens.
  """
  if encoder_input_tokens.ndim != 2:
    raise ValueError(f"encoder_input_tokens: expected shape (batch, length), got "
                     f"{encoder_input_tokens.shape}")
  targets_shape = jnp.shape(decoder_target_tokens)
  if len(targets_shape) not in (2, 3) or targets_shape[0] != encoder_input_tokens.shape[0]:
    raise ValueError(f"decoder_target_tokens: expected shape ({encoder_input_tokens.shape[0]}, Lt) or "
                     f"({encoder_input_tokens.shape[0]}, C, Lt), got {targets_shape}")
  _check_task_ids(model, encoder_input_tokens, task_ids)
  return _score(model, params, encoder_input_tokens, decoder_target_tokens, task_ids)
