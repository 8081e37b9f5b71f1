"""kdjax.serving.cpu.kernels against numpy float64, and the engine on them against a plain full-forward greedy loop."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers

from kdjax.serving.cpu import kernels as cpu_kernels
from kdjax.serving import engine
from kdjax.models import lora
from kdjax.serving.generation import SamplingConfig
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib

PAD = 0
PROMPTS = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [100, 101, 102, 103, 104, 105, 106], [42], [7, 7]]
NEW = 8


@pytest.fixture(scope="module", autouse=True)
def kernels():
  """Where a C++ compiler exists (CI's machines), the kernels must build: a broken build fails, never skips."""
  if shutil.which("g++") or shutil.which("c++"):
    assert cpu_kernels.available()
  elif not cpu_kernels.available():
    pytest.skip("no C++ compiler: the kernels cannot be built here")


def _rms_norm64(x, norm, eps):
  x = x.astype(np.float64)
  return norm * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _silu64(x):
  x = x.astype(np.float64)
  return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 17, 40, 64, 65])
@pytest.mark.parametrize("prologue", ["plain", "rms_norm", "swiglu"])
def test_packed_matmul_equals_float64_product(rows, prologue):
  """Any row count (partial row blocks of every size; 65 rows: XLA's path on the packed layout), many tiles
  shared between threads; with the RMS norm or the SwiGLU folded in before the product, and a residual added.
  Odd row counts contract over 100 (not a multiple of the 16 lanes the norm sums in), even ones over 96."""
  rng = np.random.default_rng(rows)
  k, n, eps = 100 if rows % 2 else 96, 1024, 1e-5
  x = rng.standard_normal((rows, 2 * k if prologue == "swiglu" else k)).astype(np.float32) * 3.0
  w = rng.standard_normal((k, n)).astype(np.float32)
  norm = rng.uniform(0.5, 1.5, k).astype(np.float32)
  residual = rng.standard_normal((rows, n)).astype(np.float32)
  packed = cpu_kernels.pack(jnp.asarray(w), 1)
  np.testing.assert_array_equal(np.asarray(cpu_kernels.unpack(packed, (k, n))), w)
  kwargs = {"rms_norm": dict(norm=jnp.asarray(norm), eps=eps), "swiglu": dict(swiglu=True), "plain": {}}[prologue]
  product = jax.jit(lambda x, w, r: cpu_kernels.packed_matmul(x, w, residual=r, **kwargs))
  y = np.asarray(product(jnp.asarray(x), packed, jnp.asarray(residual)))
  left = {"plain": lambda: x.astype(np.float64), "rms_norm": lambda: _rms_norm64(x, norm, eps),
          "swiglu": lambda: _silu64(x[:, :k]) * x[:, k:]}[prologue]()
  expected = residual + left @ w.astype(np.float64)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=2e-4)  # sums of ~100 products of magnitude ~10


def test_pack_puts_sixteen_columns_per_tile_row_after_row():
  """By hand: tile t, row k holds the flattened columns 16t .. 16t + 15 of row k; inputs over two dimensions
  flatten to one."""
  w = np.arange(3 * 32, dtype=np.float32).reshape(3, 32)
  packed = np.asarray(cpu_kernels.pack(jnp.asarray(w), 1))
  assert packed.shape == (2, 3, 16)
  assert packed[1, 2, 0] == w[2, 16] == 2 * 32 + 16
  assert packed[0, 1, 15] == w[1, 15]
  w4 = np.arange(2 * 3 * 2 * 16, dtype=np.float32).reshape(2, 3, 2, 16)  # [in 2 x 3, out 2 x 16]
  packed4 = np.asarray(cpu_kernels.pack(jnp.asarray(w4), 2))
  assert packed4.shape == (2, 6, 16) and packed4[1, 4, 3] == w4[1, 1, 1, 3]


def _rotate64(x, cos, sin):
  """HF's rotate-half rotary embedding, float64: pairs (i, i + D/2)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _decode_attention64(q, k, v, keys, values, positions, cos, sin, scale):
  """float64, from the definition: rotate q and k, write k and v at each slot's position, softmax over 0..position.
  keys and values [S, H, W, D]."""
  keys, values = keys.astype(np.float64), values.astype(np.float64)
  out = np.zeros(q.shape)
  for s, at in enumerate(positions):
    if at < 0:
      continue
    c, sn = cos[s].astype(np.float64), sin[s].astype(np.float64)
    keys[s, :, at] = _rotate64(k[s].astype(np.float64), c, sn)
    values[s, :, at] = v[s]
    for h in range(q.shape[1]):
      scores = _rotate64(q[s, h].astype(np.float64), c, sn) @ keys[s, h, :at + 1].T * scale
      p = np.exp(scores - scores.max(-1, keepdims=True))
      out[s, h] = (p / p.sum(-1, keepdims=True)) @ values[s, h, :at + 1]
  return out, keys, values


def _blocked_by_hand(keys, blocks):
  """keys [S, H, W, D] in blocks of 16 positions [S, H, blocks, D, 16], one position at a time; NaN past W."""
  out = np.full(keys.shape[:2] + (blocks, keys.shape[3], 16), np.nan, keys.dtype)
  for position in range(keys.shape[2]):
    out[:, :, position // 16, :, position % 16] = keys[:, :, position]
  return out


def test_block_keys_puts_sixteen_positions_per_block_and_unblocks():
  keys = np.arange(2 * 37 * 3, dtype=np.float32).reshape(2, 37, 3)  # [H, P, D]: 37 positions -> 3 blocks
  blocked = np.asarray(cpu_kernels.block_keys(jnp.asarray(keys)))
  assert blocked.shape == (2, 3, 3, 16) and cpu_kernels.key_blocks(37) == 3
  assert blocked[1, 2, 1, 4] == keys[1, 36, 1] and blocked[0, 1, 2, 0] == keys[0, 16, 2]
  assert not blocked[:, 2, :, 5:].any()  # zeros past position 36
  np.testing.assert_array_equal(np.asarray(cpu_kernels.unblock_keys(jnp.asarray(blocked), 37)), keys)


@pytest.mark.parametrize("groups,head_dim", [(3, 64), (1, 64), (2, 128), (4, 128), (1, 16), (2, 24)])
def test_decode_attention_equals_float64_rotary_write_and_softmax(groups, head_dim):
  """Positions of -1 (a finished slot: nothing written, zeros out), 0, whole blocks, ragged tails and the window's
  last; the cache past each slot's position holds values that must not be read (1e30, NaN); sharp and flat score
  distributions. The new keys and values land in the caches, which the call updates in place."""
  rng = np.random.default_rng(head_dim)
  slots, heads, window = 7, 2, 200
  positions = np.array([-1, 0, 15, 63, 76, 130, 199], np.int32)
  q = rng.standard_normal((slots, heads, groups, head_dim)).astype(np.float32)
  q[::2] *= 6.0  # some slots with sharp distributions: scores far below the max exercise the exp's range
  k = rng.standard_normal((slots, heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((slots, heads, head_dim)).astype(np.float32)
  keys = rng.standard_normal((slots, heads, window, head_dim)).astype(np.float32)
  values = rng.standard_normal((slots, heads, window, head_dim)).astype(np.float32)
  for s, at in enumerate(positions):  # garbage from each slot's position on (the position itself is written)
    keys[s, :, max(at, 0):] = 1e30
    values[s, :, max(at, 0):] = np.nan
  angles = positions.astype(np.float32)[:, None] * (10000.0 ** -(np.arange(head_dim // 2) / (head_dim // 2)))
  cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
  scale = head_dim ** -0.5
  expected, expected_keys, expected_values = _decode_attention64(q, k, v, keys, values, positions, cos, sin, scale)
  qkv = np.concatenate([a.reshape(slots, -1) for a in (q, k, v)], axis=1)  # as the fused product gives them
  step = jax.jit(lambda *a: cpu_kernels.decode_attention(*a, scale), donate_argnums=(1, 2))
  blocks = -(-window // 16)  # 13 blocks for 200 positions: the last has 8 lanes past the window, NaN
  out, new_keys, new_values = map(np.asarray, step(qkv, _blocked_by_hand(keys, blocks), values, positions, cos, sin))
  out = out.reshape(q.shape)
  np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
  assert not out[0].any()
  finite = np.isfinite(expected_values)  # the untouched garbage compares as itself
  np.testing.assert_allclose(new_keys, _blocked_by_hand(expected_keys.astype(np.float32), blocks), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(new_values[finite], expected_values[finite], rtol=0, atol=0)
  assert np.isnan(new_values[~finite]).all()


# ----------------------------------------------------------------------------- the engine on the kernels


@pytest.fixture(scope="module")
def tiny() -> model_lib.Llama:
  return helpers.tiny_peaked_model()


_forward = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids), static_argnums=0)


def reference_greedy(model: model_lib.Llama, prompts: list[list[int]], new: int) -> list[list[int]]:
  """A plain loop of full forwards (XLA, no cache, no kernel): argmax, append, repeat."""
  responses = [[] for _ in prompts]
  for _ in range(new):
    ids = np.full((len(prompts), 32), PAD, np.int32)
    for row, prompt in enumerate(prompts):
      ids[row, :len(prompt) + len(responses[row])] = prompt + responses[row]
    logits = np.asarray(_forward(*nnx.split(model), jnp.asarray(ids)))
    for row, prompt in enumerate(prompts):
      responses[row].append(int(logits[row, len(prompt) + len(responses[row]) - 1].argmax()))
  return responses


def run_engine(model: model_lib.Llama) -> list[list[int]]:
  outs = engine.run(model, PROMPTS, list(range(len(PROMPTS))), SamplingConfig(max_new_tokens=NEW), stop_ids=[],
                    pad_id=PAD, num_slots=2, topk_logprobs=0, length_bucket=8, unrolled=True)
  return [o.tokens for o in outs]


def test_engine_uses_the_kernels_and_follows_new_weights(tiny):
  """On one CPU device in float32 the decode runs on packed weights; its greedy tokens equal the full-forward
  loop's, and after the weights change (new arrays, as every update makes) the packed copy is rebuilt, not
  reused: the tokens follow the new model."""
  weights = engine.layer_params(tiny, unrolled=True)
  assert weights.uses_cpu_kernels
  assert engine.layer_params(tiny, unrolled=True) is weights  # the same arrays: packed once
  assert set(weights.layers[0]) == {"attn_norm", "mlp_norm", "wq+wk+wv_packed", "wo_packed", "w_gate+w_up_packed",
                                    "w_down_packed"}
  assert run_engine(tiny) == reference_greedy(tiny, PROMPTS, NEW)
  changed = model_lib.init_model(config_lib.get_preset("tiny"), seed=0)
  changed.lm_head[...] = tiny.lm_head[...]
  changed.layers.w_up[...] = tiny.layers.w_up[...] * -3.0
  expected = reference_greedy(changed, PROMPTS, NEW)
  assert expected != reference_greedy(tiny, PROMPTS, NEW)
  assert run_engine(changed) == expected
  assert engine.layer_params(changed, unrolled=True) is not weights


def test_engine_with_lora_adapters_keeps_the_xla_layer(tiny):
  """Unmerged LoRA factors: the layers stay plain (model.project adds the update), and greedy tokens equal the
  full-forward loop of the adapted model."""
  model = model_lib.init_model(config_lib.get_preset("tiny"), seed=0)
  model.lm_head[...] = tiny.lm_head[...]
  lora.add_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0))
  rng = np.random.default_rng(0)
  for name in ("wq", "wv"):
    b = getattr(model.layers, f"{name}_lora_b")
    b[...] = jnp.asarray(rng.standard_normal(b.shape).astype(np.float32))
  weights = engine.layer_params(model, unrolled=True)
  assert not weights.uses_cpu_kernels and "wq_lora_a" in weights.layers[0]
  assert run_engine(model) == reference_greedy(model, PROMPTS, NEW)


def test_without_a_compiler_the_engine_keeps_xla_products(tmp_path):
  """No compiler (CXX names none that exists) and an empty kernel cache: one warning, `available()` False, and
  the decode runs on the plain weights."""
  code = ("import logging; logging.basicConfig(); from kdjax.serving import engine;"
          "from kdjax.serving.cpu import kernels as cpu_kernels;"
          "from kdjax.models.llama import config, model;"
          "m = model.init_model(config.get_preset('tiny'), seed=0);"
          "print('available', cpu_kernels.available());"
          "print('kernels', engine.layer_params(m, True).uses_cpu_kernels)")
  env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "KDJAX_CACHE": str(tmp_path / "cache"),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "available False" in proc.stdout and "kernels False" in proc.stdout
  assert proc.stderr.count("CPU kernels unavailable") == 1
