"""The study layer: the cells it plans, the report computed from cell results alone (paired observations,
crossed bootstrap, verdicts, dev-only tuning, the sweep), and a tiny study run end to end through a kill -9."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mhr_jax.experiment import statistics, study, study_report
from mhr_jax.errors import ConfigError, RunError
from tiny_runs import TWO_STEP_EXPERIMENT, kill_at_checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD_S = 3600  # only against a hung run


def _study(tmp_path, **kw):
  values = dict(model_dir=str(tmp_path / "s"), pretrain_seeds=(0, 1), adapt_seeds=(13, 42),
                sweep=("AdapterConfig.n_splits", (1, 8)), sweep_bindings=("Experiment.pretrain = ('mhr',)",),
                sweep_stages=("adapt/mhr",))
  values.update(kw)
  return study.Study(**values)


def test_cells_cover_seeds_and_sweep_values(tmp_path):
  cells = study.cells(_study(tmp_path))
  assert [(c.name, c.role, c.seed, c.value) for c in cells] == [
      ("base", "base", None, None), ("seed0", "main", 0, None), ("seed1", "main", 1, None),
      ("seed0-n_splits1", "sweep", 0, 1), ("seed1-n_splits1", "sweep", 1, 1),
      ("seed0-n_splits8", "sweep", 0, 8), ("seed1-n_splits8", "sweep", 1, 8)]
  root = str(tmp_path / "s")
  base_run = os.path.join(root, "base", "base")
  for c in cells:
    assert c.directory == os.path.join(root, c.name)
    assert f"Experiment.model_dir = {c.directory!r}" in c.bindings
    assert "adapt/AdaptConfig.seeds = (13, 42)" in c.bindings
    if c.role != "base":  # every other cell starts from the one base, with its own pre-training seed
      assert f"Experiment.base_run = {base_run!r}" in c.bindings
      assert f"pretrain/RunConfig.seed = {c.seed}" in c.bindings and f"mu/RunConfig.seed = {c.seed}" in c.bindings
  sweep = [c for c in cells if c.role == "sweep"]
  assert all(f"AdapterConfig.n_splits = {c.value}" in c.bindings and "Experiment.pretrain = ('mhr',)" in c.bindings
             for c in sweep)
  # Stages that start from the base run once, in the base cell, and the main cells leave them out.
  lists = {"adapt": ("mhr", "full"), "controls": ("lora",), "zero_shot": ("base", "mhr-mu")}
  shared = study.cells(_study(tmp_path, shared=("zeroshot/base", "adapt/full"), sweep_seeds=(0,)), lists=lists)
  assert {"Experiment.adapt = ('full',)", "Experiment.controls = ()", "Experiment.zero_shot = ('base',)"} <= set(
      shared[0].bindings)
  assert {"Experiment.adapt = ('mhr',)", "Experiment.controls = ('lora',)",
          "Experiment.zero_shot = ('mhr-mu',)"} <= set(shared[1].bindings)
  assert [c.name for c in shared if c.role == "sweep"] == ["seed0-n_splits1", "seed0-n_splits8"]
  with pytest.raises(ConfigError, match=r"Study.shared: 'ia3' is not in Experiment.adapt"):
    study.cells(_study(tmp_path, shared=("adapt/ia3",)), lists=lists)
  # A Hugging Face base (Experiment.base_checkpoint): nothing to train once, every cell starts from it.
  from_hf = study.cells(_study(tmp_path), trains_base=False)
  assert [c.name for c in from_hf] == [c.name for c in cells[1:]]
  assert not any("base_run" in b for c in from_hf for b in c.bindings)


@pytest.mark.parametrize("changes, expected", [
    ({"pretrain_seeds": (0, 0)}, "Study seeds must be distinct"),
    ({"sweep": ("AdapterConfig.n_splits",)}, "Study.sweep="),
    ({"hypotheses": ({"id": "H1", "claim": "c", "a": "adapt/mhr", "b": "adapt/poly"},)}, "missing 'test'"),
    ({"hypotheses": ({"id": "H1", "claim": "c", "a": "adapt/mhr", "b": "adapt/poly", "test": "better"},)},
     "test='better'"),
    ({"hypotheses": ({"id": "H1", "claim": "c", "a": "train/mhr", "b": "adapt/poly", "test": "superiority"},)},
     "'train/mhr' is not a stage of kind"),
    ({"model_dir": ""}, "Study.model_dir is empty"),
])
def test_bad_study_settings_are_one_line(tmp_path, changes, expected):
  with pytest.raises(ConfigError) as info:
    _study(tmp_path, **changes)
  assert expected in str(info.value).splitlines()[0]  # gin adds context lines; the CLI keeps the first


# ---------------------------------------------------------------------------- the report, from files

TASKS = ("t_a", "t_b", "t_c")
PSEEDS = (0, 1)
ASEEDS = (13, 42)


def _value(method, task, pseed, aseed):
  """A deterministic, method-dependent metric with task and seed effects."""
  offset = {"mhr": 3.0, "poly": 1.0, "lora": 0.0, "mhr-z@slow": -4.0, "mhr-z@fast": 1.5}[method]
  return 40.0 + offset + 5.0 * TASKS.index(task) + 0.7 * pseed + 0.1 * (aseed % 7)


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _fake_study(root):
  """Cell result files as a study's cells write them, and the study plan, without any training."""
  cells = [{"name": "base", "dir": os.path.join(root, "base"), "role": "base", "seed": None, "value": None}]
  cells += [{"name": f"seed{s}", "dir": os.path.join(root, f"seed{s}"), "role": "main", "seed": s, "value": None}
            for s in PSEEDS]
  cells += [{"name": f"seed{s}-n_splits1", "dir": os.path.join(root, f"seed{s}-n_splits1"), "role": "sweep",
             "seed": s, "value": 1} for s in PSEEDS]
  # Full fine-tuning from the shared base ran once, in the base cell.
  _write(os.path.join(root, "base", "adapt", "full", "results.json"), {"status": "done", "pairs": [
      {"task": t, "seed": a, "rougeL": 30.0 + TASKS.index(t)} for t in TASKS for a in ASEEDS]})
  for c in cells[1:]:
    methods = ("mhr", "poly", "lora", "mhr-z@slow", "mhr-z@fast") if c["role"] == "main" else ("mhr",)
    for m in methods:
      shift = -2.0 if c["role"] == "sweep" else 0.0
      pairs = [{"task": t, "seed": a, "rougeL": _value(m, t, c["seed"], a) + shift,
                "best_dev_score": _value(m, t, c["seed"], a) + 0.5} for t in TASKS for a in ASEEDS]
      _write(os.path.join(c["dir"], "adapt", m, "results.json"), {"status": "done", "pairs": pairs})
    if c["role"] == "main":
      for name, level in (("lora", 10.0), ("mhr-mu", 12.0)):
        _write(os.path.join(c["dir"], "zeroshot", name, "results.json"),
               {"status": "done", "pairs": [{"task": t, "seed": 13, "rougeL": level + i} for i, t in enumerate(TASKS)]})
      for kind, cosine in (("mhr", 0.5), ("poly", 0.3), ("lora", 0.35)):
        _write(os.path.join(c["dir"], "analysis", kind, "analysis.json"),
               {"mean_pairwise_gradient_cosine": cosine + 0.01 * c["seed"]})
  plan = {"model_dir": root, "cells": cells, "metric": "rougeL", "tune": {"adapt/mhr-z": ["adapt/mhr-z@slow", "adapt/mhr-z@fast"]},
          "sweep": ["AdapterConfig.n_splits", [1]], "sweep_main_value": 4, "sweep_stages": ["adapt/mhr"],
          "statistics": {"n_resamples": 2000, "confidence": 0.95, "seed": 0}, "shared": ["adapt/full"],
          "hypotheses": [
              {"id": "H1", "claim": "mhr beats poly", "a": "adapt/mhr", "b": "adapt/poly", "test": "superiority"},
              {"id": "H2", "claim": "mhr-z near lora", "a": "adapt/mhr-z", "b": "adapt/lora",
               "test": "non-inferiority", "margin": 2.0},
              {"id": "H3", "claim": "alignment", "a": "analysis/mhr", "b": "max(analysis/poly, analysis/lora)",
               "test": "superiority"},
              {"id": "H4", "claim": "lora beats mhr", "a": "adapt/lora", "b": "adapt/mhr", "test": "superiority"},
              {"id": "H5", "claim": "mhr beats the mean", "a": "adapt/mhr", "b": "mean(adapt/lora, adapt/poly)",
               "test": "superiority"},
              {"id": "H6", "claim": "zero-shot", "a": "zeroshot/mhr-mu", "b": "zeroshot/lora", "test": "superiority"},
              {"id": "H7", "claim": "full", "a": "adapt/poly", "b": "adapt/full", "test": "superiority"}]}
  _write(os.path.join(root, study_report.PLAN_FILE), plan)
  return plan


def test_report_from_cell_results(tmp_path):
  root = str(tmp_path / "s")
  _fake_study(root)
  files = study_report.report(root)
  with open(files["json"]) as f:
    results = json.load(f)
  rows = {r["id"]: r for r in results["hypotheses"]}
  # Few-shot: one paired difference per (task, pre-training seed, adaptation seed).
  assert rows["H1"]["n"] == len(TASKS) * len(PSEEDS) * len(ASEEDS)
  for obs in rows["H1"]["observations"]:
    pseed, aseed = obs["seeds"]
    assert obs["diff"] == pytest.approx(_value("mhr", obs["task"], pseed, aseed) - _value("poly", obs["task"], pseed,
                                                                                         aseed))
  assert rows["H1"]["mean_diff"] == pytest.approx(2.0) and rows["H1"]["verdict"] == "supported"
  assert rows["H4"]["verdict"] == "contradicted"
  # The interval is the crossed bootstrap of exactly the stored observations (anyone can recompute it).
  again = statistics.paired_bootstrap(rows["H1"]["observations"], n_resamples=2000, confidence=0.95, seed=0)
  assert (rows["H1"]["ci_low"], rows["H1"]["ci_high"]) == (again.ci_low, again.ci_high)
  # Dev-only tuning: the candidate with the better mean dev score stands for adapt/mhr-z.
  assert results["tuning"]["adapt/mhr-z"]["chosen"] == "adapt/mhr-z@fast"
  assert rows["H2"]["mean_diff"] == pytest.approx(1.5) and rows["H2"]["verdict"] == "supported"
  # Gradient alignment: one observation per pre-training seed, against the best of the others.
  assert rows["H3"]["n"] == len(PSEEDS) and rows["H3"]["mean_diff"] == pytest.approx(0.15)
  assert all(obs["task"] is None and len(obs["seeds"]) == 1 for obs in rows["H3"]["observations"])
  # mean(...) reduces observation by observation.
  assert rows["H5"]["mean_diff"] == pytest.approx(2.5)
  # Zero-shot: one observation per (task, pre-training seed).
  assert rows["H6"]["n"] == len(TASKS) * len(PSEEDS) and rows["H6"]["mean_diff"] == pytest.approx(2.0)
  assert all(len(obs["seeds"]) == 1 and obs["task"] in TASKS for obs in rows["H6"]["observations"])
  # A shared stage (run once, in the base cell) pairs with every pre-training seed's values.
  assert rows["H7"]["n"] == len(TASKS) * len(PSEEDS) * len(ASEEDS)
  for obs in rows["H7"]["observations"]:
    pseed, aseed = obs["seeds"]
    assert obs["diff"] == pytest.approx(_value("poly", obs["task"], pseed, aseed) - 30.0 - TASKS.index(obs["task"]))
  # The sweep: the main cells give the main value (4), the sweep cells the others.
  curve = results["sweep"]["curves"]["adapt/mhr"]
  assert [p["value"] for p in curve] == [1, 4]
  main = np.mean([_value("mhr", t, s, a) for t in TASKS for s in PSEEDS for a in ASEEDS])
  assert curve[1]["mean"] == pytest.approx(main) and curve[0]["mean"] == pytest.approx(main - 2.0)
  for name in ("forest", "sweep", "alignment"):
    with open(files[name], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(files["markdown"]) as f:
    text = f.read()
  assert "| H1 | mhr beats poly | adapt/mhr - adapt/poly | superiority |" in text and "**supported**" in text


def test_report_names_what_is_missing(tmp_path):
  root = str(tmp_path / "s")
  plan = _fake_study(root)
  plan["hypotheses"].append({"id": "H8", "claim": "c", "a": "zeroshot/lora", "b": "adapt/lora", "test": "superiority"})
  _write(os.path.join(root, study_report.PLAN_FILE), plan)
  with pytest.raises(RunError, match="H8: zeroshot/lora and adapt/lora have no observation in common"):
    study_report.report(root)
  os.remove(os.path.join(plan["cells"][1]["dir"], "adapt", "poly", "results.json"))
  with pytest.raises(RunError, match="seed0/adapt/poly has no results"):
    study_report.report(root)


# ---------------------------------------------------------------------------- end to end, through a kill -9

TINY_STUDY = TWO_STEP_EXPERIMENT + """
Experiment.pretrain = ('mhr', 'lora')
Experiment.adapt = ('mhr', 'lora')
RunConfig.checkpoint_every = 1
Study.model_dir = %MODEL_DIR
Study.pretrain_seeds = (0,)
Study.adapt_seeds = (13,)
Study.n_resamples = 200
Study.hypotheses = ({'id': 'H1', 'claim': 'MHR beats LoRA', 'a': 'adapt/mhr', 'b': 'adapt/lora',
                     'test': 'superiority'},)
"""
KILL_AT_CHECKPOINTER = kill_at_checkpointer("mhr_jax.experiment.study")


def test_a_study_resumes_after_kill_9_and_reports_its_cells(env, tmp_path):
  config = tmp_path / "study.gin"
  config.write_text(TINY_STUDY)
  model_dir = str(tmp_path / "study")
  flags = [f"--gin_file={config}", f"--gin.MODEL_DIR='{model_dir}'"]
  marker = os.path.join(model_dir, "seed0", "adapt", "mhr", "resume")
  killed = subprocess.run([sys.executable, "-c", KILL_AT_CHECKPOINTER, marker, *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert os.path.isfile(os.path.join(model_dir, study_report.PLAN_FILE))  # the hypotheses, fixed before any cell ran
  assert not os.path.exists(os.path.join(model_dir, "results.json"))
  command = [sys.executable, "-m", "mhr_jax.experiment.study", *flags]
  resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for stage in ("base", "pretrain/mhr", "pretrain/lora"):
    assert f"stage {stage}: done" in resumed.stderr
  with open(os.path.join(model_dir, "results.json")) as f:
    results = json.load(f)
  (row,) = results["hypotheses"]
  pairs = {}
  for method in ("mhr", "lora"):
    with open(os.path.join(model_dir, "seed0", "adapt", method, "results.json")) as f:
      pairs[method] = {p["task"]: p["rougeL"] for p in json.load(f)["pairs"]}
  assert row["n"] == 2 and len(row["observations"]) == 2
  for obs in row["observations"]:
    assert obs["seeds"] == [0, 13]
    assert obs["diff"] == pytest.approx(pairs["mhr"][obs["task"]] - pairs["lora"][obs["task"]])
  assert row["mean_diff"] == pytest.approx(np.mean([o["diff"] for o in row["observations"]]))
  assert row["verdict"] in statistics.VERDICTS
  # The same command on the finished study trains nothing and writes the same results.
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "======== stage" not in again.stderr
  with open(os.path.join(model_dir, "results.json")) as f:
    assert json.load(f)["hypotheses"] == results["hypotheses"]
