"""Hugging Face T5 directories: load, save, round trips through transformers, bad input, base restore."""
import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import hf_oracle
from mhr_jax import checkpoints
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.checkpoints.hf_t5 import config_from_hf, load_hf_t5, merge_base_params, save_hf_t5
from mhr_jax.models import T5, preset

ATOL = RTOL = 1e-4    # fp32 comparisons with the PyTorch oracle; fixed


def _batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (2, 11)).astype(np.int32)
  enc[1, 6:] = 0
  tgt = rng.integers(2, vocab, (2, 7)).astype(np.int32)
  tgt[1, 4:] = 0
  dec = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
  return enc, dec, tgt


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  model = T5(cfg)
  return jax.jit(lambda params, enc, dec, tgt: model.apply(
      {"params": params}, enc, dec, tgt, enable_dropout=False))


def _ours(cfg, params, batch):
  return np.asarray(_apply(cfg)(params, *batch))


def _assert_close_at_targets(a, b, tgt):
  valid = tgt > 0
  np.testing.assert_allclose(a[valid], b[valid], rtol=RTOL, atol=ATOL)


def _tree_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
  for (key, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(key))


@pytest.fixture(scope="module", params=hf_oracle.VARIANTS)
def variant(request):
  return request.param


@pytest.fixture(scope="module")
def hf_dir(variant, tmp_path_factory):
  return hf_oracle.make_hf_t5(tmp_path_factory.mktemp("hf"), variant)


# ----------------------------------------------------------------------------- loading

def test_load_config_fields(hf_dir, variant):
  cfg, params = checkpoints.load_hf_t5(hf_dir)
  ref = hf_oracle.hf_config(variant)
  for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
               "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
               "dropout_rate", "layer_norm_epsilon", "feed_forward_proj", "pad_token_id",
               "eos_token_id", "decoder_start_token_id"):
    assert getattr(cfg, name) == getattr(ref, name), name
  assert cfg.tie_word_embeddings == (variant == "original")
  assert ("logits_dense" in params) == (variant == "v1_1")
  assert cfg.adapter.kind == "none"
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_missing_config_fields_take_transformers_defaults():
  cfg = config_from_hf({"architectures": ["T5ForConditionalGeneration"]})
  ref = transformers.T5Config()
  for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
               "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
               "dropout_rate", "layer_norm_epsilon", "feed_forward_proj", "pad_token_id",
               "eos_token_id"):
    assert getattr(cfg, name) == getattr(ref, name), name
  assert cfg.decoder_start_token_id == ref.pad_token_id


def test_torch_bin_and_sharded_safetensors_load_the_same(hf_dir, tmp_path):
  cfg, params = load_hf_t5(hf_dir)
  model = hf_oracle.load_hf_model(hf_dir)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shutil.copy(os.path.join(hf_dir, "config.json"), bin_dir)
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  cfg_bin, params_bin = load_hf_t5(bin_dir)
  assert cfg_bin == cfg
  _tree_equal(params_bin, params)

  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").exists()
  _, params_sharded = load_hf_t5(sharded)
  _tree_equal(params_sharded, params)


def test_bf16_checkpoint_loads_as_float32(hf_dir, tmp_path):
  _, params = load_hf_t5(hf_dir)
  hf_oracle.load_hf_model(hf_dir).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  stored = load_file(os.path.join(tmp_path / "bf16", "model.safetensors"))
  assert stored["shared.weight"].dtype.name == "bfloat16"
  _, params16 = load_hf_t5(tmp_path / "bf16")
  rounded = jax.tree.map(lambda x: x.astype(stored["shared.weight"].dtype).astype(np.float32), params)
  _tree_equal(params16, rounded)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params16))


# ----------------------------------------------------------------------------- saving

def test_save_ours_loads_in_transformers_with_same_logits(variant, tmp_path):
  cfg = preset("tiny", feed_forward_proj="gated-gelu" if variant == "v1_1" else "relu",
               tie_word_embeddings=variant == "original")
  batch = _batch(cfg.vocab_size)
  params = hf_oracle.random_t5_params(cfg, seed=3)
  out = tmp_path / "ours"
  save_hf_t5(out, cfg, params)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert os.listdir(tmp_path) == ["ours"]          # no temp dirs left behind
  _assert_close_at_targets(hf_oracle.hf_logits(out, batch[0], batch[1]), _ours(cfg, params, batch),
                           batch[2])
  cfg2, params2 = load_hf_t5(out)
  assert cfg2 == cfg
  _tree_equal(params2, jax.tree.map(np.asarray, params))


def test_hf_to_ours_to_hf_round_trip(hf_dir, tmp_path):
  cfg, params = load_hf_t5(hf_dir)
  batch = _batch(cfg.vocab_size, seed=1)
  ref = hf_oracle.hf_logits(hf_dir, batch[0], batch[1])
  _assert_close_at_targets(_ours(cfg, params, batch), ref, batch[2])
  out = tmp_path / "again"
  save_hf_t5(out, cfg, params)
  _assert_close_at_targets(hf_oracle.hf_logits(out, batch[0], batch[1]), ref, batch[2])
  original = load_file(os.path.join(hf_dir, "model.safetensors"))
  written = load_file(os.path.join(out, "model.safetensors"))
  for key, value in original.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_save_replaces_existing_dir_and_rejects_adapter_params(tmp_path):
  cfg, params = load_hf_t5(hf_oracle.make_hf_t5(tmp_path, "original"))
  out = tmp_path / "out"
  out.mkdir()
  (out / "stale.txt").write_text("old")
  save_hf_t5(out, cfg, params)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["hf_original_0", "out"]

  adapted = dict(params, encoder=dict(params["encoder"]))
  adapted["encoder"]["block_0"] = {**params["encoder"]["block_0"], "extra": {"lora_a": np.ones(2)}}
  with pytest.raises(ValueError, match=r"encoder/block_0/extra/lora_a"):
    save_hf_t5(tmp_path / "bad", cfg, adapted)
  bad_shape = dict(params, shared_embedding={"embedding": np.ones((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"shared_embedding/embedding has shape \(3, 3\)"):
    save_hf_t5(tmp_path / "bad", cfg, bad_shape)
  assert not (tmp_path / "bad").exists()
  assert sorted(os.listdir(tmp_path)) == ["hf_original_0", "out"]


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def editable_dir(tmp_path):
  """A fresh v1.1 directory a test may corrupt, plus its config dict."""
  path = hf_oracle.make_hf_t5(tmp_path, "v1_1")
  with open(os.path.join(path, "config.json")) as f:
    return path, json.load(f)


def _write_config(path, config):
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


def test_missing_dir_or_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    load_hf_t5(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=r"config.json: missing"):
    load_hf_t5(tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("architectures", ["BertForMaskedLM"], r"architectures=\['BertForMaskedLM'\]"),
    ("model_type", "bart", r"model_type='bart'"),
    ("is_encoder_decoder", False, r"is_encoder_decoder=False"),
    ("feed_forward_proj", "gated-silu", r"feed_forward_proj='gated-silu' is unsupported"),
    ("d_model", "wide", r"d_model='wide': expected an integer"),
    ("num_heads", 0, r"num_heads=0: must be >= 1"),
])
def test_bad_config_fields(editable_dir, field, value, message):
  path, config = editable_dir
  _write_config(path, {**config, field: value})
  with pytest.raises(ValueError, match=r"config\.json: " + message) as info:
    load_hf_t5(path)
  assert "\n" not in str(info.value)


def test_invalid_json(editable_dir):
  path, _ = editable_dir
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
    load_hf_t5(path)


def test_shape_mismatch_names_file_and_key(editable_dir):
  path, config = editable_dir
  _write_config(path, {**config, "d_ff": config["d_ff"] * 2})
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'encoder\.block\.0\.layer\.1\."
                     r"DenseReluDense\.wi_0\.weight' has shape \(64, 32\), config\.json implies "
                     r"\(128, 32\)"):
    load_hf_t5(path)


def test_missing_and_unexpected_tensors(editable_dir):
  path, _ = editable_dir
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  save_file({k: v for k, v in tensors.items() if k != "decoder.final_layer_norm.weight"}, file)
  with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'decoder\.final_layer_norm"):
    load_hf_t5(path)
  save_file({**tensors, "decoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight":
             np.zeros((8, 4), np.float32)}, file)
  with pytest.raises(ValueError, match=r"unexpected tensor 'decoder\.block\.1\.layer\.0\."):
    load_hf_t5(path)


def test_corrupt_safetensors_and_no_weights(editable_dir):
  path, _ = editable_dir
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors") as info:
    load_hf_t5(path)
  assert "\n" not in str(info.value)
  os.remove(file)
  with pytest.raises(FileNotFoundError, match="no weights file"):
    load_hf_t5(path)


def test_tied_config_with_distinct_lm_head_is_refused(editable_dir):
  path, config = editable_dir
  _write_config(path, {**config, "scale_decoder_outputs": True})
  with pytest.raises(ValueError, match=r"'lm_head\.weight' differs from 'shared\.weight'"):
    load_hf_t5(path)


# ----------------------------------------------------------------------------- base restore

def test_merge_base_into_adapted_model(tmp_path):
  hf_dir = hf_oracle.make_hf_t5(tmp_path, "v1_1")
  cfg, base = load_hf_t5(hf_dir)
  # Two adapted layers keep the compile small; the merge itself does not depend on where they are.
  adapted_cfg = cfg.replace(adapter=AdapterConfig(
      kind="mhr", rank=2, n_tasks=3, n_skills=4, n_splits=2,
      target_modules=r"(encoder|decoder)/block_1/self_attention/v"))
  batch = _batch(cfg.vocab_size, seed=2)
  task_ids = np.array([0, 2], np.int32)
  model = T5(adapted_cfg)
  boxed = jax.jit(lambda k: model.init(k, *batch, task_ids=task_ids, enable_dropout=False))(
      jax.random.key(0, impl="unsafe_rbg"))["params"]
  merged, report = merge_base_params(boxed, base)

  is_adapter = lambda path: path.endswith(("lora_a", "lora_b", "routing/logits"))
  flat_model = {"/".join(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]}
  assert set(report.missing) == {p for p in flat_model if is_adapter(p)}
  assert len(report.missing) == 6 and report.unexpected == ()
  assert "model params not in base (kept)" in str(report)
  flat_merged = {"/".join(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(
      merged, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]}
  assert flat_merged.keys() == flat_model.keys()
  for path, leaf in flat_merged.items():
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert leaf.names == flat_model[path].names
    if is_adapter(path):
      np.testing.assert_array_equal(leaf.value, flat_model[path].value)
  _tree_equal(_restrict(nn.unbox(merged), base), base)
  # B = 0 at init: the adapted model with the restored base computes the HF model exactly.
  logits = np.asarray(jax.jit(lambda p: model.apply({"params": p}, *batch, task_ids=task_ids,
                                                    enable_dropout=False))(nn.unbox(merged)))
  _assert_close_at_targets(logits, hf_oracle.hf_logits(hf_dir, batch[0], batch[1]), batch[2])


def _restrict(tree, like):
  """`tree` restricted to the keys of `like` (nested dicts)."""
  return {k: _restrict(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def test_merge_reports_unexpected_and_rejects_shape_mismatch(tmp_path):
  cfg, base = load_hf_t5(hf_oracle.make_hf_t5(tmp_path, "v1_1"))
  tied = jax.eval_shape(lambda: nn.unbox(T5(cfg.replace(tie_word_embeddings=True)).init(
      jax.random.key(0), *_batch(cfg.vocab_size), enable_dropout=False))["params"])
  merged, report = merge_base_params(tied, base)
  assert report.missing == () and report.unexpected == ("logits_dense/kernel",)
  assert "1 base params unused: logits_dense/kernel" in str(report)
  assert merged["encoder"]["final_norm"]["scale"].dtype == np.float32
  wide = dict(base, shared_embedding={"embedding": np.zeros((cfg.vocab_size, 7), np.float32)})
  with pytest.raises(ValueError, match=r"shared_embedding/embedding has shape \(128, 7\) in base, "
                     r"\(128, 32\) in model"):
    merge_base_params(tied, wide)
