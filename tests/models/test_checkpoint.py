"""kdjax checkpoints: Orbax save/restore, the convert command, and the tokenizer that travels with them."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jax.numpy as jnp

import kdjax
from kdjax.models import checkpoint
from kdjax.models.llama import model as model_lib
from kdjax.models.llama import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_save_restore_round_trip_is_exact(tmp_path):
  model = model_lib.init_model(config_lib.PRESETS["tiny"], seed=3)
  checkpoint.save_model(model, tmp_path / "ckpt")
  restored, config = kdjax.load_model(tmp_path / "ckpt")
  assert config == model.config
  for name, array in model.layers.arrays().items():
    np.testing.assert_array_equal(np.asarray(restored.layers.arrays()[name]), np.asarray(array), err_msg=name)
  ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
  np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(model(ids)))


def test_unfinished_checkpoint_is_refused(tmp_path):
  (tmp_path / "ckpt" / "params").mkdir(parents=True)
  with pytest.raises(Exception, match="not a Hugging Face directory|no config.json"):
    kdjax.load_model(tmp_path / "ckpt")


def test_bfloat16_parameters(tmp_path):
  model = model_lib.init_model(config_lib.PRESETS["tiny-tied"], seed=0, param_dtype=jnp.bfloat16,
                               dtype=jnp.bfloat16)
  checkpoint.save_model(model, tmp_path / "ckpt")
  restored, _ = kdjax.load_model(tmp_path / "ckpt", dtype="bfloat16")
  assert restored.embed[...].dtype == jnp.bfloat16
  ids = jnp.ones((1, 8), jnp.int32)
  np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(model(ids)))


def test_convert_gguf_to_checkpoint_and_back(smollm2_gguf, tmp_path):
  """The command users run: GGUF -> kdjax checkpoint (with tokenizer) -> restore equals direct GGUF load."""
  out = tmp_path / "smol"
  proc = subprocess.run([sys.executable, "-m", "kdjax.convert", f"--source={smollm2_gguf}", f"--output={out}"],
                        capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "wrote" in proc.stdout
  direct, _ = kdjax.load_model(smollm2_gguf)
  restored, config = kdjax.load_model(out)
  assert config.num_layers == 30 and config.tie_word_embeddings
  ids = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(direct(ids)))
  tok = kdjax.load_tokenizer(out)
  assert tok.convert_tokens_to_ids("<|im_end|>") == 2
  # Running it again finds the finished checkpoint and does nothing.
  again = subprocess.run([sys.executable, "-m", "kdjax.convert", f"--source={smollm2_gguf}", f"--output={out}"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert again.returncode == 0 and "nothing to do" in again.stdout
