"""Greedy / beam decoding and sequence scoring against Hugging Face PyTorch T5 (the oracle)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import hf_oracle
from mhr_jax.evaluation import decoding
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.checkpoints.hf_t5 import load_hf_t5
from mhr_jax.models.t5 import T5

torch.set_num_threads(1)

VOCAB, MAX_LEN, EOS = hf_oracle.TINY_DIMS["vocab_size"], 10, hf_oracle.TINY_DIMS["eos_token_id"]
INPUT_LENGTHS = (9, 3, 6, 1, 8, 5, 2, 7)      # padded batch with inputs of different lengths
# (seed, EOS logit boost) per variant, chosen so outputs mix early EOS with full-length sequences.
ORACLES = {"v1_1": (3, 1.0), "original": (1, 2.0)}


def _encoder_inputs(seed=0):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(INPUT_LENGTHS), max(INPUT_LENGTHS)), np.int64)
  for i, n in enumerate(INPUT_LENGTHS):
    tokens[i, :n] = rng.integers(2, VOCAB, n)
  return tokens


def _oracle(tmp_dir, variant):
  """A tiny random HF T5 whose search is non-trivial, and the same model loaded with `load_hf_t5`.

  Weights N(0, 0.3) give competing candidates; a raised EOS output row makes hypotheses end at
  different steps (and some never). Queries, keys, norms, relative biases and the tied embedding keep
  hf_oracle's init: sharper attention makes fp32 itself drift by more than the tolerances.
  """
  seed, eos_boost = ORACLES[variant]
  hf = hf_oracle.make_hf_model(variant, seed)
  keep = ("q.weight", "k.weight", "layer_norm.weight", "relative_attention_bias.weight", "shared.weight")
  with torch.no_grad():
    for name, w in hf.named_parameters():
      if not name.endswith(keep):
        w.normal_(0.0, 0.3)
    (hf.lm_head.weight if variant == "v1_1" else hf.shared.weight)[EOS] += eos_boost
  path = tmp_dir / variant
  hf.save_pretrained(path)
  cfg, params = load_hf_t5(path)
  return hf, T5(cfg), jax.tree.map(jnp.asarray, params), _encoder_inputs()


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("oracles")
  return {variant: _oracle(tmp, variant) for variant in ORACLES}


@pytest.fixture(scope="module")
def pair(oracles):
  return oracles["v1_1"]


def _hf_generate(hf, enc, **kwargs):
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0), do_sample=False,
                      max_new_tokens=MAX_LEN, output_scores=True, return_dict_in_generate=True, **kwargs)
  return out.sequences.numpy()[:, 1:], (None if kwargs.get("num_beams", 1) == 1
                                        else out.sequences_scores.numpy())


def _cut_after_eos(tokens):
  """(B, <=L) HF tokens -> (B, L): everything after the first EOS (HF fills it with pad or EOS) set to 0."""
  out = np.zeros((tokens.shape[0], MAX_LEN), np.int64)
  for i, row in enumerate(tokens):
    row = list(row)
    end = row.index(EOS) + 1 if EOS in row else len(row)
    out[i, :end] = row[:end]
  return out


def _ended_early(tokens):
  return [EOS in list(row[:MAX_LEN - 1]) for row in tokens]


@pytest.mark.parametrize("variant", sorted(ORACLES))
def test_greedy_matches_hf(oracles, variant):
  hf, model, params, enc = oracles[variant]
  ours = np.asarray(decoding.greedy_decode(model, params, jnp.asarray(enc), MAX_LEN))
  theirs, _ = _hf_generate(hf, enc, num_beams=1)
  np.testing.assert_array_equal(ours, _cut_after_eos(theirs))
  ended = _ended_early(ours)
  assert any(ended) and not all(ended)        # the batch mixes early EOS with full-length outputs


def test_greedy_compiles_once_per_shape(pair):
  _, model, params, enc = pair
  decoding.greedy_decode(model, params, jnp.asarray(enc), MAX_LEN)
  size = decoding._greedy._cache_size()
  again = decoding.greedy_decode(model, params, jnp.asarray(enc[::-1].copy()), MAX_LEN)
  assert decoding._greedy._cache_size() == size
  assert again.shape == (len(enc), MAX_LEN)


BEAM_SETTINGS = [(n, alpha, es) for alpha in (0.6, 1.0, 2.0)
                 for n, es in ((3, False), (3, True), (4, False), (4, True), (4, "never"))]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", BEAM_SETTINGS)
def test_beam_matches_hf(pair, num_beams, length_penalty, early_stopping):
  hf, model, params, enc = pair
  tokens, scores = decoding.beam_search(model, params, jnp.asarray(enc), MAX_LEN, num_beams,
                                        length_penalty, early_stopping)
  theirs, their_scores = _hf_generate(hf, enc, num_beams=num_beams, length_penalty=length_penalty,
                                      early_stopping=early_stopping)
  np.testing.assert_array_equal(np.asarray(tokens), _cut_after_eos(theirs))
  np.testing.assert_allclose(np.asarray(scores), their_scores, rtol=1e-5, atol=1e-4)


def test_beam_matches_hf_original_variant(oracles):
  """Tied embeddings with the d_model**-0.5 output scaling (original T5) inside the cached steps."""
  hf, model, params, enc = oracles["original"]
  tokens, scores = decoding.beam_search(model, params, jnp.asarray(enc), MAX_LEN, 4, 1.0, False)
  theirs, their_scores = _hf_generate(hf, enc, num_beams=4, length_penalty=1.0, early_stopping=False)
  np.testing.assert_array_equal(np.asarray(tokens), _cut_after_eos(theirs))
  np.testing.assert_allclose(np.asarray(scores), their_scores, rtol=1e-5, atol=1e-4)
  assert any(_ended_early(np.asarray(tokens)))


def test_beam_cases_exercise_finished_hypotheses(pair):
  """The oracle outputs of BEAM_SETTINGS cover the branches of the finished-hypothesis logic."""
  hf, _, _, enc = pair
  greedy, _ = _hf_generate(hf, enc, num_beams=1)
  outputs = {s: _cut_after_eos(_hf_generate(hf, enc, num_beams=s[0], length_penalty=s[1],
                                            early_stopping=s[2])[0]) for s in BEAM_SETTINGS}
  ended = np.array([_ended_early(t) for t in outputs.values()])
  assert ended.any() and not ended.all()       # hypotheses end at EOS early, others run to the limit
  lengths = {int((t > 0).sum(1).min()) for t in outputs.values()}
  assert len(lengths) > 1
  for stopping in (True, "never"):              # each early_stopping mode changes some result
    assert any((outputs[(n, a, es)] != outputs[(n, a, False)]).any()
               for n, a, es in BEAM_SETTINGS if es == stopping)
  assert any((t != _cut_after_eos(greedy)).any() for t in outputs.values())


def test_cached_steps_match_full_forward(mhr):
  """Step-by-step logits against the KV cache equal the teacher-forced forward (adapted model)."""
  model, params = mhr
  enc = jnp.asarray(_encoder_inputs(1))
  task_ids = jnp.arange(len(enc)) % 3
  targets = jnp.asarray(np.random.default_rng(2).integers(1, VOCAB, (len(enc), MAX_LEN)))
  inputs = decoding.shift_right(targets)
  full = jax.jit(lambda: model.apply({"params": params}, enc, inputs, targets, task_ids=task_ids,
                                     enable_dropout=False))()
  encoded = jax.jit(lambda: model.apply({"params": params}, enc, task_ids=task_ids, enable_dropout=False,
                                        method=model.encode))()
  cache = decoding._init_cache(model, params, encoded, enc, task_ids, MAX_LEN)
  step = jax.jit(lambda cache, tokens: decoding._decode_step(model, params, cache, encoded, enc, tokens,
                                                             task_ids, MAX_LEN))
  steps = []
  for t in range(MAX_LEN):
    logits, cache = step(cache, inputs[:, t])
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full), atol=1e-5, rtol=1e-5)
  # The cache-building call (full length, decode=True) is itself a causal forward.
  built, _ = jax.jit(lambda: model.apply({"params": params}, encoded, enc, inputs, task_ids=task_ids,
                                         enable_dropout=False, decode=True, max_decode_length=MAX_LEN,
                                         mutable=["cache"], method=model.decode))()
  np.testing.assert_allclose(np.asarray(built), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_score_sequences_matches_hf(pair):
  hf, model, params, enc = pair
  rng = np.random.default_rng(3)
  targets = np.zeros((len(enc), 7), np.int64)
  for i, n in enumerate((7, 1, 4, 6, 2, 5, 3, 7)):
    targets[i, :n] = rng.integers(1, VOCAB, n)
  total, mean, lengths = decoding.score_sequences(model, params, jnp.asarray(enc), jnp.asarray(targets))

  with torch.no_grad():
    labels = torch.tensor(targets)
    logits = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                labels=labels.masked_fill(labels == 0, -100)).logits
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
  mask = targets > 0
  their_total = -(nll.numpy() * mask).sum(1)
  np.testing.assert_array_equal(np.asarray(lengths), mask.sum(1))
  np.testing.assert_allclose(np.asarray(total), their_total, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mean), their_total / mask.sum(1), atol=1e-4, rtol=1e-5)


def test_score_sequences_choices_equal_flat(pair):
  """(B, C, Lt) answer choices (the input encoded once) score like each choice scored on its own."""
  _, model, params, enc = pair
  choices = np.random.default_rng(4).integers(1, VOCAB, (len(enc), 3, 7))
  choices[:, 1, 3:] = 0
  together = decoding.score_sequences(model, params, jnp.asarray(enc), jnp.asarray(choices))
  assert together[0].shape == (len(enc), 3)
  for c in range(3):
    alone = decoding.score_sequences(model, params, jnp.asarray(enc), jnp.asarray(choices[:, c]))
    for got, want in zip(together, alone):
      np.testing.assert_allclose(np.asarray(got)[:, c], np.asarray(want), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(together[2])[:, 1], 3)


@pytest.fixture(scope="module")
def mhr(pair):
  """A tiny MHR model: the oracle's base weights plus a random (non-zero) inventory and routing, so the
  task id matters. Adapters skip the queries to keep attention well conditioned."""
  _, _, base, enc = pair
  cfg = pair[1].config.replace(adapter=AdapterConfig(kind="mhr", target_modules=r".*/(v|o|wo)", n_tasks=3,
                                                     n_skills=4, n_splits=2, rank=2))
  model = T5(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(enc), enc[:, :2], enc[:, :2],
                                               task_ids=jnp.zeros(len(enc), int), enable_dropout=False))
  rng = np.random.default_rng(6)

  def fill(path, leaf):
    keys = [k.key for k in path]
    if keys[-1] in ("lora_a", "lora_b"):
      return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), jnp.float32)
    if "routing" in keys:
      return jnp.asarray(rng.normal(0.0, 3.0, leaf.shape), jnp.float32)
    value = base
    for k in keys:
      value = value[k]
    return value

  return model, jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract["params"]))


def test_adapter_mixed_task_ids_equal_alone(mhr):
  """A batch mixing tasks decodes and scores each example as a batch holding only that example would
  (the example repeated, so the same compiled programs are reused)."""
  model, params = mhr
  enc = jnp.asarray(_encoder_inputs(5))
  task_ids = jnp.array([0, 1, 2, 1, 0, 2, 2, 1])
  greedy = decoding.greedy_decode(model, params, enc, MAX_LEN, task_ids=task_ids)
  beam, beam_scores = decoding.beam_search(model, params, enc, MAX_LEN, 3, 0.6, False, task_ids=task_ids)
  total, _, _ = decoding.score_sequences(model, params, enc, greedy, task_ids=task_ids)
  n = len(enc)
  for i in range(n):
    alone, tid, target = (jnp.repeat(x[i:i + 1], n, axis=0) for x in (enc, task_ids, greedy))
    np.testing.assert_array_equal(decoding.greedy_decode(model, params, alone, MAX_LEN, task_ids=tid),
                                  np.repeat(greedy[i:i + 1], n, axis=0))
    tokens, scores = decoding.beam_search(model, params, alone, MAX_LEN, 3, 0.6, False, task_ids=tid)
    np.testing.assert_array_equal(tokens, np.repeat(beam[i:i + 1], n, axis=0))
    np.testing.assert_allclose(scores, np.repeat(beam_scores[i], n), atol=1e-5, rtol=1e-5)
    alone_total, _, _ = decoding.score_sequences(model, params, alone, target, task_ids=tid)
    np.testing.assert_allclose(alone_total, np.repeat(total[i], n), atol=1e-4, rtol=1e-5)
  shifted = decoding.greedy_decode(model, params, enc, MAX_LEN, task_ids=(task_ids + 1) % 3)
  assert (np.asarray(shifted) != np.asarray(greedy)).any()     # the routing changes the outputs


def test_sharded_inputs_match_unsharded(pair):
  _, model, params, enc = pair
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(jnp.asarray(enc), NamedSharding(mesh, PartitionSpec("data")))
  replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  np.testing.assert_array_equal(decoding.greedy_decode(model, replicated, sharded, MAX_LEN),
                                decoding.greedy_decode(model, params, jnp.asarray(enc), MAX_LEN))
  tokens, scores = decoding.beam_search(model, replicated, sharded, MAX_LEN, 3, 1.0, False)
  want_tokens, want_scores = decoding.beam_search(model, params, jnp.asarray(enc), MAX_LEN, 3, 1.0, False)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise(pair):
  _, model, params, enc = pair
  enc = jnp.asarray(enc)
  with pytest.raises(ValueError, match="early_stopping"):
    decoding.beam_search(model, params, enc, MAX_LEN, 3, 1.0, "sometimes")
  with pytest.raises(ValueError, match="num_beams"):
    decoding.beam_search(model, params, enc, MAX_LEN, 0)
  with pytest.raises(ValueError, match="task_ids"):
    decoding.greedy_decode(model, params, enc, MAX_LEN, task_ids=jnp.zeros((3,), int))
  with pytest.raises(ValueError, match="max_decode_length"):
    decoding.greedy_decode(model, params, enc, 0)
  with pytest.raises(ValueError, match="decoder_target_tokens"):
    decoding.score_sequences(model, params, enc, jnp.ones((2, 4), int))


def test_out_of_range_task_ids_are_refused(pair, mhr):
  """An id >= n_tasks would take the last routing row silently under jit; every decoding entry point
  refuses concrete ids outside [0, n_tasks)."""
  model, params = mhr
  enc = jnp.asarray(pair[3])
  bad = jnp.full((enc.shape[0],), model.config.adapter.n_tasks, jnp.int32)
  message = rf"task_ids must lie in \[0, adapter.n_tasks={model.config.adapter.n_tasks}\)"
  with pytest.raises(ValueError, match=message):
    decoding.greedy_decode(model, params, enc, MAX_LEN, task_ids=bad)
  with pytest.raises(ValueError, match=message):
    decoding.beam_search(model, params, enc, MAX_LEN, 2, task_ids=bad)
  with pytest.raises(ValueError, match=message):
    decoding.score_sequences(model, params, enc, jnp.ones((enc.shape[0], 4), jnp.int32), task_ids=bad - 7)
