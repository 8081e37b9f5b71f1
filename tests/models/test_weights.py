"""Conversion parity, Levanter style: random torch Llamas saved with `save_pretrained`, loaded, compared, exported."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp

import kdjax
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import weights

REPO = pathlib.Path(__file__).resolve().parents[2]

# llama3 rope scaling with a short original context, GQA, explicit head_dim (!= hidden / heads), untied.
TINY_HF = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_theta=10_000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32})


def _torch_model(seed=0, **overrides):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**{**TINY_HF, **overrides})
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # norms start at one; randomise them so a swapped norm cannot pass
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """One untied model saved whole, the same model saved in several shards, and a tied one."""
  root = tmp_path_factory.mktemp("hf")
  model = _torch_model()
  model.save_pretrained(root / "single")
  model.save_pretrained(root / "sharded", max_shard_size="60KB")
  tied = _torch_model(seed=1, tie_word_embeddings=True, num_key_value_heads=4)
  tied.save_pretrained(root / "tied")
  return root, model, tied


def test_sharded_save_really_has_several_shards(saved):
  root, _, _ = saved
  assert (root / "sharded" / "model.safetensors.index.json").exists()
  assert len(list((root / "sharded").glob("*.safetensors"))) > 2


@pytest.mark.parametrize("folder", ["single", "sharded", "tied"])
def test_logits_match_torch_beyond_original_context(saved, folder):
  root, untied, tied = saved
  torch_model = tied if folder == "tied" else untied
  model, config = kdjax.load_model(root / folder)
  assert config.rope_scaling is not None if folder != "tied" else True
  seq = 96  # > original_max_position_embeddings (32): the llama3 scaling matters
  ids = np.random.RandomState(0).randint(0, TINY_HF["vocab_size"], (2, seq))
  ours = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_llama3_scaling_is_not_a_no_op(saved):
  """Guards the test above: without the scaling the logits at long positions must differ."""
  root, untied, _ = saved
  src = weights.open_source(root / "single")
  config = weights.config_from_source(src)
  import dataclasses
  unscaled = weights.load_into_model(src, dataclasses.replace(config, rope_scaling=None))
  ids = np.random.RandomState(0).randint(0, TINY_HF["vocab_size"], (1, 96))
  assert np.abs(np.asarray(unscaled(jnp.asarray(ids))) - _torch_logits(untied, ids)).max() > 1e-3


def test_export_back_gives_original_tensors(saved, tmp_path):
  root, untied, _ = saved
  model, _ = kdjax.load_model(root / "sharded")
  weights.export_hf(model, tmp_path / "out", max_shard_bytes=50_000)
  from safetensors.numpy import load_file
  exported = {}
  for f in (tmp_path / "out").glob("*.safetensors"):
    exported.update(load_file(f))
  original = {k: v.numpy() for k, v in untied.state_dict().items()}
  assert sorted(exported) == sorted(original)
  for name, array in original.items():
    np.testing.assert_array_equal(exported[name], array, err_msg=name)
  # transformers reads the export back and computes the same function.
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids = np.random.RandomState(1).randint(0, TINY_HF["vocab_size"], (1, 40))
  np.testing.assert_allclose(_torch_logits(reloaded, ids), _torch_logits(untied, ids), atol=1e-6)


def test_transformers_v5_rope_parameters_layout():
  v5 = {k: v for k, v in TINY_HF.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = {**TINY_HF["rope_scaling"], "rope_theta": 10_000.0}
  v4 = config_lib.from_hf_config(TINY_HF)
  assert config_lib.from_hf_config(v5) == v4
  assert v4.rope_scaling.original_max_position_embeddings == 32 and v4.head_dim == 24


# ------------------------------------------------------------------------------------------- bad input

def _convert(*args):
  return subprocess.run([sys.executable, "-m", "kdjax.convert", *args], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  import shutil
  shutil.copytree(src, dst)
  return dst


def _assert_one_line_error(proc, needle):
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert needle in lines[0], lines[0]


def test_missing_shard_is_one_clear_line(saved, tmp_path):
  root, _, _ = saved
  broken = _copy(root / "sharded", tmp_path / "broken")
  victim = sorted(broken.glob("*.safetensors"))[1]
  victim.unlink()
  _assert_one_line_error(_convert(f"--source={broken}", f"--output={tmp_path / 'ckpt'}"), "missing")


def test_truncated_shard_is_one_clear_line(saved, tmp_path):
  root, _, _ = saved
  broken = _copy(root / "sharded", tmp_path / "broken")
  victim = sorted(broken.glob("*.safetensors"))[1]
  data = victim.read_bytes()
  victim.write_bytes(data[: len(data) - 100])
  _assert_one_line_error(_convert(f"--source={broken}", f"--output={tmp_path / 'ckpt'}"), "truncated")


def test_shape_mismatch_is_one_clear_line(saved, tmp_path):
  root, _, _ = saved
  broken = _copy(root / "single", tmp_path / "broken")
  cfg = json.loads((broken / "config.json").read_text())
  cfg["intermediate_size"] = 128
  (broken / "config.json").write_text(json.dumps(cfg))
  _assert_one_line_error(_convert(f"--source={broken}", f"--output={tmp_path / 'ckpt'}"), "has shape")


def test_unsupported_architecture_is_one_clear_line(saved, tmp_path):
  root, _, _ = saved
  broken = _copy(root / "single", tmp_path / "broken")
  cfg = json.loads((broken / "config.json").read_text())
  cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
  (broken / "config.json").write_text(json.dumps(cfg))
  _assert_one_line_error(_convert(f"--source={broken}", f"--output={tmp_path / 'ckpt'}"), "unsupported architecture")


def test_missing_source_is_one_clear_line(tmp_path):
  _assert_one_line_error(_convert(f"--source={tmp_path / 'nope'}", f"--output={tmp_path / 'ckpt'}"), "nope")


@pytest.mark.slow
def test_conversion_peak_memory_stays_within_output_plus_largest_tensor():
  proc = subprocess.run([sys.executable, "-m", "benchmarks.measure_convert_memory", "--hidden=512", "--layers=6"],
                        capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
  assert "within" in proc.stdout
