"""The training CLI: configs/tiny.gin end to end, resuming, HF base weights, NaN stop, bad input.

End-to-end runs are subprocesses of `python -m mhr_jax.train` (8 simulated CPU devices from conftest's
XLA_FLAGS) sharing a persistent JAX compilation cache; bad-input cases call `train.main` in-process, since
they stop before any compilation.
"""
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
from flax import traverse_util

from mhr_jax.models import param_counts
from mhr_jax import config as config_lib
from mhr_jax import cli, train
from mhr_jax.models.config import preset
from mhr_jax.checkpoints.run_state import restore_params

REPO = config_lib.REPO_ROOT


def run_cli(env, *flags, timeout=600):
  cmd = [sys.executable, "-m", "mhr_jax.train", "--gin_file=configs/tiny.gin", *flags]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tiny_run(env, tmp_path_factory):
  """A 3-step configs/tiny.gin run: (model_dir, flags, CompletedProcess)."""
  model_dir = str(tmp_path_factory.mktemp("tiny") / "run")
  flags = (f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=3")
  return model_dir, flags, run_cli(env, *flags)


def test_tiny_config_runs_and_resumes(env, tiny_run):
  model_dir, flags, first = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  log = first.stderr
  for section in ("setup", "mesh", "data", "state", "checkpoint", "loop", "results"):
    assert f"======== {section} " in log
  assert "mesh (data=8, fsdp=1, model=1); process 0/1; devices: 8 local, 8 global" in log
  assert "step/s" in log  # tqdm progress
  records = read_metrics(model_dir)
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
  assert {"tokens_per_s", "step_time_s", "grad_norm/adapters", "learning_rate/routing"} <= set(records[-1])
  with open(os.path.join(model_dir, "config.gin")) as f:
    operative = f.read()
  assert "RunConfig.train_steps = %TRAIN_STEPS" in operative and "TRAIN_STEPS = 3" in operative
  assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["3"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(model_dir, "tb")))
  with open(os.path.join(model_dir, "results.json")) as f:
    results = json.load(f)
  assert results["status"] == "done" and results["step"] == 3
  assert results["final_metrics"]["loss"] == records[-1]["loss"]
  assert f"results: {os.path.abspath(model_dir)}/results.json" in log

  # The same command again on the finished run: nothing to do, nothing rewritten.
  with open(os.path.join(model_dir, "results.json"), "rb") as f:
    finished = f.read()
  again = run_cli(env, *flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "done (results.json, step 3); nothing to do" in again.stderr
  assert read_metrics(model_dir) == records
  with open(os.path.join(model_dir, "results.json"), "rb") as f:
    assert f.read() == finished


def test_adapt_from_pretraining_run(env, tiny_run, tmp_path):
  """MHR-z through the CLI: one fresh routing row per pair trains, the skill inventory stays put; the
  parameters of the step with the best dev ROUGE-L are kept (best-on-dev); the reported metrics are the
  official ones of the stored predictions against the task file's test instances."""
  from mhr_jax.evaluation import metrics
  from tasks import superni
  pretrain_dir, _, pretrained = tiny_run
  assert pretrained.returncode == 0, pretrained.stderr[-3000:]
  model_dir = str(tmp_path / "adapt")
  result = subprocess.run(
      [sys.executable, "-m", "mhr_jax.train", "--gin_file=configs/adapt/tiny.gin",
       f"--gin.PRETRAIN_DIR='{pretrain_dir}'", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2",
       "--gin.AdaptConfig.method='mhr-z'", "--gin.AdaptConfig.seeds=(13,)", "--gin.AdaptConfig.select_every=1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(model_dir, "results.json")) as f:
    results = json.load(f)
  suite = os.path.join(model_dir, "synthetic_data")
  test_tasks = superni.read_task_list(os.path.join(suite, "splits", "default", "test_tasks.txt"))
  assert results["method"] == "mhr-z" and results["pretrain_step"] == 3
  assert [(p["task"], p["seed"]) for p in results["pairs"]] == [(t, 13) for t in test_tasks]
  for i, pair in enumerate(results["pairs"]):
    with open(os.path.join(model_dir, "pairs", f"{i:04d}.json")) as f:
      stored = json.load(f)
    references = [inst["output"] for inst in superni.load_task(suite, pair["task"])["Instances"][:100]]
    assert len(stored["predictions"]) == 100
    assert metrics.superni_metrics(stored["predictions"], references) == {
        "exact_match": pair["exact_match"], "rougeL": pair["rougeL"]}
    assert np.isfinite(pair["final_loss"])
    assert pair["best_step"] in (1, 2) and pair["dev_metric"] == "rougeL"
    assert 0.0 <= pair["best_dev_score"] <= 100.0
  assert results["trainable_params_per_pair"] == 36 * 4 * 4  # 36 adapted layers x S x K: one routing row
  assert "best-on-dev: every 1 steps by dev rougeL" in result.stderr
  with open(os.path.join(model_dir, "results.md")) as f:
    assert f"| {test_tasks[0]} |" in f.read()
  assert [r["step"] for r in read_metrics(model_dir)] == [1, 2]
  adapted = restore_params(os.path.join(model_dir, "checkpoints"), 2)  # frozen inventory + trained routing
  before = restore_params(os.path.join(pretrain_dir, "checkpoints"), 3)
  layer = adapted["encoder"]["block_0"]["self_attention"]["q"]
  np.testing.assert_array_equal(np.asarray(layer["lora_a"]), np.asarray(
      before["encoder"]["block_0"]["self_attention"]["q"]["lora_a"]))
  logits = np.asarray(layer["routing"]["logits"])
  assert logits.shape == (2, 1, 4, 4)  # (pairs, one new task row, S, K)
  assert np.max(np.abs(logits)) > 1e-3  # moved beyond its U(-1e-3, 1e-3) init

  # The same command on the finished run: nothing to do, results untouched. Stopped after its last
  # checkpoint but before results.json (here: results.json removed), it completes with the same results.
  command = result.args
  with open(os.path.join(model_dir, "results.json"), "rb") as f:
    finished = f.read()
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "done (results.json, 2 steps); nothing to do" in again.stderr
  with open(os.path.join(model_dir, "results.json"), "rb") as f:
    assert f.read() == finished
  os.remove(os.path.join(model_dir, "results.json"))
  window = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert window.returncode == 0, window.stderr[-3000:]
  with open(os.path.join(model_dir, "results.json")) as f:
    completed = json.load(f)
  assert completed["pairs"] == results["pairs"]


def _tiny_base(nan_at=None):
  """Random base weights of the tiny preset (numpy), optionally with one NaN entry."""
  cfg = preset("tiny")
  rng = np.random.default_rng(0)
  abstract = param_counts.abstract_params(cfg)
  flat = {k: rng.normal(0, 0.05, v.shape).astype(np.float32)
          for k, v in traverse_util.flatten_dict(abstract).items()}
  if nan_at is not None:
    flat[nan_at][0, 0] = np.nan
  return cfg, traverse_util.unflatten_dict(flat)


def test_hf_base_weights_and_nonfinite_stop(env, tmp_path):
  from mhr_jax.checkpoints import save_hf_t5
  hf_dir = str(tmp_path / "hf")
  cfg, base = _tiny_base(nan_at=("encoder", "block_0", "mlp", "wo", "kernel"))
  save_hf_t5(hf_dir, cfg, base)
  model_dir = str(tmp_path / "run")
  result = run_cli(env, f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=3",
                   f"--gin.RunConfig.init_checkpoint='{hf_dir}'")
  assert result.returncode == cli.EXIT_NONFINITE, result.stderr[-3000:]
  # The merge reports the adapter parameters the HF checkpoint lacks.
  assert f"starting weights: {hf_dir} (" in result.stderr
  assert "model params not in base (kept): decoder/block_0/cross_attention/k/lora_a" in result.stderr
  (line,) = error_lines(result.stderr)
  assert "non-finite" in line and "at step 1" in line and "adapters" in line
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(model_dir, "checkpoints", "1"))


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def existing_run(tmp_path):
  """A run directory as a tiny run leaves it (config.gin of the default tiny config, metrics)."""
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  config_lib.parse_gin(["configs/tiny.gin"], [f"MODEL_DIR = '{model_dir}'"])
  config_lib.write_run_files(config_lib.load_config(), config_lib.operative_config())
  (model_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
  gin.clear_config()
  return model_dir


def _snapshot(directory):
  return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("flags, expected", [
    (["--gin.RunConfig.trainsteps=3"], "Configurable 'RunConfig' doesn't have a parameter named 'trainsteps'"),
    (["--gin.MeshConfig.data=3"], "MeshConfig"),
    (["--gin.DataConfig.batch_size=12"], "DataConfig.batch_size=12 is not divisible by the mesh batch axes"),
    (["--gin.AdapterConfig.n_splits=2"], "holds a run with a different model/adapter config "
                                         "(AdapterConfig.n_splits: saved 4, now 2)"),
    (["--gin.RunConfig.mode='adapt'"], "RunConfig.mode='adapt' starts from RunConfig.pretrain_dir"),
    (["--gin.RunConfig.init_run='/nonexistent/run'"], "RunConfig.init_run='/nonexistent/run': no config.gin there"),
    (["--gin.RunConfig.init_checkpoint='/nonexistent/hf'"], "RunConfig.init_checkpoint='/nonexistent/hf': "
                                                            "no such directory"),
    (["--gin.AdapterConfig.anneal_steps=41"], "AdapterConfig.anneal_steps=41 exceeds RunConfig.train_steps=40"),
    (["--gin.AdaptConfig.eval_batch_size=0"], "AdaptConfig.eval_batch_size=0: must be >= 1"),
    (["--gin.AdapterConfig.n_splits=3"], "adapter.n_splits=3 must divide the widths of every adapted layer"),
])
def test_bad_input_is_one_line_and_writes_nothing(existing_run, flags, expected, capsys):
  before = _snapshot(existing_run)
  status = train.main(["--gin_file=configs/tiny.gin", f"--gin.MODEL_DIR='{existing_run}'", *flags])
  err = capsys.readouterr().err
  assert status == cli.EXIT_CONFIG_ERROR
  (line,) = error_lines(err)
  assert expected in line
  assert "Traceback" not in err
  assert _snapshot(existing_run) == before


def test_a_model_that_cannot_be_built_is_one_line_in_a_new_directory(tmp_path, capsys):
  """Heads that do not divide the layer widths: exit 2 with one line naming the key; nothing written."""
  model_dir = tmp_path / "new"
  status = train.main(["--gin_file=configs/tiny.gin", f"--gin.MODEL_DIR='{model_dir}'",
                       "--gin.AdapterConfig.n_splits=3"])
  err = capsys.readouterr().err
  assert status == cli.EXIT_CONFIG_ERROR and "Traceback" not in err
  (line,) = error_lines(err)
  assert line.startswith("error: adapter.n_splits=3 must divide")
  assert not model_dir.exists()


def test_adapt_without_pretraining_checkpoint(existing_run, tmp_path, capsys):
  """existing_run has a config.gin but no checkpoint: refused before the adaptation run dir exists."""
  model_dir = tmp_path / "adapt"
  before = _snapshot(existing_run)
  status = train.main(["--gin_file=configs/adapt/tiny.gin", f"--gin.PRETRAIN_DIR='{existing_run}'",
                       f"--gin.MODEL_DIR='{model_dir}'"])
  assert status == cli.EXIT_CONFIG_ERROR
  (line,) = error_lines(capsys.readouterr().err)
  assert line == (f"error: RunConfig.pretrain_dir='{existing_run}': no checkpoint in {existing_run}/checkpoints "
                  "(run or resume its pre-training first)")
  assert not model_dir.exists()
  assert _snapshot(existing_run) == before
  status = train.main(["--gin_file=configs/adapt/tiny.gin", f"--gin.PRETRAIN_DIR='{tmp_path}/none'",
                       f"--gin.MODEL_DIR='{model_dir}'"])
  assert status == cli.EXIT_CONFIG_ERROR
  assert "no config.gin there (not a run directory)" in error_lines(capsys.readouterr().err)[0]
  assert not model_dir.exists()


def test_missing_model_dir_flag(capsys):
  assert train.main(["--gin_file=configs/tiny.gin"]) == cli.EXIT_CONFIG_ERROR
  (line,) = error_lines(capsys.readouterr().err)
  assert line.startswith("error: MODEL_DIR is required: pass --gin.MODEL_DIR=")


def test_flag_parsing():
  parser = cli.flag_parser("prog", "")
  args = cli.parse_flags(parser, ["--gin_file=a.gin", "--gin.MODEL_DIR='/x'", "--gin_file=b.gin",
                            "--gin_bindings=RunConfig.seed = 3", "--gin.TRAIN_STEPS=4",
                            "--gin_search_paths=/p1,/p2", "--gin_search_paths=/p3"])
  assert args.gin_file == ["a.gin", "b.gin"]
  assert args.gin_bindings == ["MODEL_DIR = '/x'", "RunConfig.seed = 3", "TRAIN_STEPS = 4"]
  assert args.gin_search_paths == ["/p1", "/p2", "/p3"]
  with pytest.raises(config_lib.ConfigError, match="expected --gin.KEY=VALUE"):
    cli.parse_flags(parser, ["--gin_file=a.gin", "--gin.MODEL_DIR"])


# ------------------------------------------------------------------------------------------ throughput


def _dot_flops(jaxpr) -> int:
  """Independent count: 2 x (output size) x (contracted size) over every dot_general, sub-jaxprs included."""
  from jax.extend import core as jcore
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contracting]))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jcore.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          total += _dot_flops(sub)
  return total


@pytest.mark.parametrize("overrides", [
    dict(num_layers=3, num_decoder_layers=2, d_model=48, vocab_size=300),
    dict(feed_forward_proj="relu", tie_word_embeddings=True),
])
def test_train_flops_match_the_traced_matmuls(overrides):
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from mhr_jax import models
  from mhr_jax.logging_utils import train_flops_per_step
  cfg = preset("tiny", **overrides)
  model = models.T5(cfg)
  batch, input_len, target_len = 3, 24, 8
  enc, dec = jnp.ones((batch, input_len), jnp.int32), jnp.ones((batch, target_len), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), enc, dec, dec, enable_dropout=False))["params"]
  loss = lambda p: model.apply({"params": p}, enc, dec, dec, enable_dropout=False).sum()
  forward = _dot_flops(jax.make_jaxpr(loss)(params).jaxpr)
  training = _dot_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  assert train_flops_per_step(cfg, batch, input_len, target_len, trains_base=True) == training
  assert train_flops_per_step(cfg, batch, input_len, target_len, trains_base=False) == 2 * forward


def test_throughput_and_mfu(monkeypatch):
  from mhr_jax import logging_utils
  clock = iter([100.0, 102.0])
  monkeypatch.setattr(logging_utils.time, "perf_counter", lambda: next(clock))
  meter = logging_utils.Throughput(flops_per_step=5e12, peak_flops_total=1e13)
  meter.add(1, 300.0)
  meter.add(1, 100.0)
  out = meter.measure()
  assert out == {"step_time_s": 1.0, "steps_per_s": 1.0, "tokens_per_s": 200.0, "mfu": 0.5}


def test_cpu_mfu_uses_measured_matmul_rate():
  from mhr_jax import logging_utils
  assert logging_utils.peak_flops_per_device() is None  # CPU: no datasheet peak ...
  peak = logging_utils.peak_flops_total()                # ... so the measured matmul rate stands in
  assert 1e8 < peak < 1e13
