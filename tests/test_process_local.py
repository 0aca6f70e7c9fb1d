"""The per-process checkpoint store of multi-process adaptation: every leaf round-trips bit for bit with its
dtype, bfloat16 included (stored as its bits, since np.savez cannot name it), and a step without its commit
marker does not count."""
import io
import os

import ml_dtypes
import numpy as np

from mhr_jax.checkpoints.process_local import COMMITTED, ProcessLocalCheckpointer


def test_round_trip_keeps_dtypes_and_bits_and_uncommitted_steps_are_ignored(tmp_path):
  rng = np.random.default_rng(0)
  state = {"params": {"a": rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16),
                      "b": rng.normal(size=(5,)).astype(np.float32)},
           "step": np.asarray(7, np.int32)}
  store = ProcessLocalCheckpointer(str(tmp_path / "ckpt"), keep=1)
  store.save(3, state, {"pairs_done": 2})
  with np.load(io.BytesIO((tmp_path / "ckpt" / "3" / "state.npz").read_bytes())) as saved:
    assert saved["params/a"].dtype == np.uint16 and saved["params/b"].dtype == np.float32
  target = {"params": {"a": np.zeros((3, 4), ml_dtypes.bfloat16), "b": np.zeros(5, np.float32)},
            "step": np.asarray(0, np.int32)}
  restored, progress = store.restore(3, target)
  assert progress == {"pairs_done": 2}
  for got, want in zip([restored["params"]["a"], restored["params"]["b"], restored["step"]],
                       [state["params"]["a"], state["params"]["b"], state["step"]]):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(f"u{got.dtype.itemsize}"), want.view(f"u{want.dtype.itemsize}"))
  store.save(5, state, {"pairs_done": 4})
  assert store.all_steps() == [5]                   # keep=1 removed step 3
  os.remove(tmp_path / "ckpt" / "5" / COMMITTED)
  assert store.latest_step() is None
