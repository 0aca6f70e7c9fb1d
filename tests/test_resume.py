"""Exact resume: a run stopped by SIGTERM, then killed with SIGKILL, then finished, equals an uninterrupted
run bitwise on CPU (per-step losses, gradient norms and the final parameters)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mhr_jax import config as config_lib
from mhr_jax import cli
from mhr_jax.checkpoints.run_state import read_state

REPO = config_lib.REPO_ROOT
STEPS = 10
TIMING_KEYS = {"step_time_s", "steps_per_s", "tokens_per_s", "mfu"}


def command(model_dir):
  return [sys.executable, "-m", "mhr_jax.train", "--gin_file=configs/tiny.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}"]


def metrics(model_dir):
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


# `python -m mhr_jax.train ARGS` that sends itself signal SIGNUM as soon as it has written the metrics of
# step STEP: the signal lands at that step whatever the machine's speed or load. (A watcher process polling
# metrics.jsonl sees the step late when it is starved of CPU, and the run may by then have passed the next
# checkpoint or finished.)
SIGNAL_AT_STEP = """
import os, runpy, sys
from mhr_jax import logging_utils
step, signum = int(sys.argv[1]), int(sys.argv[2])
write = logging_utils.MetricsJsonl.write

def write_then_signal(self, at, record):
  write(self, at, record)
  if at == step:
    os.kill(os.getpid(), signum)

logging_utils.MetricsJsonl.write = write_then_signal
sys.argv = ["mhr_jax.train", *sys.argv[3:]]
runpy.run_module("mhr_jax.train", run_name="__main__", alter_sys=True)
"""


def run_until(env, model_dir, step, sig):
  """Runs the command, the run signalling itself `sig` once it has logged `step`; (returncode, stderr)."""
  flags = command(model_dir)[3:]
  result = subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, str(step), str(int(sig)), *flags], cwd=REPO,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
  return result.returncode, result.stderr


def final_state(model_dir):
  return read_state(os.path.join(model_dir, "checkpoints"), STEPS)


def without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("reference"))
  result = subprocess.run(command(model_dir), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


def test_sigterm_then_kill9_then_resume_equals_uninterrupted_run(env, reference, tmp_path):
  model_dir = str(tmp_path / "run")

  # 1. SIGTERM once step 2 is logged: the handler saves a checkpoint at the step it finishes, then exits.
  status, stderr = run_until(env, model_dir, 2, signal.SIGTERM)
  assert status == cli.EXIT_PREEMPTED, stderr[-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(model_dir, "checkpoints")) if s.isdigit())
  assert len(saved) == 1 and 2 <= saved[0] < STEPS
  assert f"SIGTERM: checkpoint saved at step {saved[0]}" in stderr
  with open(os.path.join(model_dir, "results.json")) as f:
    assert json.load(f)["status"] == "preempted"

  # 2. Resume, then SIGKILL once step 7 is logged (past the periodic checkpoint at 5): no chance to save.
  status, stderr = run_until(env, model_dir, 7, signal.SIGKILL)
  assert status == -signal.SIGKILL, stderr[-3000:]
  assert f"resumed from {model_dir}/checkpoints/{saved[0]}" in stderr
  assert metrics(model_dir)[-1]["step"] < STEPS

  # 3. The same command finishes the run from the latest complete checkpoint.
  result = subprocess.run(command(model_dir), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from" in result.stderr

  got, want = metrics(model_dir), metrics(reference)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  assert without_timing(got) == without_timing(want)  # exact float equality, every logged metric
  got_state, want_state = final_state(model_dir), final_state(reference)
  assert sorted(got_state) == sorted(want_state)
  assert any(k.startswith("opt_state/") for k in got_state)
  for key, value in want_state.items():
    np.testing.assert_array_equal(got_state[key], value, err_msg=key)


def test_metrics_file_is_cut_back_to_the_checkpoint(tmp_path):
  from mhr_jax.logging_utils import MetricsJsonl
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4))
                  + '{"step": 5, "lo')  # the last line of a killed run, cut short
  writer = MetricsJsonl(str(path), resume_step=3)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
  writer.write(4, {"loss": 0.5})
  assert json.loads(path.read_text().splitlines()[-1]) == {"step": 4, "loss": 0.5}
  MetricsJsonl(str(path), resume_step=None)  # a fresh start (no checkpoint) empties it
  assert path.read_text() == ""


def test_the_frozen_base_is_saved_once_per_run(reference):
  """Step checkpoints hold the trained part and the optimizer state; the frozen base is saved once, in
  RUN_DIR/frozen, and read back with them."""
  from mhr_jax.checkpoints import run_state as run_checkpoints  # pylint: disable=g-import-not-at-top
  assert os.listdir(os.path.join(reference, "frozen")) == ["0"]
  checkpoints = os.path.join(reference, "checkpoints")
  apart = read_state(run_checkpoints.frozen_store(checkpoints), 0)
  assert apart and all(k.startswith("frozen/") for k in apart)
  for step in run_checkpoints.checkpoint_steps(checkpoints):
    layout = run_checkpoints._layout(checkpoints, step)  # pylint: disable=protected-access
    assert layout["frozen_apart"] and not any(e["path"][0] == "frozen" for e in layout["leaves"])
  state = final_state(reference)
  for key, value in apart.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  params = run_checkpoints.restore_params(checkpoints, STEPS)
  kernel = params["encoder"]["block_0"]["self_attention"]["q"]["kernel"]
  np.testing.assert_array_equal(np.asarray(kernel), apart["frozen/encoder/block_0/self_attention/q/kernel"])
