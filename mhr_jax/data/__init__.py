"""Data: the SeqIO pipeline to host batches (pipeline.py, the only place that imports TensorFlow and SeqIO
with tasks/) and the (task, seed) pairs of few-shot adaptation with their batches (fewshot.py)."""
