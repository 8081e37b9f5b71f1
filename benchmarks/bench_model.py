"""kdjax vs transformers/torch on SmolLM2-135M, fp32, this CPU, measured in one run.

  python -m benchmarks.bench_model [--repeats=5]

Prints the median time of (a) a 512-token prefill (full logits, batch 1) and (b) a forward+backward of a
4x256-token batch (mean next-token cross-entropy, gradients for every parameter), and kdjax's speed-up.
Both frameworks are warmed up first; compile time is printed apart. Last, the speed-up ceiling that this
CPU's fp32 GEMM rates allow over torch's times (benchmarks/roofline.py). Host memory as in bench_train.py (--malloc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import kdjax
from benchmarks import roofline
from kdjax.infra import fetch, hostmem


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--malloc", choices=("keep", "glibc"), default="keep",
                      help="keep: kdjax.infra.hostmem.keep_freed_memory(), for both frameworks, as kdjax.main does on "
                           "CPU; glibc: the C library's defaults")
  args = parser.parse_args()
  if args.malloc == "keep":  # before either framework starts its threads
    hostmem.keep_freed_memory()
  torch.set_num_threads(args.threads)
  path = fetch.smollm2_gguf()

  model, config = kdjax.load_model(path)
  import transformers
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

  rng = np.random.RandomState(0)
  prefill_ids = rng.randint(0, config.vocab_size, (1, 512)).astype(np.int32)
  train_ids = rng.randint(0, config.vocab_size, (4, 256)).astype(np.int32)

  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, ids):
    return nnx.merge(graphdef, state)(ids)

  def loss_fn(state, ids):
    logits = nnx.merge(graphdef, state)(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  train_step = jax.jit(jax.value_and_grad(loss_fn))

  results = {}
  t0 = time.perf_counter()
  prefill(state, prefill_ids).block_until_ready()
  train_step(state, train_ids)[0].block_until_ready()
  print(f"kdjax compile + first run: {time.perf_counter() - t0:.1f}s")

  results["kdjax prefill 512"] = median_time(lambda: prefill(state, prefill_ids).block_until_ready(), args.repeats)
  results["kdjax fwd+bwd 4x256"] = median_time(
      lambda: jax.block_until_ready(train_step(state, train_ids)), args.repeats)

  t_prefill = torch.from_numpy(prefill_ids.astype(np.int64))
  t_train = torch.from_numpy(train_ids.astype(np.int64))

  def torch_prefill():
    with torch.no_grad():
      torch_model(t_prefill).logits

  def torch_train():
    torch_model.zero_grad(set_to_none=True)
    logits = torch_model(t_train).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t_train[:, 1:].reshape(-1))
    loss.backward()

  torch_prefill(), torch_train()  # warm-up
  results["torch prefill 512"] = median_time(torch_prefill, args.repeats)
  results["torch fwd+bwd 4x256"] = median_time(torch_train, args.repeats)

  for name, seconds in results.items():
    tokens = 512 if "prefill" in name else 1024
    print(f"{name:24s} {seconds * 1000:8.1f} ms   {tokens / seconds:8.0f} tokens/s")
  print(f"speed-up prefill 512:     {results['torch prefill 512'] / results['kdjax prefill 512']:.2f}x (target 1.5x)")
  print(f"speed-up fwd+bwd 4x256:   {results['torch fwd+bwd 4x256'] / results['kdjax fwd+bwd 4x256']:.2f}x "
        "(target 1.5x)")
  print(roofline.ceiling_line("prefill 512", results["torch prefill 512"], roofline.prefill_floor(config), 1.5))
  print(roofline.ceiling_line("fwd+bwd 4x256", results["torch fwd+bwd 4x256"],
                              roofline.train_floor(config, 4, 256, frozen_base=False), 1.5))


if __name__ == "__main__":
  main()
