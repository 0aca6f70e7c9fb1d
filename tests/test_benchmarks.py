"""benchmarks/step.py smoke-runs at tiny width on CPU: every record complete and finite, the
per-case time guard and the budget, and the FLOP count against a hand count."""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset=tiny", "--batches=8", "--input_len=16", "--target_len=8", "--steps=1",
        "--matmul_n=128", "--n_tasks=4", "--n_skills=2", "--n_splits=2", "--decode_len=4",
        "--choices=2", "--choice_len=4"]


def _run(tmp_path, env, *flags):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.step", *TINY, *flags,
                         f"--out_dir={out}"], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out / "step_results.json") as f:
    return json.load(f), (out / "step_results.md").read_text()


def test_smoke_run_gives_complete_finite_records(tmp_path, env):
  result, text = _run(tmp_path, env, "--cases=peak,train:mhr:8,peft_train:mhr:8,greedy:8,"
                                     "hf_generate:8")
  rows = {r["name"]: r for r in result["records"]}
  expected = ["peak", "train/mhr/single/b8", "train/mhr/mixed/b8", "peft_train/mhr/single/b8",
              "peft_train/mhr/mixed/b8", "greedy/mhr/b8", "hf_generate/mhr/b8"]
  assert sorted(rows) == sorted(expected), [(r["name"], r.get("note")) for r in result["records"]]
  for name, r in rows.items():
    assert r["status"] == "ok", (name, r.get("note"))
    numbers = ["step_s", "tflops_per_s", "flops"]
    if name != "peak":
      numbers += ["tokens_per_s", "first_step_s", "pct_of_peak"]
    if r["side"] == "jax" and r["kind"] == "train":
      numbers += ["compile_s", "peak_memory_gb", "loss", "vs_torch"]
    for key in numbers:
      assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (name, key)
  assert rows["train/mhr/single/b8"]["tokens_per_s"] == pytest.approx(8 * 24 / rows[
      "train/mhr/single/b8"]["step_s"])
  assert result["machine"]["jax"]["backend"] == "cpu" and result["machine"]["torch"]["torch"]
  assert "MHR tokens/s against PEFT at batch 8" in text and "| train/mhr/mixed/b8 | ok |" in text


def test_a_slow_case_times_out_and_the_rest_still_runs(tmp_path, env):
  """Only the compile case gets a short limit: within it, its worker must import the JAX side and trace
  and compile a T5 train step (seconds on any machine); peak keeps the default limit, however slow the
  machine."""
  result, _ = _run(tmp_path, env, "--cases=compile:mhr:8,peak", "--case_timeouts=compile:mhr:8=0.2")
  status = {r["name"]: r["status"] for r in result["records"]}
  assert status == {"compile:mhr:8": "timeout", "peak": "ok"}, result["records"]
  assert result["records"][0]["note"] == "no result within 0.2 s"


def test_case_timeouts_name_cases_of_the_run():
  from benchmarks import step
  args = step.parse_args(["--cases=peak,compile:mhr:8", "--case_timeouts=compile:mhr:8=30"])
  assert step.case_timeouts(args, step.expand_cases(args)) == {"peak": 600.0, "compile:mhr:8": 30.0}
  for flag, match in (("--case_timeouts=train:mhr:8=30", "'train:mhr:8' is not one of the cases"),
                      ("--case_timeouts=peak=soon", "'peak=soon' is not case=seconds")):
    args = step.parse_args(["--cases=peak", flag])
    with pytest.raises(SystemExit, match=match):
      step.case_timeouts(args, step.expand_cases(args))


def test_spent_budget_skips_cases(tmp_path, env):
  result, _ = _run(tmp_path, env, "--cases=peak,peft_train:lora:8", "--budget_s=1",
                   "--min_case_s=5")
  assert [(r["name"], r["status"]) for r in result["records"]] == [
      ("peak", "skipped"), ("peft_train:lora:8", "skipped")]


def test_needed_flops_match_a_hand_count():
  """T5-XL, batch 8, 512 -> 128: the measured PEFT run did 26.6 TFLOP/s x 1.10 s = 29.3 TFLOP."""
  fields = common.Settings(preset="xl").model_fields()
  d, ff, inner, vocab, layers = 2048, 5120, 2048, 32128, 24
  b, li, lt = 8, 512, 128
  enc = layers * (4 * d * inner + 3 * d * ff) * b * li + layers * 2 * b * li * li * inner
  dec = (layers * (6 * d * inner + 3 * d * ff) * b * lt + layers * 2 * d * inner * b * li
         + layers * 2 * b * lt * (lt + li) * inner + d * vocab * b * lt)
  forward = 2 * (enc + dec)
  assert common.train_flops(fields, b, li, lt, trains_base=False) == pytest.approx(2 * forward)
  assert common.train_flops(fields, b, li, lt, trains_base=True) == pytest.approx(3 * forward)
  assert 2 * forward / 1e12 == pytest.approx(29.3, rel=0.01)


def test_benchmarks_import_without_tensorflow_seqio_or_gin(env):
  """The GPU image has none of them: blocking the modules must not stop the benchmark's imports."""
  code = ("import sys\n"
          "for name in ('tensorflow', 'seqio', 'gin', 'mhr_jax.data', 'tasks'):\n"
          "  sys.modules[name] = None\n"
          "import benchmarks.step, benchmarks.jax_cases, benchmarks.torch_cases\n"
          "from mhr_jax.evaluation import decoding\nfrom mhr_jax.training import adaptation, train_step\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_checkpoint_save_benchmark_runs(capsys):
  from benchmarks import checkpoint_save
  checkpoint_save.main(["--leaves=2,5", "--saves=1"])
  rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
  assert [int(r[0]) for r in rows[1:]] == [2, 5]
  assert all(float(x) > 0 for r in rows[1:] for x in r[1:])
