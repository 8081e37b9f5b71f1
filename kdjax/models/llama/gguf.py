"""Reads GGUF Llama checkpoints as Hugging Face-named float32 tensors.

`GGUFSource` is a *tensor source*: `hf_config()`, `names()`, `shape(name)` and `read(name)`, all in
Hugging Face `LlamaForCausalLM` naming and layout. The file is memory-mapped by `gguf.GGUFReader`;
a tensor is dequantized only when `read` asks for it.

Two things differ between a GGUF and the Hugging Face checkpoint it was converted from:
  * ggml lists dimensions fastest-first, so GGUF shapes are numpy shapes reversed;
  * llama.cpp's converter permutes the rows of `attn_q` / `attn_k` within each head so that the two
    rotary halves interleave (ggml's "normal" RoPE rotates adjacent pairs, HF rotates halves).
    `unpermute_rotary_rows` undoes that.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import gguf
import numpy as np

ARCHITECTURE = "llama"

# Float and block-quantized types that gguf.quants can dequantize and that llama.cpp writes for
# Llama weights. Integer and F64 tensors are never Llama weights, and the IQ*/TQ* codebook types are
# left out until a checkpoint needs them.
_Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset({
    _Q.F32, _Q.F16, _Q.BF16,
    _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
})

# GGUF name -> HF name; "{i}" is the layer index. One row per tensor kind, both directions.
NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)

# Holds llama3 RoPE frequency divisors; it becomes `rope_scaling` in the config, not a weight.
ROPE_FREQS_NAME = "rope_freqs.weight"
# llama.cpp's default when a llama3 checkpoint does not say its pre-training context.
_LLAMA3_ORIGINAL_CONTEXT = 8192


class GGUFError(ValueError):
  """Base class for GGUF files this reader cannot turn into a HF Llama checkpoint."""


class TruncatedGGUF(GGUFError):
  """The file is shorter than its own header says (an interrupted download or copy)."""


class UnsupportedArchitecture(GGUFError):
  """`general.architecture` is not llama."""


class UnsupportedTensorType(GGUFError):
  """A tensor is stored in a ggml type outside SUPPORTED_TENSOR_TYPES."""


class UnsupportedTensor(GGUFError):
  """A tensor name has no HF Llama counterpart (e.g. biases, MoE experts)."""


class UnsupportedRopeScaling(GGUFError):
  """The RoPE scaling in the file has no HF Llama equivalent this reader knows."""


class MissingMetadata(GGUFError):
  """A required GGUF metadata key is absent."""


def _compile(template: str) -> re.Pattern[str]:
  return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_GGUF_TO_HF = tuple((_compile(g), h) for g, h in NAME_TABLE)
_HF_TO_GGUF = tuple((_compile(h), g) for g, h in NAME_TABLE)


def _rename(name: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
  for pattern, template in rules:
    if match := pattern.fullmatch(name):
      return template.format(**match.groupdict())
  return None


def _hf_sort_key(name: str) -> tuple[int, int, int]:
  """Orders HF names as a HF checkpoint lists them: embeddings, layers by index, norm, lm_head."""
  for row, (pattern, _) in enumerate(_HF_TO_GGUF):
    if match := pattern.fullmatch(name):
      if "i" in match.groupdict():
        return (1, int(match["i"]), row)
      return (0 if row == 0 else 2, 0, row)
  return (3, 0, 0)


def gguf_to_hf_name(name: str) -> str | None:
  """HF name of GGUF tensor `name`, or None when the table has no row for it."""
  return _rename(name, _GGUF_TO_HF)


def hf_to_gguf_name(name: str) -> str | None:
  """GGUF name of HF tensor `name`, or None when the table has no row for it."""
  return _rename(name, _HF_TO_GGUF)


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's q/k row permutation, giving the HF row order.

  llama.cpp maps HF row (head, half, j) to GGUF row (head, j, half); this maps it back.
  """
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"{rows} rows do not split into {num_heads} heads of two rotary halves")
  half = rows // num_heads // 2
  return (weight.reshape(num_heads, half, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def check_tensor_type(tensor_type: gguf.GGMLQuantizationType, name: str = "tensor") -> None:
  """Raises UnsupportedTensorType unless `tensor_type` is in SUPPORTED_TENSOR_TYPES."""
  if tensor_type not in SUPPORTED_TENSOR_TYPES:
    supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
    raise UnsupportedTensorType(
        f"{name}: ggml tensor type {tensor_type.name} is not supported (supported: {supported})")


def dequantize_tensor(data: np.ndarray, tensor_type: gguf.GGMLQuantizationType,
                      name: str = "tensor") -> np.ndarray:
  """Dequantizes raw GGUF tensor data (numpy order) to float32."""
  check_tensor_type(tensor_type, name)
  return np.asarray(gguf.quants.dequantize(data, tensor_type), dtype=np.float32)


def llama3_rope_factors(rope_scaling: dict[str, Any], rope_theta: float,
                        head_dim: int) -> np.ndarray:
  """Per-frequency divisors of Llama 3.1 RoPE (what llama.cpp stores as `rope_freqs`), float64."""
  factor = rope_scaling["factor"]
  low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
  context = rope_scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  smooth = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
  return 1.0 / ((1.0 - smooth) / factor + smooth)


def llama3_rope_scaling(rope_factors: np.ndarray, rope_theta: float, head_dim: int,
                        original_max_position_embeddings: int = _LLAMA3_ORIGINAL_CONTEXT,
                        ) -> dict[str, Any]:
  """Recovers the HF llama3 `rope_scaling` dict from llama.cpp's `rope_freqs` divisors.

  In the interpolated band, with s = (1/d - 1/factor) / (1 - 1/factor) for divisor d,
  s = context/(high-low) * (1/wavelen) - low/(high-low): a line whose slope and intercept give
  low_freq_factor and high_freq_factor. Scaling context, low and high together leaves every
  divisor unchanged, so the context is taken as given (llama.cpp's default 8192).
  """
  factors = np.asarray(rope_factors, dtype=np.float64)
  factor = float(factors.max())
  banded = (factors > 1.0 + 1e-4) & (factors < factor * (1.0 - 1e-4))
  if factor <= 1.0 or banded.sum() < 2:
    raise UnsupportedRopeScaling(
        f"{ROPE_FREQS_NAME} does not look like llama3 RoPE scaling (max divisor {factor:g}, "
        f"{int(banded.sum())} interpolated frequencies)")
  wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  smooth = (1.0 / factors[banded] - 1.0 / factor) / (1.0 - 1.0 / factor)
  slope, intercept = np.polyfit(1.0 / wavelen[banded], smooth, 1)
  context = original_max_position_embeddings
  low = -intercept * context / slope
  # rope_freqs is float32: round to 4 significant digits so 1.0000023 reads as the 1.0 it was.
  rope_scaling = {
      "rope_type": "llama3",
      "factor": _round_sig(factor),
      "low_freq_factor": _round_sig(low),
      "high_freq_factor": _round_sig(low + context / slope),
      "original_max_position_embeddings": int(context),
  }
  rebuilt = llama3_rope_factors(rope_scaling, rope_theta, head_dim)
  if not np.allclose(rebuilt, factors, rtol=1e-4, atol=0.0):
    raise UnsupportedRopeScaling(f"{ROPE_FREQS_NAME} is not reproduced by llama3 RoPE scaling")
  return rope_scaling


def _round_sig(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")


def _as_float32_value(x: float) -> float:
  """Shortest decimal of a float32 metadata value: 9.99999974e-06 is the 1e-05 that was written."""
  return float(str(np.float32(x)))


class _HeaderReader(gguf.GGUFReader):
  """Parses only a GGUF's header and tensor table, to learn how long the file should be.

  `GGUFReader` maps every tensor while it opens a file, so a truncated file fails there with a numpy
  reshape error; this variant skips the mapping and records where the last tensor's bytes end.
  """

  def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
    end = start_offs
    for field in fields:
      _name_len, _name, _n_dims, dims, raw_dtype, offset_tensor = field.parts
      block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
      end = max(end, start_offs + int(offset_tensor[0]) + int(np.prod(dims)) * type_size // block_size)
    self.expected_size = end


def _unreadable(path: str, error: Exception) -> GGUFError:
  """The error for a file `gguf.GGUFReader` could not open: truncated (with both sizes) when it is."""
  actual = os.path.getsize(path)
  with open(path, "rb") as f:
    if f.read(4) != b"GGUF":
      return GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
  try:
    expected = _HeaderReader(path).expected_size
  except Exception:  # noqa: BLE001 - any failure here means the header itself is cut short or garbled
    return TruncatedGGUF(f"{path}: GGUF file is truncated or corrupt inside its header (the file has {actual} "
                         f"bytes); download or copy it again")
  if expected > actual:
    return TruncatedGGUF(f"{path}: GGUF file is truncated: its header describes {expected} bytes, the file has "
                         f"{actual}; download or copy it again")
  return GGUFError(f"{path}: unreadable GGUF file ({error})")


class GGUFSource:
  """HF-named, lazily dequantized tensors of a GGUF Llama checkpoint."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    try:
      self._reader = gguf.GGUFReader(self.path)  # memory-maps the file; tensors are views into it
    except (ValueError, IndexError, KeyError, OverflowError) as err:
      raise _unreadable(self.path, err) from None
    architecture = self._metadata("general.architecture", None)
    if architecture != ARCHITECTURE:
      raise UnsupportedArchitecture(
          f"{self.path}: GGUF architecture {architecture!r} is not supported "
          f"(only {ARCHITECTURE!r})")
    self._tensors: dict[str, Any] = {}
    self._rope_freqs = None
    for tensor in self._reader.tensors:
      if tensor.name == ROPE_FREQS_NAME:
        self._rope_freqs = tensor
        continue
      hf_name = gguf_to_hf_name(tensor.name)
      if hf_name is None:
        raise UnsupportedTensor(f"{self.path}: GGUF tensor {tensor.name!r} has no HF Llama name")
      check_tensor_type(tensor.tensor_type, tensor.name)  # fail on open, not mid-conversion
      self._tensors[hf_name] = tensor
    self._config = self._build_config()

  def _metadata(self, key: str, default: Any = ...) -> Any:
    field = self._reader.fields.get(key)
    if field is None:
      if default is ...:
        raise MissingMetadata(f"{self.path}: GGUF metadata key {key!r} is missing")
      return default
    return field.contents()

  def _build_config(self) -> dict[str, Any]:
    arch = ARCHITECTURE
    hidden = int(self._metadata(f"{arch}.embedding_length"))
    num_heads = int(self._metadata(f"{arch}.attention.head_count"))
    head_dim = int(self._metadata(
        f"{arch}.attention.key_length",
        self._metadata(f"{arch}.rope.dimension_count", hidden // num_heads)))
    rope_theta = _as_float32_value(self._metadata(f"{arch}.rope.freq_base", 10000.0))
    embed = self._tensors.get("model.embed_tokens.weight")
    if embed is None:
      raise MissingMetadata(f"{self.path}: GGUF tensor 'token_embd.weight' is missing")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(self._metadata(f"{arch}.vocab_size", int(embed.shape[-1]))),
        "hidden_size": hidden,
        "intermediate_size": int(self._metadata(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(self._metadata(f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(self._metadata(f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _as_float32_value(
            self._metadata(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": self._rope_scaling(rope_theta, head_dim),
        "max_position_embeddings": int(self._metadata(f"{arch}.context_length")),
        "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
      value = self._metadata(f"tokenizer.ggml.{gguf_key}", None)
      config[key] = None if value is None else int(value)
    return config

  def _rope_scaling(self, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = self._metadata(f"{ARCHITECTURE}.rope.scaling.type", "none")
    if self._rope_freqs is not None and kind == "none":
      factors = dequantize_tensor(self._rope_freqs.data, self._rope_freqs.tensor_type,
                                  ROPE_FREQS_NAME)
      context = self._metadata(f"{ARCHITECTURE}.rope.scaling.original_context_length",
                               _LLAMA3_ORIGINAL_CONTEXT)
      return llama3_rope_scaling(factors.reshape(-1), rope_theta, head_dim, int(context))
    if kind == "none":
      return None
    if kind == "linear" and self._rope_freqs is None:
      return {"rope_type": "linear",
              "factor": _as_float32_value(self._metadata(f"{ARCHITECTURE}.rope.scaling.factor"))}
    raise UnsupportedRopeScaling(f"{self.path}: RoPE scaling {kind!r} is not supported "
                                 f"(only llama3 via {ROPE_FREQS_NAME}, or linear)")

  def hf_config(self) -> dict[str, Any]:
    """A Hugging Face LlamaConfig-style dict (a fresh copy)."""
    config = dict(self._config)
    if config["rope_scaling"] is not None:
      config["rope_scaling"] = dict(config["rope_scaling"])
    return config

  def names(self) -> list[str]:
    """HF names of the weights, in HF checkpoint order; no lm_head when embeddings are tied."""
    return sorted(self._tensors, key=_hf_sort_key)

  def _tensor(self, name: str) -> Any:
    tensor = self._tensors.get(name)
    if tensor is None:
      raise KeyError(f"{name!r} is not a tensor of {self.path}")
    return tensor

  def shape(self, name: str) -> tuple[int, ...]:
    """HF (numpy) shape of `name`, without reading it."""
    return tuple(int(d) for d in reversed(self._tensor(name).shape))

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Dequantized float32 weight `name` in HF layout (restricted to `index`), as a fresh writable array.

    Quantized blocks span whole rows, so the tensor is dequantized whole and then sliced.
    """
    tensor = self._tensor(name)
    weight = dequantize_tensor(tensor.data, tensor.tensor_type, tensor.name)
    weight = weight.reshape(self.shape(name))
    if name.endswith("self_attn.q_proj.weight"):
      weight = unpermute_rotary_rows(weight, self._config["num_attention_heads"])
    elif name.endswith("self_attn.k_proj.weight"):
      weight = unpermute_rotary_rows(weight, self._config["num_key_value_heads"])
    # F32 tensors come back as read-only views of the memory map; callers get their own copy.
    if index is not None:
      weight = weight[index]
    if np.may_share_memory(weight, self._reader.data):
      weight = weight.copy()
    return np.ascontiguousarray(weight)
