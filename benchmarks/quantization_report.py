"""How much int8 weight-only quantization changes SmolLM2's next-token distributions on GSM8K prompts.

For every position of every student chat prompt (system prompt + question), compares each variant's next-token
distribution with the float32 model's: mean per-token KL(fp32 || variant) in nats and top-1 agreement. Variants:
bf16 weights and compute (the baseline cost of bf16 alone), int8 with float32 compute (quantization alone), and
int8 with bf16 compute (what the teacher runs). Also prints parameter bytes, int8 vs bf16.

  JAX_PLATFORMS=cpu python -m benchmarks.quantization_report --num-questions 24

The "full precision" reference is the Q4_1 GGUF dequantized to float32 (the only real checkpoint on this machine).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


from kdjax.gsm8k import data  # noqa: E402
from kdjax.infra import fetch
from kdjax.teacher import priming
from kdjax.models import quantization
from kdjax.models.llama import weights  # noqa: E402

DEFAULT_GSM8K = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def encode_prompts(gguf: pathlib.Path, questions: list[str]) -> list[list[int]]:
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  return [priming.encode_chat(tokenizer, priming.student_messages(q)) for q in questions]


def left_pad(prompts: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Ids and attention mask [len(prompts), width], each prompt right-aligned (left padding)."""
  ids = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt):] = prompt
    mask[row, width - len(prompt):] = 1
  return ids, mask


@nnx.jit
def log_probs(model, ids, mask):
  return jax.nn.log_softmax(model(ids, attention_mask=mask), axis=-1)


@nnx.jit
def compare(reference: jax.Array, model, ids, mask) -> tuple[jax.Array, jax.Array]:
  """Per-position KL(reference || model) in nats and whether both argmaxes agree, [batch, seq] each."""
  other = jax.nn.log_softmax(model(ids, attention_mask=mask), axis=-1)
  kl = jnp.sum(jnp.exp(reference) * (reference - other), axis=-1)
  return kl, jnp.argmax(reference, -1) == jnp.argmax(other, -1)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-questions", type=int, default=24)
  parser.add_argument("--gsm8k", default=str(DEFAULT_GSM8K))
  parser.add_argument("--split", default="test")
  parser.add_argument("--batch-size", type=int, default=8)
  args = parser.parse_args(argv)

  gguf = fetch.smollm2_gguf()
  questions = [ex["question"] for ex in data.load_gsm8k(args.gsm8k, args.split)[:args.num_questions]]
  prompts = encode_prompts(gguf, questions)
  source = weights.open_source(gguf)
  config = weights.config_from_source(source)
  f32, bf16 = jnp.float32, jnp.bfloat16
  variants = {
      "fp32": dict(dtype=f32, param_dtype=f32),
      "bf16": dict(dtype=bf16, param_dtype=bf16),
      "int8 (fp32 compute)": dict(dtype=f32, param_dtype=f32, quantize=True),
      "int8 (bf16 compute)": dict(dtype=bf16, param_dtype=bf16, quantize=True),
  }
  models = {name: weights.load_into_model(source, config, **kw) for name, kw in variants.items()}

  width = max(len(p) for p in prompts)
  totals = {name: [0.0, 0, 0] for name in variants if name != "fp32"}
  start = time.time()
  for i in range(0, len(prompts), args.batch_size):
    batch = prompts[i:i + args.batch_size]
    batch = batch + [batch[-1]] * (args.batch_size - len(batch))  # one compiled shape for every batch
    ids, mask = left_pad(batch, width)  # one width for every batch, so one compilation
    real = mask.copy()
    real[len(prompts[i:i + args.batch_size]):] = 0  # the repeated filler rows are not counted
    reference = log_probs(models["fp32"], ids, mask)
    for name in totals:
      kl, agree = compare(reference, models[name], ids, mask)
      totals[name][0] += float(np.asarray(kl, np.float64)[real == 1].sum())
      totals[name][1] += int(np.asarray(agree)[real == 1].sum())
      totals[name][2] += int(real.sum())

  print(f"SmolLM2-135M-Instruct ({gguf.name}), {len(prompts)} GSM8K {args.split} chat prompts, "
        f"{totals['bf16'][2]} positions, {time.time() - start:.1f} s")
  print(f"{'variant':<22} {'mean KL(fp32||.) nats':>22} {'top-1 agreement':>16}")
  for name, (kl, agree, count) in totals.items():
    print(f"{name:<22} {kl / count:>22.5f} {agree / count:>16.4f}")
  bf16_bytes = quantization.param_bytes(models["bf16"])
  int8_bytes = quantization.param_bytes(models["int8 (bf16 compute)"])
  print(f"parameter bytes: bf16 {bf16_bytes / 2**20:.1f} MiB, int8 {int8_bytes / 2**20:.1f} MiB "
        f"({int8_bytes / bf16_bytes:.3f} of bf16; embeddings and norms stay bf16)")


if __name__ == "__main__":
  main()
