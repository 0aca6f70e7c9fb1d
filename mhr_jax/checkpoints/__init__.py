"""Checkpoint formats: Hugging Face T5 directories, PEFT adapters, and orbax run checkpoints."""
import importlib

_EXPORTS = {
    "load_hf_t5": "hf_t5", "save_hf_t5": "hf_t5",
    "export_peft": "peft", "import_peft": "peft",
}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mhr_jax.checkpoints.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'mhr_jax.checkpoints' has no attribute {name!r}")
