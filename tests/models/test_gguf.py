"""GGUFSource against transformers' own GGUF loader, and against hand-built GGUF files."""

from __future__ import annotations

import math
import pathlib

import gguf
import numpy as np
import pytest

from kdjax.models.llama import gguf as llama_gguf
from kdjax.models.llama.gguf import (GGUFSource, UnsupportedArchitecture, UnsupportedTensor,
                                     UnsupportedTensorType)

Q = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- reference helpers

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf's q/k permutation, written from its definition."""
  dim = w.shape[0]
  return w.reshape(n_head, 2, dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q8_0 blocks of 32 along the last axis: f16 scale d, 32 int8 q; value = d * q.

  Returns (raw bytes [rows, blocks*34], float64 dequantized reference).
  """
  rows = w.shape[0]
  blocks = w.reshape(rows, -1, 32).astype(np.float64)
  d = (np.abs(blocks).max(axis=-1, keepdims=True) / 127).astype(np.float16)
  d_safe = np.where(d == 0, 1, d).astype(np.float64)
  q = np.clip(np.round(blocks / d_safe), -127, 127).astype(np.int8)
  raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=-1).reshape(rows, -1)
  return raw, (d.astype(np.float64) * q).reshape(w.shape)


def quantize_q4_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q4_1 blocks of 32: f16 scale d, f16 min m, 16 bytes holding q[j] (low nibble) and q[j+16]
  (high nibble); value = d * q + m."""
  rows = w.shape[0]
  blocks = w.reshape(rows, -1, 32).astype(np.float64)
  m = blocks.min(axis=-1, keepdims=True).astype(np.float16)
  d = ((blocks.max(axis=-1, keepdims=True) - m) / 15).astype(np.float16)
  d_safe = np.where(d == 0, 1, d).astype(np.float64)
  q = np.clip(np.round((blocks - m) / d_safe), 0, 15).astype(np.uint8)
  packed = q[..., :16] | (q[..., 16:] << 4)
  raw = np.concatenate([d.view(np.uint8), m.view(np.uint8), packed], axis=-1).reshape(rows, -1)
  return raw, (d.astype(np.float64) * q + m.astype(np.float64)).reshape(w.shape)


def to_bf16(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """bfloat16 by truncation: the top 16 bits of each float32."""
  top = (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
  return top.view(np.uint8).reshape(w.shape[0], -1), (top.astype(np.uint32) << 16).view(np.float32)


def to_f16(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  half = w.astype(np.float16)
  return half, half.astype(np.float64)


TINY = dict(vocab=40, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96, context=256,
            theta=500000.0, eps=1e-6)


def write_gguf(path: pathlib.Path, arch: str, tensors: list[tuple[str, np.ndarray, Q | None]],
               llama_metadata: bool = True, extra: dict | None = None) -> pathlib.Path:
  writer = gguf.GGUFWriter(str(path), arch)
  if llama_metadata:
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_dimension_count(TINY["head_dim"])
    writer.add_rope_freq_base(TINY["theta"])
    writer.add_layer_norm_rms_eps(TINY["eps"])
    writer.add_vocab_size(TINY["vocab"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 7)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 8)
  for key, value in (extra or {}).items():
    writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)
  for name, array, raw_dtype in tensors:
    writer.add_tensor(name, array, raw_dtype=raw_dtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


# ----------------------------------------------------------------------------- real SmolLM2 file

@pytest.fixture(scope="module")
def smollm2_torch(smollm2_gguf):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model.config, state


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf) -> GGUFSource:
  return GGUFSource(smollm2_gguf)


def test_smollm2_tensors_equal_transformers(smollm2_source, smollm2_torch):
  _, state = smollm2_torch
  names = smollm2_source.names()
  assert len(names) == len(set(names)) == 2 + 9 * 30  # embed, norm, 9 per layer; lm_head tied
  assert "lm_head.weight" not in names
  # transformers lists the tied lm_head too; nothing else may differ.
  assert set(state) - set(names) == {"lm_head.weight"}
  assert set(names) <= set(state)
  np.testing.assert_array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
  for name in names:
    ours = smollm2_source.read(name)
    assert ours.dtype == np.float32, name
    assert ours.shape == smollm2_source.shape(name) == state[name].shape, name
    np.testing.assert_allclose(ours, state[name], rtol=0, atol=1e-6, err_msg=name)


def test_smollm2_config_equals_transformers(smollm2_source, smollm2_torch):
  config, _ = smollm2_torch
  ours = smollm2_source.hf_config()
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "model_type"):
    assert ours[key] == getattr(config, key), key
  # transformers keeps the float32 metadata value (9.99999974e-06); we give the 1e-05 it encodes.
  assert ours["rms_norm_eps"] == pytest.approx(config.rms_norm_eps, rel=1e-7)
  rope_theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
  assert ours["rope_theta"] == pytest.approx(rope_theta, rel=1e-7)
  assert ours["rope_scaling"] is None
  assert ours["architectures"] == ["LlamaForCausalLM"] and ours["torch_dtype"] == "float32"
  # Hand-checked against the SmolLM2-135M model card.
  assert (ours["hidden_size"], ours["num_hidden_layers"], ours["num_attention_heads"],
          ours["num_key_value_heads"], ours["rms_norm_eps"], ours["rope_theta"]) == (
              576, 30, 9, 3, 1e-5, 100000.0)


# ----------------------------------------------------------------------------- synthetic files

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """A 2-layer Llama GGUF mixing every float and the Q8_0 / Q4_1 types, with an untied lm_head.

  Returns (path, {HF name: float64 expected HF-layout values}).
  """
  rng = np.random.default_rng(0)
  t = TINY
  q_rows, kv_rows = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
  # Rows of each matrix are quantized independently, so quantizing the llama.cpp-permuted rows
  # equals permuting the quantized rows: the expectation never goes through our unpermute.
  encoders = {"q": quantize_q8_0, "k": quantize_q4_1, "v": to_f16, "o": to_bf16}
  tensors, expected = [], {}

  def add(gguf_name, hf_name, w, encode=None, permute_heads=None, raw=None):
    if encode is None:
      stored, reference = w.astype(np.float32), w.astype(np.float32).astype(np.float64)
    else:
      stored, reference = encode(w)
    if permute_heads is not None:
      stored = llama_cpp_permute(stored, permute_heads)
    tensors.append((gguf_name, stored, raw))
    expected[hf_name] = reference

  add("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(t["vocab"], t["hidden"])))
  for i in range(t["layers"]):
    hf = f"model.layers.{i}"
    add(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", rng.normal(size=t["hidden"]))
    add(f"blk.{i}.attn_q.weight", f"{hf}.self_attn.q_proj.weight",
        rng.normal(size=(q_rows, t["hidden"])), encoders["q"], t["heads"], Q.Q8_0)
    add(f"blk.{i}.attn_k.weight", f"{hf}.self_attn.k_proj.weight",
        rng.normal(size=(kv_rows, t["hidden"])), encoders["k"], t["kv_heads"], Q.Q4_1)
    add(f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight",
        rng.normal(size=(kv_rows, t["hidden"])), encoders["v"])
    add(f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight",
        rng.normal(size=(t["hidden"], q_rows)), encoders["o"], None, Q.BF16)
    add(f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight",
        rng.normal(size=t["hidden"]))
    add(f"blk.{i}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight",
        rng.normal(size=(t["ffn"], t["hidden"])), quantize_q4_1, None, Q.Q4_1)
    add(f"blk.{i}.ffn_up.weight", f"{hf}.mlp.up_proj.weight",
        rng.normal(size=(t["ffn"], t["hidden"])))
    add(f"blk.{i}.ffn_down.weight", f"{hf}.mlp.down_proj.weight",
        rng.normal(size=(t["hidden"], t["ffn"])), quantize_q8_0, None, Q.Q8_0)
  add("output_norm.weight", "model.norm.weight", rng.normal(size=t["hidden"]))
  add("output.weight", "lm_head.weight", rng.normal(size=(t["vocab"], t["hidden"])))
  rng.shuffle(tensors)  # names() must not depend on file order
  path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "llama", tensors)
  return path, expected


def test_tiny_llama_reads_hf_layout(tiny_llama):
  path, expected = tiny_llama
  source = GGUFSource(path)
  names = source.names()
  assert set(names) == set(expected)
  assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight",
                                                                     "lm_head.weight"]
  assert names[1:10] == [
      f"model.layers.0.{n}" for n in ("input_layernorm.weight", "self_attn.q_proj.weight",
                                      "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                      "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                                      "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                      "mlp.down_proj.weight")]
  for name in names:
    w = source.read(name)
    assert w.dtype == np.float32 and w.flags.writeable and w.flags.c_contiguous, name
    assert source.shape(name) == w.shape == expected[name].shape, name
    np.testing.assert_allclose(w, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
  # F32 tensors are views of the memory map inside gguf; the caller's copy must be its own.
  embed = source.read("model.embed_tokens.weight")
  embed[:] = 0
  np.testing.assert_allclose(source.read("model.embed_tokens.weight"),
                             expected["model.embed_tokens.weight"], rtol=0, atol=0)
  with pytest.raises(KeyError):
    source.read("model.layers.2.mlp.up_proj.weight")


def test_tiny_llama_config(tiny_llama):
  path, _ = tiny_llama
  config = GGUFSource(path).hf_config()
  t = TINY
  assert config == {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": t["vocab"], "hidden_size": t["hidden"], "intermediate_size": t["ffn"],
      "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
      "num_key_value_heads": t["kv_heads"], "head_dim": t["head_dim"],
      "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "rope_scaling": None,
      "max_position_embeddings": t["context"], "tie_word_embeddings": False,
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "bos_token_id": 7, "eos_token_id": 8, "pad_token_id": None, "torch_dtype": "float32"}


def test_truncated_smollm2_says_truncated_with_both_sizes(smollm2_gguf, tmp_path):
  data = smollm2_gguf.read_bytes()
  whole = len(data)  # the reference: an intact file is exactly as long as its header describes
  for keep in (whole - 1, whole // 2):
    cut = tmp_path / f"cut-{keep}.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(llama_gguf.TruncatedGGUF) as error:
      GGUFSource(cut)
    message = str(error.value)
    assert message == (f"{cut}: GGUF file is truncated: its header describes {whole} bytes, the file has {keep}; "
                       f"download or copy it again")
  cut = tmp_path / "header.gguf"
  cut.write_bytes(data[:5000])  # inside the metadata (the tokenizer's vocabulary)
  with pytest.raises(llama_gguf.TruncatedGGUF, match=r"truncated or corrupt inside its header \(the file has 5000"):
    GGUFSource(cut)
  cut.write_bytes(b"PK\x03\x04" + data[4:5000])
  with pytest.raises(llama_gguf.GGUFError, match="not a GGUF file"):
    GGUFSource(cut)


def test_rejects_non_llama_architecture(tmp_path):
  path = write_gguf(tmp_path / "gpt2.gguf", "gpt2",
                    [("token_embd.weight", np.zeros((4, 32), np.float32), None)],
                    llama_metadata=False)
  with pytest.raises(UnsupportedArchitecture, match="'gpt2'") as error:
    GGUFSource(path)
  assert "\n" not in str(error.value)


def test_rejects_unsupported_tensor_type_on_open(tmp_path):
  tensors = [("token_embd.weight", np.zeros((TINY["vocab"], TINY["hidden"]), np.float32), None),
             ("blk.0.attn_norm.weight", np.ones(TINY["hidden"], np.int32), None)]  # stored as I32
  with pytest.raises(UnsupportedTensorType, match=r"blk\.0\.attn_norm\.weight.*I32") as error:
    GGUFSource(write_gguf(tmp_path / "i32.gguf", "llama", tensors))
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("tensor_type", [Q.IQ2_XXS, Q.F64, Q.I8, Q.TQ1_0])
def test_dequantize_dispatch_rejects(tensor_type):
  with pytest.raises(UnsupportedTensorType, match=tensor_type.name):
    llama_gguf.dequantize_tensor(np.zeros((1, 256), np.uint8), tensor_type, "w")


def test_rejects_tensor_without_hf_name(tmp_path):
  tensors = [("token_embd.weight", np.zeros((TINY["vocab"], TINY["hidden"]), np.float32), None),
             ("blk.0.attn_q.bias", np.zeros(TINY["hidden"], np.float32), None)]
  with pytest.raises(UnsupportedTensor, match=r"blk\.0\.attn_q\.bias"):
    GGUFSource(write_gguf(tmp_path / "bias.gguf", "llama", tensors))


def test_name_table_round_trips():
  for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                             ("blk.17.ffn_down.weight", "model.layers.17.mlp.down_proj.weight"),
                             ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
                             ("output.weight", "lm_head.weight")]:
    assert llama_gguf.gguf_to_hf_name(gguf_name) == hf_name
    assert llama_gguf.hf_to_gguf_name(hf_name) == gguf_name
  assert llama_gguf.gguf_to_hf_name("blk.x.ffn_down.weight") is None
  assert llama_gguf.gguf_to_hf_name("blk.1.ffn_down.weightX") is None


# ----------------------------------------------------------------------------- rotary permutation

def test_unpermute_hand_case():
  # One head, head_dim 4: HF rows [a0, a1, b0, b1] (two rotary halves) are stored interleaved.
  stored = np.array([[10.], [20.], [11.], [21.]])  # a0, b0, a1, b1
  np.testing.assert_array_equal(llama_gguf.unpermute_rotary_rows(stored, 1).ravel(),
                                [10., 11., 20., 21.])


@pytest.mark.parametrize("n_head,head_dim,in_dim", [(1, 4, 3), (3, 8, 5), (9, 64, 2), (4, 2, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, in_dim):
  w = np.random.default_rng(n_head).normal(size=(n_head * head_dim, in_dim))
  permuted = llama_cpp_permute(w, n_head)
  if head_dim > 2:
    assert not np.array_equal(permuted, w)  # the check below is not vacuous
  np.testing.assert_array_equal(llama_gguf.unpermute_rotary_rows(permuted, n_head), w)
  np.testing.assert_array_equal(llama_cpp_permute(llama_gguf.unpermute_rotary_rows(w, n_head),
                                                  n_head), w)
  bias = w[:, 0]
  np.testing.assert_array_equal(
      llama_gguf.unpermute_rotary_rows(llama_cpp_permute(bias, n_head), n_head), bias)


# ----------------------------------------------------------------------------- llama3 RoPE scaling

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
LLAMA32 = dict(LLAMA31, factor=32.0)


@pytest.mark.parametrize("rope_scaling,theta,head_dim", [(LLAMA31, 500000.0, 128),
                                                         (LLAMA32, 500000.0, 64)])
def test_llama3_rope_factors_match_transformers(rope_scaling, theta, head_dim):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  config = transformers.LlamaConfig(
      hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
      max_position_embeddings=131072, rope_parameters=dict(rope_scaling, rope_theta=theta))
  scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
  plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
  ours = llama_gguf.llama3_rope_factors(rope_scaling, theta, head_dim)
  np.testing.assert_allclose(ours, (plain / scaled).double().numpy(), rtol=1e-5)
  assert ours.min() == 1.0 and ours.max() == rope_scaling["factor"]
  # rope_freqs is stored as float32; recovering the dict from it gives the original back.
  recovered = llama_gguf.llama3_rope_scaling(ours.astype(np.float32), theta, head_dim)
  assert recovered == rope_scaling


def test_rope_freqs_tensor_becomes_llama3_rope_scaling(tmp_path):
  factors = llama_gguf.llama3_rope_factors(LLAMA31, 500000.0, 128).astype(np.float32)
  tensors = [("token_embd.weight", np.zeros((TINY["vocab"], TINY["hidden"]), np.float32), None),
             ("rope_freqs.weight", factors, None)]
  path = write_gguf(tmp_path / "llama3.gguf", "llama", tensors,
                    extra={"llama.attention.key_length": 128})
  source = GGUFSource(path)
  assert source.hf_config()["rope_scaling"] == LLAMA31
  assert source.hf_config()["head_dim"] == 128
  assert "rope_freqs.weight" not in source.names() and len(source.names()) == 1


def test_rope_freqs_not_llama3_is_rejected():
  with pytest.raises(llama_gguf.UnsupportedRopeScaling):
    llama_gguf.llama3_rope_scaling(np.ones(64, np.float32), 500000.0, 128)
  assert math.isclose(llama_gguf._as_float32_value(np.float32(1e-5)), 1e-5, rel_tol=0)
