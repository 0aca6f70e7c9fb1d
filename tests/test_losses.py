"""Losses against PyTorch: token cross-entropy (label smoothing), per-task sums, T-Few terms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mhr_jax.training import losses

TFEW_RTOL = 1e-4  # our T5 against Hugging Face's: fp32 logits agree to ~1e-5

_RNG = np.random.default_rng(0)
# Jitted once each: eager op-by-op dispatch of many tiny ops is slower than one compile on CPU.
_lm_loss = jax.jit(losses.lm_loss, static_argnums=3)
_per_task = jax.jit(losses.per_task_lm_loss, static_argnums=(4, 5))
_tfew_counts = jax.jit(losses.tfew_counts)


def _logits(*shape):
  return (_RNG.normal(size=shape) * 2).astype(np.float32)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_loss_matches_torch_cross_entropy(smoothing):
  b, length, v = 3, 5, 11
  logits = _logits(b, length, v)
  targets = _RNG.integers(1, v, (b, length)).astype(np.int32)
  targets[0, 3:] = 0
  targets[2, 1:] = 0
  weights = (targets > 0).astype(np.float32)
  total, count = _lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                label_smoothing=smoothing)
  ref = F.cross_entropy(torch.tensor(logits).reshape(-1, v),
                        torch.tensor(targets).long().masked_fill(torch.tensor(targets) == 0, -100)
                        .reshape(-1), ignore_index=-100, reduction="sum", label_smoothing=smoothing)
  assert float(count) == weights.sum()
  np.testing.assert_allclose(float(total), float(ref), rtol=1e-5)


def test_per_task_sums_partition_the_batch_loss():
  b, length, v = 6, 4, 9
  logits = jnp.asarray(_logits(b, length, v))
  targets = jnp.asarray(_RNG.integers(0, v, (b, length)), jnp.int32)
  weights = (targets > 0).astype(jnp.float32)
  task_ids = jnp.asarray([2, 0, 2, 1, 0, 2], jnp.int32)
  sums, counts = _per_task(logits, targets, weights, task_ids, 4, 0.1)
  for t in range(4):
    rows = np.asarray(task_ids) == t
    # Zero weights outside task t: the same batch shape, so one compiled program.
    s, c = _lm_loss(logits, targets, weights * jnp.asarray(rows)[:, None], 0.1)
    np.testing.assert_allclose(float(sums[t]), float(s), rtol=1e-6, atol=1e-6)
    assert float(counts[t]) == float(c)
  assert float(counts[3]) == 0.0


def _tfew_batch(b=3, c=3, length=4, v=13):
  logits = _logits(b, c, length, v)
  targets = _RNG.integers(1, v, (b, c, length)).astype(np.int32)
  targets[0, 1, 2:] = 0
  targets[1, 2, 1:] = 0
  targets[2, 2, :] = 0              # example 2 has only two choices
  weights = (targets > 0).astype(np.float32)
  labels = np.array([1, 0, 1], np.int32)
  return logits, targets, weights, labels


def _tfew_port(model, input_ids, choices_ids, labels):
  """T-Few's loss block (r-three/t-few EncoderDecoder.training_step, mc_loss = unlikely_loss = 1,
  length_norm = 1), ported line by line to a Hugging Face T5: {"lm", "choice_ce", "unlikelihood"} and the
  number of positions its unlikelihood masks to -100."""
  input_ids, choices_ids = torch.tensor(input_ids).long(), torch.tensor(choices_ids).long()
  labels = torch.tensor(labels).long()
  bs, num_choices = choices_ids.size()[:2]
  flat_choices_ids = choices_ids.flatten(0, 1)
  attention_mask = (input_ids != 0).float()
  with torch.no_grad():
    encoder_hidden_states = model.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
    encoder_hidden_states = encoder_hidden_states.unsqueeze(dim=1).repeat(1, num_choices, 1, 1).flatten(0, 1)
    attention_mask = attention_mask.unsqueeze(dim=1).repeat(1, num_choices, 1).flatten(0, 1)
    decoder_input_ids = torch.cat([torch.zeros_like(flat_choices_ids[:, :1]), flat_choices_ids[:, :-1]], dim=1)
    decoder_attention_mask = (decoder_input_ids == decoder_input_ids).float()
    lm_target = flat_choices_ids - 100 * (flat_choices_ids == 0).long()
    logits = model(attention_mask=attention_mask, encoder_outputs=[encoder_hidden_states],
                   decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask).logits
  logits = logits.double()
  choices_scores = F.cross_entropy(logits.flatten(0, 1), lm_target.flatten(0, 1), reduction="none").view(
      bs, num_choices, -1).sum(dim=-1)
  choices_scores = choices_scores / (choices_ids != 0).sum(dim=-1)
  lm_loss = F.cross_entropy(logits.view(bs, num_choices, *logits.size()[1:])[range(bs), labels].flatten(0, 1),
                            lm_target.view(bs, num_choices, -1)[range(bs), labels].flatten(0, 1))
  mc_loss = F.cross_entropy(-choices_scores, labels)
  cand_loglikely = -F.cross_entropy(logits.flatten(0, 1), lm_target.flatten(0, 1), reduction="none").view(
      bs, num_choices, -1)
  cand_loglikely += (lm_target < 0).view(bs, num_choices, -1) * -100
  cand_loglikely[range(bs), labels] = -100
  unlikely_loss = -torch.log(1 - torch.exp(cand_loglikely) + 1e-2).sum() / (cand_loglikely != -100).sum()
  masked = int((cand_loglikely == -100).sum())
  return {"lm": float(lm_loss), "choice_ce": float(mc_loss), "unlikelihood": float(unlikely_loss)}, masked


def test_tfew_loss_matches_a_port_of_tfew_on_hugging_face_logits(tmp_path):
  """The T-Few objective of the train step against T-Few's own code on the same HF T5's logits."""
  import hf_oracle
  from mhr_jax import checkpoints, models
  from mhr_jax.training import train_step as ts
  model = hf_oracle.make_hf_model("v1_1", seed=3)
  model.save_pretrained(tmp_path / "hf")
  cfg, params = checkpoints.load_hf_t5(str(tmp_path / "hf"))
  b, c, li, lt, v = 3, 3, 7, 5, cfg.vocab_size
  inputs = _RNG.integers(2, v, (b, li)).astype(np.int32)
  inputs[1, 4:] = 0
  choices = _RNG.integers(2, v, (b, c, lt)).astype(np.int32)
  choices[:, :, -1] = 1                       # EOS ends every choice
  choices[0, 1, 2:] = [1, 0, 0]               # choices of different lengths: padding in the wrong choices
  choices[2, 0, 3:] = [1, 0]
  labels = np.array([2, 0, 1], np.int32)
  want, masked = _tfew_port(model, inputs, choices, labels)

  batch = {"encoder_input_tokens": inputs, "decoder_target_tokens": choices,
           "decoder_input_tokens": np.concatenate([np.zeros((b, c, 1), np.int32), choices[..., :-1]], -1),
           "decoder_loss_weights": (choices > 0).astype(np.float32), "labels": labels}
  batch = {k: jnp.asarray(x) for k, x in batch.items()}
  objective = ts.OBJECTIVES["tfew"]
  loss_cfg = losses.LossConfig(kind="tfew")
  sums = objective.sums(models.T5(cfg), params, batch, jax.random.key(0), False, loss_cfg)
  counts = objective.counts(batch, loss_cfg)
  got = {k: float(sums[k]) / float(counts[k]) for k in sums}
  wrong_tokens = float(counts["unlikelihood"])
  assert wrong_tokens == np.sum((choices > 0) & (np.arange(c)[None, :, None] != labels[:, None, None]))
  np.testing.assert_allclose(got["lm"], want["lm"], rtol=TFEW_RTOL)
  np.testing.assert_allclose(got["choice_ce"], want["choice_ce"], rtol=TFEW_RTOL)
  # T-Few's sum also holds -log(1 + 0.01) for each of its `masked` (-100) positions: a constant.
  np.testing.assert_allclose(got["unlikelihood"], want["unlikelihood"] + masked * np.log(1.01) / wrong_tokens,
                             rtol=TFEW_RTOL)


def test_unlikelihood_is_bounded_by_its_offset():
  """-log(1 - p + 0.01): a wrong-choice token predicted with certainty costs log(100), gradient <= 100."""
  v = 5
  logits = np.full((1, 2, 1, v), -30.0, np.float32)
  logits[..., 3] = 30.0                       # p(token 3) = 1
  targets = np.full((1, 2, 1), 3, np.int32)
  weights = np.ones((1, 2, 1), np.float32)
  labels = np.array([0], np.int32)
  total, count = jax.jit(losses.unlikelihood_loss)(*(jnp.asarray(x) for x in (logits, targets, weights, labels)))
  assert float(count) == 1.0
  np.testing.assert_allclose(float(total), -np.log(0.01), rtol=1e-6)
  grad = jax.grad(lambda p: -jnp.log(1.0 - p + losses.UL_OFFSET))(0.999999)
  assert float(grad) <= 100.0


def test_choice_log_likelihoods_and_padding_examples_stay_finite():
  logits, targets, weights, labels = _tfew_batch()
  sums, lengths = jax.jit(losses.choice_log_likelihoods)(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_array_equal(np.asarray(lengths), weights.sum(-1))
  logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
  want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(sums), (want * weights).sum(-1), rtol=1e-5)
  # A padding example (no choice tokens) adds nothing and keeps gradients finite.
  weights[2] = 0.0

  def total(lg):
    terms = losses.tfew_terms(lg, jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(labels))
    counts = losses.tfew_counts(jnp.asarray(weights), jnp.asarray(labels))
    return losses.combine_terms({k: v[0] for k, v in terms.items()}, counts)

  value, grad = jax.jit(jax.value_and_grad(total))(jnp.asarray(logits))
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  assert float(_tfew_counts(jnp.asarray(weights), jnp.asarray(labels))["choice_ce"]) == 2.0
  assert np.all(np.asarray(grad)[2] == 0.0)


def test_loss_config_validation():
  with pytest.raises(ValueError, match="LossConfig.kind"):
    losses.LossConfig(kind="mse")
  with pytest.raises(ValueError, match="LossConfig.label_smoothing"):
    losses.LossConfig(label_smoothing=1.0)
