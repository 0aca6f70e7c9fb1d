"""Bytes of one pre-training checkpoint at the paper's sizes, with the frozen base in every checkpoint (as
runs saved it before) and saved once per run (RUN_DIR/frozen; each step's checkpoint holds the rest).

  python -m benchmarks.checkpoint_bytes [--preset=xl]

From abstract shapes alone (jax.eval_shape: nothing is allocated): the train state of the T0 setting (every
linear layer, rank 1, K = 8 skills, 313 training tasks) for MHR (S = 64, the authors' T0 runs), Poly and
shared LoRA, with the optimizer of the paper's T0 configs (Hugging Face Adafactor, factored moments).
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from mhr_jax.models import param_counts
from mhr_jax.training import optim, train_step
from mhr_jax.adapters import AdapterConfig, methods
from mhr_jax.adapters import params as param_groups
from mhr_jax.models import T5, preset

GB = 1e9


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def state_bytes(model_preset: str, adapter: AdapterConfig) -> dict[str, int]:
  """{"trainable", "opt_state", "frozen"}: bytes of each part of the pre-training train state."""
  cfg = preset(model_preset, adapter=adapter)
  model = T5(cfg)
  labels = param_groups.param_labels(param_counts.abstract_params(cfg), methods.pretraining_rules(adapter.kind))
  opt_cfg = optim.OptimizerConfig(name="adafactor", adafactor_factoring="last_two")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
  state = train_step.abstract_train_state(model, labels, optim.make_optimizer(opt_cfg, labels, 100), mesh)
  return {"trainable": _bytes(state.trainable), "opt_state": _bytes(state.opt_state), "frozen": _bytes(state.frozen)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="xl")
  args = parser.parse_args(argv)
  routed = dict(rank=1, n_skills=8, n_tasks=313)
  cases = [("MHR (S=64)", AdapterConfig(kind="mhr", n_splits=64, **routed)),
           ("Poly", AdapterConfig(kind="poly", **routed)), ("LoRA", AdapterConfig(kind="lora", rank=1))]
  print(f"T5 preset {args.preset}; GB = 1e9 bytes; float32 parameters and optimizer state")
  print("| adapter | trained part + optimizer (GB) | frozen base (GB) | per checkpoint before (GB) | "
        "per checkpoint now (GB) | once per run (GB) |\n|---|---:|---:|---:|---:|---:|")
  for name, adapter in cases:
    b = state_bytes(args.preset, adapter)
    rest = b["trainable"] + b["opt_state"]
    print(f"| {name} | {rest / GB:.3f} | {b['frozen'] / GB:.2f} | {(rest + b['frozen']) / GB:.2f} | "
          f"{rest / GB:.3f} | {b['frozen'] / GB:.2f} |", flush=True)


if __name__ == "__main__":
  main()
