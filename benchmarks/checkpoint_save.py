"""Host time of one run checkpoint save against the number of small leaves, packed (as runs save) or not.

  python -m benchmarks.checkpoint_save --leaves=3,100,800 --saves=20

Each save goes through RunCheckpointer (orbax, asynchronous, keep 2) with replicated float32 leaves of
shape (64, 8); the loop waits for each save before the next, as a run with frequent checkpoints does.
"unpacked" sets the packing limit to 0 bytes, which saves every leaf as its own array.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp

from mhr_jax.checkpoints import packing as checkpoint_packing
from mhr_jax.checkpoints.run_state import RunCheckpointer


def ms_per_save(n_leaves: int, saves: int, packed: bool) -> float:
  tree = {f"leaf{i}": jnp.full((64, 8), i, jnp.float32) for i in range(n_leaves)}
  limit = checkpoint_packing.PACK_MAX_BYTES
  checkpoint_packing.PACK_MAX_BYTES = limit if packed else 0
  directory = tempfile.mkdtemp(prefix="checkpoint_save_")
  try:
    checkpointer = RunCheckpointer(directory, 1, 2)
    checkpointer.save(0, tree, {}, force=True)  # first save: directories, compilation of the packing
    checkpointer.wait()
    start = time.perf_counter()
    for step in range(1, saves + 1):
      checkpointer.save(step, tree, {}, force=True)
      checkpointer.wait()
    elapsed = time.perf_counter() - start
    checkpointer.close()
  finally:
    checkpoint_packing.PACK_MAX_BYTES = limit
    shutil.rmtree(directory, ignore_errors=True)
  return elapsed / saves * 1000


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--leaves", default="3,100,800", help="comma-separated numbers of leaves")
  parser.add_argument("--saves", type=int, default=20)
  args = parser.parse_args(argv)
  print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()[0].platform}")
  print("| leaves | unpacked (ms per save) | packed (ms per save) |\n|---:|---:|---:|")
  for n in (int(x) for x in args.leaves.split(",")):
    print(f"| {n} | {ms_per_save(n, args.saves, False):.1f} | {ms_per_save(n, args.saves, True):.1f} |",
          flush=True)


if __name__ == "__main__":
  main()
