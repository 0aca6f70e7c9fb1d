"""Evaluation drivers: rank classification against Hugging Face PyTorch T5 scores, sharded runs against
one device, generation against the decoding functions, and the bad-input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_oracle
from mhr_jax.evaluation import decoding, drivers as evaluation
from mhr_jax import partitioning
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.checkpoints.hf_t5 import load_hf_t5
from mhr_jax.models.t5 import T5

VOCAB = hf_oracle.TINY_DIMS["vocab_size"]
N_EXAMPLES, N_CHOICES, INPUT_LEN, TARGET_LEN, BATCH = 11, 3, 9, 6, 8


def _examples(seed=0):
  """N examples with up to 3 choices of different lengths; example i has only 2 choices when i % 4 == 3."""
  rng = np.random.default_rng(seed)
  enc = np.zeros((N_EXAMPLES, INPUT_LEN), np.int32)
  choices = np.zeros((N_EXAMPLES, N_CHOICES, TARGET_LEN), np.int32)
  for i in range(N_EXAMPLES):
    n = int(rng.integers(2, INPUT_LEN + 1))
    enc[i, :n] = rng.integers(2, VOCAB, n)
    for c in range(2 if i % 4 == 3 else N_CHOICES):
      length = int(rng.integers(1, TARGET_LEN + 1))
      choices[i, c, :length] = rng.integers(2, VOCAB, length)
  labels = rng.integers(0, 2, N_EXAMPLES).astype(np.int32)
  task_ids = (np.arange(N_EXAMPLES) % 3).astype(np.int32)
  return enc, choices, labels, task_ids


def _batches(enc, choices, labels, task_ids, batch=BATCH):
  """As data.rank_classification_batches yields them: the last batch padded with example_index -1."""
  for start in range(0, len(enc), batch):
    rows = slice(start, start + batch)
    out = {"encoder_input_tokens": enc[rows], "decoder_target_tokens": choices[rows],
           "labels": labels[rows], "task_ids": task_ids[rows],
           "example_index": np.arange(len(enc), dtype=np.int32)[rows]}
    pad = batch - len(out["labels"])
    yield {k: np.concatenate([v, np.full((pad,) + v.shape[1:], -1 if k == "example_index" else 0, v.dtype)])
           for k, v in out.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  path = hf_oracle.make_hf_t5(tmp_path_factory.mktemp("hf"), seed=4)
  cfg, params = load_hf_t5(path)
  return hf_oracle.load_hf_model(path), T5(cfg), jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def mhr(base):
  cfg = base[1].config.replace(adapter=AdapterConfig(kind="mhr", target_modules=r".*/(v|o|wo)", n_tasks=3,
                                                     n_skills=4, n_splits=2, rank=2))
  return T5(cfg), jax.tree.map(jnp.asarray, hf_oracle.random_t5_params(cfg, seed=2))


def _mesh():
  return partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))


def test_rank_classification_matches_hf_scores(base):
  """Per-choice length-normalised NLL from PyTorch T5, argmin, accuracy: the same as the driver's, on a
  (data=2, fsdp=2, model=2) mesh; absent choices and padding rows never count."""
  hf, model, params = base
  enc, choices, labels, task_ids = _examples()
  want = np.full((N_EXAMPLES, N_CHOICES), np.inf)
  for c in range(N_CHOICES):
    targets = torch.tensor(choices[:, c], dtype=torch.long)
    with torch.no_grad():
      logits = hf(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0).long(),
                  labels=targets.masked_fill(targets == 0, -100)).logits
      nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").numpy()
    lengths = (choices[:, c] > 0).sum(1)
    present = lengths > 0
    want[present, c] = (nll * (choices[:, c] > 0)).sum(1)[present] / lengths[present]
  # Gold labels chosen so that the accuracy is neither 0 nor 100.
  labels = np.argmin(want, 1).astype(np.int32)
  labels[:4] = (labels[:4] + 1) % 2

  got = evaluation.rank_classification(model, params, _batches(enc, choices, labels, task_ids), mesh=_mesh())
  np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-5)
  assert np.isinf(got.scores[3, 2]) and np.isfinite(got.scores[3, :2]).all()
  np.testing.assert_array_equal(got.labels, labels)
  np.testing.assert_array_equal(got.predictions, np.argmin(want, 1))
  assert got.accuracy == pytest.approx(100.0 * np.mean(np.argmin(want, 1) == labels))
  assert 0.0 < got.accuracy < 100.0


def test_sharded_equals_one_device_with_routing(mhr):
  """An MHR model routing each row by its task id: the sharded driver equals unsharded scoring; a fixed
  task_id routes every row with that id instead."""
  model, params = mhr
  enc, choices, labels, task_ids = _examples(1)
  mesh = _mesh()
  sharded = evaluation.rank_classification(model, params, _batches(enc, choices, labels, task_ids), mesh=mesh)
  _, mean, lengths = decoding.score_sequences(model, params, jnp.asarray(enc), jnp.asarray(choices),
                                              task_ids=jnp.asarray(task_ids))
  want = np.where(np.asarray(lengths) > 0, -np.asarray(mean), np.inf)
  np.testing.assert_allclose(sharded.scores, want, rtol=1e-5, atol=1e-5)
  one = evaluation.rank_classification(model, params, _batches(enc, choices, labels, task_ids))
  np.testing.assert_allclose(one.scores, sharded.scores, rtol=1e-5, atol=1e-5)

  fixed = evaluation.rank_classification(model, params, _batches(enc, choices, labels, task_ids), task_id=2)
  _, mean2, _ = decoding.score_sequences(model, params, jnp.asarray(enc), jnp.asarray(choices),
                                         task_ids=jnp.full((N_EXAMPLES,), 2))
  np.testing.assert_allclose(fixed.scores, np.where(np.asarray(lengths) > 0, -np.asarray(mean2), np.inf),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(fixed.scores[np.isfinite(want)], want[np.isfinite(want)])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_sharded_equals_decoding(mhr, num_beams):
  model, params = mhr
  enc, _, _, task_ids = _examples(2)
  batches = [{k: v for k, v in b.items() if k in ("encoder_input_tokens", "task_ids", "example_index")}
             for b in _batches(*_examples(2))]
  # Out of order on purpose: results come back ordered by example_index.
  got = evaluation.generate(model, params, batches[::-1], 7, mesh=_mesh(), num_beams=num_beams,
                            length_penalty=0.6)
  if num_beams == 1:
    want = decoding.greedy_decode(model, params, jnp.asarray(enc), 7, task_ids=jnp.asarray(task_ids))
  else:
    want, _ = decoding.beam_search(model, params, jnp.asarray(enc), 7, num_beams, 0.6,
                                   task_ids=jnp.asarray(task_ids))
  np.testing.assert_array_equal(got, np.asarray(want))
  assert got.shape == (N_EXAMPLES, 7)


def test_decode_texts_cuts_at_eos():
  class Vocab:
    eos_id = 1

    def decode(self, ids):
      return " ".join(map(str, ids))
  assert evaluation.decode_texts(Vocab(), np.array([[5, 6, 1, 7], [8, 0, 0, 0], [9, 9, 9, 9]])) == [
      "5 6", "8", "9 9 9 9"]


def test_bad_batches_raise(base, mhr):
  _, model, params = base
  enc, choices, labels, task_ids = _examples()
  batch = next(_batches(enc, choices, labels, task_ids))
  with pytest.raises(ValueError, match=r"missing \['labels'\]"):
    evaluation.rank_classification(model, params, [{k: v for k, v in batch.items() if k != "labels"}])
  with pytest.raises(ValueError, match="no examples"):
    evaluation.rank_classification(model, params, [])
  with pytest.raises(ValueError, match="more than one row"):
    evaluation.generate(model, params, [batch, batch], 3)
  with pytest.raises(ValueError, match="mesh batch shards"):
    evaluation.generate(model, params, _batches(enc, choices, labels, task_ids, batch=6), 3, mesh=_mesh())
  routed, routed_params = mhr
  with pytest.raises(ValueError, match="no 'task_ids'"):
    evaluation.generate(routed, routed_params, [{k: v for k, v in batch.items() if k != "task_ids"}], 3)
  bad = dict(batch, task_ids=np.where(np.arange(BATCH) == 2, 3, batch["task_ids"]).astype(np.int32))
  with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=3\)"):
    evaluation.generate(routed, routed_params, [bad], 3)   # not silently routed by the last row
  with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=3\)"):
    evaluation.rank_classification(routed, routed_params, [bad])
  with pytest.raises(ValueError, match=r"task_ids must lie in \[0, adapter.n_tasks=3\)"):
    evaluation.generate(routed, routed_params, [batch], 3, task_id=5)
