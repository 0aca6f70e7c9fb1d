"""The two kinds of run `python -m mhr_jax.train` makes, each a resumable run directory: multi-task
pre-training (pretrain.py) and few-shot adaptation with its evaluation (fewshot.py)."""
