"""How fast any framework could run the benchmarked SmolLM2 workloads on this CPU (fp32): a compute floor.

The floor of a workload is the sum, over its matrix products, of FLOPs divided by the fp32 GEMM rate that
this machine reaches on that product's shape, measured here with jax, torch and (for a decode step's few rows)
kdjax's own CPU kernel (kdjax.serving.cpu.kernels), taking the fastest, over enough back-to-back products that one
call's dispatch does not count (`gemm_rate`).
A training step adds one pass its loss cannot skip: the log-normaliser (logsumexp) of every logit row and its
gradient, timed the same way. Everything else (softmax, norms, rotary, memory traffic, overhead) is free,
attention is counted causally (no work above the diagonal) at the best rate seen, and the GEMM probes reuse
weights that stay in cache. So the floor is optimistic, and `reference seconds / floor` is an upper bound
on the speed-up any implementation can reach over that reference: the ceiling the benchmarks print.
`streamed_gemm_rate` times the same products with their weights read from memory, as a decode step has them
(its 538 MB of weights do not fit in any cache); it is not part of the floor.

  python -m benchmarks.roofline   # prints the floors of the four benchmarked workloads
"""

from __future__ import annotations

import functools
import os
import time
from collections import defaultdict

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.serving.cpu import kernels as cpu_kernels
from kdjax.models.llama.config import LlamaConfig, get_preset

Shape = tuple[int, int, int]  # (m, k, n) of an [m, k] @ [k, n] product


def best_seconds(fn, repeats: int = 7) -> float:
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


# A rate is timed over this many FLOPs at least (up to PROBE_PRODUCTS products of the shape per timing), so a
# small product's rate is its own and not the dispatch of one call: timed one call at a time, 16-row decode products
# (0.1 ms each) measured anywhere from 115 to 290 GFLOP/s in one process (AMD EPYC, 2 cores), as the wake-up of the
# thread pool and the per-call overhead came and went, and the decode floor built from them from 3.9 to 5.3 s. A
# decode step runs its ~200 products inside one compiled program and pays no per-product dispatch either.
PROBE_FLOPS = 1e9
PROBE_PRODUCTS = 32


def probe_products(shape: Shape) -> int:
  """How many products of `shape` one timing of `gemm_rate` runs back to back."""
  m, k, n = shape
  return int(min(PROBE_PRODUCTS, max(1, -(-PROBE_FLOPS // (2.0 * m * k * n)))))


def _products_rate(shape: Shape, lefts: int, rights: int, repeats: int) -> float:
  """The best fp32 FLOP/s of jax, torch and (for a decode's few rows) kdjax's CPU kernel over max(lefts, rights)
  products [m, k] @ [k, n] of `lefts` distinct left and `rights` distinct right operands (one of the two counts
  is 1), timed together: in jax as one compiled program (XLA may run independent products side by side, as it
  does in a decode step), in torch as a loop of calls."""
  import torch
  m, k, n = shape
  count = max(lefts, rights)
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((m, k), np.float32) for _ in range(lefts)]
  ws = [rng.standard_normal((k, n), np.float32) for _ in range(rights)]
  pairs = lambda a, b: [(a[i % len(a)], b[i % len(b)]) for i in range(count)]
  products = jax.jit(lambda a, b: tuple(x @ w for x, w in pairs(a, b)))
  jax_xs, jax_ws = [jnp.asarray(x) for x in xs], [jnp.asarray(w) for w in ws]
  jax_s = best_seconds(lambda: jax.block_until_ready(products(jax_xs, jax_ws)), repeats)
  torch_xs, torch_ws = [torch.from_numpy(x) for x in xs], [torch.from_numpy(w) for w in ws]
  torch_s = best_seconds(lambda: [torch.matmul(x, w) for x, w in pairs(torch_xs, torch_ws)], repeats)
  best_s = min(jax_s, torch_s)
  if m <= cpu_kernels.MAX_KERNEL_ROWS and n % cpu_kernels.TILE == 0 and cpu_kernels.available():
    # kdjax's own kernel for a decode's few rows, on its packed weights: the floor is the best this machine does
    packed = [cpu_kernels.pack(w, 1) for w in jax_ws]
    kernel = jax.jit(lambda a, b: tuple(cpu_kernels.packed_matmul(x, w) for x, w in pairs(a, b)))
    best_s = min(best_s, best_seconds(lambda: jax.block_until_ready(kernel(jax_xs, packed)), repeats))
  return 2.0 * m * k * n * count / best_s


@functools.cache
def gemm_rate(shape: Shape, repeats: int = 5) -> float:
  """The best fp32 FLOP/s (`_products_rate`) on [m, k] @ [k, n] products with their operands in cache:
  `probe_products(shape)` products of distinct left operands and one right operand per timing."""
  return _products_rate(shape, lefts=probe_products(shape), rights=1, repeats=repeats)


# Right operands per timing of `streamed_gemm_rate`: several times the last-level cache (32 MB on this project's
# CPUs), so the weights come from memory.
STREAM_BYTES = 256e6


@functools.cache
def streamed_gemm_rate(shape: Shape, repeats: int = 3) -> float:
  """Like `gemm_rate`, but with distinct right operands, STREAM_BYTES of float32 of them per timing, so each
  product reads its weights from memory as a decode step does (it reads all 538 MB of SmolLM2's weights once
  per token). Not part of the floor, which keeps operands in cache: it shows how much slower the best of them
  runs a decode's products as the decode has them."""
  m, k, n = shape
  return _products_rate(shape, lefts=1, rights=int(-(-STREAM_BYTES // (4 * k * n))), repeats=repeats)


@functools.cache
def normalizer_seconds(rows: int, cols: int, repeats: int = 3) -> float:
  """The faster of jax and torch at logsumexp over the rows of a float32 [rows, cols] array plus its gradient."""
  import torch
  x = np.random.default_rng(0).standard_normal((rows, cols), np.float32)
  jx, tx = jnp.asarray(x), torch.from_numpy(x).requires_grad_()
  grad = jax.jit(jax.grad(lambda v: jax.nn.logsumexp(v, axis=-1).sum()))
  jax_s = best_seconds(lambda: grad(jx).block_until_ready(), repeats)
  torch_s = best_seconds(lambda: torch.logsumexp(tx, dim=-1).sum().backward(), repeats)
  return min(jax_s, torch_s)


class Floor:
  """Accumulates matrix-product FLOPs by shape; `seconds()` is their sum at this machine's measured rates."""

  def __init__(self):
    self.flops: dict[Shape, float] = defaultdict(float)
    self.attention_flops = 0.0
    self.normalizers: list[tuple[int, int]] = []  # (rows, vocab) of each loss's log-normaliser, with gradient

  def gemm(self, m: int, k: int, n: int, count: float = 1.0, *, backward: bool = False,
           weight_grad: bool = False) -> None:
    """`count` products [m, k] @ [k, n]; with backward, also dX = dY @ W^T and optionally dW = X^T @ dY."""
    self.flops[(m, k, n)] += 2.0 * m * k * n * count
    if backward:
      self.flops[(m, n, k)] += 2.0 * m * k * n * count
      if weight_grad:
        self.flops[(k, m, n)] += 2.0 * m * k * n * count

  def seconds(self, streamed_rows: int = 0) -> float:
    """The floor. With `streamed_rows`, products of at most that many rows count at `streamed_gemm_rate` (weights
    read from memory) instead: no longer a floor, the same work at the rates a decode step's products get."""
    rate = lambda shape: streamed_gemm_rate(shape) if shape[0] <= streamed_rows else gemm_rate(shape)
    gemm_s = sum(flops / rate(shape) for shape, flops in self.flops.items())
    best = max(gemm_rate(shape) for shape in self.flops) if self.flops else 1.0
    return gemm_s + self.attention_flops / best + sum(normalizer_seconds(*shape) for shape in self.normalizers)

  def total_flops(self) -> float:
    return sum(self.flops.values()) + self.attention_flops


def _layer_products(config: LlamaConfig) -> list[tuple[int, int]]:
  """(k, n) of every weight product of one decoder layer."""
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def add_forward(floor: Floor, config: LlamaConfig, tokens: int, causal_pairs: float, logits_tokens: int, *,
                backward: bool = False, weight_grad: bool = False) -> None:
  """A forward (and optionally backward) pass over `tokens` tokens.

  causal_pairs: (query, key) pairs attended in total; logits_tokens: positions whose logits are computed.
  """
  for k, n in _layer_products(config):
    floor.gemm(tokens, k, n, config.num_layers, backward=backward, weight_grad=weight_grad)
  if logits_tokens:
    floor.gemm(logits_tokens, config.hidden_size, config.vocab_size, backward=backward, weight_grad=weight_grad)
  # QK^T and PV: 2 products of 2 * head_dim FLOPs per (query, key) pair and head; a backward pass is 2x that.
  attention = 4.0 * config.num_heads * config.head_dim * causal_pairs * config.num_layers
  floor.attention_flops += attention * (3.0 if backward else 1.0)


def causal_pairs(length: int) -> float:
  return length * (length + 1) / 2.0


def prefill_floor(config: LlamaConfig, length: int = 512) -> Floor:
  """bench_model's prefill: one sequence, logits at every position."""
  floor = Floor()
  add_forward(floor, config, length, causal_pairs(length), length)
  return floor


def train_floor(config: LlamaConfig, batch: int, seq: int, *, frozen_base: bool) -> Floor:
  """A forward + backward pass with a loss over logits everywhere; weight gradients unless the base is frozen."""
  floor = Floor()
  add_forward(floor, config, batch * seq, batch * causal_pairs(seq), batch * seq, backward=True,
              weight_grad=not frozen_base)
  floor.normalizers.append((batch * seq, config.vocab_size))
  return floor


def decode_floor(config: LlamaConfig, prompt_lengths: list[int], new_tokens: int) -> Floor:
  """bench_decode: unpadded prompts prefilled (last logits only), then `new_tokens` steps of the batch."""
  floor = Floor()
  rows = len(prompt_lengths)
  pairs = sum(causal_pairs(p) for p in prompt_lengths)
  add_forward(floor, config, sum(prompt_lengths), pairs, 0)
  floor.gemm(rows, config.hidden_size, config.vocab_size)
  for step in range(1, new_tokens):  # the first new token comes from the prefill's logits
    context = sum(p + step for p in prompt_lengths)
    add_forward(floor, config, rows, context, rows)
  return floor


def ceiling_line(label: str, reference_s: float, floor: Floor, target: float) -> str:
  """One line: the floor, and the largest speed-up over `reference_s` that it allows, against the target."""
  floor_s = floor.seconds()
  ceiling = reference_s / floor_s
  verdict = "reachable at most" if ceiling >= target else "out of reach on this CPU"
  loss = " + the loss's log-normaliser" if floor.normalizers else ""
  return (f"{label}: compute floor {floor_s * 1000:.0f} ms ({floor.total_flops() / 1e9:.0f} GFLOP at this "
          f"CPU's best fp32 GEMM rates{loss}) -> speed-up ceiling {ceiling:.2f}x over the reference; target "
          f"{target:.1f}x {verdict}")


def main() -> None:
  config = get_preset("smollm2-135m")
  rates = {shape: gemm_rate(shape) / 1e9 for shape in [(512, 576, 1536), (1024, 576, 1536), (16, 576, 1536),
                                                        (512, 576, 49152), (16, 576, 49152)]}
  print("fp32 GEMM rate, best of jax, torch and kdjax's CPU kernel (GFLOP/s): " +
        ", ".join(f"{m}x{k}x{n} {r:.0f}" for (m, k, n), r in rates.items()))
  streamed = {shape: streamed_gemm_rate(shape) / 1e9 for shape in [(16, 576, 1536), (16, 576, 49152)]}
  print("the same with the weights read from memory, as in a decode step (GFLOP/s): " +
        ", ".join(f"{m}x{k}x{n} {r:.0f}" for (m, k, n), r in streamed.items()))
  print(f"logsumexp + gradient over [1024, {config.vocab_size}], best of jax and torch: "
        f"{normalizer_seconds(1024, config.vocab_size) * 1000:.0f} ms")
  import kdjax  # the prompts of bench_decode, for their lengths
  from kdjax.gsm8k import data
  from kdjax.infra import fetch
  from kdjax.teacher import priming
  gsm8k = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
  tokenizer = kdjax.load_tokenizer(fetch.smollm2_gguf())
  prompts = [priming.encode_chat(tokenizer, priming.student_messages(row["question"]))
             for row in data.load_gsm8k(gsm8k, "test")[:16]]
  decode = decode_floor(config, [len(p) for p in prompts], 128)
  for label, floor in [("prefill 512", prefill_floor(config)),
                       ("fwd+bwd 4x256, all gradients", train_floor(config, 4, 256, frozen_base=False)),
                       ("LoRA step 4x256, frozen base", train_floor(config, 4, 256, frozen_base=True)),
                       ("decode 16 x 128 new tokens", decode)]:
    print(f"{label:32s} {floor.total_flops() / 1e9:7.0f} GFLOP   floor {floor.seconds() * 1000:8.0f} ms")
  print(f"{'  its 16-row products streamed':32s} {'':13s} {decode.seconds(streamed_rows=16) * 1000:8.0f} ms")


if __name__ == "__main__":
  main()
