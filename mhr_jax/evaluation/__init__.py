"""Evaluation: decoding with a KV cache and sequence scoring (decoding.py), the sharded drivers
(drivers.py: rank classification and generation), the official metrics (metrics.py) and the evaluation and
tables of adapted few-shot pairs (fewshot.py)."""
import importlib

_EXPORTS = {"rank_classification": "drivers", "generate": "drivers", "decode_texts": "drivers"}


def __getattr__(name):
  # `mhr_jax.evaluation.rank_classification` without importing JAX for `evaluation.metrics` users.
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mhr_jax.evaluation.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'mhr_jax.evaluation' has no attribute {name!r}")
