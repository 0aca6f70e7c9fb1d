"""gs:// run directories and data, against a Cloud Storage server on loopback (tests/fake_gcs.py; conftest's
`gcs` and `bucket`): a training run killed with -9 resumes bitwise from its bucket, the experiment writes, skips
finished stages and reports there, exports appear whole, the data loaders read URLs (TensorFlow's ram:// file
system for tf.io.gfile), and a malformed or unreachable URL is one `error:` line that leaves nothing behind."""
import json
import os
import signal
import subprocess
import sys
import uuid

import flax.linen as nn
import fsspec
import gin
import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import traverse_util

import fixtures_formats as ff
from mhr_jax import cli, storage, train
from mhr_jax import config as config_lib
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.checkpoints import export_peft, import_peft, load_hf_t5, save_hf_t5
from mhr_jax.checkpoints.run_state import read_state
from mhr_jax.data import pipeline as data
from mhr_jax.errors import RunError
from mhr_jax.experiment import report, runner
from mhr_jax.logging_utils import MetricsJsonl
from mhr_jax.models import T5, preset
from tasks import superni, t0
from tiny_runs import TINY_EXPERIMENT

REPO = config_lib.REPO_ROOT
STEPS = 8  # tiny.gin checkpoints every 5 steps
KILL_AT = 7
TIMING_KEYS = {"step_time_s", "steps_per_s", "tokens_per_s", "mfu"}
HANG_GUARD_S = 1800


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def train_flags(model_dir):
  return ["--gin_file=configs/tiny.gin", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}"]


def without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# `python -m mhr_jax.train ARGS` killed with SIGKILL as soon as it has logged step STEP, after waiting for the
# checkpoint saves it started (the one at step 5): the kill lands at that step with that checkpoint complete,
# whatever the machine's load.
KILL_AT_STEP = """
import os, runpy, signal, sys
from mhr_jax import logging_utils
from mhr_jax.checkpoints import run_state
step = int(sys.argv[1])
checkpointers = []
init = run_state.RunCheckpointer.__init__

def remember(self, *args, **kwargs):
  init(self, *args, **kwargs)
  checkpointers.append(self)

write = logging_utils.MetricsJsonl.write

def write_then_kill(self, at, record):
  write(self, at, record)
  if at == step:
    for checkpointer in checkpointers:
      checkpointer.wait()
    os.kill(os.getpid(), signal.SIGKILL)

run_state.RunCheckpointer.__init__ = remember
logging_utils.MetricsJsonl.write = write_then_kill
sys.argv = ["mhr_jax.train", *sys.argv[2:]]
runpy.run_module("mhr_jax.train", run_name="__main__", alter_sys=True)
"""


def test_training_killed_in_a_bucket_resumes_bitwise(env, gcs, bucket, tmp_path):
  reference = str(tmp_path / "local")
  done = subprocess.run([sys.executable, "-m", "mhr_jax.train", *train_flags(reference)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert done.returncode == 0, done.stderr[-3000:]

  run = f"gs://{bucket}/run"
  remote_env = {**env, **gcs.env}
  killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(KILL_AT), *train_flags(run)], cwd=REPO,
                          env=remote_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=HANG_GUARD_S)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  objects = gcs.objects(bucket)
  assert "run/checkpoints/5/commit_success.txt" in objects and "run/results.json" not in objects
  assert storage.read_jsonl(f"{run}/metrics.jsonl")[-1]["step"] < STEPS

  resumed = subprocess.run([sys.executable, "-m", "mhr_jax.train", *train_flags(run)], cwd=REPO,
                           env=remote_env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {run}/checkpoints/5" in resumed.stderr

  got, want = storage.read_jsonl(f"{run}/metrics.jsonl"), storage.read_jsonl(f"{reference}/metrics.jsonl")
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  assert without_timing(got) == without_timing(want)  # exact float equality, every logged metric
  got_state = read_state(f"{run}/checkpoints", STEPS)
  want_state = read_state(os.path.join(reference, "checkpoints"), STEPS)
  assert sorted(got_state) == sorted(want_state) and any(k.startswith("opt_state/") for k in got_state)
  for key, value in want_state.items():
    np.testing.assert_array_equal(got_state[key], value, err_msg=key)
  # The same files as a local run; TensorBoard events uploaded from both processes' writers.
  assert storage.read_json(f"{run}/results.json")["status"] == "done"
  local_files = {"config.gin", "run_config.json", "metrics.jsonl", "results.json"}
  assert local_files <= set(os.listdir(reference)) and local_files <= set(storage.listdir(run))
  assert len(storage.listdir(f"{run}/tb")) == 2 and len(os.listdir(os.path.join(reference, "tb"))) == 1


EXPERIMENT = TINY_EXPERIMENT + """
BASE = %gin.REQUIRED
Experiment.base_checkpoint = %BASE
Experiment.pretrain = ('mhr',)
Experiment.adapt = ('mhr',)
Experiment.controls = ()
Experiment.zero_shot = ()
Experiment.analysis_grad_batches = 1
RunConfig.checkpoint_every = 2
pretrain/RunConfig.train_steps = 3
adapt/RunConfig.train_steps = 2
adapt/AdaptConfig.seeds = (13,)
"""
STAGES = ["pretrain/mhr", "adapt/mhr", "analysis/mhr"]


def random_params(cfg, seed):
  """Unboxed float32 params of models.T5(cfg), every leaf drawn (LoRA's B starts at zero otherwise)."""
  tokens = np.ones((1, 4), np.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(T5(cfg).init(jax.random.key(0), tokens, tokens, tokens,
                                                         task_ids=np.zeros((1,), np.int32)))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1, shapes)


def test_experiment_writes_skips_finished_stages_and_reports_in_a_bucket(env, gcs, bucket, tmp_path):
  base = f"gs://{bucket}/hf_base"  # a Hugging Face base directory in the bucket
  save_hf_t5(base, preset("tiny"), random_params(preset("tiny"), 0))
  config = tmp_path / "experiment.gin"
  config.write_text(EXPERIMENT)
  model_dir = f"gs://{bucket}/exp"
  command = [sys.executable, "-m", "mhr_jax.experiment", f"--gin_file={config}", f"--gin.MODEL_DIR='{model_dir}'",
             f"--gin.BASE='{base}'"]
  remote_env = {**env, **gcs.env}

  first = subprocess.run(command, cwd=REPO, env=remote_env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert first.returncode == 0, first.stderr[-3000:]
  objects = set(gcs.objects(bucket))
  for stage in STAGES:
    assert f"exp/{stage}/{'analysis' if stage.startswith('analysis') else 'results'}.json" in objects
  assert {"exp/plan.json", "exp/results.json", "exp/results.md", "exp/results.csv", "exp/methods.png",
          "exp/learning_curves.png", "exp/pretrain/mhr/metrics.jsonl", "exp/pretrain/mhr/config.gin",
          "exp/adapt/mhr/metrics.jsonl", "exp/analysis/mhr/routing_mean.png"} <= objects
  assert any(name.startswith("exp/pretrain/mhr/checkpoints/3/") for name in objects)
  assert any(name.startswith("exp/synthetic_data/tasks/") for name in objects)  # the data, read back from there
  written = storage.read_json(f"{model_dir}/results.json")
  (row,) = written["summary"]
  assert row["method"] == "mhr" and 0.0 <= row["rougeL"] <= 100.0
  assert storage.read_json(f"{model_dir}/pretrain/mhr/results.json")["model_dir"] == f"{model_dir}/pretrain/mhr"

  again = subprocess.run(command, cwd=REPO, env=remote_env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert again.returncode == 0, again.stderr[-3000:]
  for stage in STAGES:
    assert f"stage {stage}: done" in again.stderr
  assert "======== stage" not in again.stderr

  tables = subprocess.run([sys.executable, "-m", "mhr_jax.experiment.report", f"--model_dir={model_dir}"],
                          cwd=REPO, env=remote_env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert tables.returncode == 0, tables.stderr[-3000:]
  assert "| mhr | few-shot |" in tables.stdout and f"results: {model_dir}/results.md" in tables.stdout
  assert storage.read_json(f"{model_dir}/results.json")["summary"] == written["summary"]


def test_exports_to_a_bucket_appear_whole(gcs, bucket, monkeypatch):
  base, peft_dir = f"gs://{bucket}/base", f"gs://{bucket}/peft"
  cfg = preset("tiny", adapter=AdapterConfig(kind="lora", rank=2))
  params = random_params(cfg, 1)
  flat = traverse_util.flatten_dict(params)
  base_params = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not k[-1].startswith("lora_")})
  save_hf_t5(base, preset("tiny"), random_params(preset("tiny"), 2))
  save_hf_t5(base, preset("tiny"), base_params)  # replaces the first
  assert gcs.objects(bucket) == ["base/config.json", "base/model.safetensors"]
  export_peft(peft_dir, cfg, params)
  got_cfg, got = import_peft(peft_dir, base)
  assert got_cfg.adapter.kind == "lora" and got_cfg.adapter.rank == 2
  got_flat = traverse_util.flatten_dict(got)
  assert sorted(got_flat) == sorted(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(got_flat[key], value, err_msg="/".join(key))

  # A writer stopped after it began to replace the directory leaves it marked, and readers refuse it.
  gcsfs = fsspec.filesystem("gs")  # the process's one instance, which storage uses
  put_file = gcsfs.put_file

  def fail_on_weights(local_path, path, **kwargs):
    if path.endswith("model.safetensors"):
      raise OSError("connection reset")
    return put_file(local_path, path, **kwargs)

  monkeypatch.setattr(gcsfs, "put_file", fail_on_weights)
  with pytest.raises(RunError, match="connection reset"):
    save_hf_t5(base, preset("tiny"), base_params)
  monkeypatch.setattr(gcsfs, "put_file", put_file)
  assert f"base/{storage.WRITING_MARKER}" in gcs.objects(bucket)
  with pytest.raises(FileNotFoundError, match=r"/base: incomplete \(\.writing is still there"):
    load_hf_t5(base)
  save_hf_t5(base, preset("tiny"), base_params)
  assert [o for o in gcs.objects(bucket) if o.startswith("base/")] == ["base/config.json", "base/model.safetensors"]
  np.testing.assert_array_equal(load_hf_t5(base)[1]["shared_embedding"]["embedding"],
                                base_params["shared_embedding"]["embedding"])


def test_metrics_object_is_rewritten_whole(gcs, bucket):
  path = f"gs://{bucket}/run/metrics.jsonl"
  storage.write_text_atomic(path, "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4))
                            + '{"step": 5, "lo')  # the last line of a killed run, cut short
  writer = MetricsJsonl(path, resume_step=3)
  assert [r["step"] for r in storage.read_jsonl(path)] == [1, 2, 3]
  writer.write(4, {"loss": 0.5})
  assert [r["step"] for r in storage.read_jsonl(path)] == [1, 2, 3]  # an object is not appended to
  writer.sync(force=False)  # not due yet
  assert [r["step"] for r in storage.read_jsonl(path)] == [1, 2, 3]
  writer.close()
  assert storage.read_jsonl(path)[-1] == {"step": 4, "loss": 0.5}
  MetricsJsonl(path, resume_step=None)  # a fresh start (no checkpoint) empties it
  assert storage.read_text(path) == ""
  with pytest.raises(ValueError, match="cannot be appended to"):
    storage.append_text(path, "{}\n")


def _copy_tree(local_dir, url):
  for folder, _, names in os.walk(local_dir):
    target = url + folder[len(str(local_dir)):]
    tf.io.gfile.makedirs(target)
    for name in names:
      tf.io.gfile.copy(os.path.join(folder, name), f"{target}/{name}", overwrite=True)


def test_data_loaders_read_a_url(tmp_path):
  """A natural-instructions clone and a P3 copy read from TensorFlow's ram:// file system (tf.io.gfile) give
  what their local copies give."""
  tasks = {"task001_copy": ff.superni_task("task001_copy", 130),
           "task010_heldout": ff.superni_task("task010_heldout", 240, outputs_per_instance=2)}
  local = ff.write_superni_clone(tmp_path / "ni", tasks, ["task001_copy"], ["task010_heldout"])
  url = f"ram://ni-{uuid.uuid4().hex[:8]}"
  _copy_tree(local, url)
  for task, k, seed in (("task010_heldout", 16, 13), ("task010_heldout", 32, 42), ("task001_copy", 8, 0)):
    assert superni.instance_splits(url, task, k, seed) == superni.instance_splits(local, task, k, seed)
  vocab = data.get_vocabulary("byte")
  remote = superni.register_superni(url, vocab, prefix="url_ni", fewshot_ks=(16,), fewshot_seeds=(13,))
  here = superni.register_superni(local, vocab, prefix="local_ni", fewshot_ks=(16,), fewshot_seeds=(13,))
  assert remote.task_ids == here.task_ids and list(remote.mixtures.values()) == list(here.mixtures.values())
  for split in ("train", "test", "train_k16_seed13"):
    got = data.eval_examples("url_ni_task010_heldout", split)
    assert got and got == data.eval_examples("local_ni_task010_heldout", split)

  examples = [{"inputs": f"premise {i}", "targets": ("yes", "no")[i % 2], "answer_choices": ["yes", "no"]}
              for i in range(6)]
  ff.write_p3_subset(tmp_path / "p3", "nli_a", "validation", examples, stats=False)
  p3 = f"ram://p3-{uuid.uuid4().hex[:8]}"
  _copy_tree(tmp_path / "p3", p3)
  read = t0.read_choice_examples(p3, "nli_a", "validation")
  assert read == t0.read_choice_examples(str(tmp_path / "p3"), "nli_a", "validation")
  assert [ex["label"] for ex in read] == [i % 2 for i in range(6)]
  assert t0.num_examples(p3, "nli_a", "validation") == 6


@pytest.mark.parametrize("model_dir, message", [
    ("gs://no-such-bucket/run", "='gs://no-such-bucket/run': no bucket 'no-such-bucket' in Cloud Storage"),
    ("gs:/x", "='gs:/x': a malformed URL (expected scheme://bucket/path, e.g. gs://BUCKET/run)"),
    ("memory://b/run", "='memory://b/run': a run directory (orbax checkpoints) is a local path or a gs:// URL"),
])
def test_a_bad_url_is_one_error_line_and_writes_nothing(gcs, tmp_path, monkeypatch, capsys, model_dir, message):
  monkeypatch.chdir(REPO)
  local = os.path.join(REPO, model_dir.split(":")[0] + ":")  # what a URL taken for a local path would create
  assert not os.path.exists(local)
  buckets = gcs.buckets()
  try:
    assert train.main(["--gin_file=configs/tiny.gin", f"--gin.MODEL_DIR='{model_dir}'"]) == cli.EXIT_CONFIG_ERROR
  finally:
    gin.clear_config()
  (line,) = error_lines(capsys.readouterr().err)
  assert line == f"error: RunConfig.model_dir{message}"
  experiment = tmp_path / "experiment.gin"
  experiment.write_text(EXPERIMENT.replace("BASE = %gin.REQUIRED", "BASE = None"))
  assert runner.main([f"--gin_file={experiment}", f"--gin.MODEL_DIR='{model_dir}'"]) == cli.EXIT_CONFIG_ERROR
  (line,) = error_lines(capsys.readouterr().err)
  assert line == f"error: Experiment.model_dir{message}"
  if not model_dir.startswith("memory"):  # the report reads any URL
    assert report.main([f"--model_dir={model_dir}"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"error: --model_dir{message}"
  assert not os.path.exists(local) and gcs.buckets() == buckets
