"""The Hugging Face + PEFT side of benchmarks/step.py: the same model, batch and adapter in PyTorch.

transformers' T5ForConditionalGeneration with the preset's dimensions and random weights, PEFT
`poly` (n_splits = S for "mhr", 1 for "poly") or LoRA on all 7 linear kinds, AdamW on the
trainable parameters. On a GPU: float32 weights under bf16 autocast (the targets' measured setup);
on CPU: float32. Imports nothing from JAX, so the GPU stays free for this process.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import time

import numpy as np
import torch

from benchmarks.common import (Settings, Timed, forward_flops, record, synthetic_batch,
                               time_cases, train_flops)

TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
GB = 1e9


def _device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _autocast(s: Settings):
  if _device().type == "cuda" and s.dtype == "bfloat16":
    return torch.autocast("cuda", dtype=torch.bfloat16)
  return contextlib.nullcontext()


def build(s: Settings, method: str):
  """(model, fields, takes_task_ids): an HF T5 of the preset's size with `method`'s adapter."""
  import transformers
  fields = s.model_fields()
  config = transformers.T5Config(
      vocab_size=fields["vocab_size"], d_model=fields["d_model"], d_kv=fields["d_kv"],
      d_ff=fields["d_ff"], num_layers=fields["num_layers"],
      num_decoder_layers=fields["num_decoder_layers"], num_heads=fields["num_heads"],
      relative_attention_num_buckets=fields["relative_attention_num_buckets"],
      relative_attention_max_distance=fields["relative_attention_max_distance"],
      dropout_rate=0.0, feed_forward_proj=fields["feed_forward_proj"],
      tie_word_embeddings=fields["tie_word_embeddings"], decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)
  torch.manual_seed(0)
  with torch.device(_device()):
    model = transformers.T5ForConditionalGeneration(config)
  if method == "full":
    return model, fields, False
  import peft
  task = peft.TaskType.SEQ_2_SEQ_LM
  if method == "lora":
    adapter = peft.LoraConfig(task_type=task, r=s.rank, lora_alpha=1, lora_dropout=0.0,
                              target_modules=TARGETS)
  else:
    adapter = peft.PolyConfig(task_type=task, r=s.rank, n_tasks=s.n_tasks, n_skills=s.n_skills,
                              n_splits=s.n_splits if method == "mhr" else 1,
                              target_modules=TARGETS)
  return peft.get_peft_model(model, adapter), fields, method != "lora"


def _tensors(host: dict, takes_task_ids: bool) -> dict:
  dev = _device()
  as_long = lambda k: torch.as_tensor(host[k], dtype=torch.long, device=dev)
  out = dict(input_ids=as_long("encoder_input_tokens"),
             decoder_input_ids=as_long("decoder_input_tokens"))
  out["attention_mask"] = (out["input_ids"] != 0).long()
  if takes_task_ids:
    out["task_ids"] = as_long("task_ids")
  return out


def _peak_gb():
  return torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else None


def _reset_peak():
  if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()


def _free(*objs):
  del objs
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def _time(fn, steps):
  _sync()
  t0 = time.perf_counter()
  fn()
  _sync()
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    _sync()
    times.append(time.perf_counter() - t0)
  return first, times


def prepare_train(s: Settings, method: str, batch_size: int) -> list[Timed]:
  """One AdamW step on the trainable parameters (the frozen base gets no gradient), ready to time;
  PEFT poly also on a mixed-task batch."""
  model, fields, takes_ids = build(s, method)
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  variants = [("single", False)] + ([("mixed", True)] if takes_ids else [])
  common = dict(side="torch", kind="train", method=method, batch=batch_size,
                flops=train_flops(fields, batch_size, s.input_len, s.target_len,
                                  trains_base=method == "full"),
                tokens=batch_size * (s.input_len + s.target_len))

  def step(inputs, labels):
    with _autocast(s):
      loss = model(**inputs, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync()
    return loss.detach()

  out = []
  for tasks, mixed in variants:
    host = synthetic_batch({**fields, "n_tasks": s.n_tasks}, batch_size, s.input_len,
                           s.target_len, mixed)
    labels = torch.as_tensor(host["decoder_target_tokens"], dtype=torch.long, device=_device())
    out.append(Timed(f"peft_train/{method}/{tasks}/b{batch_size}",
                     functools.partial(step, _tensors(host, takes_ids), labels),
                     dict(common, tasks=tasks)))
  return out


def train(s: Settings, method: str, batch_size: int) -> list[dict]:
  """Records of `prepare_train`'s cases, timed one after the other, with torch's peak memory."""
  _reset_peak()
  out = time_cases(prepare_train(s, method, batch_size), s)
  for r in out:
    r["peak_memory_gb"] = _peak_gb()
  _free()
  return out


def _encoder_once(model, takes_ids, inputs):
  """Encoder outputs computed once per input; PEFT poly injects task ids with forward hooks."""
  hooks = getattr(getattr(model, "base_model", None), "_manage_pre_hooks", None)
  ctx = hooks(inputs["task_ids"]) if takes_ids and hooks else contextlib.nullcontext()
  with ctx:
    return model.get_encoder()(input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"]).last_hidden_state


def score(s: Settings, batch_size: int) -> list[dict]:
  """Rank classification as a PyTorch user writes it: encode once, decode every choice, sum the
  target tokens' log-probabilities."""
  model, fields, takes_ids = build(s, s.eval_method)
  model.eval()
  host = synthetic_batch({**fields, "n_tasks": s.n_tasks}, batch_size, s.input_len,
                         s.target_len, True)
  inputs = _tensors(host, takes_ids)
  rng = np.random.default_rng(1)
  targets = torch.as_tensor(rng.integers(2, fields["vocab_size"],
                                         (batch_size * s.choices, s.choice_len)), device=_device())
  dec = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], 1)
  rep = lambda t: t.repeat_interleave(s.choices, 0)

  def run():
    with torch.no_grad(), _autocast(s):
      hidden = _encoder_once(model, takes_ids, inputs)
      extra = {"task_ids": rep(inputs["task_ids"])} if takes_ids else {}
      logits = model(encoder_outputs=(rep(hidden),), attention_mask=rep(inputs["attention_mask"]),
                     decoder_input_ids=dec, **extra).logits
      logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
      return logp.sum(-1).view(batch_size, s.choices)

  _reset_peak()
  first, times = _time(run, s.steps)
  flops = forward_flops(fields, batch_size, s.input_len, s.choice_len, choices=s.choices)
  out = [record(f"hf_score/{s.eval_method}/b{batch_size}", "torch", "score", s.eval_method,
                batch_size, s, tasks="mixed", first_step_s=first, times=times, flops=flops,
                tokens=batch_size * (s.input_len + s.choices * s.choice_len),
                peak_memory_gb=_peak_gb(), note=f"{s.choices} choices x {s.choice_len} tokens")]
  _free(model)
  return out


def generate(s: Settings, batch_size: int) -> list[dict]:
  """Hugging Face `generate`, greedy, exactly `decode_len` new tokens (min_new_tokens)."""
  model, fields, takes_ids = build(s, s.eval_method)
  model.eval()
  host = synthetic_batch({**fields, "n_tasks": s.n_tasks}, batch_size, s.input_len,
                         s.target_len, True)
  inputs = _tensors(host, takes_ids)
  inputs.pop("decoder_input_ids")

  def run():
    with torch.no_grad(), _autocast(s):
      return model.generate(**inputs, max_new_tokens=s.decode_len, min_new_tokens=s.decode_len,
                            do_sample=False, num_beams=1)

  _reset_peak()
  first, times = _time(run, s.steps)
  out = [record(f"hf_generate/{s.eval_method}/b{batch_size}", "torch", "greedy", s.eval_method,
                batch_size, s, tasks="mixed", first_step_s=first, times=times,
                flops=forward_flops(fields, batch_size, s.input_len, s.decode_len),
                tokens=batch_size * s.decode_len, peak_memory_gb=_peak_gb(),
                note=f"{s.decode_len} new tokens per example; tokens/s counts generated tokens")]
  _free(model)
  return out


RUNNERS = {"peft_train": train, "hf_score": score, "hf_generate": generate}
