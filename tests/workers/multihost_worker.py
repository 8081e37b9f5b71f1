"""Worker for tests/serving/test_multihost_generation.py: one process's part of a generation on a mesh.

`python -m workers.multihost_worker --out F.npz --mesh data=2,fsdp=2,tensor=2 [--num-processes 2 --process-id i
--port P]` builds the tiny random Llama (the same weights in every process: a fixed seed), places it on a mesh of every
device of the run (all processes' with jax.distributed, so the mesh spans them) or on one device (`--mesh none`),
and generates the ragged prompts below three ways: greedy, sampled, and greedy with top-k log-probs. It writes what
came back to `--out` (every process writes its own file: each must have read every row) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from kdjax.serving.generation import SamplingConfig  # noqa: E402

# Ragged prompts (3 to 40 tokens) over the tiny vocabulary; 7 prompts through 4 slots, so slots refill.
PROMPT_LENGTHS = (3, 40, 17, 9, 28, 5, 33)
STOP_IDS = (4, 11, 110, 150, 210, 213, 214)  # picked from the outputs: greedy rows stop after 4 to 15 tokens, one runs to 24
MAX_NEW_TOKENS = 24
SLOTS = 4
TOPK = 8
TAILS = (1.0, 2.0)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, seed=0)
SAMPLED = SamplingConfig(temperature=0.9, top_p=0.9, top_k=40, max_new_tokens=MAX_NEW_TOKENS, seed=5)


def prompts() -> list[list[int]]:
  rng = np.random.RandomState(3)
  return [rng.randint(1, 256, n).tolist() for n in PROMPT_LENGTHS]


def tiny_model():
  """The "tiny" preset (256 ids, 2 layers, 4 heads, 2 KV heads), its head scaled so rows are not near-ties."""
  from kdjax.models.llama import config as config_lib
  from kdjax.models.llama import model as model_lib
  model = model_lib.init_model(config_lib.get_preset("tiny"), seed=1)
  model.lm_head[...] = model.lm_head[...] * 8.0
  return model


def parse_mesh(text: str) -> dict[str, int] | None:
  if text == "none":
    return None
  return {axis: int(size) for axis, size in (item.split("=") for item in text.split(","))}


def place(model, shape: dict[str, int] | None):
  """`model` on a mesh of `shape` over every device of the run (jax.devices(): all processes'), by logical axes."""
  if shape is None:
    return model
  import jax
  from flax import nnx

  from kdjax.infra import parallel
  mesh = parallel.make_mesh(shape, devices=jax.devices())
  state = nnx.state(model)
  # The NamedShardings are read with get_raw_value (parallel.shard_model indexes them, which flax 0.12.8 refuses).
  placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_raw_value())),
                        state, parallel.state_shardings(state, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, placed)
  return model


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--mesh", default="none", help="none, or axis=size,... over every device of the run")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args()

  import jax
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id)
  from kdjax.serving import engine, generation
  from kdjax.infra import parallel
  model = place(tiny_model(), parse_mesh(args.mesh))
  mesh = engine.model_mesh(model)
  spans = parallel.spans_processes(mesh)
  out = {}
  common = dict(stop_ids=list(STOP_IDS), pad_id=0, batch_size=SLOTS)
  for name, sampling, extra in (("greedy", GREEDY, {}), ("sampled", SAMPLED, {}),
                                ("topk", GREEDY, dict(topk_logprobs=TOPK, tail_temperatures=TAILS))):
    results = generation.generate(model, prompts(), sampling, **common, **extra)
    lengths = [len(r.tokens) for r in results]
    tokens = np.zeros((len(results), MAX_NEW_TOKENS), np.int32)
    for row, r in enumerate(results):
      tokens[row, :len(r.tokens)] = r.tokens
    out[f"{name}_tokens"], out[f"{name}_lengths"] = tokens, np.asarray(lengths)
    out[f"{name}_stopped"] = np.asarray([r.finish_reason == "stop" for r in results])
    if extra:
      for field in ("topk_ids", "topk_logprobs", "tail_mass", "tail_log_mass"):
        out[f"{name}_{field}"] = np.concatenate([getattr(r, field) for r in results])
  np.savez(args.out, **out)
  print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "devices": len(mesh.devices.flat) if mesh is not None else 1, "spans_processes": spans}),
        flush=True)


if __name__ == "__main__":
  main()
