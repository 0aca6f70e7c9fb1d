"""The experiment command end to end at the smallest sizes: every stage, the results files and their
consistency, skipping finished stages, a kill -9 in the middle of a stage, and one-line config errors."""
import argparse
import csv
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mhr_jax import cli
from mhr_jax.experiment import runner as experiment
from mhr_jax import config as config_lib
from tiny_runs import TINY_EXPERIMENT, kill_at_checkpointer

REPO = config_lib.REPO_ROOT
# Only against a hung run: one experiment run below took 300 s on a loaded 2-core machine.
HANG_GUARD_S = 3600
TINY = TINY_EXPERIMENT + """
Experiment.pretrain = ('mhr', 'lora')
Experiment.adapt = ('mhr', 'mhr-z', 'mhr-mu', 'lora')
Experiment.controls = ('lora',)
Experiment.zero_shot = ('base', 'mhr-mu')
Experiment.mu_steps = 2
Experiment.analysis_grad_batches = 1
RunConfig.checkpoint_every = 2
base/RunConfig.train_steps = 3
pretrain/RunConfig.train_steps = 3
adapt/RunConfig.train_steps = 2
adapt/AdaptConfig.seeds = (13, 42)
"""
ROWS = ["base (zero-shot)", "mhr-mu (zero-shot)", "mhr", "mhr-z", "mhr-mu", "lora", "lora (no pre-training)"]
STAGES = ["base", "pretrain/mhr", "pretrain/lora", "pretrain/mhr-mu", "zeroshot/base", "zeroshot/mhr-mu",
          "adapt/mhr", "adapt/mhr-z", "adapt/mhr-mu", "adapt/lora", "control/lora", "analysis/mhr"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "tiny_experiment.gin"
  path.write_text(TINY)
  return str(path)


def _command(config_file, model_dir, *flags):
  return [sys.executable, "-m", "mhr_jax.experiment", f"--gin_file={config_file}", f"--gin.MODEL_DIR='{model_dir}'",
          *flags]


def _run(env, config_file, model_dir, *flags):
  return subprocess.run(_command(config_file, model_dir, *flags), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=HANG_GUARD_S)


def _read(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def finished(env, config_file, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("exp") / "run")
  return model_dir, _run(env, config_file, model_dir)


def test_experiment_end_to_end(finished, env, config_file):
  model_dir, result = finished
  assert result.returncode == 0, result.stderr[-4000:]
  plan = _read(os.path.join(model_dir, "plan.json"))
  assert [s["name"] for s in plan["stages"]] == STAGES
  report = _read(os.path.join(model_dir, "results.json"))
  rows = {r["method"]: r for r in report["summary"]}
  assert [r["method"] for r in report["summary"]] == ROWS
  assert report["metric"] == "rougeL"
  for name, row in rows.items():
    stage = _read(os.path.join(model_dir, *row["stage"].split("/"), "results.json"))
    assert stage["status"] == "done"
    # The summary is the stage's pairs: per seed the mean over held-out tasks, then mean and std over seeds.
    for metric in ("rougeL", "exact_match"):
      per_seed = {}
      for pair in stage["pairs"]:
        per_seed.setdefault(pair["seed"], []).append(pair[metric])
      values = [np.mean(v) for v in per_seed.values()]
      assert row[metric] == pytest.approx(np.mean(values)) and row[f"{metric}_std"] == pytest.approx(np.std(values))
      assert 0.0 <= row[metric] <= 100.0
    assert row["seeds"] == ([13] if "zero-shot" in name else [13, 42])
    assert row["kind"] == ("zero-shot" if "zero-shot" in name else "control" if "no pre-training" in name else "few-shot")
    assert row["wall_time_s"] > 0
  # Trainable parameters per task: 36 adapted layers of the tiny T5.
  assert rows["mhr-z"]["trainable_params"] == 36 * 2 * 2           # one routing row (S x K per layer)
  assert rows["mhr-mu"]["trainable_params"] == rows["lora"]["trainable_params"] > 0
  assert rows["mhr"]["trainable_params"] == 36 * 2 * 2 + 2 * rows["lora"]["trainable_params"]  # K = 2 skills
  assert rows["base (zero-shot)"]["trainable_params"] == 0
  with open(os.path.join(model_dir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [r["method"] for r in table] == ROWS
  assert [float(r["rougeL"]) for r in table] == pytest.approx([rows[m]["rougeL"] for m in ROWS])
  with open(os.path.join(model_dir, "results.md")) as f:
    markdown = f.read()
  assert all(f"| {m} |" in markdown for m in ROWS) and "## Stages" in markdown
  for png in ("methods.png", "learning_curves.png", "analysis/mhr/routing_mean.png",
              "analysis/mhr/gradient_alignment.png"):
    with open(os.path.join(model_dir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
  assert {s["stage"]: s["status"] for s in report["stages"]} == {s: "done" for s in STAGES}
  # A stage's config.gin reruns it alone: the same run directory, and nothing left to do.
  stage_dir = os.path.join(model_dir, "pretrain", "mhr")
  cfg, _ = config_lib.load_run_config([os.path.join(stage_dir, "config.gin")])
  assert (cfg.run.model_dir, cfg.model.adapter.kind, cfg.run.init_run) == (
      stage_dir, "mhr", os.path.join(model_dir, "base"))
  with open(os.path.join(stage_dir, "config.gin")) as f:
    assert f"python -m mhr_jax.train --gin_file={stage_dir}/config.gin" in f.read()
  # The same command again skips every finished stage and writes the same table.
  again = _run(env, config_file, model_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert all(f"stage {s}: done" in again.stderr for s in STAGES)
  assert "======== stage" not in again.stderr
  assert _read(os.path.join(model_dir, "results.json"))["summary"] == report["summary"]


def test_report_runs_without_jax(finished, tmp_path):
  """The tables come from the results files alone: `python -m mhr_jax.experiment.report` where JAX (and TensorFlow)
  cannot be imported rewrites the same summary."""
  model_dir, _ = finished
  reference = _read(os.path.join(model_dir, "results.json"))
  blocker = (
      "import importlib.abc, sys\n"
      "class Blocked(importlib.abc.MetaPathFinder):\n"
      "  def find_spec(self, name, path, target=None):\n"
      "    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'orbax', 'tensorflow', 'seqio'):\n"
      "      raise ImportError('blocked: ' + name)\n"
      "sys.meta_path.insert(0, Blocked())\n"
      "from mhr_jax.experiment import report\n"
      f"sys.exit(report.main(['--model_dir', {model_dir!r}]))\n")
  result = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _read(os.path.join(model_dir, "results.json"))["summary"] == reference["summary"]


def test_a_stage_is_done_only_when_its_results_say_so_at_its_steps(tmp_path):
  """stage_done: a results.json saying "preempted", or "done" at another step count, is not done."""
  from mhr_jax.experiment import plan as experiment_plan  # pylint: disable=g-import-not-at-top
  train = experiment_plan.Stage("pretrain/mhr", "train", "pretrain", str(tmp_path / "p"))
  adapt = experiment_plan.Stage("adapt/mhr", "adapt", "adapt", str(tmp_path / "a"))
  cfg = lambda steps: argparse.Namespace(run=argparse.Namespace(train_steps=steps))  # noqa: E731
  assert not experiment.stage_done(train, cfg(3))  # nothing written yet
  for stage, key in ((train, "step"), (adapt, "steps")):
    os.makedirs(stage.directory)
    for status, steps, done in (("preempted", 3, False), ("done", 2, False), ("done", 3, True)):
      with open(os.path.join(stage.directory, "results.json"), "w") as f:
        json.dump({"status": status, key: steps}, f)
      assert experiment.stage_done(stage, cfg(3)) == done, (stage.name, status, steps)


def _tmp_files(model_dir):
  return [p for p in glob.glob(os.path.join(model_dir, "**", "*"), recursive=True)
          if ".tmp" in os.path.basename(p) and not p.endswith(".orbax-checkpoint-tmp")]


KILL_AT_CHECKPOINTER = kill_at_checkpointer("mhr_jax.experiment")


def test_kill_9_then_rerun_finishes_with_the_same_table(finished, env, config_file, tmp_path):
  """SIGKILL in the middle of an adaptation stage (after pre-training: when adapt/mhr-z opens its resume
  directory), then the same command: the finished stages are skipped, the killed one continues, and the
  table equals the uninterrupted run's."""
  reference = _read(os.path.join(finished[0], "results.json"))["summary"]
  model_dir = str(tmp_path / "run")
  marker = os.path.join(model_dir, "adapt", "mhr-z", "resume")
  killed = subprocess.run([sys.executable, "-c", KILL_AT_CHECKPOINTER, marker,
                           *_command(config_file, model_dir)[3:]], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=HANG_GUARD_S)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert os.path.isdir(marker)
  assert not os.path.exists(os.path.join(model_dir, "results.json"))
  assert not os.path.exists(os.path.join(model_dir, "adapt", "mhr-z", "results.json"))
  rerun = _run(env, config_file, model_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "stage pretrain/mhr: done" in rerun.stderr
  rows = _read(os.path.join(model_dir, "results.json"))["summary"]
  keys = ("method", "kind", "rougeL", "rougeL_std", "exact_match", "exact_match_std", "trainable_params", "seeds",
          "per_task")  # everything but the wall times
  assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in reference]
  assert not _tmp_files(model_dir)


@pytest.mark.parametrize("binding, expected", [
    ("Experiment.adapt = ('mhr-q',)", "Experiment.adapt: unknown method 'mhr-q'"),
    ("Experiment.adapt = ('poly-z',)", "Experiment.adapt: 'poly-z' adapts a pre-trained 'poly' adapter; add 'poly' "
                                       "to Experiment.pretrain"),
    ("Experiment.base_checkpoint = '/nope/t5'", "Experiment.base_checkpoint='/nope/t5': no such directory"),
    ("DataConfig.source = 'superni'", "DataConfig.data_dir: required for source 'superni'"),
    ("DataConfig.data_dir = '/nope/ni'", "DataConfig.data_dir='/nope/ni': no such directory"),
    ("Experiment.controls = ('mhr-z',)", "Experiment.controls: 'mhr-z' cannot start from a plain base"),
    # Model-shape rules of every stage are checked too, before the base trains.
    ("AdapterConfig.n_splits = 3", "adapter.n_splits=3 must divide the widths of every adapted layer"),
])
def test_bad_config_is_one_line_before_anything_is_written(config_file, tmp_path, capsys, binding, expected):
  model_dir = tmp_path / "run"
  if "DataConfig.data_dir" in binding:
    binding = [binding, "DataConfig.source = 'superni'"]
  flags = [f"--gin_file={config_file}", f"--gin.MODEL_DIR='{model_dir}'"]
  flags += [f"--gin_bindings={b}" for b in ([binding] if isinstance(binding, str) else binding)]
  assert experiment.main(flags) == cli.EXIT_CONFIG_ERROR
  (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert expected in line
  assert not model_dir.exists()


def test_every_stage_mesh_is_checked_before_anything_runs(config_file, tmp_path, capsys):
  """Planned for a 4-host slice of 16 devices: the pre-training stages span all 16, adaptation each host's 4
  (pairs are spread over the hosts); a mesh that only fits all 16 is refused for the adaptation stages by
  name, before anything is written."""
  model_dir = tmp_path / "run"
  flags = [f"--gin_file={config_file}", f"--gin.MODEL_DIR='{model_dir}'", "--dry_run", "--devices=16",
           "--processes=4", "--gin.MeshConfig.data=4", "--gin.MeshConfig.fsdp=2", "--gin.MeshConfig.model=2",
           "--gin.adapt/MeshConfig.data=1"]
  assert experiment.main(flags) == 0
  err = capsys.readouterr().err
  assert "4 processes, 16 devices" in err
  assert f"{model_dir}/pretrain/mhr, 3 steps, mesh data=4 fsdp=2 model=2 over all devices" in err
  assert f"{model_dir}/adapt/mhr-z, 2 steps, mesh data=1 fsdp=2 model=2 over each process's devices" in err
  assert experiment.main(flags[:-1]) == cli.EXIT_CONFIG_ERROR
  (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert line.startswith("error: stage zeroshot/base: MeshConfig {'data': 4, 'fsdp': 2, 'model': 2}: ")
  assert "(the mesh spans each process's 4 devices)" in line
  assert not model_dir.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(config_file, tmp_path, capsys):
  model_dir = tmp_path / "run"
  assert experiment.main([f"--gin_file={config_file}", f"--gin.MODEL_DIR='{model_dir}'", "--dry_run"]) == 0
  err = capsys.readouterr().err
  for stage in STAGES:
    assert f"{stage} " in err
  assert f"{model_dir}/adapt/mhr-z, 2 steps" in err and f"{model_dir}/pretrain/mhr-mu, 2 steps" in err
  assert not model_dir.exists()
