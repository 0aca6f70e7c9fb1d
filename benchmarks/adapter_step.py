"""Training- and eval-step time of the adapter kinds on one model width.

  python -m benchmarks.adapter_step --preset=base --num_layers=2 --batch=8 --input_len=128 \
      --target_len=32 --steps=5

Compares no adapter (full fine-tuning), shared LoRA, Poly and MHR (S=8, K=8) on single-task and
mixed-task batches, with the real jitted train step (mhr_jax.train_step). Prints a Markdown table
(median seconds per step, ratio to LoRA) and writes it, with the machine and versions, as JSON when
--out is given. Runs on synthetic batches, so it needs only JAX (no TensorFlow).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from mhr_jax.models import param_counts
from mhr_jax.training import losses, optim, train_step
from mhr_jax import partitioning
from mhr_jax.adapters import AdapterConfig
from mhr_jax.adapters import params as param_groups
from mhr_jax.models import T5, preset

N_TASKS = 16


def _variants(rank: int):
  routed = dict(rank=rank, n_tasks=N_TASKS, n_skills=8, gumbel=True)
  return [
      ("no adapter (full FT)", "full", AdapterConfig(), False),
      ("LoRA", "lora", AdapterConfig(kind="lora", rank=rank), False),
      ("Poly (S=1, K=8)", "poly", AdapterConfig(kind="poly", **routed), False),
      ("MHR (S=8, K=8)", "mhr", AdapterConfig(kind="mhr", n_splits=8, **routed), False),
      ("MHR (S=8, K=8), mixed tasks", "mhr", AdapterConfig(kind="mhr", n_splits=8, **routed), True),
  ]


def _random_params(model_cfg, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  shapes = param_counts.abstract_params(model_cfg)
  return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _batch(args, mixed: bool, rng) -> dict:
  b, li, lt = args.batch, args.input_len, args.target_len
  targets = rng.integers(2, 1000, (b, lt)).astype(np.int32)
  return {
      "encoder_input_tokens": rng.integers(2, 1000, (b, li)).astype(np.int32),
      "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones((b, lt), np.float32),
      "task_ids": (rng.integers(0, N_TASKS, (b,)) if mixed else np.full((b,), 3)).astype(np.int32),
  }


def _time(fn, steps: int) -> float:
  fn()  # compile
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(args) -> list[dict]:
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  rows = []
  for name, method, acfg, mixed in _variants(args.rank):
    cfg = preset(args.preset, num_layers=args.num_layers, dropout_rate=0.0, adapter=acfg)
    model = T5(cfg)
    params = _random_params(cfg, 0)
    labels = param_groups.param_labels(params, method)
    opt = optim.make_optimizer(optim.OptimizerConfig(name="adafactor"), labels, total_steps=1000)
    state = train_step.init_train_state(model, params, labels, opt, mesh)
    shardings = train_step.shardings_of(train_step.abstract_train_state(model, labels, opt, mesh))
    step_fn = train_step.make_train_step(model, opt, losses.LossConfig(), mesh, shardings)
    batch = partitioning.global_batch(_batch(args, mixed, np.random.default_rng(0)), mesh)
    rng = jax.random.key(0)
    holder = {"state": state}

    def train_once():
      holder["state"], metrics = step_fn(holder["state"], batch, rng)
      jax.block_until_ready(metrics["loss"])

    forward = jax.jit(lambda p, b: model.apply(
        {"params": p}, b["encoder_input_tokens"], b["decoder_input_tokens"],
        b["decoder_target_tokens"], task_ids=b["task_ids"], enable_dropout=False))
    eval_params = holder["state"].params

    def eval_once():
      jax.block_until_ready(forward(eval_params, batch))

    train_s = _time(train_once, args.steps)
    eval_params = holder["state"].params
    eval_s = _time(eval_once, args.steps)
    trained = param_counts.count_params(params, method)["trainable"]
    rows.append(dict(variant=name, train_step_s=train_s, eval_step_s=eval_s,
                     trainable_params=int(trained)))
    print(f"{name:32s} train {train_s:.3f}s  eval {eval_s:.3f}s", flush=True)
  return rows


def markdown(rows: list[dict]) -> str:
  lora = next(r for r in rows if r["variant"] == "LoRA")
  out = ["| variant | trainable params | train step (s) | / LoRA | eval forward (s) | / LoRA |",
         "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(f"| {r['variant']} | {r['trainable_params']:,} | {r['train_step_s']:.3f} | "
               f"{r['train_step_s'] / lora['train_step_s']:.2f} | {r['eval_step_s']:.3f} | "
               f"{r['eval_step_s'] / lora['eval_step_s']:.2f} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="base")
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--rank", type=int, default=1)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--input_len", type=int, default=128)
  parser.add_argument("--target_len", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args()
  rows = run(args)
  table = markdown(rows)
  print(table)
  if args.out:
    record = dict(config=vars(args), rows=rows, machine=dict(
        platform=platform.platform(), cpus=os.cpu_count(), devices=str(jax.devices()),
        jax=jax.__version__), table=table)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
  main()
