"""Mesh construction, logical -> mesh rules, parameter and batch shardings (8 simulated devices)."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import AxisType, PartitionSpec as P

from mhr_jax import models, partitioning
from mhr_jax.adapters import AdapterConfig
from mhr_jax.training.train_step import abstract_boxed_params


def _boxed(adapter=None):
  cfg = models.preset("tiny", adapter=adapter or AdapterConfig(kind="mhr", n_tasks=3, n_skills=2,
                                                                n_splits=2, rank=2))
  return abstract_boxed_params(models.T5(cfg))


def test_mesh_config_resolves_the_rest_and_rejects_bad_products():
  assert partitioning.MeshConfig().resolve(8) == (8, 1, 1)
  assert partitioning.MeshConfig(data=-1, fsdp=2, model=2).resolve(8) == (2, 2, 2)
  assert partitioning.MeshConfig(data=2, fsdp=-1, model=1).resolve(8) == (2, 4, 1)
  with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the 8 devices"):
    partitioning.MeshConfig(data=-1, fsdp=3).resolve(8)
  with pytest.raises(ValueError, match=r"data\*fsdp\*model = 4 but there are 8 devices"):
    partitioning.MeshConfig(data=2, fsdp=2, model=1).resolve(8)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    partitioning.MeshConfig(data=-1, fsdp=-1).resolve(8)
  with pytest.raises(ValueError, match=r"MeshConfig.model=0"):
    partitioning.MeshConfig(model=0).resolve(8)


def test_make_mesh_axes_types_and_describe():
  assert jax.device_count() == 8
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  sub = partitioning.make_mesh(partitioning.MeshConfig(data=-1), devices=jax.devices()[:2])
  assert dict(sub.shape) == {"data": 2, "fsdp": 1, "model": 1}
  text = partitioning.describe(mesh)
  assert "data=2, fsdp=2, model=2" in text and "process 0/1" in text and "8 global" in text


def test_every_logical_axis_of_the_model_has_a_rule():
  ruled = {name for name, _ in partitioning.LOGICAL_RULES}
  for adapter in (AdapterConfig(kind="mhr", n_tasks=2, n_skills=2, n_splits=2, routing="shared"),
                  AdapterConfig(kind="private_lora", n_tasks=2), AdapterConfig(kind="ia3")):
    leaves = jax.tree.leaves(_boxed(adapter), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    names = {n for leaf in leaves for n in leaf.names}
    assert names <= ruled, names - ruled


def test_param_shardings_shard_the_base_and_replicate_adapters():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
  shardings = traverse_util.flatten_dict(partitioning.param_shardings(_boxed(), mesh))
  spec = lambda path: shardings[tuple(path.split("/"))].spec
  assert spec("encoder/block_0/self_attention/q/kernel") == P("fsdp", "model")
  assert spec("encoder/block_0/self_attention/o/kernel") == P("model", "fsdp")
  assert spec("decoder/block_1/mlp/wi_0/kernel") == P("fsdp", "model")
  assert spec("shared_embedding/embedding") == P("model", "fsdp")
  assert spec("logits_dense/kernel") == P("fsdp", "model")
  assert spec("encoder/relpos_bias/rel_embedding") == P(None, "model")
  for path, sharding in shardings.items():
    if path[-1] in ("lora_a", "lora_b", "logits"):
      assert all(axis is None for axis in sharding.spec), path


def test_param_shardings_replicate_dims_the_mesh_does_not_divide():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
  tree = {"odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((385, 32), np.float32),
                                         ("vocab", "embed")),
          "plain": jax.ShapeDtypeStruct((4,), np.float32)}
  out = partitioning.param_shardings(tree, mesh)
  assert out["odd"].spec == P(None, "fsdp")
  assert out["plain"].spec == P()


def test_global_batch_places_rows_over_data_and_fsdp():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
  tokens = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  out = partitioning.global_batch({"tokens": tokens, "task_ids": np.arange(8, dtype=np.int32)}, mesh)
  assert out["tokens"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out["tokens"]), tokens)
  # Each (data, fsdp) shard holds 2 rows, replicated over 'model'.
  assert {s.data.shape for s in out["tokens"].addressable_shards} == {(2, 3)}
  with pytest.raises(ValueError, match=r"batch size 6 .*MeshConfig.data x MeshConfig.fsdp.*DataConfig.batch_size"):
    partitioning.global_batch({"tokens": tokens[:6]}, mesh)
