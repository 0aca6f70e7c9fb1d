"""Where runs, results and data live, and how the project writes its own files: atomically, so that a
reader sees a file whole or not at all. Imports neither JAX nor TensorFlow (the report reads results with
NumPy alone)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from mhr_jax.errors import ConfigError


def _writes_files() -> bool:
  """Process 0 writes the run's shared files. Without JAX imported there is one process."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def write_bytes_atomic(path: str, data: bytes, every_process: bool = False) -> None:
  """Writes `data` to `path` through a temporary file and os.replace; by process 0 only (a run's shared
  files), or by whichever process calls with `every_process` (a process's own files)."""
  if not (every_process or _writes_files()):
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` through a temporary file and os.replace (process 0 only)."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
  """The JSON object in `path`, or None when the file does not exist (yet)."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file ([] when it does not exist); a line cut short by a killed writer is
  skipped."""
  if not os.path.isfile(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def check_local_paths(section: str, obj, names: Sequence[str]) -> None:
  """ConfigError for a URL (gs://...) in a path field: run directories and data are read and written with
  POSIX file calls, and os.path would quietly turn 'gs://b/x' into a local folder 'gs:/b/x'."""
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, str) and "://" in value:
      raise ConfigError(f"{section}.{name}={value!r}: URLs are not read directly; mount the bucket (e.g. "
                        "gcsfuse) and give its local path (launch/README.md)")
