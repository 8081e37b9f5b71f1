"""Useful tokens/s of kdjax.serving.generation on the real workloads vs transformers `generate` (SmolLM2-135M, fp32, CPU).

Two workloads, greedy, each row stopping at its end-of-turn token or after `--new-tokens`:
  teacher: GSM8K train questions in the primed teacher chat (`--strategy`), as the generate stage writes stores;
  eval:    GSM8K test questions in the student chat, as the eval stage scores them.
kdjax runs `generation.generate` with `--slots` decode slots (continuous batching); HF runs `generate` on static
batches of the same number of rows (prompts sorted by length, left-padded, each batch until its longest row
stops). Useful tokens are the response tokens up to and including the stop token. kdjax is timed after a
warm-up run that compiles. Each workload ends with its compute floor (benchmarks/roofline.py: the prefill of every
prompt and the useful decode tokens in steps of `--slots` rows, at this CPU's best fp32 GEMM rates).

  JAX_PLATFORMS=cpu python -m benchmarks.bench_generate [--num-prompts 48] [--new-tokens 512] [--slots 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

WORKLOADS = ("teacher", "eval")


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-prompts", type=int, default=48)
  parser.add_argument("--new-tokens", type=int, default=512)
  parser.add_argument("--slots", type=int, default=16, help="kdjax decode slots = HF static batch rows")
  parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: teacher, eval")
  parser.add_argument("--strategy", default="ground_truth", help="priming strategy of the teacher workload")
  parser.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                      "gsm8k"))
  parser.add_argument("--length-bucket", type=int, default=64, help="kdjax's prompt length bucket")
  parser.add_argument("--skip-hf", action="store_true", help="time kdjax only")
  parser.add_argument("--torch-device", default="cpu", help="where HF runs: cpu (default) or cuda")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch intra-op threads for HF (default: torch's own choice)")
  parser.add_argument("--malloc", choices=("keep", "glibc"), default="keep",
                      help="keep: kdjax.infra.hostmem.keep_freed_memory() for both frameworks (as kdjax.main on CPU)")
  args = parser.parse_args()
  workloads = [w for w in args.workloads.split(",") if w]
  bad = [w for w in workloads if w not in WORKLOADS]
  if bad or not workloads:
    parser.error(f"--workloads: unknown {bad}; choose from {WORKLOADS}")
  if args.num_prompts < 1 or args.new_tokens < 1 or args.slots < 1:
    parser.error("--num-prompts, --new-tokens and --slots must be >= 1")
  if not os.path.exists(os.path.join(args.gsm8k, "train.jsonl")):
    parser.error(f"--gsm8k: no train.jsonl in {args.gsm8k}")
  args.workloads = workloads
  return args


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown (no lscpu)"
  names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
  return names[0] if names else "unknown"


def workload_prompts(name: str, args, tokenizer) -> list[list[int]]:
  from kdjax.gsm8k import data
  from kdjax.teacher import priming, jax_engine as teacher
  from kdjax.evaluation import loop
  if name == "teacher":
    questions = data.load_gsm8k(args.gsm8k, "train")[:args.num_prompts]
    return [teacher.teacher_prompt_ids(tokenizer, q, args.strategy, "system") for q in questions]
  questions = data.load_gsm8k(args.gsm8k, "test")[:args.num_prompts]
  return [priming.encode_chat(tokenizer, loop.prompt_messages(q["question"], "zero_shot_cot")) for q in questions]


def useful_length(tokens: list[int], stop_ids: set[int]) -> int:
  """Response tokens up to and including the first stop token (all of them when none)."""
  for i, token in enumerate(tokens):
    if token in stop_ids:
      return i + 1
  return len(tokens)


def hf_generate_static(hf_model, prompts: list[list[int]], rows: int, new_tokens: int, stop_ids: list[int],
                       pad_id: int, device: str) -> list[list[int]]:
  """HF `generate` on static batches of `rows` prompts (sorted by length), responses in the prompts' order."""
  import torch
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  responses: list[list[int]] = [[] for _ in prompts]
  for first in range(0, len(order), rows):
    members = order[first:first + rows]
    width = max(len(prompts[i]) for i in members)
    ids = np.full((len(members), width), pad_id, np.int64)
    mask = np.zeros((len(members), width), np.int64)
    for row, i in enumerate(members):  # left padding, as HF expects for batched generation
      ids[row, width - len(prompts[i]):] = prompts[i]
      mask[row, width - len(prompts[i]):] = 1
    with torch.no_grad():
      out = hf_model.generate(torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                              do_sample=False, max_new_tokens=new_tokens, eos_token_id=stop_ids,
                              pad_token_id=pad_id)
    out = out[:, width:].cpu().tolist()
    for row, i in enumerate(members):
      responses[i] = out[row]
  return responses


def useful_floor(config, prompt_lengths: list[int], useful: list[int], rows: int):
  """roofline Floor of the useful work, built like roofline.decode_floor: the unpadded prompts prefilled as one
  product (last logits only), then every useful token but the first (which comes from the prefill) decoded in
  steps of `rows` rows against its own context."""
  from benchmarks import roofline
  floor = roofline.Floor()
  pairs = sum(roofline.causal_pairs(length) for length in prompt_lengths)
  roofline.add_forward(floor, config, sum(prompt_lengths), pairs, 0)
  floor.gemm(len(prompt_lengths), config.hidden_size, config.vocab_size)
  decoded = sum(n - 1 for n in useful)
  steps = decoded / rows
  for k, n in roofline._layer_products(config):
    floor.gemm(rows, k, n, config.num_layers * steps)
  floor.gemm(rows, config.hidden_size, config.vocab_size, steps)
  context = sum(sum(p + t for t in range(1, n)) for p, n in zip(prompt_lengths, useful))
  floor.attention_flops += 4.0 * config.num_heads * config.head_dim * context * config.num_layers
  return floor


def main() -> None:
  args = parse_args()
  if args.malloc == "keep":  # before either framework starts its threads
    from kdjax.infra import hostmem
    hostmem.keep_freed_memory()
  import kdjax
  from kdjax.infra import fetch
  from kdjax.serving import generation
  from kdjax.teacher import priming

  print(f"CPU: {cpu_model()}, {os.cpu_count()} cpu(s); jax {jax.__version__} on {jax.devices()[0].platform}")
  gguf_path = fetch.smollm2_gguf()
  model, _ = kdjax.load_model(gguf_path, dtype="float32")
  tokenizer = kdjax.load_tokenizer(gguf_path)
  stop_ids = priming.stop_token_ids(tokenizer)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
  sampling = generation.SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
  hf_model = None
  if not args.skip_hf:
    import torch
    import transformers
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval().to(args.torch_device)

  for name in args.workloads:
    prompts = workload_prompts(name, args, tokenizer)
    print(f"\n[{name}] {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"greedy, stop at EOS or {args.new_tokens} new tokens, {args.slots} slots / rows, fp32")
    run = lambda: generation.generate(model, prompts, sampling, stop_ids=stop_ids, pad_id=pad_id,
                                      batch_size=args.slots, length_bucket=args.length_bucket)
    start = time.perf_counter()
    run()  # compiles the prefill, insert and decode programs for these shapes
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    outs = run()
    kdjax_s = time.perf_counter() - start
    useful = [len(o.tokens) for o in outs]
    kdjax_tps = sum(useful) / kdjax_s
    print(f"kdjax: {kdjax_s:.2f} s, {sum(useful)} useful tokens ({sum(u == args.new_tokens for u in useful)} rows "
          f"at the limit), {kdjax_tps:.1f} useful tokens/s; compile ~{warmup_s - kdjax_s:.1f} s")
    floor = useful_floor(model.config, list(map(len, prompts)), useful, args.slots)
    floor_s = floor.seconds() if jax.devices()[0].platform == "cpu" else None
    if floor_s is not None:
      streamed_s = floor.seconds(streamed_rows=args.slots)
      print(f"compute floor of the useful tokens: {floor_s:.2f} s ({floor.total_flops() / 1e9:.0f} GFLOP); "
            f"kdjax runs at {floor_s / kdjax_s:.0%} of it; with the {args.slots}-row products' weights read from "
            f"memory, as in a decode step: {streamed_s:.2f} s ({streamed_s / kdjax_s:.0%})")
    if hf_model is None:
      continue
    import torch
    hf_generate_static(hf_model, prompts[:2], 2, 4, stop_ids, pad_id, args.torch_device)  # warm-up
    start = time.perf_counter()
    hf = hf_generate_static(hf_model, prompts, args.slots, args.new_tokens, stop_ids, pad_id, args.torch_device)
    if args.torch_device.startswith("cuda"):
      torch.cuda.synchronize()
    hf_s = time.perf_counter() - start
    hf_useful = [useful_length(r, set(stop_ids)) for r in hf]
    hf_tps = sum(hf_useful) / hf_s
    same = sum(o.tokens == r[:n] for o, r, n in zip(outs, hf, hf_useful))
    print(f"HF generate: {hf_s:.2f} s, {sum(hf_useful)} useful tokens, {hf_tps:.1f} useful tokens/s "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"speed-up kdjax / HF (useful tokens/s): {kdjax_tps / hf_tps:.2f}x (target 2x); greedy outputs "
          f"identical for {same} of {len(prompts)}")
    if floor_s is not None:
      from benchmarks import roofline
      print(roofline.ceiling_line(f"{name} (useful tokens)", hf_s * sum(useful) / sum(hf_useful), floor, 2.0))


if __name__ == "__main__":
  main()
