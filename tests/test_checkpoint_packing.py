"""Run checkpoints save small replicated leaves packed per dtype and give the named tree back."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mhr_jax.checkpoints import packing
from mhr_jax.checkpoints.run_state import RunCheckpointer, read_state, restore_params


def _mesh(n):
  return Mesh(np.asarray(jax.devices()[:n]), ("model",))


def _state(n_devices=2):
  mesh = _mesh(n_devices)
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("model"))
  rng = np.random.default_rng(0)
  put = jax.device_put
  return {
      "trainable": {"enc": {"lora_a": put(rng.normal(size=(4, 3)).astype(np.float32), replicated),
                            "logits": put(jnp.asarray(rng.normal(size=(2, 4)), jnp.bfloat16), replicated)}},
      "frozen": {"enc": {"kernel": put(rng.normal(size=(8, 6)).astype(np.float32), sharded),  # sharded
                         "big": put(rng.normal(size=(64, 64)).astype(np.float32), replicated)}},
      "opt_state": [put(jnp.int32(7), replicated), put(np.zeros((4, 3), np.float32), replicated)],
  }


@pytest.fixture
def small_limit(monkeypatch):
  monkeypatch.setattr(packing, "PACK_MAX_BYTES", 1024)  # "big" (16 KiB) stays on its own


def _save(directory, state, step=3):
  checkpointer = RunCheckpointer(str(directory), 1, None)
  assert checkpointer.save(step, state, {"batches_consumed": step}, force=True)
  checkpointer.wait()
  return checkpointer


def test_pack_groups_small_replicated_leaves(small_limit):
  saved, layout = packing.pack(_state())
  by_path = {"/".join(e["path"]): e for e in layout["leaves"]}
  assert by_path["trainable/enc/lora_a"]["group"] == "float32"
  assert by_path["trainable/enc/logits"]["group"] == "bfloat16"
  assert by_path["opt_state/0"]["group"] == "int32"
  assert by_path["frozen/enc/kernel"]["group"] is None  # sharded over "model"
  assert by_path["frozen/enc/big"]["group"] is None  # over PACK_MAX_BYTES
  assert sorted(saved["packed"]) == ["bfloat16", "float32", "int32"]
  assert saved["packed"]["float32"].shape == (12 + 12,)
  assert len(saved["leaves"]) == 2
  host, host_layout = packing.pack(jax.device_get(_state()))  # host NumPy leaves pack as well
  assert sorted(host["packed"]) == ["bfloat16_host", "float32_host", "int32_host"]
  assert [e["group"] for e in host_layout["leaves"]].count(None) == 1  # "big" only


def test_round_trip_onto_another_mesh(tmp_path, small_limit):
  state = _state(2)
  checkpointer = _save(tmp_path / "checkpoints", state)
  assert os.path.isdir(tmp_path / "checkpoints" / "3" / "layout")
  wider = _state(4)  # the same tree laid out over 4 devices
  restored, progress = checkpointer.restore(3, wider)
  checkpointer.close()
  assert progress == {"batches_consumed": 3}
  for (path, got), want, like in zip(jax.tree_util.tree_leaves_with_path(restored),
                                     jax.tree.leaves(state), jax.tree.leaves(wider)):
    assert got.dtype == want.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    assert got.sharding.is_equivalent_to(like.sharding, got.ndim), jax.tree_util.keystr(path)
  params = restore_params(str(tmp_path / "checkpoints"), 3)
  assert set(params["enc"]) == {"lora_a", "logits", "kernel", "big"}
  np.testing.assert_array_equal(np.asarray(params["enc"]["logits"]),
                                np.asarray(state["trainable"]["enc"]["logits"]))
  assert params["enc"]["logits"].dtype == jnp.bfloat16


def test_host_state_round_trip(tmp_path):
  state = jax.device_get(_state())
  checkpointer = _save(tmp_path / "checkpoints", state)
  restored, _ = checkpointer.restore(3, state)
  checkpointer.close()
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_a_different_tree_is_refused_naming_the_leaf(tmp_path):
  checkpointer = _save(tmp_path / "checkpoints", _state())
  other = _state()
  other["trainable"]["enc"]["lora_b"] = other["trainable"]["enc"]["lora_a"]
  with pytest.raises(ValueError, match="lora_b"):
    checkpointer.restore(3, other)
  checkpointer.close()


def test_checkpoints_written_before_packing_still_restore(tmp_path):
  """A checkpoint of the plain named tree (no "layout" item), as runs wrote before packing."""
  state = _state()
  directory = str(tmp_path / "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=("state", "progress"))
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          progress=ocp.args.JsonSave({"batches_consumed": 5})))
  manager.wait_until_finished()
  manager.close()
  checkpointer = RunCheckpointer(directory, 1, None)
  restored, progress = checkpointer.restore(5, state)
  checkpointer.close()
  assert progress == {"batches_consumed": 5}
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  params = restore_params(directory, 5)
  np.testing.assert_array_equal(np.asarray(params["enc"]["kernel"]),
                                np.asarray(state["frozen"]["enc"]["kernel"]))
  np.testing.assert_array_equal(read_state(directory, 5)["opt_state/1"], np.zeros((4, 3), np.float32))


def test_read_state_names_every_leaf(tmp_path, small_limit):
  state = _state()
  _save(tmp_path / "checkpoints", state).close()
  leaves = read_state(str(tmp_path / "checkpoints"), 3)
  assert sorted(leaves) == sorted(["trainable/enc/lora_a", "trainable/enc/logits", "frozen/enc/kernel",
                                   "frozen/enc/big", "opt_state/0", "opt_state/1"])
  np.testing.assert_array_equal(leaves["opt_state/0"], 7)
  np.testing.assert_array_equal(leaves["frozen/enc/kernel"], np.asarray(state["frozen"]["enc"]["kernel"]))


def _bits(x):
  """(dtype, shape, raw bytes) of an array: equal only for a bit-for-bit copy (NaN payloads, -0.0 included)."""
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


def _values_float32_would_change():
  """Leaf name -> values of every dtype a state holds, most of which a trip through float32 changes. With jax
  x64 disabled 64-bit leaves exist only as host NumPy arrays ("host_" leaves, packed as the others are)."""
  signalling_nan = np.array([0x7FF0000000000001], np.uint64).view(np.float64)[0]
  return {
      "int32": np.array([2**24 + 1, -(2**31), 2**31 - 1], np.int32),
      "uint32": np.array([2**32 - 1, 2**24 + 1], np.uint32),
      "float32": np.array([1 + 2**-23, 3.4e38, 1e-45, -0.0], np.float32),
      "bfloat16": np.array([1.0078125, -3.3895e38, 9.2e-41, np.inf], jnp.bfloat16),
      "bool": np.array([True, False, True, True]),
      "host_float64": np.array([1 + 2**-52, 1e300, 5e-324, -0.0, np.pi, -1 / 3, signalling_nan], np.float64),
      "host_int64": np.array([2**53 + 1, -(2**63), 2**63 - 1], np.int64),
      "host_int32": np.array([2**24 + 1, -(2**31)], np.int32),
      "host_uint32": np.array([2**32 - 1], np.uint32),
      "host_bfloat16": np.array([1.0078125, -1.0], jnp.bfloat16),
      "host_bool": np.array([False, True]),
  }


def test_every_dtype_round_trips_bit_for_bit(tmp_path):
  """Each packed group restores in its own saved dtype: no leaf goes through float32 (or any other dtype).
  Device leaves (replicated) are params, as restore_params reads them; 64-bit host leaves sit outside the
  params, since restore_params puts params on a device, where x64-disabled JAX has no 64-bit types."""
  replicated = NamedSharding(_mesh(2), P())
  values = _values_float32_would_change()
  where = {name: "host" if v.dtype.itemsize == 8 else "trainable" for name, v in values.items()}
  state = {"trainable": {}, "host": {}}
  for name, v in values.items():
    state[where[name]][name] = v if name.startswith("host_") else jax.device_put(v, replicated)
  checkpointer = _save(tmp_path / "checkpoints", state)
  groups = {e["path"][-1]: e["group"] for e in packing.pack(state)[1]["leaves"]}
  assert groups["uint32"] == "uint32" and groups["host_float64"] == "float64_host"
  assert None not in groups.values()  # every leaf is packed: the test is about the packed groups
  restored, _ = checkpointer.restore(3, state)
  checkpointer.close()
  for name, want in values.items():
    got = restored[where[name]][name]
    assert isinstance(got, np.ndarray) == name.startswith("host_"), name
    assert _bits(got) == _bits(want), name
  on_host = read_state(str(tmp_path / "checkpoints"), 3)
  assert sorted(on_host) == sorted(f"{where[name]}/{name}" for name in values)
  for name, want in values.items():
    assert _bits(on_host[f"{where[name]}/{name}"]) == _bits(want), name
  params = restore_params(str(tmp_path / "checkpoints"), 3)
  assert sorted(params) == sorted(state["trainable"])
  for name, got in params.items():
    assert _bits(got) == _bits(values[name]), name
