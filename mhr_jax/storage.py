"""Where runs, results and data live, and the one module through which the project reads and writes its own
files: local paths, and URLs on object storage (gs://BUCKET/path). Imports neither JAX nor TensorFlow (the
report reads results with NumPy alone); TensorFlow only when a URL needs it.

Paths. A path setting is a local path (the os module, as ever) or a URL `scheme://bucket/path`:
  - a scheme fsspec knows: gs:// through gcsfs (the Cloud Storage JSON API), and any other fsspec file
    system that is installed;
  - a scheme only TensorFlow's file systems serve (ram://, ...): tf.io.gfile.
Run directories (they hold orbax checkpoints: RunConfig.model_dir, init_run, pretrain_dir, Experiment.model_dir)
are local paths or gs:// URLs: orbax reaches Cloud Storage through etils.epath, put on its fsspec backend here,
and TensorStore. A loopback Cloud Storage server (fake-gcs-server) needs STORAGE_EMULATOR_HOST (gcsfs) and
TENSORSTORE_GCS_HTTP_URL (TensorStore), nothing else.

Atomic writes. A local file is written to a temporary name, then os.replace. An object is written in one upload,
which the store publishes whole when it completes, or not at all. Objects cannot be appended to or renamed:
a growing file is rewritten whole (logging_utils.MetricsJsonl), and a directory that must appear whole
(`write_dir_atomic`: Hugging Face and PEFT exports) marks itself while it is written.

Errors, each one line: ConfigError for a malformed or unsupported URL (found without any I/O), FileNotFoundError
for what is missing, RunError for a store that fails (unreachable, refused).
"""
from __future__ import annotations

import contextlib
import glob as glob_lib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from typing import Any, Callable, Sequence

import fsspec

from mhr_jax.errors import ConfigError, RunError

_URL = re.compile(r"([a-z][a-z0-9+.-]*)://([^/]+)(/.*)?")
_SCHEME_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/")  # "gs:/x": a URL that lost a slash
# Schemes of run directories: those orbax checkpoints reach (etils.epath on fsspec, and TensorStore).
RUN_DIR_SCHEMES = ("gs",)
# An object in a URL directory while `write_dir_atomic` writes it (written first, deleted last).
WRITING_MARKER = ".writing"

# etils.epath (orbax's paths) would take TensorFlow's GCS client when TensorFlow is installed; that client has no
# endpoint setting, so it could not reach a loopback server. On fsspec, every gs:// path of the process goes
# through gcsfs.
os.environ["EPATH_USE_TF"] = "false"
# gcsfs's experimental layer asks the storage-control API for a bucket's layout before every call until it
# answers; ordinary buckets need no answer and emulators give none. A user's setting wins.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# gcsfs caches directory listings forever by default; checkpoints are also written by TensorStore and by other
# processes, which such a cache would not see.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
# gcsfs logs a failed request with its traceback before raising it; the error is reported once, as one line.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def _writes_files() -> bool:
  """Process 0 writes the run's shared files. Without JAX imported there is one process."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


# ============================================================================== paths


def is_url(path) -> bool:
  """Whether `path` is a URL (scheme://...) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """A local path made absolute (os.path.abspath); a URL as given, without a trailing '/'."""
  path = os.fspath(path)
  if not is_url(path):
    return os.path.abspath(path)
  scheme, _, rest = path.partition("://")
  return f"{scheme}://{rest.rstrip('/')}"


def _scheme_supported(scheme: str) -> bool:
  """Whether fsspec (installed packages) or TensorFlow's file systems serve `scheme`."""
  try:
    fsspec.get_filesystem_class(scheme)
    return True
  except ImportError as e:
    raise ConfigError(f"{scheme}:// needs a package that is not installed ({_one_line(e)})") from None
  except ValueError:
    pass
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return scheme in tf.io.gfile.get_registered_schemes()


def check_path(value, key: str, run_dir: bool = False) -> None:
  """ConfigError naming `key` when `value` (a path setting) is a malformed URL, a URL no file system here
  serves, or, for a run directory, a URL that orbax cannot checkpoint to. No I/O."""
  if not isinstance(value, str):
    return
  if not is_url(value):
    if _SCHEME_PREFIX.match(value):
      raise ConfigError(f"{key}={value!r}: a malformed URL (expected scheme://bucket/path, e.g. gs://BUCKET/run)")
    return
  match = _URL.fullmatch(value)
  if match is None:
    raise ConfigError(f"{key}={value!r}: a malformed URL (expected scheme://bucket/path, e.g. gs://BUCKET/run)")
  scheme = match.group(1)
  if run_dir and scheme not in RUN_DIR_SCHEMES:
    raise ConfigError(f"{key}={value!r}: a run directory (orbax checkpoints) is a local path or a gs:// URL")
  try:
    supported = _scheme_supported(scheme)
  except ConfigError as e:
    raise ConfigError(f"{key}={value!r}: {e}") from None
  if not supported:
    raise ConfigError(f"{key}={value!r}: no file system serves {scheme}:// here (fsspec or TensorFlow)")


def check_paths(section: str, obj, names: Sequence[str], run_dirs: Sequence[str] = ()) -> None:
  """`check_path` on the fields `names` of a config dataclass (`run_dirs`: those that are run directories)."""
  for name in names:
    check_path(getattr(obj, name), f"{section}.{name}", run_dir=name in run_dirs)


def check_reachable(path: str, key: str) -> None:
  """For a gs:// URL (a place the run will write): ConfigError when its bucket does not exist, RunError when the
  store cannot be reached. Reads only, so a bad MODEL_DIR leaves nothing behind; local paths are not checked."""
  check_path(path, key)
  match = _URL.fullmatch(path) if is_url(path) else None
  if match is None or match.group(1) not in ("gs", "gcs"):
    return
  root = f"{match.group(1)}://{match.group(2)}"
  try:
    _filesystem(path).ls(root, detail=False)
  except FileNotFoundError:
    raise ConfigError(f"{key}={path!r}: no bucket {match.group(2)!r} in Cloud Storage") from None
  except Exception as e:  # the client's own errors: connection, HTTP, credentials
    raise RunError(f"{key}={path!r}: cannot reach {root} ({type(e).__name__}: {_one_line(e)})") from None


# ============================================================================== file systems


class _TensorFlowFiles:
  """The part of fsspec's file system interface this module uses, over tf.io.gfile: URLs that only
  TensorFlow's file systems serve (ram://, ...). Paths stay full URLs."""

  def __init__(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._gfile, self._not_found = tf.io.gfile, tf.errors.NotFoundError

  def info(self, path: str) -> dict:
    if not self._gfile.exists(path):
      raise FileNotFoundError(path)
    if self._gfile.isdir(path):
      return {"type": "directory", "size": 0}
    stat = self._gfile.stat(path)
    return {"type": "file", "size": stat.length, "mtime": stat.mtime_nsec}

  def ls(self, path: str, detail: bool = False) -> list[str]:
    del detail
    try:
      return [os.path.join(path, name.rstrip("/")) for name in self._gfile.listdir(path)]
    except self._not_found:
      raise FileNotFoundError(path) from None

  def glob(self, pattern: str) -> list[str]:
    return self._gfile.glob(pattern)

  def unstrip_protocol(self, path: str) -> str:
    return path

  def cat_file(self, path: str) -> bytes:
    try:
      with self._gfile.GFile(path, "rb") as f:
        return f.read()
    except self._not_found:
      raise FileNotFoundError(path) from None

  def pipe_file(self, path: str, data: bytes) -> None:
    self._gfile.makedirs(os.path.dirname(path))
    with self._gfile.GFile(path, "wb") as f:
      f.write(data)

  def put_file(self, local_path: str, path: str) -> None:
    self._gfile.makedirs(os.path.dirname(path))
    self._gfile.copy(local_path, path, overwrite=True)

  def rm_file(self, path: str) -> None:
    self._gfile.remove(path)

  def rm(self, path, recursive: bool = False) -> None:
    del recursive
    for one in [path] if isinstance(path, str) else path:
      if self._gfile.isdir(one):
        self._gfile.rmtree(one)
      else:
        self._gfile.remove(one)

  def find(self, path: str) -> list[str]:
    return [os.path.join(folder, name) for folder, _, names in self._gfile.walk(path) for name in names]


def _filesystem(url: str):
  """The file system of a URL: fsspec's for its scheme (one instance per process), else TensorFlow's."""
  scheme = url.partition("://")[0]
  try:
    fsspec.get_filesystem_class(scheme)
  except ValueError:
    return _TensorFlowFiles()
  except ImportError as e:
    raise ConfigError(f"{url}: {scheme}:// needs a package that is not installed ({_one_line(e)})") from None
  return fsspec.filesystem(scheme)


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def _store_errors(path: str):
  """The store's own errors (connection, HTTP, credentials) as RunError naming `path`; a missing file stays
  FileNotFoundError."""
  try:
    yield
  except (FileNotFoundError, ConfigError, RunError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (gcsfs, aiohttp, google-auth and TensorFlow types)
    raise RunError(f"{path}: {type(e).__name__}: {_one_line(e)}") from e


def _info(path: str) -> dict | None:
  """fsspec's info (type "file" or "directory", size, ...) of a URL; None when nothing is there."""
  with _store_errors(path):
    try:
      return _filesystem(path).info(path)
    except FileNotFoundError:
      return None


# ============================================================================== reading


def exists(path: str) -> bool:
  return _info(path) is not None if is_url(path) else os.path.exists(path)


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  info = _info(path)
  return info is not None and info["type"] == "file"


def isdir(path: str) -> bool:
  """A local directory; for a URL, a bucket or a prefix with objects below it."""
  if not is_url(path):
    return os.path.isdir(path)
  info = _info(path)
  return info is not None and info["type"] == "directory"


def listdir(path: str) -> list[str]:
  """The names in a directory (FileNotFoundError when there is none)."""
  if not is_url(path):
    return os.listdir(path)
  with _store_errors(path):
    return [os.path.basename(p.rstrip("/")) for p in _filesystem(path).ls(path, detail=False)]


def glob(pattern: str) -> list[str]:
  """The paths matching a glob pattern (`*`, `?`, `[...]`), sorted."""
  if not is_url(pattern):
    return sorted(glob_lib.glob(pattern))
  with _store_errors(pattern):
    fs = _filesystem(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(pattern))


def version(path: str) -> tuple:
  """What changes when the file is rewritten (modification time and size; an object's generation), for
  caches keyed by file version. FileNotFoundError when it is missing."""
  if not is_url(path):
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size
  info = _info(path)
  if info is None:
    raise FileNotFoundError(path)
  return str(info.get("generation", info.get("mtime", info.get("updated")))), info.get("size")


def read_bytes(path: str) -> bytes:
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read()
  with _store_errors(path):
    return _filesystem(path).cat_file(path)


def read_text(path: str) -> str:
  """The file's text (UTF-8)."""
  return read_bytes(path).decode("utf-8")


def _text_if_there(path: str) -> str | None:
  """The file's text, or None when there is no such file (one request for an object)."""
  if not is_url(path):
    return read_text(path) if os.path.isfile(path) else None
  try:
    return read_text(path)
  except FileNotFoundError:
    return None


def read_json(path: str):
  """The JSON object in `path`, or None when the file does not exist (yet)."""
  text = _text_if_there(path)
  return None if text is None else json.loads(text)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file ([] when it does not exist); a line cut short by a killed writer is
  skipped."""
  text = _text_if_there(path)
  records = []
  for line in (text or "").splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


# ============================================================================== writing


def makedirs(path: str) -> None:
  """Creates a local directory and its parents; nothing for a URL (object stores have no directories: an
  object's name holds its whole path)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def _temporary_name(path: str) -> str:
  """A name beside `path` that no other process picks, also on another host sharing the file system."""
  return f"{path}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _replace_local(path: str, fill: Callable[[str], None]) -> None:
  """The local file `path` replaced whole: fill(temporary name) in its folder, then os.replace."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _temporary_name(path)
  try:
    fill(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_bytes_atomic(path: str, data: bytes, every_process: bool = False) -> None:
  """Writes `data` to `path` whole or not at all: a temporary file and os.replace, or one object upload.
  Process 0 writes the run's shared files; `every_process`: each process writes (the same deterministic
  content, where every process needs the file before any other could have written it)."""
  if not (every_process or _writes_files()):
    return
  if is_url(path):
    with _store_errors(path):
      _filesystem(path).pipe_file(path, data)
    return

  def fill(tmp):
    with open(tmp, "wb") as f:
      f.write(data)
  _replace_local(path, fill)


def write_text_atomic(path: str, text: str, every_process: bool = False) -> None:
  """Writes `text` (UTF-8) to `path` whole or not at all (see `write_bytes_atomic`)."""
  write_bytes_atomic(path, text.encode("utf-8"), every_process)


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_text(path: str, text: str) -> None:
  """Appends `text` to a local file (created if needed) and flushes it. Objects cannot be appended to: a URL
  is a ValueError (rewrite the object whole instead)."""
  if is_url(path):
    raise ValueError(f"{path}: an object cannot be appended to; rewrite it whole")
  with open(path, "a") as f:
    f.write(text)
    f.flush()


def upload(local_path: str, path: str) -> None:
  """Copies the local file `local_path` to `path`, whole or not at all (a local `path`: through a temporary
  file and os.replace)."""
  if is_url(path):
    with _store_errors(path):
      _filesystem(path).put_file(local_path, path)
    return
  _replace_local(path, lambda tmp: shutil.copyfile(local_path, tmp))


def remove(path: str) -> None:
  """Deletes a file or object (FileNotFoundError when it is missing)."""
  if not is_url(path):
    os.remove(path)
    return
  with _store_errors(path):
    _filesystem(path).rm_file(path)


def rmtree(path: str) -> None:
  """Deletes a directory and everything below it; nothing when it does not exist."""
  if not is_url(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  if exists(path):
    with _store_errors(path):
      _filesystem(path).rm(path, recursive=True)


def local_scratch_dir(prefix: str) -> str:
  """A new local temporary directory (the caller removes it with `rmtree`): where files that a library can only
  write to a local path are made before `upload` copies them to a URL."""
  return tempfile.mkdtemp(prefix=prefix)


def write_dir_atomic(path, files: dict[str, Callable[[str], None]]) -> None:
  """Writes {file name: writer(local file path)} as the directory `path`, replacing what was there, so that a
  reader sees the old directory, the new one, or (for a URL, see `check_dir_complete`) an unfinished one.

  Locally the files are written into a fresh temporary directory that replaces `path` by renames. Objects
  cannot be renamed: the files are made locally first (a failing writer leaves `path` untouched), then
  WRITING_MARKER is written into `path`, the old objects deleted, the files uploaded, and the marker deleted
  last.
  """
  path = absolute(os.fspath(path))
  if is_url(path):
    _write_objects(path, files)
    return
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


def _write_objects(path: str, files: dict[str, Callable[[str], None]]) -> None:
  scratch = local_scratch_dir("mhr_jax_dir_")
  marker = os.path.join(path, WRITING_MARKER)
  try:
    for name, write in files.items():
      write(os.path.join(scratch, name))
    with _store_errors(path):
      fs = _filesystem(path)
      fs.pipe_file(marker, b"")
      old = [p for p in map(fs.unstrip_protocol, fs.find(path)) if p != marker] if exists(path) else []
      if old:
        fs.rm(old)
      for name in files:
        fs.put_file(os.path.join(scratch, name), os.path.join(path, name))
      fs.rm_file(marker)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def check_dir_complete(path) -> None:
  """FileNotFoundError when the URL directory `path` is being written by `write_dir_atomic`, or its writer
  stopped before the end (it still holds WRITING_MARKER). A directory without the marker (finished, or copied
  into the bucket by other means) is complete; so is every local one (renamed into place whole)."""
  path = os.fspath(path)
  if is_url(path) and exists(os.path.join(path, WRITING_MARKER)):
    raise FileNotFoundError(f"{path}: incomplete ({WRITING_MARKER} is still there: its writer has not finished; "
                            "write it again)")
