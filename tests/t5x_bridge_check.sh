#!/usr/bin/env bash
# End-to-end check of the T5X bridge with real T5X, on CPU:
#   1. the design card's literal command, 20 steps:
#        python -m t5x.train --gin_file=configs/mhr.gin --gin.MODEL_DIR="'DIR'" --gin.TRAIN_STEPS=20
#   2. the training loss (T5X's TensorBoard events) fell;
#   3. the last checkpoint holds the routing logits, moved away from their U(-1e-3, 1e-3) init;
#   4. that checkpoint converts to a project run checkpoint with the same parameters.
#
# Usage, from anywhere:  tests/t5x_bridge_check.sh PYTHON [MODEL_DIR]
#   PYTHON: the python of a virtualenv with the project's requirements plus T5X (see README.md,
#   section "T5X"; e.g. ../shared/tools/t5x-venv.sh prints one). MODEL_DIR defaults to a fresh
#   temporary directory. Exit status 0 when every check passes.
set -euo pipefail

PY=${1:?usage: $0 PYTHON [MODEL_DIR]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${2:-$(mktemp -d)/mhr_t5x}
LOG="$DIR.log"
mkdir -p "$(dirname "$DIR")"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3

echo "== python -m t5x.train --gin_file=configs/mhr.gin --gin.MODEL_DIR=\"'$DIR'\" --gin.TRAIN_STEPS=20"
start=$(date +%s)
if ! "$PY" -m t5x.train --gin_file=configs/mhr.gin --gin.MODEL_DIR="'$DIR'" --gin.TRAIN_STEPS=20 \
    > "$LOG" 2>&1; then
  tail -40 "$LOG"
  echo "FAIL: t5x.train exited with an error (log: $LOG)"
  exit 1
fi
echo "   done in $(( $(date +%s) - start )) s (log: $LOG)"

echo "== checkpoint -> run checkpoint"
"$PY" -m mhr_jax.t5x_bridge.checkpoints --to=run --gin_file=configs/mhr.gin \
  --gin "MODEL_DIR='$DIR'" --gin TRAIN_STEPS=20 --t5x_checkpoint="$DIR/checkpoint_20" \
  --run_dir="$DIR.run" >> "$LOG" 2>&1 || { tail -20 "$LOG"; echo "FAIL: conversion"; exit 1; }

# The checks print to stdout; TensorFlow's and absl's chatter goes to the log.
"$PY" - "$DIR" 2>>"$LOG" <<'PYCHECK' || { echo "(log: $LOG)"; exit 1; }
import glob, os, sys
import numpy as np
import tensorflow as tf
tf.get_logger().setLevel("ERROR")
from flax import traverse_util
from mhr_jax import run_checkpoints
from mhr_jax.t5x_bridge import checkpoints

model_dir = sys.argv[1]
losses = {}
for path in sorted(glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))):
  for event in tf.compat.v1.train.summary_iterator(path):
    for value in event.summary.value:
      if value.tag == "loss":
        losses[event.step] = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
            else value.simple_value
steps = sorted(losses)
ok = True
print(f"== training loss ({len(steps)} steps logged)")
print("   " + " ".join(f"{s}:{losses[s]:.3f}" for s in steps))
first, last = losses[steps[0]], losses[steps[-1]]
head, tail = np.mean([losses[s] for s in steps[:5]]), np.mean([losses[s] for s in steps[-5:]])
fell = last < first and tail < head
ok &= fell
print(f"   loss first (step {steps[0]}) {first:.4f} -> last (step {steps[-1]}) {last:.4f}; "
      f"mean of first 5 {head:.4f} -> last 5 {tail:.4f}: {'fell' if fell else 'DID NOT FALL'}")

params = traverse_util.flatten_dict(checkpoints.read_t5x_params(os.path.join(model_dir, "checkpoint_20")))
routing = {"/".join(p): v for p, v in params.items() if p[-2:] == ("routing", "logits")}
shapes = sorted({v.shape for v in routing.values()})
moved = max(float(np.abs(v).max()) for v in routing.values()) if routing else 0.0
print(f"== checkpoint_20: {len(params)} parameter arrays, {len(routing)} routing-logit arrays {shapes}")
print(f"   max |routing logit| {moved:.4f} (init bound 0.001): {'trained' if moved > 1e-3 else 'NOT TRAINED'}")
ok &= len(routing) > 0 and moved > 1e-3

run = traverse_util.flatten_dict(run_checkpoints.restore_params(os.path.join(model_dir + ".run", "checkpoints"), 20))
same = set(run) == set(params) and all(np.array_equal(run[p], params[p]) for p in params)
ok &= same
print(f"== run checkpoint {model_dir}.run/checkpoints/20: parameters {'identical' if same else 'DIFFER'}")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PYCHECK
