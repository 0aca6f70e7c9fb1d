"""T5 numerics against Hugging Face PyTorch T5 (fp32), packing, logical axes, dtypes, dropout, presets."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

import hf_oracle
from mhr_jax import partitioning
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.checkpoints.hf_t5 import load_hf_t5
from mhr_jax.models import T5, preset
from mhr_jax.models.t5 import relative_position_bucket

# Fixed fp32 tolerance for every comparison with the PyTorch oracle (never loosened).
ATOL = RTOL = 1e-4


def _shift_right(targets):
  return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def _padded_batch(rng, vocab, enc_lengths, tgt_lengths):
  """Right-padded token arrays; lengths beyond max_distance exercise the log-spaced buckets."""
  enc = np.zeros((len(enc_lengths), max(enc_lengths)), np.int32)
  tgt = np.zeros((len(tgt_lengths), max(tgt_lengths)), np.int32)
  for i, (n, m) in enumerate(zip(enc_lengths, tgt_lengths)):
    enc[i, :n] = rng.integers(2, vocab, n)
    tgt[i, :m] = rng.integers(2, vocab, m)
  return enc, _shift_right(tgt), tgt


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, enable_dropout):
  model = T5(cfg)
  return jax.jit(lambda params, enc, dec, tgt, rng, kw: model.apply(
      {"params": params}, enc, dec, tgt, enable_dropout=enable_dropout, rngs={"dropout": rng},
      **kw))


def _logits(cfg, params, enc, dec, tgt, enable_dropout=False, rng=None, **kw):
  rng = jax.random.key(0) if rng is None else rng
  return np.asarray(_jitted_apply(cfg, enable_dropout)(params, enc, dec, tgt, rng, kw))


@pytest.fixture(scope="module", params=hf_oracle.VARIANTS)
def hf_dir(request, tmp_path_factory):
  return hf_oracle.make_hf_t5(tmp_path_factory.mktemp("hf"), request.param)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_position_bucket_matches_hf(bidirectional, num_buckets, max_distance):
  rel = np.arange(-300, 301)
  ours = relative_position_bucket(jnp.asarray(rel), bidirectional, num_buckets, max_distance)
  ref = T5Attention._relative_position_bucket(torch.as_tensor(rel), bidirectional, num_buckets,
                                              max_distance)
  np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_logits_match_hf_with_padding(hf_dir):
  cfg, params = load_hf_t5(hf_dir)
  rng = np.random.default_rng(0)
  enc, dec, tgt = _padded_batch(rng, cfg.vocab_size, (30, 17, 5), (25, 10, 3))
  ours = _logits(cfg, params, enc, dec, tgt)
  ref = hf_oracle.hf_logits(hf_dir, enc, dec)
  assert ours.shape == ref.shape == dec.shape + (cfg.vocab_size,)
  valid = tgt > 0
  np.testing.assert_allclose(ours[valid], ref[valid], rtol=RTOL, atol=ATOL)
  assert np.abs(ref[valid]).max() > 1.0      # not trivially small logits


def test_packed_row_matches_separate_examples_and_hf(hf_dir):
  cfg, params = load_hf_t5(hf_dir)
  lengths = ((9, 6), (7, 4))                 # (input, target) length of the two examples
  li, lt = 19, 12                            # packed row: both examples, then 3 / 2 pad tokens
  rng = np.random.default_rng(1)
  single_enc, single_dec, single_tgt = _padded_batch(rng, cfg.vocab_size, *zip(*lengths))
  # One batch, one compile: row 0 packs both examples, rows 1-2 hold each example alone.
  enc, dec, tgt = (np.zeros((3, n), np.int32) for n in (li, lt, lt))
  enc_seg, dec_seg = np.zeros((3, li), np.int32), np.zeros((3, lt), np.int32)
  i = j = 0
  for seg, (n, m) in enumerate(lengths, start=1):
    enc[0, i:i + n], enc_seg[0, i:i + n] = single_enc[seg - 1, :n], seg
    dec[0, j:j + m], tgt[0, j:j + m] = single_dec[seg - 1, :m], single_tgt[seg - 1, :m]
    dec_seg[0, j:j + m] = seg
    enc[seg, :n], enc_seg[seg, :n] = single_enc[seg - 1, :n], 1
    dec[seg, :m], tgt[seg, :m], dec_seg[seg, :m] = single_dec[seg - 1, :m], single_tgt[seg - 1, :m], 1
    i, j = i + n, j + m
  out = _logits(cfg, params, enc, dec, tgt, encoder_segment_ids=enc_seg,
                decoder_segment_ids=dec_seg)
  ref = hf_oracle.hf_logits(hf_dir, single_enc, single_dec)
  for seg, (_, m) in enumerate(lengths, start=1):
    part = out[0, dec_seg[0] == seg]
    np.testing.assert_allclose(part, out[seg, :m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(part, ref[seg - 1, :m], rtol=RTOL, atol=ATOL)
  # With one segment id for the whole row the second example attends to the first.
  merged = _logits(cfg, params, enc, dec, tgt, encoder_segment_ids=np.minimum(enc_seg, 1),
                   decoder_segment_ids=np.minimum(dec_seg, 1))
  second = dec_seg[0] == 2
  assert not np.allclose(merged[0, second], out[0, second], atol=1e-3)


# ----------------------------------------------------------------------------- logical axes

_ADAPTERS = {
    "none": AdapterConfig(),
    "lora": AdapterConfig(kind="lora", rank=2),
    "private_lora": AdapterConfig(kind="private_lora", rank=2, n_tasks=3),
    "ia3": AdapterConfig(kind="ia3"),
    "poly": AdapterConfig(kind="poly", rank=2, n_tasks=3, n_skills=4),
    "mhr_layer": AdapterConfig(kind="mhr", rank=2, n_tasks=3, n_skills=4, n_splits=4),
    "mhr_shared": AdapterConfig(kind="mhr", rank=2, n_tasks=3, n_skills=4, n_splits=4,
                                routing="shared"),
}

_ROUTED_AXES = {"lora_a": ("adapter_splits", "adapter_skills", "adapter_in", "adapter_rank"),
                "lora_b": ("adapter_splits", "adapter_skills", "adapter_rank", "adapter_out")}
_ADAPTER_AXES = {
    "lora": {"lora_a": ("adapter_in", "adapter_rank"), "lora_b": ("adapter_rank", "adapter_out")},
    "private_lora": {"lora_a": ("adapter_tasks", "adapter_in", "adapter_rank"),
                     "lora_b": ("adapter_tasks", "adapter_rank", "adapter_out")},
    "ia3": {"ia3_scale": ("adapter_out",)},
    "poly": _ROUTED_AXES, "mhr_layer": _ROUTED_AXES, "mhr_shared": _ROUTED_AXES,
}


def _expected_axes(path, kind):
  """Logical names each parameter should carry, from its path alone."""
  *modules, leaf = path
  if leaf in ("lora_a", "lora_b", "ia3_scale"):
    return _ADAPTER_AXES[kind][leaf]
  if modules[-1:] == ["routing"]:
    return ("routing_tasks", "adapter_splits", "adapter_skills")
  layer = modules[-1]
  return {"embedding": ("vocab", "embed"), "rel_embedding": ("relpos_buckets", "heads"),
          "scale": ("embed",)}.get(leaf) or {
              "q": ("embed", "joined_kv"), "k": ("embed", "joined_kv"),
              "v": ("embed", "joined_kv"), "o": ("joined_kv", "embed"),
              "wi": ("embed", "mlp"), "wi_0": ("embed", "mlp"), "wi_1": ("embed", "mlp"),
              "wo": ("mlp", "embed"), "logits_dense": ("embed", "vocab")}[layer]


def _batch(batch=2, enc_len=6, dec_len=4):
  tokens = jnp.ones((batch, enc_len), jnp.int32)
  targets = jnp.ones((batch, dec_len), jnp.int32)
  return tokens, targets, targets, jnp.zeros((batch,), jnp.int32)


@pytest.mark.parametrize("name", list(_ADAPTERS))
@pytest.mark.parametrize("variant", ["gated-gelu", "relu"])
def test_every_param_has_logical_axes(name, variant):
  cfg = preset("tiny", adapter=_ADAPTERS[name], feed_forward_proj=variant,
               tie_word_embeddings=variant == "relu")
  enc, dec, tgt, task_ids = _batch()
  boxed = jax.eval_shape(lambda: T5(cfg).init(jax.random.key(0), enc, dec, tgt, task_ids=task_ids,
                                              enable_dropout=False))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  mapped = {name for name, _ in partitioning.LOGICAL_RULES}
  seen_adapter = False
  for key_path, leaf in leaves:
    path = [k.key for k in key_path]
    where = "/".join(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} carries no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, f"{where}: names {leaf.names} vs shape {leaf.value.shape}"
    assert tuple(leaf.names) == _expected_axes(path, name), where
    assert set(leaf.names) <= mapped, f"{where}: {leaf.names} not all in partitioning.LOGICAL_RULES"
    seen_adapter |= path[-1] in ("lora_a", "ia3_scale")
  assert seen_adapter == (name != "none")
  has_root_routing = "routing" in boxed
  assert has_root_routing == (name == "mhr_shared")


# ----------------------------------------------------------------------------- dtype and dropout

@pytest.fixture(scope="module")
def tiny():
  """A tiny model with random params (dropout 0.3, inactive unless enable_dropout) and a batch."""
  cfg = preset("tiny", dropout_rate=0.3)
  enc, dec, tgt = _padded_batch(np.random.default_rng(0), cfg.vocab_size, (12, 7), (8, 5))
  return cfg, hf_oracle.random_t5_params(cfg), (enc, dec, tgt)


def test_bf16_compute_with_fp32_params_close_to_fp32(tiny):
  cfg, params, (enc, dec, tgt) = tiny
  ref = _logits(cfg, params, enc, dec, tgt)
  cfg16 = cfg.replace(dtype="bfloat16")
  boxed = jax.eval_shape(lambda: T5(cfg16).init(jax.random.key(0), enc, dec, tgt,
                                                enable_dropout=False))["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(boxed)))
  out = _jitted_apply(cfg16, False)(params, enc, dec, tgt, jax.random.key(0), {})
  assert out.dtype == jnp.float32
  valid = tgt > 0
  err, scale = np.abs(np.asarray(out) - ref)[valid], ref[valid]
  # bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%); rounding in each of the 2+2 blocks
  # adds up to a mean error of ~2% of the logits' spread here (worst logit ~4-8% of the largest).
  # Fixed bounds: mean error <= 5% of std(logits), max error <= 15% of max |logit|.
  assert err.mean() <= 0.05 * scale.std(), (err.mean(), scale.std())
  assert err.max() <= 0.15 * np.abs(scale).max(), (err.max(), np.abs(scale).max())
  assert err.max() > 0.0      # the bf16 path really ran in reduced precision


def test_dropout_only_in_training_mode(tiny):
  cfg, params, (enc, dec, tgt) = tiny
  run = lambda train, key: _logits(cfg, params, enc, dec, tgt, enable_dropout=train, rng=key)
  # unsafe_rbg keys: XLA on CPU compiles threefry's dropout draws several times more slowly.
  k0, k1 = jax.random.key(0, impl="unsafe_rbg"), jax.random.key(1, impl="unsafe_rbg")
  evaluation = run(False, k0)
  np.testing.assert_array_equal(evaluation, run(False, k1))
  train0 = run(True, k0)
  assert not np.allclose(train0, evaluation, atol=1e-3)
  assert not np.allclose(train0, run(True, k1), atol=1e-3)
  np.testing.assert_array_equal(train0, run(True, k0))


# ----------------------------------------------------------------------------- presets

def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_xl_preset_matches_methods_dims_and_hf_param_count():
  enc, dec, tgt, task_ids = _batch(1, 4, 4)

  def abstract(cfg):
    return nn.unbox(jax.eval_shape(lambda: T5(cfg).init(
        jax.random.key(0), enc, dec, tgt, task_ids=task_ids, enable_dropout=False))["params"])

  # The xl preset scans its layers; count per layer in the unscanned layout.
  cfg = preset("xl", scan_layers=False, adapter=AdapterConfig(kind="lora", rank=1))
  assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers) == (2048, 5120, 24, 24)
  params = abstract(cfg)
  assert _count(abstract(cfg.replace(scan_layers=True))) == _count(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  is_adapter = lambda kp: kp[-1].key in ("lora_a", "lora_b")
  base = sum(int(np.prod(x.shape)) for kp, x in flat if not is_adapter(kp))
  lora = [x for kp, x in flat if is_adapter(kp)]
  # docs/METHODS.md: 432 linear layers; rank-1 LoRA on all of them is 2,211,840 parameters.
  assert len(lora) == 2 * 432 and sum(int(np.prod(x.shape)) for x in lora) == 2_211_840
  assert params["encoder"]["block_23"]["mlp"]["wi_0"]["kernel"].shape == (2048, 5120)
  for stack in ("encoder", "decoder"):
    assert sum(k.startswith("block_") for k in params[stack]) == 24

  with torch.device("meta"):   # shapes only: the oracle's parameter count allocates nothing
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
        num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False))
  hf_count = sum(p.numel() for p in hf.parameters())
  if hf.lm_head.weight is hf.shared.weight:    # transformers 5.x ties at construction
    hf_count += hf.lm_head.weight.numel()
  assert base == hf_count

  # docs/METHODS.md: (IA)^3 on k, v, wi_1 of T5-XL is 540,672 parameters.
  ia3 = abstract(cfg.replace(adapter=AdapterConfig(kind="ia3")))
  assert _count(ia3) - base == 540_672
