"""Atomic directory writes: a checkpoint directory appears complete or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def write_dir(path, files: dict[str, Callable[[str], None]]) -> None:
  """Writes {file name: writer(file path)} into a fresh directory that replaces `path` atomically."""
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    for name, write in files.items():
      write(os.path.join(tmp, name))
    if os.path.exists(path):
      # rename() cannot replace a non-empty directory: move the old one aside first.
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.replace(path, os.path.join(old, "dir"))
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
