"""Helpers for tests/distill/test_train.py: a tiny student, synthetic teacher-store data, and subprocess entry points.

Run as `python -m workers.train_worker` it trains (`train`: used by the kill -9 test) or compares a mesh run with a
single-device run (`mesh`: needs XLA_FLAGS=--xla_force_host_platform_device_count=8 in the environment before jax
starts).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.distill import batches, losses
from kdjax.models import lora
from kdjax.distill import train as train_lib
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib

TOPK = 8


def _scale_head(model: model_lib.Llama, head_scale: float) -> model_lib.Llama:
  # The tiny preset's 0.02-std head keeps every distribution near uniform; a larger head gives peaked ones.
  if head_scale != 1.0:
    model.lm_head.set_value(model.lm_head[...] * head_scale)
  return model


def make_student(seed: int = 0, dropout: float = 0.0, rank: int = 4, head_scale: float = 1.0) -> model_lib.Llama:
  model = _scale_head(model_lib.init_model(config_lib.get_preset("tiny"), seed=seed), head_scale)
  return lora.add_lora(model, lora.LoraConfig(rank=rank, alpha=8.0, dropout=dropout,
                                              targets=("wq", "wv", "w_up")), seed=seed + 1)


def synthetic_examples(num: int, seed: int, *, teacher_seed: int = 123,
                       head_scale: float = 1.0) -> list[batches.TrainExample]:
  """Random prompts and responses; top-k / tail from a fixed random "teacher" (the tiny preset, another seed)."""
  from flax import nnx
  cfg = config_lib.get_preset("tiny")
  graphdef, state = nnx.split(_scale_head(model_lib.init_model(cfg, seed=teacher_seed), head_scale))
  rng = np.random.default_rng(seed)
  seqs = [(rng.integers(1, cfg.vocab_size, rng.integers(3, 9)), rng.integers(1, cfg.vocab_size, rng.integers(4, 21)))
          for _ in range(num)]
  padded = np.zeros((num, 32), np.int32)  # right padding: causal attention never looks at it
  for row, (prompt, response) in enumerate(seqs):
    padded[row, :len(prompt) + len(response)] = np.concatenate([prompt, response])
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(padded))
  logp_all = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
  out = []
  for i, (prompt, response) in enumerate(seqs):
    rows = logp_all[i, len(prompt) - 1:len(prompt) + len(response) - 1]  # distribution of each response token
    ids = np.argsort(-rows, axis=-1)[:, :TOPK]
    top = np.take_along_axis(rows, ids, -1)
    tail = np.log(np.clip(1.0 - np.exp(top).sum(-1), 0.0, 1.0))
    out.append(batches.distill_example(prompt, response, ids, top.astype(np.float32), tail.astype(np.float32),
                                       question_id=i))
  return out


def lora_arrays(model) -> dict[str, np.ndarray]:
  from flax import nnx
  flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  return {".".join(map(str, path)): np.asarray(var[...]) for path, var in flat}


class SlowExamples(list):
  """A list whose reads sleep, so a subprocess run lasts long enough to be killed mid-way."""

  delay = 0.0

  def __getitem__(self, item):
    time.sleep(self.delay)
    return super().__getitem__(item)


def run_train(workdir: str, out: str | None, delay: float, steps: int) -> None:
  data = SlowExamples(synthetic_examples(24, seed=0))
  data.delay = delay
  val = synthetic_examples(6, seed=1)
  cfg = train_lib.TrainConfig(optimizer="adamw", learning_rate=1e-2, warmup_steps=2, batch_size=4,
                              grad_accum_steps=2, num_steps=steps, checkpoint_every=3, keep_checkpoints=2,
                              eval_every=4, log_every=2, pad_multiple=16, chunk_size=64, tensorboard=False,
                              progress_bar=False)
  model = make_student(dropout=0.1)  # dropout on: the resumed run must replay the same dropout masks
  train_lib.train(model, data, val, cfg, losses.LossConfig(ce_weight=0.2), workdir)
  if out:
    np.savez(out, **lora_arrays(model))


def run_mesh(out: str) -> None:
  """Three steps on a data=2 x fsdp=4 mesh and on one device; writes both LoRA states and losses."""
  from kdjax.infra import parallel
  data = synthetic_examples(16, seed=0)
  cfg = train_lib.TrainConfig(optimizer="sgd", learning_rate=0.5, batch_size=8, num_steps=3, checkpoint_every=10,
                              log_every=1, pad_multiple=16, chunk_size=64, tensorboard=False, progress_bar=False,
                              async_checkpointing=False)
  results = {}
  for name, mesh in (("single", None), ("mesh", parallel.make_mesh({"data": 2, "fsdp": 4}))):
    model = make_student(dropout=0.1)
    result = train_lib.train(model, data, None, cfg, losses.LossConfig(ce_weight=0.3), f"{out}_{name}", mesh=mesh)
    spec = str(model.layers.wq[...].sharding.spec) if mesh is not None else ""
    results[name] = {"lora": {k: v.tolist() for k, v in lora_arrays(model).items()},
                     "loss": [h["loss"] for h in result.history], "wq_spec": spec}
  results["num_devices"] = jax.device_count()
  pathlib.Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["train", "mesh"])
  parser.add_argument("--workdir", default="")
  parser.add_argument("--out", default="")
  parser.add_argument("--delay", type=float, default=0.0)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  if args.mode == "train":
    run_train(args.workdir, args.out or None, args.delay, args.steps)
  else:
    run_mesh(args.out)
