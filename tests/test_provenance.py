"""Provenance (kdjax/provenance.py): no stage reuses or continues an output made under other settings.

Each scenario of issue 11 section 4 runs the real pipeline on a tiny random Llama (SmolLM2's tokenizer, 2 layers
of width 64) with a handful of GSM8K questions: one full run (convert, generate, train, eval) is made once, and
each test changes one thing in a copy of its work folder and runs the stage again. Nothing a scenario is about is
stubbed: the refusals come from the records the stages wrote and the sources and files as they are on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from kdjax import config as config_lib
from kdjax import data, pipeline, provenance

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_checkpoint(folder: pathlib.Path, tokenizer, seed: int) -> pathlib.Path:
  from kdjax import checkpoint
  from kdjax.models.llama import config as llama_config
  from kdjax.models.llama import model as model_lib
  config = dataclasses.replace(llama_config.get_preset("tiny"), vocab_size=49152, rope_scaling=None,
                               max_position_embeddings=1024, name="tiny-49152")
  checkpoint.save_model(model_lib.init_model(config, seed=seed), folder, tokenizer=tokenizer)
  return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory, smollm2_gguf, gsm8k_dir):
  from kdjax import checkpoint
  root = tmp_path_factory.mktemp("sources")
  tokenizer = checkpoint.load_tokenizer(smollm2_gguf)
  return {"model": _tiny_checkpoint(root / "tiny0", tokenizer, seed=0),
          "other_model": _tiny_checkpoint(root / "tiny1", tokenizer, seed=1), "gsm8k": gsm8k_dir}


def tiny_config(workdir, sources, **overrides):
  c = config_lib.get_default_config()
  c.workdir = str(workdir)
  c.stages = "convert,generate,train,eval"
  c.arms = "ground_truth"
  c.data.source = str(sources["gsm8k"])
  c.data.num_train_questions = 4
  c.data.num_validation = 2
  for role in (c.teacher, c.student):
    role.source = str(sources["model"])
    role.dtype = "float32"
    role.model_id = "tiny-random"
  c.teacher.quantization = "none"
  c.teacher.k = 4
  c.teacher.max_new_tokens = 6
  c.teacher.batch_size = c.teacher.shard_size = 8
  c.student.remat = False
  c.student.lora.rank = 2
  c.distill.divergence = "forward_kl"
  c.distill.temperature = 1.0
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-3
  c.train.batch_size = 2
  c.train.num_epochs = 1
  c.train.max_len = 256
  c.train.eval_every = 0  # validation once, at the end
  c.train.checkpoint_every = c.train.log_every = 1
  c.train.chunk_size = 64
  c.eval.num_questions = 2
  c.eval.max_new_tokens = 4
  c.eval.batch_size = 2
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, sources):
  workdir = tmp_path_factory.mktemp("base") / "work"
  pipeline.run(tiny_config(workdir, sources))
  return workdir


@pytest.fixture
def work(base_run, tmp_path):
  """A copy of the base run's work folder for one test to change."""
  copy = tmp_path / "work"
  shutil.copytree(base_run, copy, symlinks=True)
  return copy


def test_base_run_wrote_a_record_next_to_every_output(base_run):
  for folder in ("models/student", "models/teacher", "stores/ground_truth", "arms/ground_truth/train",
                 "arms/ground_truth/adapter", "arms/ground_truth/eval"):
    assert (base_run / folder / provenance.RECORD_FILE).is_file(), folder
  store = provenance.read(base_run / "stores/ground_truth")
  assert store["settings"]["data.num_train_questions"] == 4
  assert list(store["questions"]["train"]["ids"]) == ["0", "1", "2", "3"]  # the first 4 GSM8K train questions
  train = provenance.read(base_run / "arms/ground_truth/train")
  assert train["settings"]["distill.temperature"] == 1.0 and train["settings"]["train.batch_size"] == 2
  assert "train.log_every" not in train["settings"] and "student.remat" not in train["settings"]
  assert train["inputs"]["store"]["folder"] == "stores/ground_truth"
  assert json.loads((base_run / "config.json").read_text())["workdir"] == str(base_run)
