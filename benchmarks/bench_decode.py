"""Decode throughput of kdjax.serving.generation vs transformers `generate` on SmolLM2-135M-Instruct (fp32, CPU).

Both decode the same GSM8K chat prompts greedily, batched, for exactly `--new-tokens` tokens (stop tokens are
ignored by kdjax and suppressed by HF's min_new_tokens, so every row produces the full count). kdjax is timed
after a warm-up run that compiles; the compile time is reported separately. Then kdjax's time against the
compute floor of the workload, and the speed-up ceiling that this CPU's fp32 GEMM rates allow over HF's time
(benchmarks/roofline.py); and the same work with the decode's products at the rates they reach with their weights
read from memory rather than cache (no longer a floor: where the decode's own products stand). Host memory as in
bench_train.py (--malloc).

  JAX_PLATFORMS=cpu python -m benchmarks.bench_decode [--batch-size 16] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                      "gsm8k"))
  parser.add_argument("--length-bucket", type=int, default=16,
                      help="kdjax pads prompts to a multiple of this (HF pads to the longest prompt)")
  parser.add_argument("--skip-hf", action="store_true", help="time kdjax only")
  parser.add_argument("--torch-device", default="cpu", help="where HF runs: cpu (default) or cuda")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch intra-op threads for HF (default: torch's own choice); on a busy machine "
                           "one thread can be much faster than a spinning pool of two")
  parser.add_argument("--malloc", choices=("keep", "glibc"), default="keep",
                      help="keep: kdjax.infra.hostmem.keep_freed_memory(), for both frameworks, as kdjax.main does on "
                           "CPU; glibc: the C library's defaults")
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  if args.malloc == "keep":  # before either framework starts its threads
    from kdjax.infra import hostmem
    hostmem.keep_freed_memory()
  import bench_generate
  import kdjax
  from kdjax.gsm8k import data
  from kdjax.infra import fetch
  from kdjax.serving import generation
  from kdjax.teacher import priming

  gguf_path = fetch.smollm2_gguf()
  model, _ = kdjax.load_model(gguf_path, dtype="float32")
  tokenizer = kdjax.load_tokenizer(gguf_path)
  questions = [row["question"] for row in data.load_gsm8k(args.gsm8k, "test")[:args.batch_size]]
  prompts = [priming.encode_chat(tokenizer, priming.student_messages(q)) for q in questions]
  total_tokens = args.batch_size * args.new_tokens
  print(f"CPU: {bench_generate.cpu_model()}")
  print(f"{args.batch_size} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{args.new_tokens} new tokens each, greedy, fp32, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cpu(s)")

  sampling = generation.SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  run = lambda: generation.generate(model, prompts, sampling, stop_ids=[], pad_id=pad_id,
                                    batch_size=args.batch_size, length_bucket=args.length_bucket)
  start = time.perf_counter()
  run()  # compiles the prefill and the decode loop for these shapes
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  outs = run()
  kdjax_s = time.perf_counter() - start
  assert all(len(o.tokens) == args.new_tokens for o in outs)
  kdjax_tps = total_tokens / kdjax_s
  print(f"kdjax: {kdjax_s:.2f} s, {kdjax_tps:.1f} tokens/s (prefill included); "
        f"compile ~{warmup_s - kdjax_s:.1f} s (warm-up {warmup_s:.1f} s minus a timed run)")
  floor = None
  if jax.devices()[0].platform == "cpu":  # the compute floor is measured from this CPU's GEMM rates
    from benchmarks import roofline
    floor = roofline.decode_floor(model.config, list(map(len, prompts)), args.new_tokens)
    print(f"kdjax runs at {floor.seconds() / kdjax_s:.1%} of the compute floor ({floor.seconds():.2f} s)")
    streamed_s = floor.seconds(streamed_rows=args.batch_size)
    print(f"the floor's {args.batch_size}-row products at the rates they reach with their weights read from "
          f"memory, as in a decode step: {streamed_s:.2f} s (kdjax at {streamed_s / kdjax_s:.0%} of that)")
  if args.skip_hf:
    return

  import torch
  import transformers
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval().to(args.torch_device)
  width = max(map(len, prompts))
  ids = np.full((len(prompts), width), pad_id, np.int64)
  mask = np.zeros((len(prompts), width), np.int64)
  for row, prompt in enumerate(prompts):  # left padding, as HF expects for batched generation
    ids[row, width - len(prompt):] = prompt
    mask[row, width - len(prompt):] = 1
  ids_t, mask_t = torch.from_numpy(ids).to(args.torch_device), torch.from_numpy(mask).to(args.torch_device)
  eos = priming.stop_token_ids(tokenizer)

  def hf_generate(new_tokens: int):
    with torch.no_grad():
      out = hf_model.generate(ids_t, attention_mask=mask_t, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad_id)
    if out.is_cuda:  # kernels run asynchronously: the clock stops when they are done
      torch.cuda.synchronize()
    return out

  hf_generate(4)  # warm-up: first-call allocations and lazy initialisation
  start = time.perf_counter()
  out = hf_generate(args.new_tokens)
  hf_s = time.perf_counter() - start
  assert out.shape[1] == width + args.new_tokens
  hf_tps = total_tokens / hf_s
  print(f"HF generate: {hf_s:.2f} s, {hf_tps:.1f} tokens/s (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)")
  print(f"speed-up kdjax / HF: {kdjax_tps / hf_tps:.2f}x")
  if floor is not None:
    print(roofline.ceiling_line("decode", hf_s, floor, 3.0))


if __name__ == "__main__":
  main()
