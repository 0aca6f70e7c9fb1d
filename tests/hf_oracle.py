"""Tiny random Hugging Face PyTorch T5 models: the independent numerical oracle for tests.

`make_hf_t5` writes a `T5ForConditionalGeneration` directory (config.json + model.safetensors) in one of
two variants: "v1_1" (gated-GELU feed-forward, untied lm_head, no decoder output scaling) and "original"
(ReLU feed-forward, lm_head tied to the shared embedding, decoder output scaled by d_model**-0.5).
`hf_logits` runs such a model in fp32 on numpy token arrays. `random_t5_params` gives random params
for one of our models without compiling its init (XLA's CPU compile dominates tiny tests).
Under pytest, tests/ is on sys.path: `import hf_oracle`.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
import torch
import transformers

VARIANTS = ("v1_1", "original")

# Small enough for a few-second test on one CPU core; 2 layers exercise the block-0-only relative bias.
TINY_DIMS = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                 num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                 dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)


def hf_config(variant: str = "v1_1", **overrides) -> transformers.T5Config:
  """The transformers.T5Config of a tiny model of `variant` ("v1_1" or "original"), with overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
  kind = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False) if variant == "v1_1" else \
      dict(feed_forward_proj="relu", tie_word_embeddings=True)
  return transformers.T5Config(**{**TINY_DIMS, **kind, **overrides})


def make_hf_model(variant: str = "v1_1", seed: int = 0, **overrides):
  """A random fp32 T5ForConditionalGeneration in eval mode.

  Layer-norm scales and relative-position biases are re-drawn away from their constant / tiny
  initial values so that a wrong mapping of any of them shows up in the logits.
  """
  torch.manual_seed(seed)
  torch.set_num_threads(1)
  config = hf_config(variant, **overrides)
  model = transformers.T5ForConditionalGeneration(config)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
      elif name.endswith("relative_attention_bias.weight"):
        param.copy_(torch.randn_like(param))
    if variant == "v1_1":
      # A fresh module owns its own weight, so lm_head no longer shares storage with `shared`.
      head = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
      head.weight.copy_(torch.randn_like(head.weight) * config.d_model ** -0.5)
      model.lm_head = head
  return model.eval()


def make_hf_t5(tmp_dir, variant: str = "v1_1", seed: int = 0, **overrides) -> str:
  """Writes a random tiny HF T5 of `variant` to `<tmp_dir>/hf_<variant>_<seed>` and returns that path."""
  path = os.path.join(os.fspath(tmp_dir), f"hf_{variant}_{seed}")
  make_hf_model(variant, seed, **overrides).save_pretrained(path)
  return path


def load_hf_model(path):
  """Loads an HF T5 directory as an fp32 T5ForConditionalGeneration in eval mode."""
  torch.set_num_threads(1)
  return transformers.T5ForConditionalGeneration.from_pretrained(
      os.fspath(path), dtype=torch.float32).eval()


def hf_logits(model_or_path, encoder_input_tokens, decoder_input_tokens, encoder_mask=None,
              decoder_mask=None) -> np.ndarray:
  """fp32 logits (B, Lt, V) of an HF T5 (a model or a directory path).

  encoder_input_tokens (B, Li) and decoder_input_tokens (B, Lt) are integer arrays. `encoder_mask`
  (B, Li) defaults to `encoder_input_tokens != 0`; `decoder_mask` (B, Lt) defaults to HF's causal-only
  mask (the decoder start token is the pad id 0, so a pad-based default would hide it).
  """
  model = model_or_path if isinstance(model_or_path, torch.nn.Module) else load_hf_model(model_or_path)
  enc = torch.as_tensor(np.asarray(encoder_input_tokens), dtype=torch.long)
  dec = torch.as_tensor(np.asarray(decoder_input_tokens), dtype=torch.long)
  enc_mask = enc != 0 if encoder_mask is None else torch.as_tensor(np.asarray(encoder_mask))
  kwargs = {}
  if decoder_mask is not None:
    kwargs["decoder_attention_mask"] = torch.as_tensor(np.asarray(decoder_mask)).long()
  with torch.no_grad():
    out = model(input_ids=enc, attention_mask=enc_mask.long(), decoder_input_ids=dec, use_cache=False,
                **kwargs)
  return out.logits.float().numpy()


def random_t5_params(cfg, seed: int = 0) -> dict:
  """Unboxed float32 numpy params of `mhr_jax.models.T5(cfg)` (base and adapters alike).

  Norm scales ~ 1 + 0.2 N(0, 1); every other leaf ~ N(0, 1 / shape[0]) (kernels: fan-in scaling),
  so logits stay of order one and attention stays soft. Shapes come from `jax.eval_shape`.
  """
  from mhr_jax.models import T5
  tokens = np.ones((1, 4), np.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(T5(cfg).init(
      jax.random.key(0), tokens, tokens, tokens, task_ids=np.zeros((1,), np.int32),
      enable_dropout=False))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1].key == "scale":
      return 1.0 + 0.2 * noise
    return noise * np.float32(leaf.shape[0] ** -0.5)
  return jax.tree_util.tree_map_with_path(draw, shapes)
