"""Two processes on localhost (jax.distributed, gloo CPU collectives, 2 devices each) against one process:
the tiny config trains to the same per-step losses (the same 4-device mesh), the evaluation drivers give the
same scores and tokens, and few-shot adaptation spread over the processes gives the same per-pair results."""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from mhr_jax import cli
from mhr_jax import config as config_lib
from tiny_runs import TWO_STEP_EXPERIMENT

REPO = config_lib.REPO_ROOT
STEPS = 3
HANG_GUARD_S = 1800  # only against a hung run

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


def _one_process(env, command):
  single = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert single.returncode == 0, single.stderr[-3000:]
  return single


def _processes(env, command_of_process, n=2, expected=0):
  """Runs command_of_process(i, port) for i < n with 2 devices each; returns their stderr, each process having
  ended with status `expected`."""
  port = _free_port()
  procs = [subprocess.Popen(command_of_process(i, port), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
           for i in range(n)]
  errs = []
  for proc in procs:
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    errs.append(err)
  for proc, err in zip(procs, errs):
    assert proc.returncode == expected, err[-3000:]
  return errs


def _two_processes(env, command_of_process):
  return _processes(env, command_of_process)


@pytest.fixture(scope="module")
def single_run(env, tmp_path_factory):
  """The tiny config trained in one process on 4 devices: (run dir, CompletedProcess)."""
  single_dir = str(tmp_path_factory.mktemp("multihost") / "single")
  return single_dir, _one_process(env, _command(single_dir))


def test_two_processes_match_one(env, tmp_path, single_run):
  single_dir, single = single_run
  multi_dir = str(tmp_path / "multi")
  errs = _two_processes(env, lambda i, port: _command(
      multi_dir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"))
  for i, err in enumerate(errs):
    assert f"mesh (data=4, fsdp=1, model=1); process {i}/2; devices: 2 local, 4 global" in err
  assert "process 0/1; devices: 4 local, 4 global" in single.stderr

  single_loss, single_norm = _losses(single_dir)
  multi_loss, multi_norm = _losses(multi_dir)
  # Same global batches and mesh; only the cross-process reductions (gloo) may round differently.
  np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-6, atol=0)
  np.testing.assert_allclose(multi_norm, single_norm, rtol=1e-6, atol=0)
  assert os.path.isdir(os.path.join(multi_dir, "checkpoints", str(STEPS)))


def test_evaluation_drivers_across_processes(env, tmp_path):
  """Rank classification and greedy decoding of a tiny MHR model on a (data=2, model=2) mesh spanning two
  processes equal the same mesh in one process."""
  worker = os.path.join(REPO, "tests", "multihost_eval_worker.py")
  env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))}
  single, multi = str(tmp_path / "single.json"), str(tmp_path / "multi.json")
  _one_process(env, [sys.executable, worker, "0", "1", "0", single])
  _two_processes(env, lambda i, port: [sys.executable, worker, str(i), "2", str(port), multi])
  with open(single) as f, open(multi) as g:
    one, two = json.load(f), json.load(g)
  np.testing.assert_allclose(two["scores"], one["scores"], rtol=1e-6, atol=0)
  assert two["tokens"] == one["tokens"] and two["accuracy"] == one["accuracy"]
  assert len(set(map(tuple, one["tokens"]))) > 1  # the rows decode differently (routing by task id)


ADAPT_STEPS = 4


def _adapt(pretrain_dir, model_dir, *extra):
  """The arguments of `python -m mhr_jax.train` adapting MHR from `pretrain_dir`: 2 tasks x 2 seeds."""
  return ["-m", "mhr_jax.train", "--gin_file=configs/adapt/tiny.gin", f"--gin.PRETRAIN_DIR='{pretrain_dir}'",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={ADAPT_STEPS}", "--gin.AdaptConfig.seeds=(13, 42)",
          "--gin.RunConfig.checkpoint_every=100", *extra]


def _on(port, i):
  return [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]


@pytest.fixture(scope="module")
def two_process_adaptation(env, tmp_path_factory, single_run):
  """Few-shot adaptation of the tiny pre-training run on two processes, uninterrupted: (its directory, each
  process's stderr)."""
  multi_dir = str(tmp_path_factory.mktemp("adapt") / "multi")
  errs = _two_processes(env, lambda i, port: [sys.executable, *_adapt(single_run[0], multi_dir, *_on(port, i))])
  return multi_dir, errs


def test_adaptation_pairs_spread_over_processes(env, tmp_path, single_run, two_process_adaptation):
  """Few-shot adaptation on two processes (2 devices each): every process adapts and evaluates every
  second (task, seed) pair on its own devices, and process 0 writes the gathered results, equal to one
  process with the same 2-device mesh per pair."""
  two_devices = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  single_dir = str(tmp_path / "single")
  single = subprocess.run([sys.executable, *_adapt(single_run[0], single_dir)], cwd=REPO, env=two_devices,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert single.returncode == 0, single.stderr[-3000:]
  multi_dir, errs = two_process_adaptation
  assert "this process adapts pairs [0, 2]" in errs[0] and "this process adapts pairs [1, 3]" in errs[1]
  with open(os.path.join(single_dir, "results.json")) as f, open(os.path.join(multi_dir, "results.json")) as g:
    one, two = json.load(f), json.load(g)
  assert two["processes"] == 2 and len(two["pairs"]) == 4
  for a, b in zip(one["pairs"], two["pairs"]):
    assert (a["task"], a["seed"]) == (b["task"], b["seed"])
    np.testing.assert_allclose(b["final_loss"], a["final_loss"], rtol=1e-5)
    assert (a["rougeL"], a["exact_match"]) == (b["rougeL"], b["exact_match"])
  assert two["table"] == one["table"]
  for i in range(4):
    with open(os.path.join(single_dir, "pairs", f"{i:04d}.json")) as f, \
         open(os.path.join(multi_dir, "pairs", f"{i:04d}.json")) as g:
      assert json.load(f)["predictions"] == json.load(g)["predictions"]
  assert sorted(os.listdir(os.path.join(multi_dir, "resume"))) == ["process_0", "process_1"]
  # Each process saved its own pairs' adapted parameters.
  assert sorted(os.listdir(os.path.join(multi_dir, "checkpoints"))) == ["process_0", "process_1"]


# `python -m mhr_jax.train ARGS` whose process WHO sends itself SIGTERM when adaptation asks whether to stop
# at step id AT: the signal lands at that step whatever the machine's speed.
SIGTERM_AT_STEP = """
import os, runpy, signal, sys
import jax
from mhr_jax.stages import fewshot
at, who = int(sys.argv[1]), int(sys.argv[2])
ask = fewshot._OrbaxResume.stop_requested

def signal_then_ask(self, step_id):
  if step_id == at and jax.process_index() == who:
    os.kill(os.getpid(), signal.SIGTERM)
  return ask(self, step_id)

fewshot._OrbaxResume.stop_requested = signal_then_ask
sys.argv = ["mhr_jax.train", *sys.argv[3:]]
runpy.run_module("mhr_jax.train", run_name="__main__", alter_sys=True)
"""


def test_a_sigterm_to_one_process_stops_every_process_at_one_step(env, tmp_path, single_run,
                                                                   two_process_adaptation):
  """Few-shot adaptation spread over two processes: SIGTERM reaching process 1 alone after step 2 makes both
  save at step 2 and exit 143; the same command then finishes both with the results of the uninterrupted
  two-process run."""
  stopped = str(tmp_path / "stopped")
  errs = _processes(env, lambda i, port: [sys.executable, "-c", SIGTERM_AT_STEP, "2", "1",
                                          *_adapt(single_run[0], stopped, *_on(port, i))[2:]],
                    expected=cli.EXIT_PREEMPTED)
  saved = [re.search(r"adaptation state saved at pair group 0, step (\d+)", err) for err in errs]
  assert all(saved), errs[0][-2000:]
  assert [int(s.group(1)) for s in saved] == [2, 2]
  assert not os.path.exists(os.path.join(stopped, "results.json"))
  _processes(env, lambda i, port: [sys.executable, *_adapt(single_run[0], stopped, *_on(port, i))])
  with open(os.path.join(two_process_adaptation[0], "results.json")) as f, \
       open(os.path.join(stopped, "results.json")) as g:
    one, two = json.load(f), json.load(g)
  assert [p["task"] for p in two["pairs"]] == [p["task"] for p in one["pairs"]]
  for a, b in zip(one["pairs"], two["pairs"]):
    assert (b["final_loss"], b["rougeL"]) == (a["final_loss"], a["rougeL"])


POD_EXPERIMENT = TWO_STEP_EXPERIMENT + """
Experiment.pretrain = ('mhr',)
Experiment.adapt = ('mhr',)
Experiment.zero_shot = ('base',)
RunConfig.checkpoint_every = 100
adapt/AdaptConfig.seeds = (13, 42)
adapt/MeshConfig.data = 1
"""


def test_a_pod_simulated_on_cpu_gives_the_table_of_one_process(env, tmp_path):
  """The experiment as on a pod: 4 processes over gloo with 2 devices each, pre-training on one mesh over all
  8 devices and adaptation on each process's 2 (pairs spread over the processes), gives the same table as
  one process with 8 devices."""
  config = tmp_path / "pod.gin"
  config.write_text(POD_EXPERIMENT)
  base = [sys.executable, "-m", "mhr_jax.experiment", f"--gin_file={config}"]
  one = str(tmp_path / "one")
  single = subprocess.run([*base, f"--gin.MODEL_DIR='{one}'", "--gin.adapt/MeshConfig.fsdp=8"], cwd=REPO,
                          env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert single.returncode == 0, single.stderr[-3000:]
  pod = str(tmp_path / "pod")
  errs = _processes(env, lambda i, port: [*base, f"--gin.MODEL_DIR='{pod}'", "--gin.adapt/MeshConfig.fsdp=2",
                                          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=4",
                                          f"--process_id={i}"], n=4)
  assert "mesh data=8 fsdp=1 model=1 over all devices" in errs[0]
  assert "mesh data=1 fsdp=2 model=1 over each process's devices" in errs[0]
  with open(os.path.join(one, "results.json")) as f, open(os.path.join(pod, "results.json")) as g:
    reference, table = json.load(f)["summary"], json.load(g)["summary"]
  keys = ("method", "kind", "rougeL", "rougeL_std", "exact_match", "exact_match_std", "trainable_params", "seeds",
          "per_task")
  assert [{k: r[k] for k in keys} for r in table] == [{k: r[k] for k in keys} for r in reference]
