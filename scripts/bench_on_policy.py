"""Seconds per on-policy step, split into sampling / scoring / update, next to an off-policy step (issue 14).

  python scripts/bench_on_policy.py [--questions=4] [--new_tokens=64] [--steps=4]

SmolLM2-135M-Instruct (float32) is both the LoRA student (r 4 on q, k, v, o) and the resident teacher, primed
with ground_truth, on the first `--questions` GSM8K train questions: one step holds all of them. The on-policy
run (fraction 1) samples up to `--new_tokens` tokens per question with the student's current LoRA, has the
teacher grade them (dense forward KL over the vocabulary at T = 1) and updates; the off-policy run (fraction 0)
trains on store-shaped examples of the same prompts with `--new_tokens`-token responses and random top-50
teacher arrays. Both run `kdjax.distill.train.train` with AdamW; the first step (compilation) is dropped and
the medians of the others are printed, with the CPU model from lscpu.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

import kdjax
from kdjax import data, fetch, priming, teacher
from kdjax.distill import batches, losses, lora, on_policy
from kdjax.distill import train as train_lib

TOP_K = 50


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
  except OSError:
    return "unknown (no lscpu)"
  fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
  return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def store_examples(tokenizer, questions, new_tokens: int, vocab: int, seed: int = 0) -> list[batches.TrainExample]:
  rng = np.random.default_rng(seed)
  out = []
  for q in questions:
    response = rng.integers(0, vocab, new_tokens)
    ids = np.stack([rng.choice(vocab, TOP_K, replace=False) for _ in range(new_tokens)])
    logits = rng.normal(size=(new_tokens, TOP_K)) * 3
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) + np.log(0.9)
    out.append(batches.distill_example(teacher.student_prompt_ids(tokenizer, q), response, ids, logprobs,
                                       question_id=q["id"]))
  return out


def run(fraction: float, examples, prompts, tokenizer, steps: int, new_tokens: int, workdir: str) -> list[dict]:
  student, _ = kdjax.load_model(fetch.smollm2_gguf())
  resident, _ = kdjax.load_model(fetch.smollm2_gguf())
  lora.add_lora(student, lora.LoraConfig(rank=4, alpha=8, dropout=0.1), seed=0)
  settings = on_policy.OnPolicySettings(fraction=fraction, temperature=1.0, max_new_tokens=new_tokens,
                                        decode_slots=len(examples))
  scorer = on_policy.OnPolicy(resident, prompts, settings, stop_ids=priming.stop_token_ids(tokenizer),
                              pad_id=priming.pad_token_id(tokenizer))
  cfg = train_lib.TrainConfig(optimizer="adamw", learning_rate=1e-4, batch_size=len(examples), num_steps=steps,
                              checkpoint_every=10_000, log_every=1, pad_multiple=64, chunk_size=256,
                              tensorboard=False, progress_bar=False, async_checkpointing=False)
  result = train_lib.train(student, examples, None, cfg, losses.LossConfig(divergence="forward_kl", ce_weight=0.0),
                           workdir, on_policy=scorer)
  return result.history[1:]  # the first step compiles


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--questions", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--steps", type=int, default=4)
  args = parser.parse_args()
  tokenizer = kdjax.load_tokenizer(fetch.smollm2_gguf())
  questions = data.load_gsm8k(os.environ.get("KDJAX_GSM8K", "../shared/data/gsm8k"), "train")[:args.questions]
  prompts = {q["id"]: teacher.teacher_prompt_ids(tokenizer, q, "ground_truth", "system") for q in questions}
  examples = store_examples(tokenizer, questions, args.new_tokens, len(tokenizer))
  print(f"cpu: {cpu_model()}")
  print(f"SmolLM2-135M student + resident teacher (ground_truth), {args.questions} questions per step, "
        f"{args.new_tokens} new tokens, median of {args.steps - 1} steps after the first")
  with tempfile.TemporaryDirectory() as folder:
    on = run(1.0, examples, prompts, tokenizer, args.steps, args.new_tokens, f"{folder}/on")
    off = run(0.0, examples, prompts, tokenizer, args.steps, args.new_tokens, f"{folder}/off")
  med = lambda rows, key: statistics.median(r.get(key, 0.0) for r in rows)
  sample, score, update = med(on, "sample_s"), med(on, "score_s"), med(on, "update_s")
  print(f"on-policy step:  {sample + score + update:7.2f} s = sampling {sample:.2f} + scoring {score:.2f} + "
        f"update {update:.2f}  (mean sampled length {med(on, 'sampled_len'):.0f} tokens)")
  print(f"off-policy step: {med(off, 'update_s'):7.2f} s = update {med(off, 'update_s'):.2f}  "
        f"(store batch of {args.new_tokens}-token responses)")


if __name__ == "__main__":
  main()
