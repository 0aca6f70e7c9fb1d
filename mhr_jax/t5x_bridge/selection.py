"""Best-on-dev model selection in T5X's trainer: keep the checkpoint with the best dev score.

The project's trainer scores each adapted pair every `AdaptConfig.select_every` steps (and at the
end) on its dev split, by the ROUGE-L of greedy generations (`select_metric`), and keeps the
parameters of the first step with the best score (the authors' SuperNI model selection). Under T5X
the same takes three pieces, wired by configs/t5x/best_on_dev.gin:
  - T5X's inference evaluation runs on the dev split every EVAL_PERIOD steps and after the last
    step, right after T5X saved that step's checkpoint (SaveCheckpointConfig.period = EVAL_PERIOD);
  - `BestOnDev`, a T5X action after each inference evaluation: the score is the metric's mean over
    the evaluated tasks; a score strictly above the best so far makes that step the best (the
    first step wins ties, as in the project's trainer). It writes MODEL_DIR/best_on_dev.json:
      {"metric", "best_step", "best_score", "checkpoint": MODEL_DIR/checkpoint_<best_step>,
       "history": [{"step", "score", "tasks": {task: value}}, ...]}
  - `BestOnDevCheckpointManager`, T5X's orbax checkpoint manager that deletes, after each save,
    every checkpoint but the one just saved (to resume from) and the best so far. A finished run
    keeps the best checkpoint and the last one.
Evaluate the best checkpoint on the test split with `t5x.eval` (CHECKPOINT_PATH = its "checkpoint").
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging
from t5x import checkpoints as t5x_checkpoints
from t5x import trainer as t5x_trainer
from t5x import utils as t5x_utils

RECORD_FILE = "best_on_dev.json"


def read_record(model_dir: str) -> dict | None:
  """MODEL_DIR/best_on_dev.json as a dict, or None before the first evaluation."""
  path = os.path.join(model_dir, RECORD_FILE)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _write_record(model_dir: str, record: dict) -> None:
  """Through a temporary file and a rename, so a reader never sees half a record."""
  path = os.path.join(model_dir, RECORD_FILE)
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _value(metric) -> float:
  """seqio's evaluator gives floats or `seqio.metrics.Scalar`s."""
  return float(getattr(metric, "value", metric))


class BestOnDev(t5x_trainer.BaseAction):
  """T5X action (ActionMode INFER_EVAL) that records the best dev score and its step.

  For gin: `train_script.train.actions = {'INFER_EVAL': [@bridge_selection.BestOnDev()]}` with
  `train_script.train.concurrent_metrics = False` (T5X runs INFER_EVAL actions only then).

  Args:
    model_dir: the run's MODEL_DIR (its checkpoints and the record file).
    metric: the evaluated tasks' metric to maximise, e.g. 'rougeL' (t5x_bridge.tasks.superni_metric).
  """

  def __init__(self, model_dir: str, metric: str = "rougeL"):
    self.model_dir, self.metric = model_dir, metric
    # A resumed run continues the record of its earlier part.
    self.record = read_record(model_dir) or {"metric": metric, "best_step": None,
                                             "best_score": None, "checkpoint": None, "history": []}
    if self.record["metric"] != metric:
      raise ValueError(f"BestOnDev.metric={metric!r} but {os.path.join(model_dir, RECORD_FILE)} "
                       f"records {self.record['metric']!r}; use a new MODEL_DIR")

  def run(self, train_state, metrics_by_task: Mapping[str, Mapping[str, Any]]) -> bool:
    """Scores the step; never stops training (returns False)."""
    step = int(t5x_utils.get_local_data(train_state.step))
    tasks = {task: _value(values[self.metric]) for task, values in metrics_by_task.items()
             if self.metric in values}
    if not tasks:
      raise ValueError(f"BestOnDev.metric={self.metric!r}: no evaluated task reports it (tasks and "
                       f"metrics: { {t: sorted(v) for t, v in metrics_by_task.items()} })")
    score = float(np.mean(list(tasks.values())))
    record = self.record
    record["history"] = [h for h in record["history"] if h["step"] != step]
    record["history"].append({"step": step, "score": score, "tasks": tasks})
    if record["best_score"] is None or score > record["best_score"]:
      record.update(best_step=step, best_score=score,
                    checkpoint=t5x_checkpoints.get_checkpoint_dir(self.model_dir, step))
    _write_record(self.model_dir, record)
    logging.info("best-on-dev: step %d %s %.4f; best step %d (%.4f)", step, self.metric, score,
                 record["best_step"], record["best_score"])
    return False


class BestOnDevCheckpointManager(t5x_checkpoints.OrbaxCheckpointManagerInterface):
  """T5X's orbax checkpoint manager keeping only the latest checkpoint and the best on dev.

  For gin: `utils.SaveCheckpointConfig.checkpoint_manager_cls` and
  `utils.RestoreCheckpointConfig.checkpoint_manager_cls` (T5X wants both the same). The best step is
  read from the record that `BestOnDev` writes; before the first evaluation only the latest is kept
  (step 0, saved before training, is never a candidate: selection starts after EVAL_PERIOD steps).
  """

  def save(self, train_state, state_transformation_fns=(), force: bool = True) -> bool:
    saved = super().save(train_state, state_transformation_fns, force)
    self.wait_until_finished()   # delete only once the new checkpoint is complete
    record = read_record(os.fspath(self.directory))
    keep = {int(t5x_utils.get_local_data(train_state.step))}
    if record is not None and record["best_step"] is not None:
      keep.add(int(record["best_step"]))
    for step in self.all_steps():
      if step not in keep:
        self._manager.delete(step)  # the orbax manager the T5X interface wraps
    return saved
