"""Seconds per on-policy step, split into sampling / scoring / update, next to an off-policy step (issue 14).

  python -m benchmarks.bench_on_policy [--questions=4] [--new_tokens=64] [--steps=4] [--repeats=2]

SmolLM2-135M-Instruct (float32) is both the LoRA student (r 4 on q, k, v, o) and the resident teacher, primed
with ground_truth, on the first `--questions` GSM8K train questions: one step holds all of them. The on-policy
run (fraction 1) samples up to `--new_tokens` tokens per question with the student's current LoRA, has the
teacher grade them (dense forward KL over the vocabulary at T = 1) and updates; the off-policy run (fraction 0)
trains on store-shaped examples of the same prompts with `--new_tokens`-token responses and random top-50
teacher arrays. Both run `kdjax.distill.train.train` with AdamW; the first step (compilation) is dropped and
the medians of the others are printed, with the CPU model from lscpu.

The on-policy run is made twice per repeat, alternating, in one process: with the teacher's final hidden states
in the batch (the loss projects them chunk by chunk: `OnPolicy(teacher_scoring="hidden")`, the default) and with
its full [B, S, V] float32 logits (`teacher_scoring="logits"`, the path before). Beside their times the script
prints each on-policy train step's compiled memory (XLA's memory analysis of the step on this batch shape:
arguments + outputs - aliases + temporaries), the same figure the plan stage reads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

import kdjax
from kdjax.gsm8k import data
from kdjax.infra import fetch
from kdjax.teacher import priming, jax_engine as teacher
from kdjax.distill import batches, losses, on_policy
from kdjax.models import lora
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


LOSS = losses.LossConfig(divergence="forward_kl", ce_weight=0.0)


def train_config(examples, steps: int) -> train_lib.TrainConfig:
  return train_lib.TrainConfig(optimizer="adamw", learning_rate=1e-4, batch_size=len(examples), num_steps=steps,
                               checkpoint_every=10_000, log_every=1, pad_multiple=64, chunk_size=256,
                               tensorboard=False, progress_bar=False, async_checkpointing=False)


def make_student():
  student, _ = kdjax.load_model(fetch.smollm2_gguf())
  lora.add_lora(student, lora.LoraConfig(rank=4, alpha=8, dropout=0.1), seed=0)
  return student


def make_scorer(fraction: float, examples, prompts, tokenizer, new_tokens: int, scoring: str) -> on_policy.OnPolicy:
  resident, _ = kdjax.load_model(fetch.smollm2_gguf())
  settings = on_policy.OnPolicySettings(fraction=fraction, temperature=1.0, max_new_tokens=new_tokens,
                                        decode_slots=len(examples))
  return on_policy.OnPolicy(resident, prompts, settings, stop_ids=priming.stop_token_ids(tokenizer),
                            pad_id=priming.pad_token_id(tokenizer), teacher_scoring=scoring)


def run(fraction: float, examples, prompts, tokenizer, steps: int, new_tokens: int, workdir: str,
        scoring: str = "hidden") -> list[dict]:
  scorer = make_scorer(fraction, examples, prompts, tokenizer, new_tokens, scoring)
  result = train_lib.train(make_student(), examples, None, train_config(examples, steps), LOSS, workdir,
                           on_policy=scorer)
  return result.history[1:]  # the first step compiles


def step_memory(scorer: on_policy.OnPolicy, examples, tokenizer, new_tokens: int) -> int:
  """Compiled bytes of the on-policy train step on a batch scored by `scorer` (responses of `new_tokens`)."""
  from flax import nnx
  from kdjax.plan import generate as plan
  cfg = train_config(examples, 1)
  student = make_student()
  graphdef, lora_state, rest = nnx.split(student, nnx.LoRAParam, ...)
  tx = train_lib.make_optimizer(cfg, 1)
  opt_state = tx.init(lora_state)
  rng = np.random.default_rng(0)
  responses = [rng.integers(0, len(tokenizer), new_tokens).astype(np.int32) for _ in examples]
  batch = scorer._scored_batch(examples, responses, len(examples), cfg.pad_multiple, cfg.max_length)
  batch = {k: np.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
  step = train_lib.make_train_step(graphdef, tx, on_policy.dense_loss_config(LOSS), cfg.chunk_size, True,
                                   lora_state, opt_state)
  lowered = step.lower(lora_state, opt_state, rest, batch, jax.random.key(0), teacher_head=scorer.teacher_head)
  return plan._step_memory(lowered.compile()).total_bytes


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--questions", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=2, help="alternating on-policy runs per scoring path")
  args = parser.parse_args()
  tokenizer = kdjax.load_tokenizer(fetch.smollm2_gguf())
  questions = data.load_gsm8k(os.environ.get("KDJAX_GSM8K", "../shared/data/gsm8k"), "train")[:args.questions]
  prompts = {q["id"]: teacher.teacher_prompt_ids(tokenizer, q, "ground_truth", "system") for q in questions}
  examples = store_examples(tokenizer, questions, args.new_tokens, len(tokenizer))
  print(f"cpu: {cpu_model()}")
  print(f"SmolLM2-135M student + resident teacher (ground_truth), {args.questions} questions per step, "
        f"{args.new_tokens} new tokens, median of {args.steps - 1} steps after the first")
  on = {"hidden": [], "logits": []}
  with tempfile.TemporaryDirectory() as folder:
    for repeat in range(args.repeats):
      for scoring in (("hidden", "logits") if repeat % 2 == 0 else ("logits", "hidden")):
        on[scoring] += run(1.0, examples, prompts, tokenizer, args.steps, args.new_tokens,
                           f"{folder}/on_{scoring}_{repeat}", scoring)
    off = run(0.0, examples, prompts, tokenizer, args.steps, args.new_tokens, f"{folder}/off")
  med = lambda rows, key: statistics.median(r.get(key, 0.0) for r in rows)
  for scoring, rows in on.items():
    sample, score, update = med(rows, "sample_s"), med(rows, "score_s"), med(rows, "update_s")
    memory = step_memory(make_scorer(1.0, examples, prompts, tokenizer, args.new_tokens, scoring), examples,
                         tokenizer, args.new_tokens)
    print(f"on-policy step, teacher {scoring:6s}: {sample + score + update:7.2f} s = sampling {sample:.2f} + "
          f"scoring {score:.2f} + update {update:.2f}  (mean sampled length {med(rows, 'sampled_len'):.0f} "
          f"tokens; {len(rows)} steps); compiled train step {memory / 2**20:.0f} MiB")
  print(f"off-policy step: {med(off, 'update_s'):7.2f} s = update {med(off, 'update_s'):.2f}  "
        f"(store batch of {args.new_tokens}-token responses)")


if __name__ == "__main__":
  main()
