"""Helpers for tests/teacher/test_teacher.py: a tiny random teacher with SmolLM2's vocabulary, and a subprocess
entry.

Run as `python -m workers.teacher_worker` it writes a teacher store with the tiny teacher, optionally as one process
of a `jax.distributed` group on localhost (`--num-processes 2 --process-id i --port P`), optionally on a mesh
of every device of the run (`--mesh data=2,fsdp=2,tensor=2`: with two processes, one teacher spanning both), optionally
pausing before every shard after the first (`--pause-s`) so a test can kill it between shards.
It prints the summary of `generate_store` as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from kdjax.serving.generation import SamplingConfig  # noqa: E402
from kdjax.models.llama import config as config_lib  # noqa: E402
from kdjax.models.llama import model as model_lib  # noqa: E402

STRATEGY = "confidence"
TEACHER_ID = "tiny-random-teacher"
# temperature > 0 with top-p and top-k filtering: the stores only agree if every row's key is right.
SAMPLING = SamplingConfig(temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=12, seed=7)
K = 8
SHARD_SIZE = 3
BATCH_SIZE = 2


def tiny_teacher():
  """The "tiny" preset widened to SmolLM2's 49152 ids, with a scaled head so distributions are peaked."""
  config = dataclasses.replace(config_lib.get_preset("tiny"), vocab_size=49152, rope_scaling=None,
                               max_position_embeddings=4096, name="tiny-49152")
  model = model_lib.init_model(config, seed=0)
  model.lm_head[...] = model.lm_head[...] * 30.0
  return model


def int8_teacher(num_devices: int = 1):
  """The tiny teacher with int8 projections, sharded over `num_devices` local devices (tensor axis)."""
  import jax
  from flax import nnx

  from kdjax.infra import parallel
  from kdjax.models import quantization
  model = tiny_teacher()
  if num_devices > 1:
    mesh = parallel.make_mesh({"tensor": num_devices}, devices=jax.local_devices()[:num_devices])
    state = nnx.state(model)
    # Placed here rather than with parallel.shard_model, which indexes its shardings with `[...]`
    # (fails on flax 0.12.8, where a Variable holding a NamedSharding cannot be indexed).
    placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_raw_value())),
                          state, parallel.state_shardings(state, mesh),
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, placed)
  return quantization.quantize_model(model)


def run_store(store_dir, questions, tokenizer, model=None, **overrides) -> dict:
  from kdjax.teacher import jax_engine as teacher
  kwargs = dict(teacher_model_id=TEACHER_ID, sampling=SAMPLING, k=K, shard_size=SHARD_SIZE,
                batch_size=BATCH_SIZE, tail_temperatures=(1.0, 5.94), progress=False)
  kwargs.update(overrides)
  model = tiny_teacher() if model is None else model
  return teacher.generate_store(model, tokenizer, questions, STRATEGY, store_dir, **kwargs)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--store", required=True)
  parser.add_argument("--tokenizer", required=True, help="a folder saved with tokenizer.save_pretrained")
  parser.add_argument("--gsm8k", required=True)
  parser.add_argument("--num-questions", type=int, required=True)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--pause-s", type=float, default=0.0)
  parser.add_argument("--int8-devices", type=int, default=0,
                      help="use the int8 teacher sharded over this many local devices")
  parser.add_argument("--mesh", default="none",
                      help="axis=size,...: the tiny teacher on a mesh of every device of the run (all processes')")
  args = parser.parse_args()

  import jax
  from flax import nnx
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)
  from transformers import AutoTokenizer

  from kdjax.gsm8k import data
  from kdjax.serving import generation
  tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
  questions = data.load_gsm8k(args.gsm8k, "train")[:args.num_questions]
  if args.pause_s:
    real_generate = generation.generate
    calls = []

    def paused_generate(*a, **kw):
      if calls:  # after the first shard is on disk: leave the killer time to strike between shards
        time.sleep(args.pause_s)
      calls.append(1)
      return real_generate(*a, **kw)

    generation.generate = paused_generate
  model = int8_teacher(args.int8_devices) if args.int8_devices else None
  if model is not None:
    assert all(len(leaf.sharding.device_set) == args.int8_devices for leaf in jax.tree.leaves(nnx.state(model))
               if leaf.ndim == 4), "the projections are not sharded"
  teacher_id = f"{TEACHER_ID}-int8" if model is not None else TEACHER_ID
  if args.mesh != "none":  # the float teacher, so its store compares with the 1-device reference's
    from workers import multihost_worker
    model = multihost_worker.place(tiny_teacher(), multihost_worker.parse_mesh(args.mesh))
  summary = run_store(args.store, questions, tokenizer, model=model, teacher_model_id=teacher_id)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
