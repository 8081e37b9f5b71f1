"""Int8 weight-only quantization of the decoder projections, per output channel.

Each projection weight `w` [layers, in dims..., out dims...] becomes `q` int8 of the same shape plus a float32
`{name}_scale` [layers, out dims...]: for every output channel, `scale = max|w| over the input dims / 127` and
`q = round(w / scale)`. `model.project` computes `einsum(x, q.astype(dtype)) * scale`, so activations and the KV
cache stay in the compute dtype (bf16). Embeddings, the LM head and the norms are not quantized.

Why not qwix's PTQ (qwix 0.1.8, installed): its provider intercepts `jnp.einsum` inside a module call and finds
the weight operand by identity, tracer parentage or shape among the *current module's* `nnx.Param`s. Our
projections run inside `jax.lax.scan` on one layer's slice of a stacked `LayerStack` parameter, and the einsum
is called from `Llama.forward`, so that lookup finds nothing and the weights would silently stay unquantized.
Its offline path, `qwix.quantize_params`, quantizes a complete float param tree, whereas we must quantize each
device's shard while the sharded loader reads it from the checkpoint, so that the full-precision model never
exists (Llama 3.1 8B takes 16 GB in bf16, more than a 16 GiB v5e chip; 8.5 GiB in int8). qwix would also store
its own `QArray` leaves rather than the `{name}_scale` entries the layer body reads. The arithmetic is a few
lines, so it is written here, once, for both numpy (the loader's host-side shards) and jax (`quantize_model`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.infra import parallel
from kdjax.models.llama import model as model_lib

INT8_MAX = 127
_INV_INT8_MAX = np.float32(1.0 / INT8_MAX)
QUANTIZED_PROJECTIONS = tuple(model_lib.PROJECTIONS)

# reader(layer, index) -> float array of that layer's weight restricted to `index` (slices over in + out dims).
LayerReader = Callable[[int, tuple[slice, ...]], np.ndarray]


class QuantizationError(ValueError):
  """A model cannot be quantized as asked (already quantized, unknown projection)."""


def num_in_dims(name: str) -> int:
  """How many leading (after the layer axis) dimensions of projection `name` are contracted."""
  return len(model_lib.PROJECTIONS[name][0])


def scale_axes(name: str) -> tuple[str, ...]:
  """Logical axes of `{name}_scale`: the layer axis and the weight's output axes."""
  return ("layers",) + model_lib.projection_axes(name)[1 + num_in_dims(name):]


def _in_axes(num_in: int, leading_dims: int) -> tuple[int, ...]:
  return tuple(range(leading_dims, leading_dims + num_in))


def _xp(array):
  return np if isinstance(array, np.ndarray) else jnp


def round_to_int8(w, scale, num_in_dims: int, *, leading_dims: int = 0):
  """`round(w / scale)` as int8, `scale` broadcast over the input dims (numpy or jax, same arithmetic)."""
  xp = _xp(w)
  # XLA turns `w / broadcast(scale)` into `w * broadcast(1 / scale)`; spelling that out keeps numpy (the
  # loader) and jax (`quantize_model`) bit-identical.
  inverse = xp.expand_dims(1 / scale, _in_axes(num_in_dims, leading_dims))
  return xp.clip(xp.round(w.astype(xp.float32) * inverse), -INT8_MAX, INT8_MAX).astype(xp.int8)


def channel_scale(w, num_in_dims: int, *, leading_dims: int = 0):
  """Symmetric per-output-channel scale: max |w| over the input dims / 127 (1 for all-zero channels)."""
  xp = _xp(w)
  absmax = xp.max(xp.abs(w.astype(xp.float32)), axis=_in_axes(num_in_dims, leading_dims))
  # Multiplying by the float32 constant, not dividing: XLA rewrites `x / 127` into that multiply, and numpy
  # (the loader) must produce bit-identical scales. An all-zero channel gets 1 to avoid dividing by zero.
  return xp.where(absmax > 0, absmax * _INV_INT8_MAX, 1).astype(xp.float32)


def quantize_weight(w, num_in_dims: int, *, leading_dims: int = 0):
  """Quantizes `w` [leading..., in dims..., out dims...] to (int8 `q`, float32 `scale` [leading..., out dims...]).

  Works on numpy arrays (host) and jax arrays (device) alike; |w - q * scale| <= scale / 2 per channel.
  """
  scale = channel_scale(w, num_in_dims, leading_dims=leading_dims)
  return round_to_int8(w, scale, num_in_dims, leading_dims=leading_dims), scale


def dequantize_weight(q, scale, num_in_dims: int, *, leading_dims: int = 0):
  """The float32 weight `q * scale` (the inverse of `quantize_weight`, up to rounding)."""
  xp = _xp(q)
  return q.astype(xp.float32) * xp.expand_dims(scale, _in_axes(num_in_dims, leading_dims))


def is_quantized(model: model_lib.Llama) -> bool:
  return any(hasattr(model.layers, f"{name}_scale") for name in QUANTIZED_PROJECTIONS)


def set_quantized(layers: nnx.Module, name: str, q, scale) -> None:
  """Replaces `layers.<name>` with int8 `q` and adds the `{name}_scale` Param (`q`, `scale` arrays or abstract)."""
  getattr(layers, name).set_value(q)
  setattr(layers, f"{name}_scale", nnx.Param(scale, logical_axes=scale_axes(name)))


def quantize_model(model: model_lib.Llama) -> model_lib.Llama:
  """Quantizes every projection of `model` in place (concrete, sharded or abstract parameters).

  A sharded weight keeps its sharding; its scale is placed by its logical axes on the same mesh. This path
  holds the full-precision weights, so it is for models that fit; large models use `load_quantized`.
  """
  if is_quantized(model):
    raise QuantizationError("model is already quantized")
  for name in QUANTIZED_PROJECTIONS:
    w = getattr(model.layers, name).get_value()
    n_in = num_in_dims(name)
    scale_shape = w.shape[:1] + w.shape[1 + n_in:]
    if isinstance(w, jax.ShapeDtypeStruct):
      set_quantized(model.layers, name, jax.ShapeDtypeStruct(w.shape, jnp.int8),
                    jax.ShapeDtypeStruct(scale_shape, jnp.float32))
      continue
    sharding = getattr(w, "sharding", None)
    out_shardings = None
    if isinstance(sharding, jax.sharding.NamedSharding):
      out_shardings = (sharding, parallel.named_sharding(scale_axes(name), scale_shape, sharding.mesh))
    quantize = jax.jit(lambda a, n=n_in: quantize_weight(a, n, leading_dims=1), out_shardings=out_shardings)
    q, scale = quantize(w)
    set_quantized(model.layers, name, q, scale)
  return model


def build_quantized(shape: tuple[int, ...], n_in: int, read: LayerReader, weight_sharding: jax.sharding.Sharding,
                    scale_sharding: jax.sharding.Sharding) -> tuple[jax.Array, jax.Array]:
  """Int8 weight and scale arrays of a stacked projection [layers, in..., out...], read shard by shard.

  A device's shard covers some layers, input slices and output slices. Its scales need the maximum over the
  *full* input dims, so for each (layers, output slice) the full input range is read once, one layer at a
  time, and only the small scale block is kept; every shard is then quantized from its own read. At most one
  layer's full-input column block is held in float32 at any time.
  """
  in_shape = tuple(shape[1:1 + n_in])
  full_in = tuple(slice(0, n) for n in in_shape)
  scale_shape = shape[:1] + shape[1 + n_in:]
  scales: dict[tuple, np.ndarray] = {}  # (layer range, out slices) -> [layers, out...] float32

  def key_of(layers: range, out_index: tuple[slice, ...]) -> tuple:
    return (layers.start, layers.stop) + tuple((s.start, s.stop) for s in out_index)

  def scale_block(layers: range, out_index: tuple[slice, ...]) -> np.ndarray:
    key = key_of(layers, out_index)
    if key not in scales:
      scales[key] = np.stack([channel_scale(read(i, full_in + out_index), n_in) for i in layers])
    return scales[key]

  def weight_callback(index: tuple[slice, ...]) -> np.ndarray:
    index = parallel.normalize_index(index, shape)
    layers, in_index, out_index = range(index[0].start, index[0].stop), index[1:1 + n_in], index[1 + n_in:]
    key = key_of(layers, out_index)
    blocks, layer_scales = [], []
    for j, i in enumerate(layers):
      w = read(i, index[1:])
      if in_index == full_in and key not in scales:  # this shard has every input: one read gives both
        layer_scales.append(channel_scale(w, n_in))
        blocks.append(round_to_int8(w, layer_scales[-1], n_in))
      else:
        blocks.append(round_to_int8(w, scale_block(layers, out_index)[j], n_in))
    if layer_scales:
      scales[key] = np.stack(layer_scales)
    return np.stack(blocks)

  def scale_callback(index: tuple[slice, ...]) -> np.ndarray:
    index = parallel.normalize_index(index, scale_shape)
    return scale_block(range(index[0].start, index[0].stop), index[1:])

  q = jax.make_array_from_callback(shape, weight_sharding, weight_callback)
  scale = jax.make_array_from_callback(scale_shape, scale_sharding, scale_callback)
  return q, scale


def load_quantized(layers: nnx.Module, name: str, read: LayerReader, mesh: jax.sharding.Mesh,
                   rules=parallel.DEFAULT_RULES) -> None:
  """Reads projection `name` through `read`, quantizing each shard as it is placed, into `layers` (in place)."""
  if name not in model_lib.PROJECTIONS:
    raise QuantizationError(f"{name!r} is not a projection; quantizable: {', '.join(QUANTIZED_PROJECTIONS)}")
  var = getattr(layers, name)
  shape = tuple(var.shape)
  n_in = num_in_dims(name)
  scale_shape = shape[:1] + shape[1 + n_in:]
  weight_sharding = parallel.named_sharding(var.get_metadata().get("logical_axes"), shape, mesh, rules)
  scale_sharding = parallel.named_sharding(scale_axes(name), scale_shape, mesh, rules)
  q, scale = build_quantized(shape, n_in, read, weight_sharding, scale_sharding)
  set_quantized(layers, name, q, scale)


def param_bytes(model: nnx.Module) -> int:
  """Bytes of every parameter of `model` (concrete or abstract)."""
  return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
             for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
