"""Peak resident memory of `python -m kdjax.convert` on a multi-shard HF checkpoint.

  python -m benchmarks.measure_convert_memory [--hidden=1024 --layers=8]

Builds a random Llama with torch, saves it in several safetensors shards, then converts it in a child process and
reads the child's peak RSS. The fixed overhead (Python, jax, orbax, transformers) is measured the same way on a
tiny checkpoint. The claim checked: peak <= output size + largest tensor + fixed overhead (+ 5% slack).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import subprocess
import sys
import tempfile


def child_peak_rss(args: list[str]) -> int:
  """Runs a child python and returns its peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
  code = ("import resource, runpy, sys; sys.argv = {argv!r}; "
          "exec('try:\\n runpy.run_module(\"kdjax.convert\", run_name=\"__main__\")\\nexcept SystemExit: pass'); "
          "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)").format(argv=["kdjax.convert"] + args)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if proc.returncode != 0 or "PEAK" not in proc.stdout:
    raise RuntimeError(proc.stderr[-2000:])
  return int(proc.stdout.rsplit("PEAK", 1)[1].split()[0])


def save_random_llama(path: pathlib.Path, hidden: int, layers: int, vocab: int, shard: str) -> tuple[int, int]:
  import torch
  import transformers
  cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4,
                                 num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                 num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(path, max_shard_size=shard)
  sizes = [p.numel() * 4 for p in model.state_dict().values()]
  return sum(sizes), max(sizes)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    total, largest = save_random_llama(tmp / "big", args.hidden, args.layers, args.vocab, "100MB")
    save_random_llama(tmp / "tiny", 64, 1, 256, "1MB")
    shards = len(list((tmp / "big").glob("*.safetensors")))
    overhead = child_peak_rss([f"--source={tmp / 'tiny'}", f"--output={tmp / 'tiny_ckpt'}"])
    peak = child_peak_rss([f"--source={tmp / 'big'}", f"--output={tmp / 'big_ckpt'}"])
  mib = 1 << 20
  bound = total + largest + overhead
  print(f"checkpoint: {total / mib:.0f} MiB fp32 in {shards} shards, largest tensor {largest / mib:.0f} MiB")
  print(f"fixed overhead (tiny conversion): {overhead / mib:.0f} MiB")
  print(f"peak RSS converting:              {peak / mib:.0f} MiB")
  print(f"bound output + largest + overhead: {bound / mib:.0f} MiB -> "
        f"{'within' if peak <= 1.05 * bound else 'EXCEEDS'} (peak - overhead = {(peak - overhead) / total:.2f}x output)")
  sys.exit(0 if peak <= 1.05 * bound else 1)


if __name__ == "__main__":
  main()
