"""Hugging Face <-> kdjax weight mapping for Llama, and streaming, sharded loading.

The mapping is one table of name patterns. Each kdjax array is built with `jax.make_array_from_callback`: for
every device shard, the callback reads only the rows/columns of the source tensors that shard needs (safetensors
and GGUF are memory-mapped), so a host never holds the whole checkpoint, nor even a whole tensor it does not own.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
from typing import Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.infra import parallel
from kdjax.models import quantization
from kdjax.infra import storage
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib
from kdjax.models.llama.config import LlamaConfig


class CheckpointError(ValueError):
  """A checkpoint is missing, truncated or does not match its config."""


# kdjax parameter path -> (HF name template, layout). `{i}` is the layer index of stacked parameters.
# Layouts: "copy" (same shape), "transpose" ([out, in] -> [in, out]), "linear" (HF [out, in] flattened,
# kdjax [in dims..., out dims...] as listed in model.PROJECTIONS).
WEIGHT_MAP: dict[str, tuple[str, str]] = {
    "embed": ("model.embed_tokens.weight", "copy"),
    "final_norm": ("model.norm.weight", "copy"),
    "lm_head": ("lm_head.weight", "transpose"),
    "layers.attn_norm": ("model.layers.{i}.input_layernorm.weight", "copy"),
    "layers.mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "copy"),
    "layers.wq": ("model.layers.{i}.self_attn.q_proj.weight", "linear"),
    "layers.wk": ("model.layers.{i}.self_attn.k_proj.weight", "linear"),
    "layers.wv": ("model.layers.{i}.self_attn.v_proj.weight", "linear"),
    "layers.wo": ("model.layers.{i}.self_attn.o_proj.weight", "linear"),
    "layers.w_gate": ("model.layers.{i}.mlp.gate_proj.weight", "linear"),
    "layers.w_up": ("model.layers.{i}.mlp.up_proj.weight", "linear"),
    "layers.w_down": ("model.layers.{i}.mlp.down_proj.weight", "linear"),
}


class TensorSource(Protocol):
  """What the loader needs from a checkpoint: HF names, HF-layout shapes, and (sliced) reads."""

  def hf_config(self) -> dict: ...
  def names(self) -> list[str]: ...
  def shape(self, name: str) -> tuple[int, ...]: ...
  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray: ...


class SafetensorsSource:
  """A Hugging Face directory: `config.json` and one or many `.safetensors` files (memory-mapped)."""

  def __init__(self, directory: str | os.PathLike):
    from safetensors import safe_open
    self.directory = pathlib.Path(directory)
    if not (self.directory / "config.json").exists():
      raise CheckpointError(f"{self.directory}: no config.json")
    index_path = self.directory / "model.safetensors.index.json"
    if index_path.exists():
      weight_map = json.loads(index_path.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in self.directory.glob("*.safetensors"))
      if not files:
        raise CheckpointError(f"{self.directory}: no .safetensors files")
      weight_map = None
    self._handles = {}
    for file in files:
      path = self.directory / file
      if not path.exists():
        raise CheckpointError(f"{self.directory}: shard {file} listed in the index is missing")
      expected = _safetensors_data_end(path)
      if path.stat().st_size < expected:
        raise CheckpointError(
            f"{path}: truncated ({path.stat().st_size} bytes, header says {expected})")
      try:
        self._handles[file] = safe_open(str(path), framework="np")
      except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    if weight_map is None:
      weight_map = {name: file for file, h in self._handles.items() for name in h.keys()}
    self._weight_map = weight_map

  def hf_config(self) -> dict:
    return json.loads((self.directory / "config.json").read_text())

  def names(self) -> list[str]:
    return list(self._weight_map)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._weight_map[name]].get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    piece = self._handles[self._weight_map[name]].get_slice(name)
    array = piece[index] if index is not None else piece[:]
    return np.asarray(array, dtype=np.float32)


def _safetensors_data_end(path: pathlib.Path) -> int:
  """The file size a safetensors header promises (8-byte length + header + largest data offset)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      return 8
    header_len = int.from_bytes(raw, "little")
    header = f.read(header_len)
  if len(header) < header_len:
    return 8 + header_len
  try:
    meta = json.loads(header)
  except json.JSONDecodeError:
    raise CheckpointError(f"{path}: corrupt safetensors header") from None
  end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
  return 8 + header_len + end


def open_source(path: str | os.PathLike) -> TensorSource:
  path = storage.local_copy(path)  # memory-mapped: a gs:// source is read from a local copy
  if path.suffix == ".gguf":
    if not path.exists():
      raise CheckpointError(f"{path}: no such file")
    from kdjax.models.llama.gguf import GGUFSource
    return GGUFSource(path)
  if path.is_dir():
    return SafetensorsSource(path)
  raise CheckpointError(f"{path}: not a Hugging Face directory or a .gguf file")


def _split_linear(config: LlamaConfig, param: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  shape = model_lib.projection_shape(config, param.split(".")[-1])[1:]
  n_in = len(model_lib.PROJECTIONS[param.split(".")[-1]][0])
  return shape[:n_in], shape[n_in:]


def _flat_range(dims: tuple[int, ...], index: tuple[slice, ...]) -> tuple[slice, tuple[slice, ...]]:
  """A contiguous range over the flattened `dims` covering the first dim's slice, and the rest to cut after."""
  first = index[0]
  inner = math.prod(dims[1:])
  return slice(first.start * inner, first.stop * inner), index[1:]


def expected_hf_shape(config: LlamaConfig, param: str) -> tuple[int, ...]:
  layout = WEIGHT_MAP[param][1]
  if layout == "linear":
    ins, outs = _split_linear(config, param)
    return (math.prod(outs), math.prod(ins))
  shape = kdjax_shape(config, param)
  shape = shape[1:] if param.startswith("layers.") else shape
  return shape[::-1] if layout == "transpose" else shape


def kdjax_shape(config: LlamaConfig, param: str) -> tuple[int, ...]:
  d, v, L = config.hidden_size, config.vocab_size, config.num_layers
  fixed = {"embed": (v, d), "final_norm": (d,), "lm_head": (d, v), "layers.attn_norm": (L, d),
           "layers.mlp_norm": (L, d)}
  return fixed.get(param) or model_lib.projection_shape(config, param.split(".")[-1])


def read_param(source: TensorSource, config: LlamaConfig, param: str, layer: int | None,
               index: tuple[slice, ...]) -> np.ndarray:
  """Reads one (layer's) kdjax array restricted to `index` (slices in kdjax layout, no layer axis)."""
  template, layout = WEIGHT_MAP[param]
  name = template.format(i=layer)
  if layout == "copy":
    return source.read(name, index)
  if layout == "transpose":
    return source.read(name, index[::-1]).T
  ins, outs = _split_linear(config, param)
  in_index, out_index = index[:len(ins)], index[len(ins):]
  rows, out_rest = _flat_range(outs, out_index)
  cols, in_rest = _flat_range(ins, in_index)
  block = source.read(name, (rows, cols)).T  # [in_flat_range, out_flat_range]
  block = block.reshape((in_index[0].stop - in_index[0].start,) + ins[1:] +
                        (out_index[0].stop - out_index[0].start,) + outs[1:])
  full = slice(None)
  return block[(full,) + in_rest + (full,) + out_rest]


def check_source(source: TensorSource, config: LlamaConfig, params: list[str]) -> None:
  """Fails with one clear line if a tensor is missing or has the wrong shape, before anything is loaded."""
  names = set(source.names())
  for param in params:
    template, _ = WEIGHT_MAP[param]
    layers = range(config.num_layers) if "{i}" in template else [None]
    expected = expected_hf_shape(config, param)
    for layer in layers:
      name = template.format(i=layer)
      if name not in names:
        raise CheckpointError(f"tensor {name} is missing from the checkpoint")
      got = source.shape(name)
      if tuple(got) != tuple(expected):
        raise CheckpointError(f"tensor {name} has shape {tuple(got)}, config expects {tuple(expected)}")


def build_array(source: TensorSource, config: LlamaConfig, param: str, sharding: jax.sharding.Sharding,
                dtype) -> jax.Array:
  """One kdjax array placed on `sharding`, each device's shard read straight from the source.

  Host memory beyond the output stays at about one shard plus one source tensor: each shard is filled layer by
  layer into one preallocated buffer, and buffers are dropped as soon as the devices hold their copies.
  """
  shape = kdjax_shape(config, param)
  stacked = param.startswith("layers.")
  cache: dict[tuple, np.ndarray] = {}  # devices with equal shards (replicas) share one read

  def callback(index: tuple[slice, ...]) -> np.ndarray:
    index = parallel.normalize_index(index, shape)
    key = tuple((s.start, s.stop) for s in index)
    if key not in cache:
      if stacked:
        block = np.empty(tuple(s.stop - s.start for s in index), dtype)
        for j, layer in enumerate(range(index[0].start, index[0].stop)):
          block[j] = read_param(source, config, param, layer, index[1:])
      else:
        block = np.ascontiguousarray(read_param(source, config, param, None, index), dtype=dtype)
      cache[key] = block
    return cache[key]

  array = jax.make_array_from_callback(shape, sharding, callback)
  cache.clear()
  return array


def model_params(config: LlamaConfig) -> list[str]:
  return [p for p in WEIGHT_MAP if not (p == "lm_head" and config.tie_word_embeddings)]


def load_into_model(source: TensorSource, config: LlamaConfig, *, mesh=None, rules=parallel.DEFAULT_RULES,
                    dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False, quantize: bool = False,
                    progress: Callable[[str], None] | None = None) -> model_lib.Llama:
  """Builds a Llama whose parameters are read from `source`, tensor by tensor, onto `mesh`.

  With `quantize`, the decoder projections are quantized to int8 shard by shard as they are read
  (`kdjax.models.quantization`); the other parameters are stored in `param_dtype`.
  """
  params = model_params(config)
  check_source(source, config, params)
  model = model_lib.abstract_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
  if mesh is None:
    mesh = parallel.make_mesh({"fsdp": 1}, devices=jax.local_devices()[:1])
  for param in params:
    name = param.split(".")[-1]
    if quantize and name in quantization.QUANTIZED_PROJECTIONS:
      read = functools.partial(read_param, source, config, param)
      quantization.load_quantized(model.layers, name, read, mesh, rules)
    else:
      var = _variable(model, param)
      sharding = parallel.named_sharding(var.get_metadata().get("logical_axes"), var.shape, mesh, rules)
      var.set_value(build_array(source, config, param, sharding, param_dtype))
    if progress is not None:
      progress(param)
  return model


def _variable(model: nnx.Module, param: str) -> nnx.Variable:
  obj = model
  for part in param.split("."):
    obj = getattr(obj, part)
  return obj


# ---------------------------------------------------------------------------------------------- export

def hf_tensors(model: model_lib.Llama) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in HF layout) for every tensor of `model`, one layer tensor at a time."""
  config = model.config
  for param in model_params(config):
    template, layout = WEIGHT_MAP[param]
    value = _variable(model, param)[...]
    layers = range(config.num_layers) if "{i}" in template else [None]
    for layer in layers:
      array = np.asarray(jax.device_get(value[layer] if layer is not None else value), dtype=np.float32)
      if layout == "transpose":
        array = array.T
      elif layout == "linear":
        ins, outs = _split_linear(config, param)
        array = array.reshape(math.prod(ins), math.prod(outs)).T
      yield template.format(i=layer), np.ascontiguousarray(array)


def export_hf(model: model_lib.Llama, directory: str | os.PathLike, *, max_shard_bytes: int = 2 << 30,
              dtype=np.float32) -> pathlib.Path:
  """Writes `model` as a Hugging Face directory (config.json + safetensors shards + index)."""
  from safetensors.numpy import save
  directory = storage.makedirs(directory)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in hf_tensors(model):
    array = array.astype(dtype)
    if size and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    storage.write_bytes(directory / file, save(shard, metadata={"format": "pt"}))
    weight_map.update({name: file for name in shard})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
             "weight_map": weight_map}
    storage.write_text(directory / "model.safetensors.index.json", json.dumps(index, indent=2))
  storage.write_text(directory / "config.json", json.dumps(model.config.to_hf_dict(), indent=2))
  return directory


def config_from_source(source: TensorSource, name: str = "llama") -> LlamaConfig:
  return config_lib.from_hf_config(source.hf_config(), name=name)
