"""Analysis of a pre-training run as in the MHR paper (`python -m mhr_jax.analysis`, mhr_jax/analysis/run.py):
routing heatmaps, task similarity from routing, gradient alignment between training tasks."""
import importlib


def __getattr__(name):
  if name == "analyze":
    return importlib.import_module("mhr_jax.analysis.run").analyze
  raise AttributeError(f"module 'mhr_jax.analysis' has no attribute {name!r}")
