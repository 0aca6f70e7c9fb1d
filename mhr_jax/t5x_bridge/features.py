"""T5X's feature converter for routed models: seqio's encoder-decoder conversion plus `task_ids`.

T5X builds every dataset (train, train-eval, inference eval, `t5x.eval`) with
`model.FEATURE_CONVERTER_CLS(pack=..., use_custom_packing_ops=...)` and checks that the result is a
`seqio.FeatureConverter`. `TaskIdsFeatureConverter` is that class; the conversion itself is the
project's (`mhr_jax.data.pipeline.TaskIdsFeatureConverter`), so both trainers see the same rows:

  input examples  inputs, targets (int32 (L,)), task_ids (int32 scalar)
  output rows     encoder_input_tokens (Li,), decoder_input_tokens, decoder_target_tokens,
                  decoder_loss_weights (Lt,) int32, task_ids () int32; with pack=True also
                  encoder/decoder_segment_ids and encoder/decoder_positions.

Packing is per task, as in the project's trainer: examples are grouped in windows of
`data.PACK_WINDOW` examples of one task before packing, so a packed row never mixes tasks (routing is
per row). seqio's custom packing ops are not used (`use_custom_packing_ops` is accepted and ignored).

Task ids are checked where the data enters: an id outside [0, n_tasks) stops the input pipeline with
an error naming AdapterConfig.n_tasks. Inside jit nothing could catch it (the routing gather would clamp
it to the last row silently).

Tasks must declare `task_ids` among their output features (`TASK_IDS_FEATURE`): seqio mixtures keep
only declared features. `t5x_bridge.tasks` does that for the project's registrations. The declared
feature is a length-1 vector, not a scalar, because seqio's Evaluator measures the length of every
output feature; this converter takes either form and emits the scalar the model reads.
"""
from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from mhr_jax.data import pipeline as data

_Spec = seqio.FeatureConverter.FeatureSpec

# The task id as a seqio output feature: int32 (1,), never tokenized, no EOS (`task_ids_as_vector`).
TASK_IDS_FEATURE = seqio.Feature(vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False,
                                 required=False, dtype=tf.int32, rank=1)


def task_ids_as_vector(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Preprocessor: the examples' scalar `task_ids` as the (1,) vector TASK_IDS_FEATURE declares."""
  return ds.map(lambda ex: {**ex, "task_ids": tf.reshape(tf.cast(ex["task_ids"], tf.int32), [1])},
                num_parallel_calls=tf.data.AUTOTUNE)


class TaskIdsFeatureConverter(seqio.FeatureConverter):
  """seqio.EncDecFeatureConverter's rows plus a scalar `task_ids` (see the module docstring).

  Args:
    pack, use_custom_packing_ops, apply_length_check, bos_id: as seqio.FeatureConverter.
    passthrough_features: not supported (ValueError when given).
    n_tasks: AdapterConfig.n_tasks; when set, examples with task ids outside [0, n_tasks) fail.
      `MhrEncoderDecoderModel` binds it (its FEATURE_CONVERTER_CLS is a partial of this class).
  """
  # task_ids is not a task feature here on purpose: T5X and seqio's Evaluator derive the
  # task_feature_lengths from TASK_FEATURES, and a scalar has no length. It is checked in __call__.
  TASK_FEATURES = dict(seqio.EncDecFeatureConverter.TASK_FEATURES)
  MODEL_FEATURES = {**seqio.EncDecFeatureConverter.MODEL_FEATURES,
                    "task_ids": _Spec(dtype=tf.int32, rank=0)}
  PACKING_FEATURE_DTYPES = dict(seqio.EncDecFeatureConverter.PACKING_FEATURE_DTYPES)

  def __init__(self, pack: bool = True, use_custom_packing_ops: bool = False,
               apply_length_check: bool = True, bos_id: int = 0, passthrough_features=None,
               n_tasks: int | None = None):
    if passthrough_features:
      raise ValueError("TaskIdsFeatureConverter: passthrough_features are not supported")
    super().__init__(pack=pack, use_custom_packing_ops=use_custom_packing_ops,
                     apply_length_check=apply_length_check, bos_id=bos_id)
    if n_tasks is not None and n_tasks < 1:
      raise ValueError(f"TaskIdsFeatureConverter: n_tasks={n_tasks} must be >= 1")
    self._n_tasks = n_tasks

  @property
  def n_tasks(self) -> int | None:
    return self._n_tasks

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """seqio's validated conversion; the base class would reject a rank-0 feature when packing."""
    spec = ds.element_spec
    if "task_ids" not in spec:
      raise ValueError(
          f"TaskIdsFeatureConverter: the examples have no 'task_ids' feature (they have "
          f"{sorted(spec)}); declare it among the task's output features "
          "(t5x_bridge.features.TASK_IDS_FEATURE, see t5x_bridge.tasks)")
    shape = spec["task_ids"].shape
    if (not spec["task_ids"].dtype.is_integer or shape.rank not in (0, 1)
        or (shape.rank == 1 and shape[0] not in (1, None))):
      raise ValueError(f"TaskIdsFeatureConverter: 'task_ids' must be one integer per example, "
                       f"got {spec['task_ids'].dtype.name} of shape {shape}")
    # seqio's Evaluator passes a length for every output feature, task_ids included.
    lengths = {k: v for k, v in task_feature_lengths.items() if k != "task_ids"}
    if set(lengths) != set(self.TASK_FEATURES):
      raise ValueError(f"TaskIdsFeatureConverter: task_feature_lengths must name exactly "
                       f"{sorted(self.TASK_FEATURES)}, got {sorted(lengths)}")
    ds = self._validate_dataset(ds, expected_features=self.TASK_FEATURES, expected_lengths=lengths,
                                strict=False, error_label="input_validation")
    ds = self._convert_features(ds, lengths)
    expected = dict(self.MODEL_FEATURES)
    if self.pack:
      expected.update({k: _Spec(dtype=v) for k, v in self.PACKING_FEATURE_DTYPES.items()})
    if set(ds.element_spec) != set(expected):
      raise ValueError(f"TaskIdsFeatureConverter: converted features {sorted(ds.element_spec)} differ "
                       f"from the model features {sorted(expected)}")
    return self._validate_dataset(ds, expected_features=expected,
                                  expected_lengths=self.get_model_feature_lengths(lengths),
                                  strict=True, error_label="output_validation")

  def _check_ids(self, ex):
    task_id = tf.reshape(tf.cast(ex["task_ids"], tf.int32), [])
    if self._n_tasks is not None:
      message = (f"task_ids must lie in [0, AdapterConfig.n_tasks={self._n_tasks}): a task outside "
                 "the model's routing table (held-out tasks need rows, see t5x_bridge.checkpoints)")
      checks = [tf.debugging.assert_greater_equal(task_id, 0, message=message),
                tf.debugging.assert_less(task_id, self._n_tasks, message=message)]
      with tf.control_dependencies(checks):
        task_id = tf.identity(task_id)
    return {"inputs": ex["inputs"], "targets": ex["targets"], "task_ids": task_id}

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    ds = ds.map(self._check_ids, num_parallel_calls=tf.data.AUTOTUNE)
    convert = data.TaskIdsFeatureConverter(pack=self.pack, bos_id=self.bos_id)
    if not self.pack:
      return convert(ds, task_feature_lengths)
    # Pack within windows of one task's examples, so that no packed row mixes tasks.
    return ds.group_by_window(key_func=lambda ex: tf.cast(ex["task_ids"], tf.int64),
                              reduce_func=lambda _, window: convert(window, task_feature_lengths),
                              window_size=data.PACK_WINDOW)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    return data.TaskIdsFeatureConverter(pack=self.pack).get_model_feature_lengths(task_feature_lengths)
