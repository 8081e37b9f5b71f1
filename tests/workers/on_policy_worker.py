"""Helpers for tests/distill/test_on_policy.py: a tiny student and primed "teacher", and subprocess entry points.

Run as `python -m workers.on_policy_worker` it trains on-policy (`train`: used by the kill -9 test) or compares an
8-device mesh run with a single-device run (`mesh`: needs XLA_FLAGS=--xla_force_host_platform_device_count=8
before jax starts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from workers import train_worker
from kdjax.distill import losses, on_policy
from kdjax.distill import train as train_lib
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib

STOP_ID = 3


def make_teacher(seed: int = 7, head_scale: float = 10.0) -> model_lib.Llama:
  """Another tiny model with a peaked head: its distributions differ from the student's."""
  return train_worker._scale_head(model_lib.init_model(config_lib.get_preset("tiny"), seed=seed), head_scale)


def make_on_policy(teacher, examples, fraction: float, *, temperature: float = 1.0, max_new_tokens: int = 6,
                   seed: int = 0, teacher_scoring: str = "hidden") -> on_policy.OnPolicy:
  """Primed prompts: each question's student prompt behind a fixed random "priming" prefix."""
  vocab = teacher.config.vocab_size
  priming = np.random.default_rng(seed).integers(4, vocab, 5)
  prompts = {e.question_id: np.concatenate([priming, e.input_ids[:e.teacher_offset + 1]]) for e in examples}
  settings = on_policy.OnPolicySettings(fraction=fraction, temperature=temperature, max_new_tokens=max_new_tokens,
                                        decode_slots=4)
  return on_policy.OnPolicy(teacher, prompts, settings, stop_ids=[STOP_ID], pad_id=0, teacher_scoring=teacher_scoring)


def run_train(workdir: str, out: str | None, delay: float, steps: int) -> None:
  data = train_worker.SlowExamples(train_worker.synthetic_examples(16, seed=0))
  data.delay = delay
  val = train_worker.synthetic_examples(4, seed=1)
  val = [dataclasses.replace(e, question_id=100 + i) for i, e in enumerate(val)]  # ids apart from train's
  cfg = train_lib.TrainConfig(optimizer="adamw", learning_rate=1e-2, batch_size=4, num_steps=steps,
                              checkpoint_every=3, keep_checkpoints=2, eval_every=4, log_every=2, pad_multiple=16,
                              chunk_size=64, tensorboard=False, progress_bar=False)
  model = train_worker.make_student(dropout=0.1)
  scorer = make_on_policy(make_teacher(), list(data) + val, 0.5)
  train_lib.train(model, data, val, cfg, losses.LossConfig(ce_weight=0.2), workdir, on_policy=scorer)
  if out:
    np.savez(out, **train_worker.lora_arrays(model))


def run_mesh(out: str) -> None:
  """Three on-policy steps on a data=2 x fsdp=4 mesh and on one device; writes both LoRA states and metrics."""
  from kdjax.infra import parallel
  data = train_worker.synthetic_examples(16, seed=0)
  cfg = train_lib.TrainConfig(optimizer="sgd", learning_rate=0.5, batch_size=8, num_steps=3, checkpoint_every=10,
                              log_every=1, pad_multiple=16, chunk_size=64, tensorboard=False, progress_bar=False,
                              async_checkpointing=False)
  results = {}
  for name, mesh in (("single", None), ("mesh", parallel.make_mesh({"data": 2, "fsdp": 4}))):
    model, teacher = train_worker.make_student(dropout=0.1), make_teacher()
    if mesh is not None:
      train_lib._shard_model(teacher, mesh)  # the teacher resident on the student's mesh
    scorer = make_on_policy(teacher, data, 1.0)
    result = train_lib.train(model, data, None, cfg, losses.LossConfig(divergence="reverse_kl", temperature=2.0),
                             f"{out}_{name}", mesh=mesh, on_policy=scorer)
    results[name] = {"lora": {k: v.tolist() for k, v in train_worker.lora_arrays(model).items()},
                     "history": result.history,
                     "teacher_spec": str(teacher.layers.wq[...].sharding.spec) if mesh is not None else ""}
  results["num_devices"] = jax.device_count()
  pathlib.Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["train", "mesh"])
  parser.add_argument("--workdir", default="")
  parser.add_argument("--out", default="")
  parser.add_argument("--delay", type=float, default=0.0)
  parser.add_argument("--steps", type=int, default=8)
  args = parser.parse_args()
  if args.mode == "train":
    run_train(args.workdir, args.out or None, args.delay, args.steps)
  else:
    run_mesh(args.out)
