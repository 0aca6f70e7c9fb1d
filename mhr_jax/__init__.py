"""mhr-jax: multi-task adapter routing (Poly, MHR) for T5 in JAX/Flax."""
import importlib

_SUBMODULES = ("adapters", "checkpoints", "data", "evaluation", "metrics", "models", "partitioning")


def __getattr__(name):
  # Lazy submodules: `from mhr_jax import checkpoints, models` works without importing the rest.
  if name in _SUBMODULES:
    return importlib.import_module(f"mhr_jax.{name}")
  raise AttributeError(f"module 'mhr_jax' has no attribute {name!r}")
