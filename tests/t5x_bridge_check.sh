#!/usr/bin/env bash
# End-to-end check of the T5X bridge with real T5X, on CPU:
#   1. the README's T5X command, 20 steps:
#        python -m t5x.train --gin_file=configs/mhr.gin --gin.MODEL_DIR="'DIR'" --gin.TRAIN_STEPS=20
#      the training loss (T5X's TensorBoard events) fell; the last checkpoint holds the routing logits,
#      moved away from their U(-1e-3, 1e-3) init; it converts to a project run checkpoint with the same
#      parameters (python -m mhr_jax.t5x_bridge.checkpoints, the project's flags);
#   2. few-shot adaptation from it with best-on-dev selection (configs/t5x/adapt_tiny.gin, 20 steps, the
#      dev split generated at steps 10 and 20): MODEL_DIR/best_on_dev.json names the first best step, only
#      its checkpoint and the last stay, and T5X's dev generations and ROUGE-L of the last checkpoint are
#      the project's (evaluation.generate, metrics.superni_metrics);
#   3. T-Few adaptation (configs/t5x/adapt_t0.gin on a tiny model and a P3-format fixture): the batches
#      hold the answer choices, the logged loss is the sum of T-Few's three terms, and T5X's rank
#      classification of the held-out dataset ran.
#
# Usage, from anywhere:  tests/t5x_bridge_check.sh PYTHON [MODEL_DIR]
#   PYTHON: the python of a virtualenv with the project's requirements plus T5X (see README.md,
#   section "T5X"). MODEL_DIR defaults to a fresh
#   temporary directory; the other runs go next to it (MODEL_DIR.adapt, MODEL_DIR.t0). Exit status 0
#   when every check passes.
set -euo pipefail

PY=${1:?usage: $0 PYTHON [MODEL_DIR]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${2:-$(mktemp -d)/mhr_t5x}
LOG="$DIR.log"
mkdir -p "$(dirname "$DIR")"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3

run() {  # run DESCRIPTION COMMAND...: the command's output goes to the log
  local what=$1 start
  shift
  echo "== $what"
  start=$(date +%s)
  if ! "$@" >> "$LOG" 2>&1; then
    tail -40 "$LOG"
    echo "FAIL: $what (log: $LOG)"
    exit 1
  fi
  echo "   done in $(( $(date +%s) - start )) s"
}

# The checks print to stdout; TensorFlow's and absl's chatter goes to the log.
check() {  # check STAGE: runs the Python block of that stage below
  "$PY" - "$1" "$DIR" "$ROOT" 2>>"$LOG" < <(sed -n "/^# >>> $1\$/,/^# <<< $1\$/p" "$0") \
    || { echo "(log: $LOG)"; exit 1; }
}

: > "$LOG"
run "python -m t5x.train --gin_file=configs/mhr.gin --gin.MODEL_DIR=\"'$DIR'\" --gin.TRAIN_STEPS=20" \
  "$PY" -m t5x.train --gin_file=configs/mhr.gin --gin.MODEL_DIR="'$DIR'" --gin.TRAIN_STEPS=20
run "checkpoint -> run checkpoint" \
  "$PY" -m mhr_jax.t5x_bridge.checkpoints --to=run --gin_file=configs/mhr.gin \
  --gin.MODEL_DIR="'$DIR'" --gin.TRAIN_STEPS=20 --t5x_checkpoint="$DIR/checkpoint_20" --run_dir="$DIR.run"
check pretrain

run "few-shot adaptation with best-on-dev: configs/t5x/adapt_tiny.gin + adapt_mhr.gin" \
  "$PY" -m t5x.train --gin_file=configs/t5x/adapt_tiny.gin --gin_file=configs/t5x/adapt_mhr.gin \
  --gin.PRETRAINED_CHECKPOINT="'$DIR'" --gin.MODEL_DIR="'$DIR.adapt'"
check select

check t0_fixture   # the P3 fixture, a tiny T0 gin file and its pre-trained checkpoint
run "T-Few adaptation: configs/t5x/adapt_t0.gin (tiny model, P3-format fixture)" \
  "$PY" -m t5x.train --gin_file="$DIR.t0/tiny_t0.gin" --gin.MODEL_DIR="'$DIR.t0/adapt'"
check tfew
echo "PASS"
exit 0

# >>> pretrain
import glob, os, sys
import numpy as np
import tensorflow as tf
tf.get_logger().setLevel("ERROR")
from flax import traverse_util
from mhr_jax.checkpoints import run_state as run_checkpoints
from mhr_jax.t5x_bridge import checkpoints

model_dir = sys.argv[2]
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
sys.exit(0 if ok else 1)
# <<< pretrain

# >>> select
import json, os, sys
import numpy as np
import tensorflow as tf
tf.get_logger().setLevel("ERROR")
from mhr_jax import metrics, models
from mhr_jax.data import pipeline as data
from mhr_jax.evaluation import drivers as evaluation
from mhr_jax.adapters import transforms
from mhr_jax.t5x_bridge import checkpoints, selection
from mhr_jax.t5x_bridge import tasks as bridge_tasks

adapt_dir = sys.argv[2] + ".adapt"
record = selection.read_record(adapt_dir)
history = record["history"]
scores = [h["score"] for h in history]
first_best = history[int(np.argmax(scores))]["step"]
print(f"== best-on-dev: dev ROUGE-L by step {[(h['step'], round(h['score'], 4)) for h in history]}; "
      f"best step {record['best_step']}")
ok = [h["step"] for h in history] == [10, 20] and record["best_step"] == first_best
kept = sorted(d for d in os.listdir(adapt_dir) if d.startswith("checkpoint_"))
want = sorted({f"checkpoint_{record['best_step']}", "checkpoint_20"})
ok &= kept == want and record["checkpoint"] == os.path.join(adapt_dir, f"checkpoint_{record['best_step']}")
print(f"   checkpoints kept {kept} (want {want})")

# The project's dev evaluation of checkpoint_20, task by task (its routing row as the only task).
model = checkpoints.load_gin_model(["configs/t5x/adapt_tiny.gin", "configs/t5x/adapt_mhr.gin"],
                                   [f"MODEL_DIR = '{adapt_dir}'", "PRETRAINED_CHECKPOINT = 'unused'"])
params = checkpoints.read_t5x_params(os.path.join(adapt_dir, "checkpoint_20"))
registration = bridge_tasks.register("synthetic", os.path.join(adapt_dir, "synthetic_data"), "byte",
                                     n_train_tasks=8, n_test_tasks=2, fewshot_ks=(16, 32, 64, 100))
vocabulary = data.get_vocabulary("byte")
step20 = history[-1]["tasks"]
for task in registration.mixtures["synthetic_test"]:
  name = registration.tasks[task]
  one_cfg, one_params = transforms.select_task_rows(model.config, params, [registration.task_ids[task]])
  examples = data.eval_examples(name, "dev_k16_seed13")
  tokens = evaluation.generate(models.T5(one_cfg), one_params,
                               data.generation_batches(examples, vocabulary, 8, 32), 16, task_id=0)
  predictions = evaluation.decode_texts(vocabulary, tokens)
  rouge = metrics.superni_metrics(predictions, [ex["references"] for ex in examples])["rougeL"]
  with open(os.path.join(adapt_dir, "inference_eval", f"{name}-{20:06d}.jsonl")) as f:
    t5x_predictions = [json.loads(line)["prediction"] for line in f]
  same = t5x_predictions == predictions and abs(step20[name] - rouge) < 1e-9
  ok &= same
  print(f"   {task}: step 20 dev ROUGE-L T5X {step20[name]:.4f}, project {rouge:.4f}; "
        f"{len(predictions)} dev generations {'identical' if t5x_predictions == predictions else 'DIFFER'}")
sys.exit(0 if ok else 1)
# <<< select

# >>> t0_fixture
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
import jax
import fixtures_formats as ff
from mhr_jax.t5x_bridge import checkpoints

base = sys.argv[2] + ".t0"
p3 = os.path.join(base, "P3")
train_subsets = ["qa_t1", "qa_t2", "qa_t3"]
for subset in train_subsets:
  ff.write_p3_subset(p3, subset, "train", [{"inputs": f"{subset} question", "targets": "a"}] * 4)
heldout = ["nli_c_t0", "nli_c_t1"]   # one held-out dataset, two templates; 2 or 3 answer choices
for t, subset in enumerate(heldout):
  rows = []
  for i in range(16):
    choices = ["yes", "no", "maybe so"][:2 + (i + t) % 2]
    rows.append({"inputs": f"template {t} premise {i}", "targets": choices[i % len(choices)],
                 "answer_choices": choices})
  for split in ("train", "validation"):
    ff.write_p3_subset(p3, subset, split, rows)
catalog = {"max_examples_per_dataset": 10, "fewshot_seeds": [42],
           "train": [{"dataset": "qa", "train_size": 4, "subsets": train_subsets}],
           "eval": [{"dataset": "nli_c", "shots": 8, "fewshot_split": "train", "eval_split": "validation",
                     "subsets": heldout}]}
with open(os.path.join(base, "catalog.json"), "w") as f:
  json.dump(catalog, f)
# The paper's T0 adaptation files on a tiny model: 3 training tasks, the held-out dataset's id 3.
with open(os.path.join(base, "tiny_t0.gin"), "w") as f:
  f.write(f"""from __gin__ import dynamic_registration
import __main__ as train_script
from mhr_jax.adapters import config as adapter_config
from mhr_jax.t5x_bridge import models as bridge_models
from mhr_jax.t5x_bridge import tasks as bridge_tasks
include 'configs/t5x/adapt_t0.gin'
include 'configs/t5x/adapt_mhr.gin'
HF_CHECKPOINT = 'unused'
VOCABULARY_SPEC = 'byte'
DATA_DIR = '{p3}'
PRETRAINED_CHECKPOINT = '{os.path.join(base, "pre")}'
N_TASKS = 3
ADAPT_N_TASKS = 4
T0_DATASET_MIXTURE = 't0_eval_nli_c'
TRAIN_SPLIT = 'train_k8_seed42'
TASK_FEATURE_LENGTHS = {{'inputs': 32, 'targets': 8}}
TRAIN_STEPS = 4
EVAL_PERIOD = 4
BATCH_SIZE = 4
train_script.train.stats_period = 1
bridge_models.t5_module:
  hf_config = None
  preset = 'tiny'
  scan_layers = False
  remat_policy = 'none'
adapter_config.AdapterConfig:
  n_skills = 4
  n_splits = 4
bridge_tasks.registered.catalog_path = '{os.path.join(base, "catalog.json")}'
""")
# Its pre-trained checkpoint: the same model with the 3 training tasks' rows (init values).
model = checkpoints.load_gin_model([os.path.join(base, "tiny_t0.gin")], ["ADAPT_N_TASKS = 3"])
params = model.get_initial_variables(jax.random.key(0), {"encoder_input_tokens": (1, 4),
                                                         "decoder_input_tokens": (1, 4)})["params"]
checkpoints.save_t5x(checkpoints.train_state_from_params(model, params, 0), os.path.join(base, "pre"))
# <<< t0_fixture

# >>> tfew
import glob, os, sys
import numpy as np
import tensorflow as tf
tf.get_logger().setLevel("ERROR")

run_dir = sys.argv[2] + ".t0/adapt"
scalars = {}
for path in glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True):
  run = os.path.relpath(os.path.dirname(path), run_dir)
  for event in tf.compat.v1.train.summary_iterator(path):
    for value in event.summary.value:
      if value.HasField("tensor") and value.tensor.dtype == tf.float32.as_datatype_enum:
        scalars.setdefault((run, value.tag), {})[event.step] = float(tf.make_ndarray(value.tensor))
train = {tag: by_step for (run, tag), by_step in scalars.items() if run == "train"}
terms = ["loss/lm", "loss/choice_ce", "loss/unlikelihood"]
ok = all(t in train for t in ["loss", *terms])
steps = sorted(train.get("loss", {}))
for s in steps:
  total = sum(train[t][s] for t in terms if t in train)
  ok &= abs(train["loss"][s] - total) < 1e-4
  print(f"== T-Few step {s}: loss {train['loss'][s]:.4f} = " +
        " + ".join(f"{t[5:]} {train[t][s]:.4f}" for t in terms if t in train))
accuracy = {run: by_step for (run, tag), by_step in scalars.items() if tag.endswith("accuracy")}
ok &= steps == [1, 2, 3, 4] and any(run.startswith("inference_eval") and run.endswith("_rank")
                             for run in accuracy)
print(f"   rank classification after training: "
      f"{ {run: [round(v, 2) for v in by_step.values()] for run, by_step in accuracy.items()} }")
sys.exit(0 if ok else 1)
# <<< tfew
