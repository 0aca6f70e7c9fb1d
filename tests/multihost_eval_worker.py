"""One process of the multi-host evaluation check (tests/test_multihost.py): rank classification and
greedy decoding of a tiny MHR model on a (data=2, fsdp=1, model=2) mesh; process 0 writes the results.

  python tests/multihost_eval_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON
"""
import json
import sys

import jax
import numpy as np


def main(process_id: int, num_processes: int, port: str, out: str) -> None:
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  import hf_oracle  # pylint: disable=g-import-not-at-top  (tests/ is this script's directory)
  from mhr_jax.evaluation import drivers as evaluation  # pylint: disable=g-import-not-at-top
  from mhr_jax import partitioning  # pylint: disable=g-import-not-at-top
  from mhr_jax.adapters.config import AdapterConfig  # pylint: disable=g-import-not-at-top
  from mhr_jax.models import T5, preset  # pylint: disable=g-import-not-at-top

  cfg = preset("tiny", adapter=AdapterConfig(kind="mhr", n_tasks=3, n_skills=4, n_splits=2, rank=2))
  model, params = T5(cfg), hf_oracle.random_t5_params(cfg, seed=1)
  rng = np.random.default_rng(0)
  batch = {"encoder_input_tokens": rng.integers(2, 200, (8, 9)).astype(np.int32),
           "decoder_target_tokens": rng.integers(2, 200, (8, 3, 5)).astype(np.int32),
           "labels": rng.integers(0, 3, 8).astype(np.int32), "task_ids": np.arange(8, dtype=np.int32) % 3,
           "example_index": np.arange(8, dtype=np.int32)}
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=1, model=2))
  ranked = evaluation.rank_classification(model, params, [batch], mesh=mesh)
  tokens = evaluation.generate(model, params, [batch], 6, mesh=mesh)
  if process_id == 0:
    with open(out, "w") as f:
      json.dump({"scores": ranked.scores.tolist(), "accuracy": ranked.accuracy, "tokens": tokens.tolist()}, f)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
