"""Two processes on localhost (jax.distributed, gloo CPU collectives, 2 devices each) train the tiny config
to the same per-step losses as one process with the same 4-device mesh."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from mhr_jax import config as config_lib

REPO = config_lib.REPO_ROOT
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(model_dir, *extra):
  return [sys.executable, "-m", "mhr_jax.train", "--gin_file=configs/tiny.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}", *extra]


def _losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  return np.array([r["loss"] for r in records]), np.array([r["grad_norm"] for r in records])


def test_two_processes_match_one(env, tmp_path):
  single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
  single = subprocess.run(_command(single_dir), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert single.returncode == 0, single.stderr[-3000:]

  port = _free_port()
  procs = [subprocess.Popen(
      _command(multi_dir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"),
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}) for i in range(2)]
  errs = []
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    errs.append(err)
  for proc, err in zip(procs, errs):
    assert proc.returncode == 0, err[-3000:]
  for i, err in enumerate(errs):
    assert f"mesh (data=4, fsdp=1, model=1); process {i}/2; devices: 2 local, 4 global" in err
  assert "process 0/1; devices: 4 local, 4 global" in single.stderr

  single_loss, single_norm = _losses(single_dir)
  multi_loss, multi_norm = _losses(multi_dir)
  # Same global batches and mesh; only the cross-process reductions (gloo) may round differently.
  np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-6, atol=0)
  np.testing.assert_allclose(multi_norm, single_norm, rtol=1e-6, atol=0)
  assert os.path.isdir(os.path.join(multi_dir, "checkpoints", str(STEPS)))
