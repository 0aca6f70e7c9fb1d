"""SeqIO task and mixture registration.

- `tasks.superni`: Super-NaturalInstructions from a local natural-instructions clone.
- `tasks.t0`: the T0 training mixture and the 11 held-out datasets from a local bigscience/P3 copy.
- `tasks.synthetic`: the embedded synthetic suite, written in the SuperNI format and read by `tasks.superni`.

Nothing is registered on import: each module has a `register_*` function that takes the data location and
the vocabulary and may be called again (it replaces what it registered before). The helpers below are shared
by those modules.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

_INVALID_NAME_CHARS = re.compile(r"[^\w.]")


def seqio_name(*parts: str) -> str:
  """A valid SeqIO task or mixture name: parts joined by "_", other characters than [A-Za-z0-9_.] -> "_"."""
  return "_".join(_INVALID_NAME_CHARS.sub("_", p) for p in parts)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """Text-to-text features; both sides end with EOS (appended after any truncation)."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def replace_task(name: str, dataset_fn: Callable, splits: Sequence[str],
                 vocabulary: seqio.Vocabulary) -> seqio.Task:
  """(Re-)register a text-to-text task whose source examples carry "inputs"/"targets" strings."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=list(splits)),
      output_features=output_features(vocabulary),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
  )


def replace_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float | Callable]]) -> seqio.Mixture:
  """(Re-)register a mixture; a rate is a float or a function of the seqio.Task."""
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks_and_rates))


def _dense_strings(x):
  # A ragged string column sliced per example arrives as a ragged or dense 1-D tensor.
  return x.flat_values if isinstance(x, tf.RaggedTensor) else x


def examples_dataset(examples: Sequence[Mapping], name: str) -> tf.data.Dataset:
  """In-memory examples -> tf.data.Dataset.

  Each example maps feature -> str (tf.string scalar), int (tf.int32 scalar) or list of str (tf.string (n,)).
  `name` (task and split) is used in the error for an empty list.
  """
  if not examples:
    raise ValueError(f"{name}: no examples")
  columns = {}
  list_keys = []
  for key, value in examples[0].items():
    values = [ex[key] for ex in examples]
    if isinstance(value, str):
      columns[key] = tf.constant(values, dtype=tf.string)
    elif isinstance(value, (int,)):
      columns[key] = tf.constant(values, dtype=tf.int32)
    elif isinstance(value, (list, tuple)):
      columns[key] = tf.ragged.constant([list(v) for v in values], dtype=tf.string)
      list_keys.append(key)
    else:
      raise TypeError(f"{name}: feature {key!r} has unsupported type {type(value).__name__}")
  ds = tf.data.Dataset.from_tensor_slices(columns)
  if list_keys:
    ds = ds.map(lambda ex: {k: _dense_strings(v) if k in list_keys else v for k, v in ex.items()})
  return ds
