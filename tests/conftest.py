"""Test session setup: 8 simulated CPU devices for sharding tests, small thread pools."""
import os

# Level 0 halves CPU compile time for the many tiny programs; numerics stay within the tests' tolerances.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def env(tmp_path_factory):
  """Environment for CLI subprocesses: CPU, and one persistent compile cache shared by the session's
  runs (the tiny model's programs compile once instead of once per subprocess)."""
  cache = tmp_path_factory.mktemp("jax_compilation_cache")
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
