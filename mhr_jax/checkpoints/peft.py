"""PEFT adapter directories <-> our adapted params (Poly / MHR, LoRA, (IA)^3).

A PEFT directory holds adapter_config.json and adapter_model.safetensors; the base model lives in
a separate Hugging Face T5 directory (`checkpoints.save_hf_t5`). Tensor layouts (peft 0.21):

  POLY  <module>.poly_lora_A                  (S, K, d_in/S, r)   = our lora_a
        <module>.poly_lora_B                  (S, K, r, d_out/S)  = our lora_b
        <module>.poly_router.module_logits    (T, S*K)            = our routing/logits (T, S, K)
        delta = x A_t B_t / r (no alpha): we export B * alpha and import alpha = 1.
        PEFT keeps one router per layer: shared routing exports as copies of the shared table.
  LORA  <module>.lora_A.weight (r, d_in), <module>.lora_B.weight (d_out, r); scale lora_alpha / r
        (lora_alpha / sqrt(r) with use_rslora) = our alpha / rank.
  IA3   <module>.ia3_l (d_out, 1) output scale (modules not listed in feedforward_modules).

with <module> = "base_model.model." + the transformers module name, e.g.
"encoder.block.0.layer.0.SelfAttention.q" (ours: "encoder/block_0/self_attention/q"). PEFT passes
task ids as `PeftModel(..., task_ids=...)`; its router samples a relaxed Bernoulli in train mode,
so outputs agree in eval mode (ours: enable_dropout=False).

PEFT names every layer, so both directions work on the unscanned layout; `export_peft` accepts
either layout and `import_peft` returns the layout its T5Config overrides ask for (`models.layout`).
Directories may be URLs (gs://...), written and checked as `hf_t5`'s.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from flax import traverse_util

from mhr_jax.adapters.config import KIND_TABLE, AdapterConfig
from mhr_jax.adapters.transforms import adapted_layers
from mhr_jax import storage
from mhr_jax.checkpoints import hf_t5
from mhr_jax.models import layout

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TORCH_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
TASK_TYPE = "SEQ_2_SEQ_LM"
_TENSOR_SUFFIXES = {
    "POLY": ("poly_lora_A", "poly_lora_B", "poly_router.module_logits"),
    "LORA": ("lora_A.weight", "lora_B.weight"),
    "IA3": ("ia3_l",),
}


def linear_modules(cfg) -> dict[tuple[str, ...], str]:
  """{our linear-layer module path: transformers module name} for every linear layer of `cfg`."""
  out = {}
  for key, path, _, transpose in hf_t5.weight_map(cfg):
    if transpose and path[-1] == "kernel":
      out[path[:-1]] = key[: -len(".weight")]
  return out


def _peft_targets(adapted: list[str], all_modules: list[str]):
  """PEFT `target_modules` selecting exactly `adapted` among `all_modules` (transformers names).

  A list of short names when every module with those names is adapted (PEFT matches a list by
  name suffix); otherwise a regex of the full names (PEFT fullmatches a string).
  """
  short = sorted({m.rsplit(".", 1)[-1] for m in adapted})
  if sorted(m for m in all_modules if m.rsplit(".", 1)[-1] in short) == sorted(adapted):
    return short
  return "(" + "|".join(re.escape(m) for m in sorted(adapted)) + ")"


def _our_target_regex(adapted: set[tuple[str, ...]], all_paths: list[tuple[str, ...]]) -> str:
  """Our `target_modules` regex selecting exactly `adapted` among `all_paths`."""
  short = sorted({p[-1] for p in adapted})
  if {p for p in all_paths if p[-1] in short} == adapted:
    return r".*/(" + "|".join(short) + ")"
  return "(" + "|".join(re.escape("/".join(p)) for p in sorted(adapted)) + ")"




def export_peft(path, cfg, params, adapter_cfg: AdapterConfig | None = None,
                base_model_name_or_path: str | None = None) -> None:
  """Writes the adapter of `params` as a PEFT directory (adapter_config.json + safetensors).

  Args:
    path: output directory; replaced atomically if it exists.
    cfg: the model's `T5Config`.
    params: unboxed params of `models.T5(cfg)`, either layout (base weights are not written).
    adapter_cfg: the adapter settings; default `cfg.adapter`. Kinds poly / mhr export as a PEFT
      POLY model, lora as LORA, ia3 as IA3 (output scales). For private LoRA, export one task
      with `transforms.extract_task_lora` first.
    base_model_name_or_path: recorded in adapter_config.json (PEFT's field of that name).
  """
  from safetensors.numpy import save_file
  acfg = cfg.adapter if adapter_cfg is None else adapter_cfg
  peft_type = acfg.info.peft_type
  if peft_type is None:
    exportable = sorted(k for k, info in KIND_TABLE.items() if info.peft_type)
    raise ValueError(f"export_peft: adapter.kind={acfg.kind!r} has no PEFT equivalent (supported: "
                     f"{exportable}; private_lora: export transforms.extract_task_lora)")
  params = layout.to_unscanned(cfg, params)
  flat = traverse_util.flatten_dict(dict(params))
  modules = linear_modules(cfg)
  layers = adapted_layers(params)
  if not layers:
    raise ValueError("export_peft: params hold no adapter weights")
  unknown = [l for l in layers if l not in modules]
  if unknown:
    raise ValueError(f"export_peft: adapted layer {'/'.join(unknown[0])} is not a T5 linear layer")
  tensors = {}
  for layer in layers:
    name = PREFIX + modules[layer]
    get = lambda leaf: np.asarray(flat[layer + (leaf,)], np.float32)
    if peft_type == "POLY":
      a, b = get("lora_a"), get("lora_b")
      if a.ndim != 4:
        raise ValueError(f"export_peft: {'/'.join(layer)}/lora_a has shape {a.shape}; expected "
                         "(S, K, d_in/S, r) for kind poly/mhr")
      z = np.asarray(flat[layer + ("routing", "logits")] if acfg.routing == "layer"
                     else flat[("routing", "logits")], np.float32)
      tensors[name + ".poly_lora_A"] = a
      tensors[name + ".poly_lora_B"] = b * np.float32(acfg.alpha)   # PEFT scales by 1/r only
      tensors[name + ".poly_router.module_logits"] = z.reshape(z.shape[0], -1)
    elif peft_type == "LORA":
      tensors[name + ".lora_A.weight"] = get("lora_a").T
      tensors[name + ".lora_B.weight"] = get("lora_b").T
    else:
      tensors[name + ".ia3_l"] = get("ia3_scale")[:, None]
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  targets = _peft_targets([modules[l] for l in layers], list(modules.values()))
  config = {"peft_type": peft_type, "task_type": TASK_TYPE, "target_modules": targets,
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "modules_to_save": None, "exclude_modules": None, "revision": None}
  if peft_type == "POLY":
    config.update(r=acfg.rank, n_tasks=acfg.n_tasks, n_skills=acfg.n_skills,
                  n_splits=acfg.n_splits, poly_type="poly", init_weights=True)
  elif peft_type == "LORA":
    alpha = int(acfg.alpha) if float(acfg.alpha).is_integer() else float(acfg.alpha)
    config.update(r=acfg.rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                  fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
                  rank_pattern={}, alpha_pattern={})
  else:
    config.update(feedforward_modules=[], fan_in_fan_out=False, init_ia3_weights=True)

  def write_config(file):
    with open(file, "w") as f:  # `file` is in write_dir_atomic's local scratch directory
      json.dump(config, f, indent=2, sort_keys=True)

  storage.write_dir_atomic(path, {WEIGHTS_FILE: lambda f: save_file(tensors, f, metadata={"format": "pt"}),
                                  CONFIG_FILE: write_config})


def _read_adapter_tensors(peft_dir: str) -> tuple[dict, str]:
  weights = os.path.join(peft_dir, WEIGHTS_FILE)
  if storage.isfile(weights):
    from safetensors.numpy import load, load_file
    try:
      loaded = load(storage.read_bytes(weights)) if storage.is_url(weights) else load_file(weights)
      return {k: np.asarray(v, np.float32) for k, v in loaded.items()}, weights
    except Exception as e:  # the library raises its own error types for garbled files
      message = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f"{weights}: cannot read safetensors ({message})") from None
  torch_weights = os.path.join(peft_dir, TORCH_WEIGHTS_FILE)
  if storage.isfile(torch_weights):
    return hf_t5.read_torch(torch_weights), torch_weights
  raise FileNotFoundError(f"{peft_dir}: no {WEIGHTS_FILE} (or {TORCH_WEIGHTS_FILE})")


def _adapter_config(config: dict, source: str) -> AdapterConfig:
  """Our AdapterConfig (without target_modules) from a parsed adapter_config.json."""
  peft_type = config.get("peft_type")
  if peft_type == "POLY":
    if config.get("poly_type", "poly") != "poly":
      raise ValueError(f"{source}: poly_type={config['poly_type']!r}: only 'poly' is supported")
    n_splits = int(config.get("n_splits", 1))
    # PEFT samples a relaxed Bernoulli (tau = 1) whenever it trains; PEFT's A init is kaiming.
    return AdapterConfig(kind="poly" if n_splits == 1 else "mhr", rank=int(config.get("r", 8)),
                         alpha=1.0, n_tasks=int(config.get("n_tasks", 1)),
                         n_skills=int(config.get("n_skills", 4)), n_splits=n_splits,
                         gumbel=True, temperature=1.0, init_a="kaiming")
  if peft_type == "LORA":
    for key in ("rank_pattern", "alpha_pattern"):
      if config.get(key):
        raise ValueError(f"{source}: {key}={config[key]!r}: per-module ranks/alphas are unsupported")
    for key in ("use_dora", "fan_in_fan_out"):
      if config.get(key):
        raise ValueError(f"{source}: {key}={config[key]!r} is unsupported")
    if config.get("bias", "none") != "none":
      raise ValueError(f"{source}: bias={config['bias']!r} is unsupported (need 'none')")
    r = int(config.get("r", 8))
    lora_alpha = float(config.get("lora_alpha", 8))
    # Our scale is alpha / r; rsLoRA's is lora_alpha / sqrt(r).
    alpha = lora_alpha * math.sqrt(r) if config.get("use_rslora") else lora_alpha
    return AdapterConfig(kind="lora", rank=r, alpha=alpha)
  if peft_type == "IA3":
    return AdapterConfig(kind="ia3")
  raise ValueError(f"{source}: peft_type={peft_type!r}: supported are POLY, LORA, IA3")


def _peft_matches(module: str, targets) -> bool:
  """PEFT's rule: a string is a fullmatch regex, a list matches names or dotted name suffixes."""
  if targets is None:
    return False
  if isinstance(targets, str):
    return re.fullmatch(targets, module) is not None
  return any(module == t or module.endswith("." + t) for t in targets)


def _expected_leaves(peft_type: str, parts: dict, acfg: AdapterConfig, d_in: int, d_out: int):
  """{our leaf path: (PEFT array, expected PEFT shape, converter to our layout)}."""
  if peft_type == "POLY":
    s, k, r, t = acfg.n_splits, acfg.n_skills, acfg.rank, acfg.n_tasks
    return {("lora_a",): (parts["poly_lora_A"], (s, k, d_in // s, r), lambda v: v),
            ("lora_b",): (parts["poly_lora_B"], (s, k, r, d_out // s), lambda v: v),
            ("routing", "logits"): (parts["poly_router.module_logits"], (t, s * k),
                                    lambda v: v.reshape(t, s, k))}
  if peft_type == "LORA":
    return {("lora_a",): (parts["lora_A.weight"], (acfg.rank, d_in), lambda v: v.T),
            ("lora_b",): (parts["lora_B.weight"], (d_out, acfg.rank), lambda v: v.T)}
  return {("ia3_scale",): (parts["ia3_l"], (d_out, 1), lambda v: v[:, 0])}


def import_peft(peft_dir, base_dir, **overrides) -> tuple:
  """Reads a PEFT POLY / LORA / IA3 adapter for the HF T5 in `base_dir`.

  `overrides` are T5Config fields as in `hf_t5.load_hf_t5`, e.g. scan_layers=True (the params
  then come in the scanned layout; the adapter must then adapt every layer of a stack alike).

  Returns:
    (cfg, params): `cfg` the base T5Config with the adapter settings (kind poly for n_splits = 1,
    else mhr; lora; ia3; target_modules selecting exactly the adapted layers), `params` the base
    params plus the adapter leaves (float32 numpy), such that `models.T5(cfg).apply({"params":
    params}, ..., task_ids=..., enable_dropout=False)` reproduces the PEFT model in eval mode.
  """
  peft_dir = os.fspath(peft_dir)
  config_path = os.path.join(peft_dir, CONFIG_FILE)
  storage.check_dir_complete(peft_dir)
  if not storage.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: missing (not a PEFT adapter directory)")
  config = hf_t5.read_json(config_path)
  if not isinstance(config, dict):
    raise ValueError(f"{config_path}: expected a JSON object")
  if config.get("modules_to_save"):
    raise ValueError(f"{config_path}: modules_to_save={config['modules_to_save']!r} is unsupported")
  acfg = _adapter_config(config, config_path)
  peft_type = config["peft_type"]
  # The adapter settings come from adapter_config.json, so they cannot be overridden.
  allowed = set(hf_t5.T5Config.__dataclass_fields__) - {"adapter"}
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(f"import_peft: unknown or disallowed T5Config override(s) {unknown}")
  cfg, params = hf_t5.load_hf_t5(base_dir)
  tensors, source = _read_adapter_tensors(peft_dir)
  modules = linear_modules(cfg)
  by_name = {name: path for path, name in modules.items()}

  suffixes = _TENSOR_SUFFIXES[peft_type]
  found: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    suffix = next((s for s in suffixes if key.endswith("." + s)), None)
    module = key[len(PREFIX): -len(suffix) - 1] if suffix and key.startswith(PREFIX) else None
    if module not in by_name:
      raise ValueError(f"{source}: unexpected tensor {key!r} (not a {peft_type} weight of a T5 "
                       "linear layer)")
    found.setdefault(by_name[module], {})[suffix] = value
  if not found:
    raise ValueError(f"{source}: no adapter tensors")
  if peft_type == "IA3":
    ff = [l for l in found if _peft_matches(modules[l], config.get("feedforward_modules"))]
    if ff:
      raise ValueError(f"{config_path}: feedforward_modules include {modules[ff[0]]}; input-side "
                       "(IA)^3 scales are unsupported (only output scales)")
  acfg = acfg.replace(target_modules=_our_target_regex(set(found), list(modules)))

  flat = traverse_util.flatten_dict(params)
  for layer, parts in found.items():
    missing = [s for s in suffixes if s not in parts]
    if missing:
      raise ValueError(f"{source}: {modules[layer]} lacks {missing[0]}")
    d_in, d_out = flat[layer + ("kernel",)].shape
    if acfg.routed and (d_in % acfg.n_splits or d_out % acfg.n_splits):
      raise ValueError(f"{config_path}: n_splits={acfg.n_splits} does not divide the widths of "
                       f"{modules[layer]} ({d_in}, {d_out})")
    for leaf, (value, shape, convert) in _expected_leaves(peft_type, parts, acfg, d_in,
                                                          d_out).items():
      if value.shape != shape:
        raise ValueError(f"{source}: {modules[layer]} {leaf[-1]} has shape {value.shape}, "
                         f"expected {shape} from {CONFIG_FILE}")
      flat[layer + leaf] = np.ascontiguousarray(convert(value), np.float32)
  cfg = cfg.replace(adapter=acfg, **overrides)
  return cfg, layout.to_layout(cfg, traverse_util.unflatten_dict(flat))
