"""Train-step and evaluation speed of the project beside Hugging Face + PEFT, on whatever backend exists.

  # One GPU, T5-XL, the target configs (benchmarks/gpu.sh wraps this with a time budget):
  python -m benchmarks.step --preset=xl --batches=8,32 --input_len=512 --target_len=128 \
      --out_dir=/tmp/bench
  # CPU, T5-base width with 2+2 layers (the adapter-step setting of benchmarks/RESULTS.md):
  python -m benchmarks.step --preset=base --num_layers=2 --batches=8 --input_len=128 \
      --target_len=32 --cases=peak,train,peft --out_dir=/tmp/bench_cpu

Cases (--cases takes groups or single names, comma-separated):
  peak          a matmul in the compute dtype (n = --matmul_n): the denominator of "% of peak"
  train         the project's train step, method x batch (train:<method>:<batch>); mhr/poly also
                on a mixed-task batch with the same compiled program
  peft          HF + PEFT train steps of --peft_methods (peft_train:<method>:<batch>)
  eval          rank-classification scoring and greedy decoding, ours and HF's (score:<batch>,
                greedy:<batch>, hf_score:<batch>, hf_generate:<batch>), at --eval_batch
  compile       lower + compile the train step on shapes only (compile:<method>:<batch>)
  pairs         few-shot adaptation: 1 against --n_pairs vmapped pairs (pairs:<batch>)
Each record has compile time (JAX), first-step and median step time, tokens/s, peak memory (XLA's
buffer plan for JAX, torch's peak allocation on GPU), needed TFLOP/s (2 forward passes with a frozen
base, 3 when the base trains) and % of the measured matmul peak.

Consecutive cases of one side run in one worker process (JAX's and PyTorch's allocators never share
the GPU; JAX's worker may use 92% of its memory, XLA_PYTHON_CLIENT_MEM_FRACTION); a case that
runs past its time limit (--case_timeout_s, or its own in --case_timeouts), or past what is left of
--budget_s, has its worker killed and is recorded as "timeout", and a fresh worker carries on with the
remaining cases. Results go to
<out_dir>/step_results.json (settings, machine, records) and step_results.md (tables, targets).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

from benchmarks.common import FIELDS, METHODS, Settings

JAX_RUNNERS = ("peak", "train", "compile", "score", "greedy", "pairs")
TORCH_RUNNERS = ("peft_train", "hf_score", "hf_generate")
_WORKERS = itertools.count(1)   # numbers each worker's spec, log and records files


# ------------------------------------------------------------------------------------- cases

def expand_cases(args) -> list[str]:
  """Case names (runner:method:batch, runner:batch or peak) from --cases groups and names."""
  batches = [int(b) for b in args.batches.split(",")]
  methods = args.methods.split(",")
  out = []
  for item in args.cases.split(","):
    if item == "peak":
      out.append("peak")
    elif item in ("train", "compile"):
      out += [f"{item}:{m}:{b}" for b in batches for m in methods]
    elif item == "peft":
      out += [f"peft_train:{m}:{b}" for b in batches for m in args.peft_methods.split(",")]
    elif item == "eval":
      out += [f"{r}:{args.eval_batch}" for r in ("score", "greedy", "hf_score", "hf_generate")]
    elif item == "pairs":
      out.append(f"pairs:{args.eval_batch}")
    elif item.split(":")[0] in JAX_RUNNERS + TORCH_RUNNERS:
      out.append(item)
    else:
      raise SystemExit(f"--cases: unknown case or group {item!r}")
  for case in out:
    parts = case.split(":")
    if len(parts) == 3 and parts[1] not in METHODS:
      raise SystemExit(f"--cases/--methods: unknown method {parts[1]!r} in {case}")
  return list(dict.fromkeys(out))


def case_timeouts(args, cases: list[str]) -> dict[str, float]:
  """Each case's time limit: --case_timeout_s, or the case's own in --case_timeouts ("case=seconds,...")."""
  limits = dict.fromkeys(cases, args.case_timeout_s)
  for item in filter(None, args.case_timeouts.split(",")):
    case, _, seconds = item.rpartition("=")
    if case not in limits:
      raise SystemExit(f"--case_timeouts: {case!r} is not one of the cases {list(limits)}")
    try:
      limits[case] = float(seconds)
    except ValueError:
      raise SystemExit(f"--case_timeouts: {item!r} is not case=seconds") from None
  return limits


def side(case: str) -> str:
  return "torch" if case.split(":")[0] in TORCH_RUNNERS else "jax"


def run_case(case: str, s: Settings) -> list[dict]:
  """Runs one case in this process and returns its records."""
  parts = case.split(":")
  if side(case) == "torch":
    from benchmarks import torch_cases
    fn = torch_cases.RUNNERS[parts[0]]
  else:
    from benchmarks import jax_cases
    fn = jax_cases.RUNNERS[parts[0]]
  args = [int(p) if p.isdigit() else p for p in parts[1:]]
  return fn(s, *args)


def machine_info(which: str) -> dict:
  info = dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version())
  if which == "jax":
    import flax
    import jax
    import optax
    dev = jax.devices()[0]
    info.update(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
                backend=jax.default_backend(), device=dev.device_kind, devices=jax.device_count())
  else:
    import peft
    import torch
    import transformers
    info.update(torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, torch_threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
  return info


def _failure(case: str, status: str, note: str) -> dict:
  return dict(name=case, side=side(case), kind=case.split(":")[0], status=status, note=note)


_INTERLEAVED = ("train", "peft_train")


def interleaved(cases: list[str], s: Settings, machine: dict) -> list[dict]:
  """Train-step cases of both sides prepared in this process, then timed round-robin (CPU only:
  on a shared CPU, load that comes and goes then slows every case alike)."""
  if not cases:
    return []
  from benchmarks import common, jax_cases, torch_cases
  prepared = []
  for case in cases:
    runner, method, batch = case.split(":")
    module = torch_cases if runner == "peft_train" else jax_cases
    prepared += module.prepare_train(s, method, int(batch))
  machine.update(jax=machine_info("jax"), torch=machine_info("torch"))
  return common.time_cases(prepared, s, interleave=True)


def _release_memory() -> None:
  """Frees what a failed case left (its frames are gone once the exception is dropped)."""
  gc.collect()
  if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
    sys.modules["torch"].cuda.empty_cache()


def worker(spec_path: str, results_path: str) -> None:
  """Runs the spec's cases one by one, appending records as JSON lines; prints START/DONE."""
  with open(spec_path) as f:
    spec = json.load(f)
  s = Settings(**spec["settings"])
  which = side(spec["cases"][0])
  with open(results_path, "a") as out:
    out.write(json.dumps({"machine": machine_info(which), "side": which}) + "\n")
  for case in spec["cases"]:
    print(f"START {case}", flush=True)
    try:
      records = run_case(case, s)
    except Exception as e:  # a failed case is a result; the next case still runs
      text = f"{type(e).__name__}: {e}"
      oom = any(k in text for k in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory"))
      records = [_failure(case, "oom" if oom else "error", text.splitlines()[0][:300])]
      traceback.print_exc()
    _release_memory()   # outside the except block: the traceback no longer holds the case's frames
    with open(results_path, "a") as out:
      for r in records:
        out.write(json.dumps(r, default=float) + "\n")
    print(f"DONE {case}", flush=True)


# ---------------------------------------------------------------------------- orchestration

def _spawn(cases, settings, work_dir, index, env):
  spec = os.path.join(work_dir, f"spec_{index}.json")
  with open(spec, "w") as f:
    json.dump({"settings": dataclasses.asdict(settings), "cases": cases}, f)
  results = os.path.join(work_dir, f"results_{index}.jsonl")
  log = open(os.path.join(work_dir, f"worker_{index}.log"), "w")
  proc = subprocess.Popen([sys.executable, "-m", "benchmarks.step", "--_worker", spec, results],
                          stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                          start_new_session=True)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)],
                   daemon=True).start()
  return proc, lines, results, log


def _kill(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def _read(path):
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_side(cases, settings, args, work_dir, deadline, env, timeouts) -> tuple[list[dict], dict]:
  """Runs `cases` in worker processes, each case under its time guard (`timeouts`: seconds by case)."""
  records, machine, remaining = [], {}, list(cases)
  while remaining:
    if deadline - time.time() < args.min_case_s:
      records += [_failure(c, "skipped", "benchmark time budget spent") for c in remaining]
      break
    index = f"{side(cases[0])}{next(_WORKERS)}"
    proc, lines, results, log = _spawn(remaining, settings, work_dir, index, env)
    current, started, stop = None, time.time(), None
    startup_limit = time.time() + args.startup_timeout_s
    while True:
      limit = (min(started + timeouts[current], deadline) if current
               else min(startup_limit, deadline))
      try:
        line = lines.get(timeout=max(0.1, limit - time.time()))
      except queue.Empty:
        stop = ("timeout", f"no result within {limit - started:g} s") if current else \
            ("error", "worker did not start in time")
        break
      if line is None:
        stop = ("error", "worker exited (see worker log)") if current else None
        break
      if line.startswith("START "):
        current, started = line.split(" ", 1)[1].strip(), time.time()
      elif line.startswith("DONE "):
        remaining.remove(line.split(" ", 1)[1].strip())
        current = None
        startup_limit = time.time() + args.startup_timeout_s
    _kill(proc)
    log.close()
    for row in _read(results):
      if "machine" in row:
        machine = row["machine"]
      else:
        records.append(row)
    if stop is None and current is None and remaining:
      stop = ("error", "worker exited before its next case")
    if stop:
      failed = current or remaining[0]
      records.append(_failure(failed, *stop))
      remaining.remove(failed)
  return records, machine


def _fmt(x, digits=3):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  if isinstance(x, float):
    return f"{x:,.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"
  return str(x)


def add_ratios(records: list[dict]) -> None:
  """% of the measured matmul peak, and tokens/s against the PyTorch record of the same config."""
  peak = next((r.get("tflops_per_s") for r in records if r.get("name") == "peak"
               and r.get("status") == "ok"), None)
  torch_rows = {(r.get("kind"), r.get("method"), r.get("tasks"), r.get("batch")): r
                for r in records if r.get("side") == "torch" and r.get("status") == "ok"}
  for r in records:
    if peak and r.get("tflops_per_s") and r.get("name") != "peak":
      r["pct_of_peak"] = 100.0 * r["tflops_per_s"] / peak
    ref = torch_rows.get((r.get("kind"), r.get("method"), r.get("tasks"), r.get("batch")))
    if r.get("side") == "jax" and ref and r.get("tokens_per_s") and ref.get("tokens_per_s"):
      r["vs_torch"] = r["tokens_per_s"] / ref["tokens_per_s"]


def _find(records, name):
  return next((r for r in records if r.get("name") == name and r.get("status") == "ok"), None)


def targets(records: list[dict], batches: list[int]) -> list[str]:
  """The targets that these records speak to, each with the numbers behind it."""
  lines = []
  b = batches[0]
  mhr, lora = _find(records, f"train/mhr/single/b{b}"), _find(records, f"train/lora/single/b{b}")
  if mhr and lora:
    ratio = mhr["step_s"] / lora["step_s"]
    lines.append(f"MHR(single task) / LoRA step time at batch {b}: {ratio:.2f} (target <= 1.10)")
  if mhr and mhr.get("pct_of_peak"):
    lines.append(f"MHR train step at batch {b}: {mhr['pct_of_peak']:.1f}% of the measured matmul "
                 "peak in needed FLOPs (target >= 40% on the GPU)")
  if mhr and mhr.get("vs_torch"):
    lines.append(f"MHR tokens/s against PEFT at batch {b}: {mhr['vs_torch']:.2f}x (target >= 5x "
                 "on the GPU; on CPU the project's step <= 1.0x PEFT's time)")
  for bb in batches[1:]:
    big = next((r for r in records if r.get("name", "").startswith(f"train/mhr/single/b{bb}")
                or r.get("name") == f"train:mhr:{bb}"), None)
    if big:
      lines.append(f"MHR at batch {bb}: {big['status']}"
                   + (f", {big['peak_memory_gb']:.1f} GB" if big.get("peak_memory_gb") else ""))
  compiles = [r["compile_s"] for r in records if r.get("kind") == "train" and r.get("compile_s")]
  if compiles:
    lines.append(f"train-step compile time: {min(compiles):.1f}-{max(compiles):.1f} s "
                 "(target <= 90 s)")
  pair = next((r for r in records if r.get("vs_one_pair")), None)
  if pair:
    lines.append(f"{pair['tasks']} vmapped: {pair['vs_one_pair']:.2f}x the time of one pair "
                 "(target <= 4x)")
  return lines


def markdown(records: list[dict], machine: dict, settings: Settings, command: str,
             batches: list[int]) -> str:
  head = ["case", "status", "compile (s)", "first step (s)", "step (s)", "tokens/s",
          "peak mem (GB)", "TFLOP/s needed", "% of peak", "vs PyTorch"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in records:
    cells = [r.get("name"), r.get("status"), _fmt(r.get("compile_s"), 1),
             _fmt(r.get("first_step_s")), _fmt(r.get("step_s")), _fmt(r.get("tokens_per_s"), 0),
             _fmt(r.get("peak_memory_gb"), 1), _fmt(r.get("tflops_per_s"), 2),
             _fmt(r.get("pct_of_peak"), 1), _fmt(r.get("vs_torch"), 2)]
    rows.append("| " + " | ".join(str(c) for c in cells) + " |")
  notes = [f"- {r['name']}: {r['note']}" for r in records if r.get("note")]
  return "\n".join(
      ["# benchmarks/step.py results", "", f"Command: `{command}`", "",
       f"Machine: {json.dumps(machine, sort_keys=True)}", "",
       f"Settings: {json.dumps(dataclasses.asdict(settings), sort_keys=True)}", ""]
      + rows + ["", "Targets:"] + [f"- {t}" for t in targets(records, batches)]
      + ["", "Notes:"] + notes) + "\n"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="xl")
  p.add_argument("--num_layers", type=int, default=None, help="encoder and decoder layers")
  p.add_argument("--overrides", default="{}", help="JSON of T5Config fields, e.g. "
                 "'{\"scan_layers\": false, \"remat_policy\": \"none\"}'")
  p.add_argument("--dtype", default="auto", help="compute dtype; auto: bfloat16 with a GPU, "
                 "else float32")
  p.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
  p.add_argument("--cases", default="peak,train,peft,eval")
  p.add_argument("--methods", default="mhr,lora,poly,full")
  p.add_argument("--peft_methods", default="mhr,lora")
  p.add_argument("--batches", default="8,32")
  p.add_argument("--eval_batch", type=int, default=8)
  p.add_argument("--input_len", type=int, default=512)
  p.add_argument("--target_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=5, help="timed steps after the first")
  p.add_argument("--matmul_n", type=int, default=None, help="default: 8192 on GPU, 2048 on CPU")
  for name, default in (("n_tasks", 64), ("n_skills", 8), ("n_splits", 8), ("rank", 1),
                        ("choices", 4), ("choice_len", 16), ("decode_len", 32), ("n_pairs", 16)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--budget_s", type=float, default=3600.0, help="wall time for all cases")
  p.add_argument("--case_timeout_s", type=float, default=600.0, help="time limit of every case")
  p.add_argument("--case_timeouts", default="", help="cases with their own time limit, e.g. "
                 "'compile:mhr:8=60,peak=30'")
  p.add_argument("--startup_timeout_s", type=float, default=180.0)
  p.add_argument("--min_case_s", type=float, default=15.0,
                 help="cases left when less than this remains of the budget are skipped")
  p.add_argument("--interleave", action="store_true",
                 help="CPU only: run the train and peft_train cases in this process and time their "
                 "steps round-robin, so that a shared machine's load hits all alike")
  p.add_argument("--out_dir", default="benchmarks/out")
  p.add_argument("--_worker", nargs=2, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def settings_from(args) -> Settings:
  gpu = shutil.which("nvidia-smi") is not None
  overrides = json.loads(args.overrides)
  if args.num_layers is not None:
    overrides.update(num_layers=args.num_layers, num_decoder_layers=args.num_layers)
  return Settings(
      preset=args.preset, model_overrides=overrides,
      dtype=args.dtype if args.dtype != "auto" else ("bfloat16" if gpu else "float32"),
      optimizer=args.optimizer, n_tasks=args.n_tasks, n_skills=args.n_skills,
      n_splits=args.n_splits, rank=args.rank, input_len=args.input_len,
      target_len=args.target_len, steps=args.steps,
      matmul_n=args.matmul_n or (8192 if gpu else 2048), choices=args.choices,
      choice_len=args.choice_len, decode_len=args.decode_len, n_pairs=args.n_pairs)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args._worker:
    worker(*args._worker)
    return 0
  start = time.time()
  deadline = start + args.budget_s
  settings = settings_from(args)
  cases = expand_cases(args)
  timeouts = case_timeouts(args, cases)
  if args.interleave and shutil.which("nvidia-smi"):
    raise SystemExit("--interleave is for CPU runs: on a GPU each side needs its own process")
  os.makedirs(args.out_dir, exist_ok=True)
  work_dir = os.path.join(args.out_dir, "work")   # worker specs, logs and raw records
  shutil.rmtree(work_dir, ignore_errors=True)
  os.makedirs(work_dir)
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")   # batch 32 at T5-XL needs the room
  records = []
  machine = {"host": dict(platform=platform.platform(), cpus=os.cpu_count())}
  # Consecutive cases of one side share a worker; the order of --cases is kept, so a caller with
  # a tight budget puts the cases it needs most first (benchmarks/gpu.sh does).
  groups: list[list[str]] = []
  for case in cases:
    if groups and side(groups[-1][0]) == side(case):
      groups[-1].append(case)
    else:
      groups.append([case])
  command = "python -m benchmarks.step " + " ".join(argv if argv is not None else sys.argv[1:])
  batches = [int(b) for b in args.batches.split(",")]
  if args.interleave:
    groups = [[c for c in g if c.split(":")[0] not in _INTERLEAVED] for g in groups]
    records += interleaved([c for c in cases if c.split(":")[0] in _INTERLEAVED], settings,
                           machine)
  for group in filter(None, groups):
    rows, info = run_side(group, settings, args, work_dir, deadline, env, timeouts)
    records += rows
    if info:
      machine[side(group[0])] = info
    # Written after every group, so that an outer timeout still leaves the finished cases.
    text = write_results(args.out_dir, records, machine, settings, command, batches, start)
  print(text)
  return 0


def write_results(out_dir, records, machine, settings, command, batches, start) -> str:
  """Writes step_results.json and step_results.md (atomically); returns the Markdown."""
  add_ratios(records)
  result = dict(command=command, settings=dataclasses.asdict(settings), machine=machine,
                wall_s=time.time() - start, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                records=[{k: r.get(k) for k in FIELDS} | r for r in records],
                targets=targets(records, batches))
  text = markdown(records, machine, settings, command, batches)
  for name, content in (("step_results.json", json.dumps(result, indent=1, default=float)),
                        ("step_results.md", text)):
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
      f.write(content)
    os.replace(path + ".tmp", path)
  return text


if __name__ == "__main__":
  sys.exit(main())
