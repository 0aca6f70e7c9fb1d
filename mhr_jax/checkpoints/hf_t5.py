"""Hugging Face T5 directories <-> (T5Config, params), and restoring a base into an adapted model.

A directory holds config.json and model.safetensors (or a sharded model.safetensors.index.json; or
pytorch_model.bin, read with torch when there are no safetensors). Weights map one to one onto the
`models.T5` tree; HF linear weights are (d_out, d_in), our kernels (d_in, d_out) = weight.T.

Tying: our `tie_word_embeddings=True` means logits = (x * d_model**-0.5) @ shared.T (original T5);
False means a separate `logits_dense` kernel and no scaling (T5 v1.1). transformers 5.x writes the
scaling choice as `scale_decoder_outputs` (and always `tie_word_embeddings: true`), storing
`lm_head.weight` only when it differs from `shared.weight`; both spellings are read.

Layouts: HF names every layer, so the name mapping is written for the unscanned tree
(`encoder/block_{i}/...`); loading converts to the layout the config asks for
(`T5Config.scan_layers`), saving and merging accept either (`models.layout`).

A directory may be a URL (gs://...; mhr_jax/storage.py): saving writes it as a whole
(`storage.write_dir_atomic`), loading refuses one whose writer has not finished.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os

import flax
import flax.linen as nn
import numpy as np
from flax.core import meta

from mhr_jax import storage
from mhr_jax.models import layout
from mhr_jax.models.config import T5Config

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

ARCHITECTURES = ("T5ForConditionalGeneration", "T5WithLMHeadModel", "T5Model",
                 "MT5ForConditionalGeneration", "MT5Model")
MODEL_TYPES = ("t5", "mt5")

# transformers.T5Config's own defaults, used for fields a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                    num_decoder_layers=None, num_heads=8, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6,
                    feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=None)
_INT_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
               "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
               "pad_token_id", "eos_token_id", "decoder_start_token_id")
_FLOAT_FIELDS = ("dropout_rate", "layer_norm_epsilon")

# Keys HF stores that carry no extra information for us.
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


# ----------------------------------------------------------------------------- config

def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> T5Config:
  """A T5Config from a parsed HF config.json; `source` names the file in error messages."""
  if not isinstance(hf, dict):
    raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
  archs = hf.get("architectures")
  if archs is not None and not any(a in ARCHITECTURES for a in archs):
    raise ValueError(f"{source}: architectures={archs}: supported are {ARCHITECTURES}")
  if hf.get("model_type", "t5") not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type={hf['model_type']!r}: supported are {MODEL_TYPES}")
  if hf.get("is_encoder_decoder", True) is not True:
    raise ValueError(f"{source}: is_encoder_decoder={hf['is_encoder_decoder']!r}: need an "
                     "encoder-decoder T5")
  ffn = hf.get("feed_forward_proj", _HF_DEFAULTS["feed_forward_proj"])
  if ffn not in ("gated-gelu", "relu"):
    raise ValueError(f"{source}: feed_forward_proj={ffn!r} is unsupported (supported: "
                     "'gated-gelu', 'relu')")
  fields = {k: hf.get(k, v) for k, v in _HF_DEFAULTS.items()}
  fields["feed_forward_proj"] = ffn
  if isinstance(fields["eos_token_id"], list):   # HF allows several; generation stops on the first
    fields["eos_token_id"] = fields["eos_token_id"][0] if fields["eos_token_id"] else 1
  if fields["num_decoder_layers"] is None:
    fields["num_decoder_layers"] = fields["num_layers"]
  if fields["pad_token_id"] is None:
    fields["pad_token_id"] = 0
  if fields["decoder_start_token_id"] is None:   # T5 starts decoding from the pad token
    fields["decoder_start_token_id"] = fields["pad_token_id"]
  for name in _INT_FIELDS:
    if isinstance(fields[name], bool) or not isinstance(fields[name], int):
      raise ValueError(f"{source}: {name}={fields[name]!r}: expected an integer")
  for name in _FLOAT_FIELDS:
    if isinstance(fields[name], bool) or not isinstance(fields[name], (int, float)):
      raise ValueError(f"{source}: {name}={fields[name]!r}: expected a number")
    fields[name] = float(fields[name])
  tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
  try:
    return T5Config(**fields, tie_word_embeddings=bool(tied))
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def config_to_hf(cfg: T5Config) -> dict:
  """The config.json dict transformers (4.x and 5.x) reads back as the same architecture."""
  act = "gelu_new" if cfg.gated else "relu"
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "is_encoder_decoder": True, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
      "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
      "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "initializer_factor": 1.0, "feed_forward_proj": cfg.feed_forward_proj,
      "dense_act_fn": act, "is_gated_act": cfg.gated,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "scale_decoder_outputs": cfg.tie_word_embeddings,
      "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
      "decoder_start_token_id": cfg.decoder_start_token_id, "use_cache": True,
      "dtype": "float32",
  }


# ----------------------------------------------------------------------------- name mapping

def weight_map(cfg: T5Config) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
  """(HF key, our param path, HF shape, transpose) for every base weight of `cfg`.

  lm_head is not listed: it depends on tying and is handled by the callers.
  """
  d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
  rows = [("shared.weight", ("shared_embedding", "embedding"), (cfg.vocab_size, d), False)]
  attn_shapes = {"q": (inner, d), "k": (inner, d), "v": (inner, d), "o": (d, inner)}
  mlp_shapes = ({"wi_0": (ff, d), "wi_1": (ff, d), "wo": (d, ff)} if cfg.gated
                else {"wi": (ff, d), "wo": (d, ff)})
  for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
    rows.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 (stack, "relpos_bias", "rel_embedding"),
                 (cfg.relative_attention_num_buckets, cfg.num_heads), False))
    for i in range(n_layers):
      hf, ours = f"{stack}.block.{i}.layer", (stack, f"block_{i}")
      sublayers = [("0", "SelfAttention", "self_attention", "pre_self_attention_norm")]
      if stack == "decoder":
        sublayers.append(("1", "EncDecAttention", "cross_attention", "pre_cross_attention_norm"))
      for idx, hf_name, name, norm in sublayers:
        for proj, shape in attn_shapes.items():
          rows.append((f"{hf}.{idx}.{hf_name}.{proj}.weight", ours + (name, proj, "kernel"),
                       shape, True))
        rows.append((f"{hf}.{idx}.layer_norm.weight", ours + (norm, "scale"), (d,), False))
      mlp_idx = "2" if stack == "decoder" else "1"
      for proj, shape in mlp_shapes.items():
        rows.append((f"{hf}.{mlp_idx}.DenseReluDense.{proj}.weight", ours + ("mlp", proj, "kernel"),
                     shape, True))
      rows.append((f"{hf}.{mlp_idx}.layer_norm.weight", ours + ("pre_mlp_norm", "scale"), (d,),
                   False))
    rows.append((f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), (d,), False))
  return rows


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def hf_to_params(tensors: dict, cfg: T5Config, source: str = SAFETENSORS_FILE) -> dict:
  """Our (unboxed, float32 numpy) params from HF tensors {key: (HF shape) array}."""
  params, used = {}, set(_TIED_COPIES + _IGNORED)
  for key, path, shape, transpose in weight_map(cfg):
    if key not in tensors:
      raise ValueError(f"{source}: missing tensor {key!r}")
    value = np.asarray(tensors[key], dtype=np.float32)
    if value.shape != shape:
      raise ValueError(f"{source}: tensor {key!r} has shape {value.shape}, config.json implies "
                       f"{shape}")
    _set(params, path, value.T if transpose else value)
    used.add(key)
  head = tensors.get("lm_head.weight")
  shared = params["shared_embedding"]["embedding"]
  if head is not None:
    head = np.asarray(head, dtype=np.float32)
    if head.shape != shared.shape:
      raise ValueError(f"{source}: tensor 'lm_head.weight' has shape {head.shape}, config.json "
                       f"implies {shared.shape}")
    used.add("lm_head.weight")
  if cfg.tie_word_embeddings:
    if head is not None and not np.array_equal(head, shared):
      raise ValueError(f"{source}: 'lm_head.weight' differs from 'shared.weight' but the config "
                       "scales decoder outputs as tied T5 does; set tie_word_embeddings=false")
  else:
    # v1.1 saved by transformers 5.x leaves lm_head out when it equals the shared embedding.
    _set(params, ("logits_dense", "kernel"), (shared if head is None else head).T.copy())
  unknown = sorted(set(tensors) - used)
  if unknown:
    raise ValueError(f"{source}: unexpected tensor {unknown[0]!r} ({len(unknown)} unexpected in "
                     "all); not a T5 layout this loader knows")
  return params


def params_to_hf(cfg: T5Config, params: dict) -> dict[str, np.ndarray]:
  """HF tensors {key: float32 (HF shape) array} from our params (either layout, boxed or not);
  extra leaves are an error."""
  params = layout.to_unscanned(cfg, nn.unbox(params))
  expected = {path for _, path, _, _ in weight_map(cfg)}
  if not cfg.tie_word_embeddings:
    expected.add(("logits_dense", "kernel"))
  flat = flax.traverse_util.flatten_dict(params)
  extra = sorted("/".join(p) for p in set(flat) - expected)
  if extra:
    raise ValueError(f"save_hf_t5: params hold {len(extra)} non-base leaves (first: {extra[0]}); "
                     "pass base params only (adapters export with checkpoints.export_peft)")
  out = {}
  for key, path, shape, transpose in weight_map(cfg):
    if path not in flat:
      raise ValueError(f"save_hf_t5: params lack {'/'.join(path)} (HF {key})")
    value = np.asarray(flat[path], dtype=np.float32)
    ours = shape[::-1] if transpose else shape
    if value.shape != ours:
      raise ValueError(f"save_hf_t5: {'/'.join(path)} has shape {value.shape}, config implies {ours}")
    out[key] = np.ascontiguousarray(value.T if transpose else value)
  if not cfg.tie_word_embeddings:
    path = ("logits_dense", "kernel")
    if path not in flat:
      raise ValueError("save_hf_t5: untied config but params lack logits_dense/kernel")
    head = np.asarray(flat[path], dtype=np.float32)
    if head.shape != (cfg.d_model, cfg.vocab_size):
      raise ValueError(f"save_hf_t5: logits_dense/kernel has shape {head.shape}, config "
                       f"implies {(cfg.d_model, cfg.vocab_size)}")
    out["lm_head.weight"] = np.ascontiguousarray(head.T)
  return out


# ----------------------------------------------------------------------------- files

def read_json(path: str) -> dict:
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None


def _read_safetensors(path: str) -> dict:
  from safetensors.numpy import load, load_file
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    return load(storage.read_bytes(path)) if storage.is_url(path) else load_file(path)
  except Exception as e:  # the library raises its own error types for truncated/garbled files
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"{path}: cannot read safetensors ({message})") from None


def read_torch(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ValueError(f"{path}: reading pytorch_model.bin needs torch; install it or convert the "
                     "checkpoint to model.safetensors") from None
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  source = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
  try:
    state = torch.load(source, map_location="cpu", weights_only=True)
  except Exception as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"{path}: cannot read torch checkpoint ({message})") from None
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _read_sharded(path: str, index_file: str, reader) -> dict:
  index = read_json(os.path.join(path, index_file))
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise ValueError(f"{os.path.join(path, index_file)}: no 'weight_map' object")
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(reader(os.path.join(path, shard)))
  return tensors


def _read_tensors(path: str) -> tuple[dict, str]:
  """All tensors of an HF directory and the file name to cite in errors."""
  candidates = [
      (SAFETENSORS_FILE, lambda: _read_safetensors(os.path.join(path, SAFETENSORS_FILE))),
      (SAFETENSORS_INDEX, lambda: _read_sharded(path, SAFETENSORS_INDEX, _read_safetensors)),
      (TORCH_FILE, lambda: read_torch(os.path.join(path, TORCH_FILE))),
      (TORCH_INDEX, lambda: _read_sharded(path, TORCH_INDEX, read_torch)),
  ]
  for name, read in candidates:
    if storage.isfile(os.path.join(path, name)):
      return read(), os.path.join(path, name)
  raise FileNotFoundError(f"{path}: no weights file (expected one of "
                          f"{', '.join(n for n, _ in candidates)})")


def load_hf_t5(path, **overrides) -> tuple[T5Config, dict]:
  """Reads a Hugging Face T5 directory.

  Args:
    path: the directory (config.json + weights).
    **overrides: T5Config fields that config.json does not set, e.g. scan_layers=True,
      remat_policy="save_dots", dtype="bfloat16".
  Returns:
    (cfg, params): `cfg` a T5Config with adapter kind "none"; `params` the unboxed params dict
    (float32 numpy arrays) for `models.T5(cfg).apply({"params": params}, ...)`, in the layout
    `cfg.scan_layers` asks for (unscanned by default).
  """
  path = os.fspath(path)
  config_path = os.path.join(path, CONFIG_FILE)
  if not storage.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  storage.check_dir_complete(path)
  if not storage.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: missing (not a Hugging Face model directory)")
  cfg = config_from_hf(read_json(config_path), config_path)
  if overrides:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(T5Config)})
    if unknown:
      raise ValueError(f"load_hf_t5: unknown T5Config field(s) {unknown}")
    cfg = cfg.replace(**overrides)
  tensors, source = _read_tensors(path)
  return cfg, layout.to_layout(cfg, hf_to_params(tensors, cfg, source))


def save_hf_t5(path, cfg: T5Config, params: dict) -> None:
  """Writes `params` (base params of `models.T5(cfg)`, either layout) as an HF T5 directory,
  atomically.

  The directory (config.json + float32 model.safetensors) appears complete or not at all; an
  existing directory at `path` is replaced.
  """
  from safetensors.numpy import save_file
  tensors = params_to_hf(cfg, params)

  def write_config(file):
    with open(file, "w") as f:  # `file` is in write_dir_atomic's local scratch directory
      json.dump(config_to_hf(cfg), f, indent=2, sort_keys=True)

  storage.write_dir_atomic(path, {CONFIG_FILE: write_config, SAFETENSORS_FILE: lambda file: save_file(
      tensors, file, metadata={"format": "pt"})})


# ----------------------------------------------------------------------------- restoring a base

@dataclasses.dataclass(frozen=True)
class MergeReport:
  """Keys ("a/b/c" paths) of a base restore: `missing` kept their model values (e.g. adapters),
  `unexpected` were in the base but not in the model and were dropped."""
  missing: tuple[str, ...]
  unexpected: tuple[str, ...]

  def __str__(self) -> str:
    def show(keys):
      return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    parts = [f"{len(self.missing)} model params not in base (kept): {show(self.missing)}"
             if self.missing else "every model param restored from base"]
    if self.unexpected:
      parts.append(f"{len(self.unexpected)} base params unused: {show(self.unexpected)}")
    return "; ".join(parts)


def merge_base_params(model_params: dict, base_params: dict) -> tuple[dict, MergeReport]:
  """Copies base weights into a (possibly adapted) model's params tree.

  Args:
    model_params: the model's params, e.g. from `init` (boxed or unboxed leaves, or
      jax.ShapeDtypeStruct from `eval_shape`); leaves the base lacks (adapters, routing) are kept.
    base_params: unboxed base params, e.g. from `load_hf_t5`; either layout: they are converted
      to model_params' layout (`models.layout`) first.
  Returns:
    (params, report): `params` has model_params' structure (and boxing); restored leaves take the
    model leaf's dtype. Raises ValueError naming the key and both shapes on a shape mismatch.
  """
  is_box = lambda x: isinstance(x, meta.AxisMetadata)
  model_params = flax.core.unfreeze(model_params)
  base_params = nn.unbox(flax.core.unfreeze(base_params))
  if layout.is_scanned(model_params):
    base_params = layout.to_scanned(None, base_params)
  elif layout.is_scanned(model_params) is False:
    base_params = layout.to_unscanned(None, base_params)
  model_flat = flax.traverse_util.flatten_dict(model_params)
  base_flat = flax.traverse_util.flatten_dict(base_params)
  out = {}
  for key, leaf in model_flat.items():
    if key not in base_flat:
      out[key] = leaf
      continue
    target = leaf.unbox() if is_box(leaf) else leaf
    value = base_flat[key]
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f"merge_base_params: {'/'.join(key)} has shape {tuple(value.shape)} in base, "
                       f"{tuple(target.shape)} in model")
    value = np.asarray(value).astype(target.dtype)
    out[key] = leaf.replace_boxed(value) if is_box(leaf) else value
  report = MergeReport(
      missing=tuple(sorted("/".join(k) for k in model_flat if k not in base_flat)),
      unexpected=tuple(sorted("/".join(k) for k in base_flat if k not in model_flat)))
  return flax.traverse_util.unflatten_dict(out), report
