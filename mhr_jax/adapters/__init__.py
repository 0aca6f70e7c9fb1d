"""Adapters for T5 linear layers: LoRA, private LoRA, (IA)^3, Poly and MHR.

Submodules: `config` (AdapterConfig and the kind table), `methods` (one record per training method),
`layers` (the adapter math inside a linear layer and the routing), `transforms` (new task rows, MHR-mu,
per-task LoRA, merging into the base), `params` (trainable-parameter labels by path regex, MHR-z row masks).
"""
from mhr_jax.adapters.config import ALL_LINEAR, ATTENTION_ONLY, IA3_TARGETS, AdapterConfig
from mhr_jax.adapters.layers import AdapterContext, anneal_factor

__all__ = ["ALL_LINEAR", "ATTENTION_ONLY", "IA3_TARGETS", "AdapterConfig", "AdapterContext",
           "anneal_factor"]
