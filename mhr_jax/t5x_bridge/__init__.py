"""The T5X bridge: train, evaluate and adapt the project's routed T5 with T5X's own trainer.

    python -m t5x.train --gin_file=configs/mhr.gin --gin.MODEL_DIR="'/tmp/mhr_t5x'" --gin.TRAIN_STEPS=20

T5X is not on the package registries, so nothing else in `mhr_jax` imports this package and T5X is
never a requirement: see the README section "T5X" for installing it from its repository.

Submodules (import them directly; gin files name them):
  features      T5X's feature converter that keeps `task_ids` (and checks them against n_tasks)
  models        `MhrEncoderDecoderModel`, a `t5x.models.EncoderDecoderModel` that passes task ids
  partitioning  the project's adapter / activation logical axes added to T5X's standard rules
  optim         freezing and two-speed learning rates as a T5X optimizer; a trainer that logs them
  tasks         SeqIO registration for T5X (the `task_ids` output feature, eval metrics) and the
                answer-choice training batches of T-Few adaptation
  selection     best-on-dev model selection (a T5X action and checkpoint manager)
  checkpoints   T5X checkpoints <-> the project's run checkpoints; initial checkpoints for
                fine-tuning (Hugging Face weights, few-shot adaptation from a pre-training run)
"""
try:
  import t5x.models  # noqa: F401  pylint: disable=unused-import  (is T5X installed?)
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "mhr_jax.t5x_bridge needs T5X, which is not on PyPI: install it from its repository "
      "(see README.md, section 'T5X'). The project's own trainer "
      f"(python -m mhr_jax.train) does not need it. Original error: {e}") from e
