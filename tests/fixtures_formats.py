"""Writers for small files in the real on-disk formats the loaders read (used by the data tests).

- natural-instructions clone: tasks/<task>.json with every field of the real files and
  splits/default/{train,test}_tasks.txt.
- bigscience/P3: data/<subset>/{split}.tfrecord-00000-of-00001 (tf.train.Example records with int64 token
  ids and string features, as a SeqIO cache stores them), info.{split}.json (feature dtypes and shapes,
  num_shards, seqio_version) and stats.{split}.json.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf


def superni_task(name: str, n_instances: int, definition: str = "Copy the input.",
                 outputs_per_instance: int = 1, tag: str = "input") -> dict:
  """A task JSON with n_instances instances; instance i has input "<tag> {i}" and output(s) "output {i}"."""
  return {
      "Contributors": ["Test Writer"],
      "Source": ["fixture"],
      "URL": ["https://example.org"],
      "Categories": ["Text Matching"],
      "Reasoning": [],
      "Definition": [definition],
      "Input_language": ["English"],
      "Output_language": ["English"],
      "Instruction_language": ["English"],
      "Domains": ["Miscellaneous"],
      "Positive Examples": [
          {"input": "first example", "output": "first answer", "explanation": "because"},
          {"input": "second example.", "output": "second answer!", "explanation": "because"},
      ],
      "Negative Examples": [{"input": "bad example", "output": "wrong", "explanation": "no"}],
      "Instances": [
          {"id": f"{name.split('_')[0]}-{i:04x}", "input": f"{tag} {i}",
           "output": [f"output {i}"] + [f"alt {j} of {i}" for j in range(1, outputs_per_instance)]}
          for i in range(n_instances)],
      "Instance License": ["Unknown"],
  }


def write_superni_clone(root, tasks: dict[str, dict], train: list[str], test: list[str]) -> str:
  """Write tasks/<name>.json for each task and the default split lists; returns the clone path."""
  root = str(root)
  os.makedirs(os.path.join(root, "tasks"), exist_ok=True)
  os.makedirs(os.path.join(root, "splits", "default"), exist_ok=True)
  for name, data in tasks.items():
    with open(os.path.join(root, "tasks", f"{name}.json"), "w", encoding="utf-8") as f:
      json.dump(data, f, indent=4, ensure_ascii=False)
  for split, names in (("train", train), ("test", test)):
    with open(os.path.join(root, "splits", "default", f"{split}_tasks.txt"), "w") as f:
      f.write("\n".join(names) + "\n")
  return root


def _bytes(values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))


def _ints(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def write_p3_subset(p3_dir, subset: str, split: str, examples: list[dict], stats: bool = True) -> str:
  """Write one P3 split. examples: dicts with "inputs", "targets" (str) and optionally "answer_choices".

  The int features hold stand-in token ids (one per character), as the loader ignores them.
  """
  folder = os.path.join(str(p3_dir), "data", subset)
  os.makedirs(folder, exist_ok=True)
  with_choices = "answer_choices" in examples[0]
  path = os.path.join(folder, f"{split}.tfrecord-00000-of-00001")
  with tf.io.TFRecordWriter(path) as writer:
    for ex in examples:
      feature = {
          "inputs": _ints(ord(c) % 1000 for c in ex["inputs"]),
          "inputs_pretokenized": _bytes([ex["inputs"]]),
          "targets": _ints(ord(c) % 1000 for c in ex["targets"]),
          "targets_pretokenized": _bytes([ex["targets"]]),
      }
      if with_choices:
        feature["answer_choices"] = _bytes(ex["answer_choices"])
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  features = {
      "inputs": {"dtype": "int32", "shape": [None]},
      "inputs_pretokenized": {"dtype": "string", "shape": []},
      "targets": {"dtype": "int32", "shape": [None]},
      "targets_pretokenized": {"dtype": "string", "shape": []},
  }
  if with_choices:
    features["answer_choices"] = {"dtype": "string", "shape": [None]}
  with open(os.path.join(folder, f"info.{split}.json"), "w") as f:
    json.dump({"features": features, "num_shards": 1, "seqio_version": "0.0.6"}, f, indent=2)
  if stats:
    with open(os.path.join(folder, f"stats.{split}.json"), "w") as f:
      json.dump({"examples": len(examples), "inputs_chars": sum(len(e["inputs"]) for e in examples),
                 "targets_chars": sum(len(e["targets"]) for e in examples)}, f)
  return folder
