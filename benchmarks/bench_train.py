"""kdjax's LoRA KD train step against an equivalent torch + PEFT step on SmolLM2-135M, fp32, in one run.

  python -m benchmarks.bench_train [--rounds=3] [--steps=2] [--batch=4] [--seq=256]

Both sides: SmolLM2-135M-Instruct dequantised from the same GGUF to float32; LoRA r=4, alpha=8, dropout 0.1 on
q, k, v, o (only LoRA is trained); loss = forward KL(teacher || student) against fixed random top-50 teacher
log-probs with a "rest of vocabulary" bucket (kdjax's default "tail" mode), mean over tokens; SGD with
momentum 0.9, no clipping. The kdjax step is jitted with the LoRA and optimizer state donated and differentiates
the LoRA state only; its loss is `kdjax.distill.losses.distill_loss` (chunked vocabulary projection). The torch
step is a PEFT model in train mode with the same loss written in torch and `torch.optim.SGD`.

Both are warmed up, then timed in alternating rounds (kdjax, torch, kdjax, ...) so that a burst of load from
other processes on a shared machine hits both; the median step time of each is reported with tokens/s and
the ratio (target >= 1.5x). Before timing, the two losses at the same (untrained) weights are compared.
By default the process keeps freed memory for reuse (kdjax.infra.hostmem, as `kdjax.main` does on CPU), which spares
both frameworks faulting their step buffers in again on every step; --malloc=glibc keeps the C library's defaults.
"""

from __future__ import annotations

import argparse
import math
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
from kdjax.models import lora as lora_lib
from kdjax.distill import losses

TOP_K = 50
LEARNING_RATE = 1e-4
MOMENTUM = 0.9
MIN_TAIL_MASS = losses.MIN_TAIL_MASS


def teacher_arrays(rng: np.random.RandomState, batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """Fixed random sparse teacher: k distinct ids per token, log-probs holding 50-95% of the mass."""
  scores = rng.rand(batch * seq, vocab).astype(np.float32)
  ids = np.argpartition(scores, TOP_K, axis=1)[:, :TOP_K]
  logits = 3.0 * rng.randn(batch * seq, TOP_K)
  logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  logprobs += np.log(rng.uniform(0.5, 0.95, (batch * seq, 1)))  # the rest goes to the tail bucket
  return {"teacher_ids": ids.reshape(batch, seq, TOP_K).astype(np.int32),
          "teacher_logprobs": logprobs.reshape(batch, seq, TOP_K).astype(np.float32)}


# -------------------------------------------------------------------------------------------------- kdjax

def kdjax_step_fn(graphdef, tx, loss_cfg, chunk_size, dense: bool = False):
  """A jitted step (lora, opt_state, rest, batch, key) -> (lora, opt_state, loss), LoRA state donated.

  The loss is `distill_loss` (chunked, each chunk's logits recomputed in the backward pass), or with `dense`
  the same divergence on materialised [B, S, V] logits, which shows what the chunking costs at this size.
  """

  def loss_fn(lora, rest, batch, key):
    model = nnx.merge(graphdef, lora, rest)
    out = model.forward(batch["input_ids"], return_logits=dense, dropout_key=key)
    if dense:
      div = losses.per_token_divergence(out.logits, batch["teacher_ids"], batch["teacher_logprobs"], None,
                                        loss_cfg)
      return jnp.mean(div)
    loss_batch = {k: v for k, v in batch.items() if k != "input_ids"}
    sums, _ = losses.distill_loss(out.hidden, model.lm_head_weight(), loss_batch, loss_cfg, chunk_size=chunk_size)
    return losses.total_loss(sums, loss_cfg)

  def step(lora, opt_state, rest, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(lora, rest, batch, key)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), jax.jit(loss_fn)


# -------------------------------------------------------------------------------------------------- torch

def torch_kd_loss(logits: torch.Tensor, teacher_ids: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
  """Mean forward KL over tokens between teacher buckets `log_p` [..., k+1] and the student's.

  The student's k + 1 buckets: exact log-probs of the teacher's ids and log(1 - their mass), the last floored
  at MIN_TAIL_MASS and renormalised (kdjax's "tail" mode at T = 1).
  """
  log_q_all = torch.log_softmax(logits.float(), dim=-1)
  log_q_ids = log_q_all.gather(-1, teacher_ids)
  rest = -torch.expm1(torch.logsumexp(log_q_ids, dim=-1, keepdim=True))
  log_rest = torch.where(rest > 0, torch.log(torch.where(rest > 0, rest, torch.ones_like(rest))),
                         torch.full_like(rest, -math.inf))
  log_q = _floor_tail(torch.cat([log_q_ids, log_rest], dim=-1))
  p = log_p.exp()
  kl = (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_q))).sum(-1)
  return kl.mean()


def _floor_tail(log_probs: torch.Tensor) -> torch.Tensor:
  tail = torch.clamp(log_probs[..., -1:], min=math.log(MIN_TAIL_MASS))
  return torch.log_softmax(torch.cat([log_probs[..., :-1], tail], dim=-1), dim=-1)


def teacher_buckets(teacher_logprobs: np.ndarray) -> np.ndarray:
  """The teacher's k + 1 bucket log-probs (k ids and the tail), floored like the student's (float64 math)."""
  lp = teacher_logprobs.astype(np.float64)
  tail = np.log(np.maximum(-np.expm1(np.log(np.exp(lp).sum(-1, keepdims=True))), MIN_TAIL_MASS))
  buckets = np.concatenate([lp, tail], axis=-1)
  buckets -= np.log(np.exp(buckets).sum(-1, keepdims=True))
  return buckets.astype(np.float32)


# -------------------------------------------------------------------------------------------------- main

def timed(fn, steps: int) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) per call. CPU time counts every thread of this process: on a machine
  shared with other jobs it moves less than wall time, so both are reported."""
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each framework")
  parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
  parser.add_argument("--steps", type=int, default=2, help="steps per framework per round")
  parser.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk of kdjax's loss")
  parser.add_argument("--loss", choices=("chunked", "dense"), default="chunked",
                      help="kdjax loss: distill_loss (default) or the same divergence on full logits")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch threads; 1 also makes XLA's CPU matmuls single-threaded")
  parser.add_argument("--malloc", choices=("keep", "glibc"), default="keep",
                      help="keep: kdjax.infra.hostmem.keep_freed_memory(), for both frameworks, as kdjax.main does on "
                           "CPU; glibc: the C library's defaults")
  parser.add_argument("--torch-device", default="cpu", help="where torch + PEFT runs: cpu (default) or cuda")
  args = parser.parse_args()
  if args.malloc == "keep":  # before either framework starts its threads
    hostmem.keep_freed_memory()
  torch.set_num_threads(args.threads)
  if args.threads == 1:
    # Before the first jax call initialises the backend. On a shared, oversubscribed machine multi-threaded
    # matmuls spend much of their time waiting for descheduled worker threads; one thread each is the
    # contention-robust comparison.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  path = fetch.smollm2_gguf()
  tokens = args.batch * args.seq
  print(f"SmolLM2-135M fp32, LoRA r={args.rank} on q,k,v,o, batch {args.batch}x{args.seq} = {tokens} tokens, "
        f"top-{TOP_K} forward KL, SGD momentum; {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s) per framework, kdjax loss {args.loss}, malloc {args.malloc}")

  rng = np.random.RandomState(0)
  model, config = kdjax.load_model(path)
  input_ids = rng.randint(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
  teacher = teacher_arrays(rng, args.batch, args.seq, config.vocab_size)

  # ---- kdjax
  lora_cfg = lora_lib.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.1)
  lora_lib.add_lora(model, lora_cfg, seed=0)
  graphdef, lora, rest = lora_lib.split_lora(model)
  device = jax.devices()[0]
  lora = jax.tree.map(jnp.copy, lora)  # the step donates its LoRA input; the model keeps its own arrays
  tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  # Every input committed to the device from the first call on: tx.init's zeros come back uncommitted, and a
  # change of committedness between the first and second call would compile the step twice.
  lora, rest, opt_state = jax.device_put((lora, rest, jax.jit(tx.init)(lora)), device)
  loss_cfg = losses.LossConfig(divergence="forward_kl", topk_mode="tail")
  batch = jax.device_put({
      "input_ids": jnp.asarray(input_ids), "target_ids": jnp.asarray(teacher["teacher_ids"][..., 0]),
      "loss_mask": jnp.ones((args.batch, args.seq), jnp.float32), **teacher}, device)
  step, loss_only = kdjax_step_fn(graphdef, tx, loss_cfg, args.chunk_size, dense=args.loss == "dense")
  kdjax_initial = float(loss_only(lora, rest, batch, None))
  key = jax.random.key(0)
  state = {"lora": lora, "opt": opt_state, "step": 0}

  def kdjax_step():
    step_key = jax.random.fold_in(key, state["step"])
    state["lora"], state["opt"], loss = step(state["lora"], state["opt"], rest, batch, step_key)
    state["step"] += 1
    loss.block_until_ready()

  start = time.perf_counter()
  kdjax_step()
  print(f"kdjax compile + first step: {time.perf_counter() - start:.1f}s")

  # ---- torch + PEFT, same weights (the GGUF dequantised by transformers) and the same fresh-LoRA start
  import peft
  import transformers
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32).to(args.torch_device)
  peft_cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
  torch_model = peft.get_peft_model(torch_base, peft_cfg)
  torch_model.train()
  trainable = [p for p in torch_model.parameters() if p.requires_grad]
  optimizer = torch.optim.SGD(trainable, lr=LEARNING_RATE, momentum=MOMENTUM)
  t_ids = torch.from_numpy(input_ids.astype(np.int64)).to(args.torch_device)
  t_teacher_ids = torch.from_numpy(teacher["teacher_ids"].astype(np.int64)).to(args.torch_device)
  t_log_p = torch.from_numpy(teacher_buckets(teacher["teacher_logprobs"])).to(args.torch_device)
  with torch.no_grad():
    torch_model.eval()
    torch_initial = float(torch_kd_loss(torch_model(t_ids).logits, t_teacher_ids, t_log_p))
    torch_model.train()
  print(f"initial loss (no dropout): kdjax {kdjax_initial:.6f}  torch {torch_initial:.6f}  "
        f"|diff| {abs(kdjax_initial - torch_initial):.2e}")

  def torch_step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch_kd_loss(torch_model(t_ids).logits, t_teacher_ids, t_log_p)
    loss.backward()
    optimizer.step()
    if loss.is_cuda:  # kernels run asynchronously: the clock stops when they are done
      torch.cuda.synchronize()

  # ---- warm-up, then alternating timed rounds
  for _ in range(args.warmup - 1):
    kdjax_step()
  for _ in range(args.warmup):
    torch_step()
  times = {"kdjax": [], "torch": []}
  for r in range(args.rounds):
    times["kdjax"].append(timed(kdjax_step, args.steps))
    times["torch"].append(timed(torch_step, args.steps))
    print(f"round {r + 1}: " + "   ".join(f"{name} {w * 1000:8.1f} ms/step (cpu {c * 1000:8.1f} ms)"
                                         for name, ((w, c),) in ((n, t[-1:]) for n, t in times.items())))
  wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
  cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
  for name, label in (("kdjax", "kdjax LoRA KD step"), ("torch", "torch+PEFT KD step")):
    print(f"{label}  {wall[name] * 1000:8.1f} ms   {tokens / wall[name]:8.0f} tokens/s   "
          f"(cpu {cpu[name] * 1000:8.1f} ms/step)")
  if step._cache_size() != 1:
    print(f"WARNING: the kdjax step was compiled {step._cache_size()} times")
  print(f"speed-up (wall): {wall['torch'] / wall['kdjax']:.2f}x (target >= 1.5x); "
        f"cpu-time ratio {cpu['torch'] / cpu['kdjax']:.2f}x; medians of {args.rounds} rounds x {args.steps} steps")
  if jax.devices()[0].platform != "cpu":
    return  # the compute floor below is measured from this CPU's GEMM rates
  print(roofline.ceiling_line("LoRA KD step", wall["torch"],
                              roofline.train_floor(config, args.batch, args.seq, frozen_base=True), 1.5))

if __name__ == "__main__":
  main()
