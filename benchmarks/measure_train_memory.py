"""The train plan's memory for one step on this CPU against the memory the step really takes (RSS).

  python -m benchmarks.measure_train_memory [--batch 4 --max_len 256] [--remat]

Plans SmolLM2-135M's LoRA train step on the live CPU device (the demo's settings: float32, LoRA r 4 on q, k, v, o,
AdamW, forward KL on the teacher's top-50, chunks of 256), then runs that compiled step on real arrays and
measures the process's resident memory: the baseline after compiling, before any argument exists, and the peak
(VmHWM, reset through /proc/self/clear_refs just before the step) while the step runs. The measured step memory
is peak - baseline: the arguments plus everything the step allocates. glibc is told to return freed memory to
the system (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, set before this process starts by re-executing it),
so memory freed after compiling cannot be reused unseen and RSS follows the live buffers.
Prints one JSON line: the plan's per-device figures and the measured ones.
"""

import argparse
import gc
import json
import os
import pathlib
import sys

_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "JAX_PLATFORMS": "cpu"}
if any(os.environ.get(k) != v for k, v in _ENV.items()):
  os.execve(sys.executable, [sys.executable, "-m", "benchmarks.measure_train_memory", *sys.argv[1:]],
            {**os.environ, **_ENV})

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kdjax.experiment import config as config_lib  # noqa: E402
from kdjax.plan import generate as plan_lib  # noqa: E402
from kdjax.plan import train_step as plan_train  # noqa: E402
from kdjax.distill import batches, losses  # noqa: E402
from kdjax.models import lora as lora_lib  # noqa: E402
from kdjax.distill import train as train_lib  # noqa: E402
from kdjax.models.llama import model as model_lib  # noqa: E402


def rss_bytes() -> int:
  return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
  line = next(l for l in pathlib.Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
  return int(line.split()[1]) * 1024


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--max_len", type=int, default=256)
  parser.add_argument("--remat", action="store_true")
  args = parser.parse_args()
  c = config_lib.recommended(config_lib.get_default_config())  # the demo's loss and optimizer
  config = plan_lib.config_lib.get_preset("smollm2-135m")
  train_cfg = train_lib.TrainConfig(optimizer=c.train.optimizer, batch_size=args.batch, max_length=args.max_len,
                                    chunk_size=c.train.chunk_size)
  loss_cfg = losses.LossConfig(divergence=c.distill.divergence, temperature=c.distill.temperature,
                               ce_weight=c.distill.ce_weight)
  lora_cfg = lora_lib.LoraConfig(rank=c.student.lora.rank, targets=tuple(c.student.lora.targets.split(",")))
  mesh = plan_lib.build_mesh({"fsdp": 1}, jax.devices()[:1])
  step = plan_train._compile_step(config, batch_size=args.batch, train_cfg=train_cfg, loss_cfg=loss_cfg,
                                  lora_cfg=lora_cfg, dtype="float32", quantize=False, remat=args.remat,
                                  teacher_k=c.teacher.k, mesh=mesh, rules=plan_lib.parallel.DEFAULT_RULES,
                                  optimization_level="O0")
  gc.collect()
  baseline = rss_bytes()

  model = model_lib.init_model(config, remat=args.remat)
  lora_lib.add_lora(model, lora_cfg)
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  del model
  device = jax.devices()[0]
  lora, rest = jax.device_put(lora, device), jax.device_put(rest, device)
  opt_state = jax.jit(train_lib.make_optimizer(train_cfg, 1).init)(lora)
  rng = np.random.default_rng(0)
  n, k = args.max_len - 1, c.teacher.k
  example = batches.distill_example(np.zeros(2, np.int32), rng.integers(0, config.vocab_size, n),
                                    rng.integers(0, config.vocab_size, (n, k)),
                                    np.full((n, k), np.log(0.5 / k), np.float32), np.full(n, np.log(0.5), np.float32))
  batch = batches.collate([example] * args.batch, batch_size=args.batch, max_length=args.max_len)
  batch = jax.device_put({key: v.reshape((1,) + v.shape) for key, v in batch.items()}, device)
  key = jax.random.key(0)
  jax.block_until_ready((lora, rest, opt_state, batch))
  gc.collect()
  with_arguments = rss_bytes()

  pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
  out = step.compiled(lora, opt_state, rest, batch, key)
  jax.block_until_ready(out)
  peak = peak_rss_bytes()
  memory = step.memory
  result = {"model": config.name, "batch": args.batch, "max_len": args.max_len, "remat": args.remat,
            "plan_total_bytes": memory.total_bytes, "plan_argument_bytes": memory.argument_bytes,
            "plan_temp_bytes": memory.temp_bytes, "plan_output_bytes": memory.output_bytes,
            "measured_argument_bytes": with_arguments - baseline, "measured_step_bytes": peak - baseline,
            "ratio": (peak - baseline) / memory.total_bytes}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
