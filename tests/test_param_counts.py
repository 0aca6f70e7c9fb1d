"""Trainable-parameter selection (labels, partition, MHR-z row mask) and the paper's T5-XL counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mhr_jax.training import optim
from mhr_jax.adapters import transforms
from mhr_jax.adapters.config import AdapterConfig
from mhr_jax.adapters.params import combine, default_rules, param_labels, partition, routing_row_mask
from mhr_jax.models import preset
from mhr_jax.models.param_counts import abstract_params, count_params, method_report


def _tiny(**adapter):
  return preset("tiny", vocab_size=64).replace(adapter=AdapterConfig(**adapter))


def _groups(labels):
  """{group: sorted leaf names ('lora_a', 'kernel', ...)} of a labels tree."""
  out = {}
  for path, group in traverse_util.flatten_dict(labels).items():
    out.setdefault(group, set()).add(path[-1])
  return {g: sorted(v) for g, v in out.items()}


# ----------------------------------------------------------------------------- docs/METHODS.md counts

def test_t5_xl_parameter_counts_match_the_paper():
  """T5-XL, all 7 linear kinds adapted: 432 layers; counted on abstract shapes (nothing allocated)."""
  xl = preset("xl")
  lora = count_params(xl.replace(adapter=AdapterConfig(kind="lora", rank=1)))
  assert lora["adapted_layers"] == 432 and lora["adapters"] == 2_211_840
  assert lora["trainable"] == 2_211_840
  ia3 = count_params(xl.replace(adapter=AdapterConfig(kind="ia3")), "ia3")
  assert ia3["adapters"] == 540_672 and ia3["trainable"] == 540_672
  for n_splits, z_per_task in ((1, 3_456), (8, 27_648)):
    kind = "poly" if n_splits == 1 else "mhr"
    # One pre-training task and one new task: MHR-z trains only the new task's rows.
    params = abstract_params(xl.replace(adapter=AdapterConfig(
        kind=kind, rank=1, n_skills=8, n_splits=n_splits, n_tasks=2)))
    counts = count_params(params, kind)
    assert counts["adapted_layers"] == 432
    assert counts["adapters"] == 17_694_720                 # inventory size independent of S
    assert counts["routing"] == 2 * z_per_task
    z = count_params(params, "mhr-z", routing_row_mask(params, [1]))
    assert z["trainable"] == z["routing"] == z_per_task
    assert z["total"] == counts["total"]


def test_method_report_table():
  cfg = _tiny()
  report = method_report(cfg, [("LoRA", "lora", AdapterConfig(kind="lora", rank=2)),
                               ("MHR-z", "mhr-z", AdapterConfig(kind="mhr", n_splits=2, n_skills=3,
                                                                n_tasks=4))])
  lines = report.splitlines()
  assert lines[0].split() == ["method", "layers", "adapter", "routing", "trainable", "total"]
  lora = count_params(_tiny(kind="lora", rank=2))
  assert lines[1].split()[:5] == ["LoRA", "36", f"{lora['adapters']:,}", "0", f"{lora['adapters']:,}"]
  # 36 layers x S=2 x K=3 = 216 routing entries per task; MHR-z trains one task's (the last).
  assert lines[2].split()[1:5] == ["36", f"{lora['adapters'] // 2 * 3:,}", f"{4 * 216:,}", "216"]


# ----------------------------------------------------------------------------- labels

def test_default_rules_per_method():
  mhr = abstract_params(_tiny(kind="mhr", n_splits=2, n_skills=3, n_tasks=2))
  assert _groups(param_labels(mhr, "mhr")) == {
      "adapters": ["lora_a", "lora_b"], "routing": ["logits"],
      "frozen": ["embedding", "kernel", "rel_embedding", "scale"]}
  assert _groups(param_labels(mhr, "mhr_z")) == {
      "routing": ["logits"], "frozen": ["embedding", "kernel", "lora_a", "lora_b",
                                        "rel_embedding", "scale"]}
  lora = abstract_params(_tiny(kind="lora"))
  assert _groups(param_labels(lora, "mhr-mu"))["adapters"] == ["lora_a", "lora_b"]
  ia3 = abstract_params(_tiny(kind="ia3"))
  assert _groups(param_labels(ia3, "ia3"))["adapters"] == ["ia3_scale"]
  assert _groups(param_labels(abstract_params(_tiny()), "full")) == {
      "base": ["embedding", "kernel", "rel_embedding", "scale"]}
  # Root routing table (shared routing) is labelled routing as well.
  shared = abstract_params(_tiny(kind="poly", routing="shared"))
  assert param_labels(shared, "poly")["routing"]["logits"] == "routing"


def test_label_rule_errors():
  params = abstract_params(_tiny(kind="lora"))
  with pytest.raises(ValueError, match="method='dora'"):
    default_rules("dora")
  with pytest.raises(ValueError, match="no label rule matches parameter decoder/"):
    param_labels(params, [(r".*/lora_(a|b)", "adapters"), (r"encoder/.*", "frozen"),
                          (r"shared_embedding/.*", "frozen")])
  with pytest.raises(ValueError, match="group must be one of"):
    param_labels(params, [(".*", "trainable")])
  with pytest.raises(ValueError, match="select no trainable parameter"):
    param_labels(params, "ia3")                                   # method / kind mismatch


def test_partition_and_combine_round_trip():
  cfg = _tiny(kind="mhr", n_splits=2, n_skills=3, n_tasks=2)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))
  labels = param_labels(params, "mhr")
  trainable, frozen = partition(params, labels)
  t_flat, f_flat = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
  assert {p[-1] for p in t_flat} == {"lora_a", "lora_b", "logits"}
  assert "kernel" in {p[-1] for p in f_flat} and not set(t_flat) & set(f_flat)
  assert traverse_util.flatten_dict(combine(trainable, frozen)).keys() == \
      traverse_util.flatten_dict(params).keys()
  with pytest.raises(ValueError, match="in more than one tree"):
    combine(trainable, trainable)
  with pytest.raises(ValueError, match="labels and params differ"):
    partition(params, param_labels(abstract_params(_tiny(kind="lora")), "lora"))


def test_mhr_z_mask_moves_only_the_new_task_rows_under_the_optimizer():
  cfg = _tiny(kind="mhr", n_splits=2, n_skills=3, n_tasks=2)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract_params(cfg))
  cfg, params = transforms.add_task_rows(cfg, params, 1, jax.random.key(0))   # new task id 2
  labels = param_labels(params, "mhr-z")
  mask = routing_row_mask(params, [2])
  mask_flat = traverse_util.flatten_dict(mask)
  assert len(mask_flat) == 36 and all(m.shape == (3, 1, 1) for m in mask_flat.values())
  assert all(m[:, 0, 0].tolist() == [0.0, 0.0, 1.0] for m in mask_flat.values())
  trainable, frozen = partition(params, labels)
  opt = optim.make_optimizer(
      optim.OptimizerConfig(name="adamw", routing_lr=0.1, warmup_steps=0, weight_decay=0.1,
                            schedule="constant"),
      partition(labels, labels)[0], total_steps=10, update_mask=mask)
  grads = jax.tree.map(lambda x: jnp.ones_like(x), trainable)
  updates, _ = opt.update(grads, opt.init(trainable), trainable)
  for path, u in traverse_util.flatten_dict(updates).items():
    u = np.asarray(u)
    assert not np.any(u[:2]) and np.all(np.abs(u[2]) > 0), "/".join(path)
  with pytest.raises(ValueError, match=r"row 3 outside \[0, 3\)"):
    routing_row_mask(params, [3])
