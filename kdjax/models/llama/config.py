"""Llama 3.x family configuration: presets and Hugging Face `config.json` parsing."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


class UnsupportedArchitecture(ValueError):
  """The checkpoint is not a Llama-family causal LM."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1/3.2 frequency scaling ("llama3" rope_type)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 500_000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 131_072
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  name: str = "llama"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

  @property
  def num_params(self) -> int:
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + embed + d

  def to_hf_dict(self) -> dict[str, Any]:
    """A transformers `LlamaConfig` dict (v4 layout, which v5 also reads)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if self.rope_scaling is not None:
      out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    if self.bos_token_id is not None:
      out["bos_token_id"] = self.bos_token_id
    if self.eos_token_id is not None:
      out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return out

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str) -> "LlamaConfig":
    raw = json.loads(text)
    if raw.get("rope_scaling") is not None:
      raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
    if isinstance(raw.get("eos_token_id"), list):
      raw["eos_token_id"] = tuple(raw["eos_token_id"])
    return cls(**raw)


_LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
_LLAMA32_ROPE = dataclasses.replace(_LLAMA3_ROPE, factor=32.0)

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(128_256, 4096, 14_336, 32, 32, 8, 128, rope_scaling=_LLAMA3_ROPE,
                               bos_token_id=128_000, eos_token_id=(128_001, 128_008, 128_009),
                               name="llama3.1-8b"),
    "llama3.1-70b": LlamaConfig(128_256, 8192, 28_672, 80, 64, 8, 128, rope_scaling=_LLAMA3_ROPE,
                                bos_token_id=128_000, eos_token_id=(128_001, 128_008, 128_009),
                                name="llama3.1-70b"),
    "llama3.1-405b": LlamaConfig(128_256, 16_384, 53_248, 126, 128, 8, 128, rope_scaling=_LLAMA3_ROPE,
                                 bos_token_id=128_000, eos_token_id=(128_001, 128_008, 128_009),
                                 name="llama3.1-405b"),
    "llama3.2-1b": LlamaConfig(128_256, 2048, 8192, 16, 32, 8, 64, rope_scaling=_LLAMA32_ROPE,
                               tie_word_embeddings=True, bos_token_id=128_000,
                               eos_token_id=(128_001, 128_008, 128_009), name="llama3.2-1b"),
    "llama3.2-3b": LlamaConfig(128_256, 3072, 8192, 28, 24, 8, 128, rope_scaling=_LLAMA32_ROPE,
                               tie_word_embeddings=True, bos_token_id=128_000,
                               eos_token_id=(128_001, 128_008, 128_009), name="llama3.2-3b"),
    "smollm2-135m": LlamaConfig(49_152, 576, 1536, 30, 9, 3, 64, rope_theta=100_000.0,
                                tie_word_embeddings=True, max_position_embeddings=8192,
                                bos_token_id=1, eos_token_id=2, name="smollm2-135m"),
    # Tiny random configs for tests: llama3 scaling with a short original context so it matters.
    "tiny": LlamaConfig(256, 64, 128, 2, 4, 2, 16, rope_theta=10_000.0,
                        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), max_position_embeddings=256,
                        name="tiny"),
    "tiny-tied": LlamaConfig(256, 64, 128, 2, 4, 4, 16, rope_theta=10_000.0, tie_word_embeddings=True,
                             max_position_embeddings=256, name="tiny-tied"),
}


def get_preset(name: str) -> LlamaConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
  return PRESETS[name]


def _rope_settings(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads RoPE settings from the v4 (`rope_theta`/`rope_scaling`) or v5 (`rope_parameters`) layout."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
  rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if rope_type in (None, "default"):
    return float(theta), None
  if rope_type != "llama3":
    raise UnsupportedArchitecture(f"unsupported rope_type {rope_type!r} (kdjax supports default and llama3)")
  return float(theta), RopeScaling(
      factor=float(scaling["factor"]),
      low_freq_factor=float(scaling["low_freq_factor"]),
      high_freq_factor=float(scaling["high_freq_factor"]),
      original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def from_hf_config(hf: Mapping[str, Any], name: str = "llama") -> LlamaConfig:
  """Builds a config from a transformers `config.json` dict (v4 or v5 layout)."""
  archs = hf.get("architectures") or ["LlamaForCausalLM"]
  if hf.get("model_type", "llama") != "llama" or archs[0] != "LlamaForCausalLM":
    raise UnsupportedArchitecture(
        f"unsupported architecture {archs[0]!r} (model_type {hf.get('model_type')!r}); kdjax supports LlamaForCausalLM")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise UnsupportedArchitecture("Llama checkpoints with attention or MLP biases are not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise UnsupportedArchitecture(f"unsupported hidden_act {hf['hidden_act']!r}")
  theta, scaling = _rope_settings(hf)
  num_heads = int(hf["num_attention_heads"])
  eos = hf.get("eos_token_id")
  return LlamaConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 131_072)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      name=name,
  )


def load_hf_config(directory: str | os.PathLike) -> LlamaConfig:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  with open(path) as f:
    return from_hf_config(json.load(f), name=os.path.basename(os.path.normpath(directory)))
