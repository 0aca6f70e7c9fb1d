"""PEFT interop against the real PEFT library (oracle): POLY (Poly / MHR), LoRA and (IA)^3, both ways."""
import json
import os

import numpy as np
import peft
import pytest
import torch
from flax import traverse_util

import hf_oracle
from mhr_jax.adapters.config import ALL_LINEAR, ATTENTION_ONLY, AdapterConfig
from mhr_jax.models.param_counts import abstract_params
from mhr_jax.checkpoints.hf_t5 import load_hf_t5, merge_base_params
from mhr_jax.checkpoints.peft import export_peft, import_peft, linear_modules
from mhr_jax.models import T5

ATOL = RTOL = 1e-4   # fp32 comparisons with PyTorch, never loosened


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return hf_oracle.make_hf_t5(tmp_path_factory.mktemp("base"), "v1_1", seed=0)


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory):
  return hf_oracle.make_hf_t5(tmp_path_factory.mktemp("base"), "original", seed=1)


def _batch(vocab, n, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (n, 7)).astype(np.int32)
  enc[0, 5:] = 0                                            # some encoder padding
  tgt = rng.integers(2, vocab, (n, 5)).astype(np.int32)
  dec = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], axis=1)
  return enc, dec, tgt


def _ours(cfg, params, enc, dec, tgt, task_ids=None):
  return np.asarray(T5(cfg).apply({"params": params}, enc, dec, tgt, task_ids=task_ids,
                                  enable_dropout=False))


def _peft_logits(model, enc, dec, task_ids=None):
  kwargs = {} if task_ids is None else {"task_ids": torch.as_tensor(np.asarray(task_ids))}
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(enc, dtype=torch.long),
                attention_mask=torch.as_tensor(enc != 0, dtype=torch.long),
                decoder_input_ids=torch.as_tensor(dec, dtype=torch.long), use_cache=False,
                **kwargs)
  return out.logits.float().numpy()


def _load_peft(base_dir, adapter_dir):
  model = peft.PeftModel.from_pretrained(hf_oracle.load_hf_model(base_dir), adapter_dir)
  return model.eval()


def _random_adapted(cfg, base_params, seed):
  """Our adapted params: base weights from HF, every adapter leaf random and non-zero."""
  params, report = merge_base_params(abstract_params(cfg), base_params)
  assert not report.unexpected
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(params)
  for path, leaf in flat.items():
    if path[-1] in ("lora_a", "lora_b"):
      flat[path] = rng.normal(0, 0.3, leaf.shape).astype(np.float32)
    elif path[-1] == "logits":
      flat[path] = rng.normal(0, 2.0, leaf.shape).astype(np.float32)   # far from uniform
    elif path[-1] == "ia3_scale":
      flat[path] = rng.uniform(0.3, 2.0, leaf.shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


POLY_CASES = [
    dict(n_splits=1, n_skills=3, rank=2),
    dict(n_splits=2, n_skills=4, rank=1, alpha=2.5),
    dict(n_splits=4, n_skills=2, rank=3, target_modules=ATTENTION_ONLY),
    dict(n_splits=2, n_skills=3, rank=2, routing="shared"),
    dict(n_splits=1, n_skills=2, rank=1, target_modules=r"decoder/block_1/.*/(q|wo)|encoder/.*/v"),
]


@pytest.mark.parametrize("case", POLY_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()
                                                                   if k != "target_modules"))
def test_export_poly_loads_in_peft_with_same_logits(base_dir, tmp_path, case):
  base_cfg, base_params = load_hf_t5(base_dir)
  kind = "poly" if case["n_splits"] == 1 else "mhr"
  cfg = base_cfg.replace(adapter=AdapterConfig(kind=kind, n_tasks=3, **case))
  params = _random_adapted(cfg, base_params, seed=case["rank"])
  export_peft(tmp_path / "adapter", cfg, params)
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (saved["peft_type"], saved["n_splits"], saved["n_skills"], saved["r"]) == (
      "POLY", case["n_splits"], case["n_skills"], case["rank"])
  model = _load_peft(base_dir, tmp_path / "adapter")
  assert isinstance(model.peft_config["default"], peft.PolyConfig)
  # PEFT adapted exactly our layers (an extra one would keep PEFT's B = 0 init and go unnoticed).
  peft_layers = {n.split(".model.", 1)[1].rsplit(".poly_lora_A", 1)[0]
                 for n, _ in model.named_parameters() if "poly_lora_A" in n}
  ours = {".".join(p[:-1]) for p in traverse_util.flatten_dict(params) if p[-1] == "lora_a"}
  expected = {name for path, name in linear_modules(cfg).items() if ".".join(path) in ours}
  assert peft_layers == expected and len(expected) == sum(map(cfg.adapter.targets, (
      "/".join(p) for p in linear_modules(cfg))))
  enc, dec, tgt = _batch(cfg.vocab_size, 4)
  task_ids = np.array([2, 0, 1, 2], np.int32)              # a mixed-task batch
  ours = _ours(cfg, params, enc, dec, tgt, task_ids)
  ref = _peft_logits(model, enc, dec, task_ids)
  np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
  # The adapter matters: the base model and another task's routing give different logits.
  base = hf_oracle.hf_logits(base_dir, enc, dec)
  assert np.abs(ref - base).max() > 1e-2
  other = _peft_logits(model, enc, dec, (task_ids + 1) % 3)
  assert np.abs(ref - other).max() > 1e-3


def _randomise_torch(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(s in name for s in ("poly_lora_B", "lora_B", "poly_router")):
        p.copy_(torch.randn_like(p) * (2.0 if "router" in name else 0.3))
      elif "ia3_l" in name:
        p.copy_(torch.rand_like(p) * 1.7 + 0.3)


@pytest.mark.parametrize("n_splits,n_skills,r,targets", [
    (1, 4, 2, ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]),
    (2, 3, 1, ["q", "v"]),
    (4, 2, 2, r".*decoder.*EncDecAttention\.(k|o)"),
])
def test_import_peft_poly_reproduces_peft(base_dir, tmp_path, n_splits, n_skills, r, targets):
  config = peft.PolyConfig(task_type="SEQ_2_SEQ_LM", r=r, n_tasks=3, n_skills=n_skills,
                           n_splits=n_splits, target_modules=targets)
  model = peft.get_peft_model(hf_oracle.load_hf_model(base_dir), config)
  _randomise_torch(model, seed=n_splits)
  model.save_pretrained(tmp_path / "adapter")
  model.eval()
  cfg, params = import_peft(tmp_path / "adapter", base_dir)
  assert cfg.adapter.kind == ("poly" if n_splits == 1 else "mhr")
  assert (cfg.adapter.n_splits, cfg.adapter.n_skills, cfg.adapter.rank, cfg.adapter.n_tasks) == (
      n_splits, n_skills, r, 3)
  enc, dec, tgt = _batch(cfg.vocab_size, 3, seed=1)
  task_ids = np.array([1, 2, 0], np.int32)
  np.testing.assert_allclose(_ours(cfg, params, enc, dec, tgt, task_ids),
                             _peft_logits(model, enc, dec, task_ids), rtol=RTOL, atol=ATOL)
  # Round trip: exporting what we imported gives back PEFT's tensors.
  export_peft(tmp_path / "again", cfg, params)
  from safetensors.numpy import load_file
  a = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("variant", ["v1_1", "original"])
def test_export_lora_loads_in_peft(base_dir, original_dir, tmp_path, variant):
  path = base_dir if variant == "v1_1" else original_dir
  base_cfg, base_params = load_hf_t5(path)
  cfg = base_cfg.replace(adapter=AdapterConfig(kind="lora", rank=2, alpha=3.0,
                                               target_modules=ALL_LINEAR))
  params = _random_adapted(cfg, base_params, seed=3)
  export_peft(tmp_path / "lora", cfg, params)
  saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
  assert saved["peft_type"] == "LORA" and saved["lora_alpha"] == 3 and saved["r"] == 2
  model = _load_peft(path, tmp_path / "lora")
  enc, dec, tgt = _batch(cfg.vocab_size, 2)
  ref = _peft_logits(model, enc, dec)
  np.testing.assert_allclose(_ours(cfg, params, enc, dec, tgt), ref, rtol=RTOL, atol=ATOL)
  assert np.abs(ref - hf_oracle.hf_logits(path, enc, dec)).max() > 1e-2


@pytest.mark.parametrize("use_rslora", [False, True])
def test_import_peft_lora_reproduces_peft(base_dir, tmp_path, use_rslora):
  config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=5, use_rslora=use_rslora,
                           target_modules=["q", "v", "wo"])
  model = peft.get_peft_model(hf_oracle.load_hf_model(base_dir), config)
  _randomise_torch(model, seed=4)
  model.save_pretrained(tmp_path / "lora")
  model.eval()
  cfg, params = import_peft(tmp_path / "lora", base_dir)
  assert cfg.adapter.kind == "lora" and cfg.adapter.rank == 4
  assert cfg.adapter.targets("decoder/block_1/cross_attention/v")
  assert not cfg.adapter.targets("decoder/block_1/cross_attention/k")
  enc, dec, tgt = _batch(cfg.vocab_size, 2, seed=2)
  np.testing.assert_allclose(_ours(cfg, params, enc, dec, tgt), _peft_logits(model, enc, dec),
                             rtol=RTOL, atol=ATOL)


def test_ia3_both_directions(base_dir, tmp_path):
  base_cfg, base_params = load_hf_t5(base_dir)
  cfg = base_cfg.replace(adapter=AdapterConfig(kind="ia3"))
  params = _random_adapted(cfg, base_params, seed=5)
  export_peft(tmp_path / "ia3", cfg, params)
  model = _load_peft(base_dir, tmp_path / "ia3")
  enc, dec, tgt = _batch(cfg.vocab_size, 2)
  ref = _peft_logits(model, enc, dec)
  np.testing.assert_allclose(_ours(cfg, params, enc, dec, tgt), ref, rtol=RTOL, atol=ATOL)
  cfg2, params2 = import_peft(tmp_path / "ia3", base_dir)
  np.testing.assert_allclose(_ours(cfg2, params2, enc, dec, tgt), ref, rtol=RTOL, atol=ATOL)


def test_export_rejects_private_lora_and_import_rejects_feedforward_ia3(base_dir, tmp_path):
  base_cfg, base_params = load_hf_t5(base_dir)
  cfg = base_cfg.replace(adapter=AdapterConfig(kind="private_lora", n_tasks=2))
  params = _random_adapted(cfg, base_params, seed=6)
  with pytest.raises(ValueError, match="extract_task_lora"):
    export_peft(tmp_path / "private", cfg, params)
  assert not os.path.exists(tmp_path / "private")
  config = peft.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["k", "wo"],
                          feedforward_modules=["wo"])
  peft.get_peft_model(hf_oracle.load_hf_model(base_dir), config).save_pretrained(tmp_path / "ff")
  with pytest.raises(ValueError, match="feedforward_modules include .*wo"):
    import_peft(tmp_path / "ff", base_dir)
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    import_peft(tmp_path / "missing", base_dir)
