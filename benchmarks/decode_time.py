"""Greedy decoding time against input length: how much of it is the encoder, and what one decoder step costs.

  python -m benchmarks.decode_time --preset=base --num_layers=2 --batch=8 --steps=32 --input_lens=64,512,1024

For each input length, times the encoder alone and a full greedy decode of exactly --steps tokens (no early
EOS), both jitted, min of --repeats after compilation; the per-step cost is (decode - encode) / steps. The
last column is what projecting the encoder outputs to cross-attention keys and values again at every step
would cost (those FLOPs at the device's measured matmul rate on CPU): a measured per-step cost far below it
shows that the projections run once per decode (they are loop-invariant, so XLA hoists them out of the
decode loop). Random weights and tokens; JAX only.
"""
from __future__ import annotations

import argparse
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mhr_jax.evaluation import decoding
from mhr_jax.logging_utils import peak_flops_total
from mhr_jax.models import T5, preset


def _min_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="base")
  parser.add_argument("--num_layers", type=int, default=2, help="encoder and decoder layers")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=32, help="tokens decoded")
  parser.add_argument("--input_lens", default="64,512,1024")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  cfg = preset(args.preset, num_layers=args.num_layers, num_decoder_layers=args.num_layers)
  model = T5(cfg)
  tokens = jnp.ones((1, 4), jnp.int32)
  params = nn.unbox(jax.jit(lambda: model.init(jax.random.key(0), tokens, tokens, tokens,
                                               enable_dropout=False))()["params"])
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, enable_dropout=False, method=model.encode))
  print(f"{platform.processor() or platform.machine()}, {jax.device_count()} {jax.default_backend()} "
        f"device(s), jax {jax.__version__}; {args.preset} width, {args.num_layers}+{args.num_layers} layers, "
        f"batch {args.batch}, {args.steps} greedy steps")
  flops_per_s = peak_flops_total()
  print(f"matmul rate: {flops_per_s / 1e9:.0f} GFLOP/s" if flops_per_s else "matmul rate: unknown")
  print("| input length | encoder (s) | greedy decode (s) | per step (ms) | K/V re-projection per step (ms) |")
  print("|---:|---:|---:|---:|---:|")
  rng = np.random.default_rng(0)
  for length in (int(x) for x in args.input_lens.split(",")):
    inputs = jnp.asarray(rng.integers(2, cfg.vocab_size, (args.batch, length)), jnp.int32)
    t_encode = _min_time(lambda: encode(params, inputs), args.repeats)
    t_decode = _min_time(lambda: decoding.greedy_decode(model, params, inputs, args.steps, eos_id=-1),
                         args.repeats)
    # k and v of every decoder layer: (batch x length x d_model) @ (d_model x inner), 2 FLOPs per MAC.
    reproject = 2 * cfg.num_decoder_layers * 2 * args.batch * length * cfg.d_model * cfg.inner_dim
    reproject_ms = f"{1000 * reproject / flops_per_s:.0f}" if flops_per_s else "n/a"
    print(f"| {length} | {t_encode:.3f} | {t_decode:.3f} | {1000 * (t_decode - t_encode) / args.steps:.1f} "
          f"| {reproject_ms} |")


if __name__ == "__main__":
  main()
