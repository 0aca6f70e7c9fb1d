#!/usr/bin/env bash
# The GPU targets' measurements in one prepared command: T5-XL on one GPU (an H200), batch 8 and 32,
# input 512 / target 128, the project's train steps beside Hugging Face + PEFT, then evaluation
# (scoring and greedy decoding beside HF generate). Finishes within 8 minutes: a 435 s budget for
# all cases, 150 s at most per case; cases left when the budget is spent are recorded as skipped.
#
#   bash benchmarks/gpu.sh OUT_DIR      # writes OUT_DIR/step_results.{json,md} (+ OUT_DIR/work/)
#
# Runs under the machine's python3 (jax with CUDA, flax, optax, torch, transformers, peft; no
# TensorFlow, SeqIO or gin needed). The order is the priority: the headline MHR / PEFT comparison
# first, then the other methods, batch 32, and evaluation.
set -euo pipefail
OUT_DIR="${1:-${OUT:-benchmarks/out}}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
CASES="peak,train:mhr:8,train:lora:8,peft_train:mhr:8,peft_train:lora:8,train:mhr:32"
CASES="$CASES,peft_train:mhr:32,train:poly:8,train:full:8,train:lora:32,train:full:32"
CASES="$CASES,train:poly:32,score:8,greedy:8,hf_score:8,hf_generate:8,peft_train:lora:32"
exec timeout 470 "${PYTHON:-python3}" -m benchmarks.step --preset=xl --dtype=bfloat16 \
  --input_len=512 --target_len=128 --batches=8,32 --eval_batch=8 --steps=5 --matmul_n=8192 \
  --cases="$CASES" --budget_s=435 --case_timeout_s=150 --startup_timeout_s=90 \
  --out_dir="$OUT_DIR" "${@:2}"
