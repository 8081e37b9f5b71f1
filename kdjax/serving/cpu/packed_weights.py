"""The engine's weights in the unrolled (CPU) layout: one dict of arrays per layer, packed for `cpu_kernels`.

With the kernels (float32 weights on one CPU device, no int8 scales, no unmerged LoRA factors), each layer's
projections are packed for `cpu_kernels.packed_matmul` in the four products the decode step runs (q, k and v as
one, the output, gate and up as one, down), and the output projection too; `kernel_layer` is the layer on them.
Packing reads and writes every weight, so the packed copy is kept while the model's arrays are the same objects
(jax arrays are immutable: new weights are new arrays, and are packed anew). A model that does not qualify keeps
its plain per-layer arrays, and the engine's XLA form.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.serving.cpu import kernels
from kdjax.serving import sampling
from kdjax.models.llama import model as model_lib
from kdjax.models.llama.model import Llama


class UnrolledWeights(NamedTuple):
  """The unrolled (CPU) layout's weights: one dict per layer, and the output projection packed for
  `cpu_kernels` (None: the model's own, through `sampling.last_logits`)."""
  layers: tuple[dict[str, jax.Array], ...]
  head: jax.Array | None

  @property
  def uses_cpu_kernels(self) -> bool:
    """Packed weights, and the decode's attention on the kernel too (`_slot_layer`)."""
    return self.head is not None


def unrolled_weights(model: Llama, cpu_kernels: bool) -> UnrolledWeights:
  """Each layer's arrays as its own (sliced from the stack); with `cpu_kernels` (the model on one device, not a
  mesh) and the kernels available for float32 weights on CPU, packed for them instead (`_packed_weights`)."""
  if (cpu_kernels and model.dtype == jnp.float32 and jax.default_backend() == "cpu"
      and _packable(model.layers.arrays()) and kernels.available()):
    return _packed_for(model)
  return UnrolledWeights(per_layer(model.layers.arrays(), model.config.num_layers), None)


_last_packed: list = []  # [(identity of the arrays packed, weak references to them, UnrolledWeights)]


def _packed_for(model: Llama) -> UnrolledWeights:
  """`_packed_weights` of the model, reused while its arrays are the same objects (jax arrays are immutable, so
  new weights are new arrays): packing reads and writes every weight, ~0.2 s for SmolLM2 on every `run`. One
  model is remembered, and forgotten with its arrays."""
  sources = list(model.layers.arrays().values()) + [model.embed[...] if model.config.tie_word_embeddings
                                                     else model.lm_head[...]]
  key = tuple(map(id, sources))
  if _last_packed and _last_packed[0][0] == key and all(r() is a for r, a in zip(_last_packed[0][1], sources)):
    return _last_packed[0][2]
  packed = _packed_weights(model.layers.arrays(), model.lm_head_weight(), model.config.num_layers)
  _last_packed[:] = [(key, [weakref.ref(a) for a in sources], packed)]
  weakref.finalize(sources[0], _forget_packed, key)
  return packed


def _forget_packed(key: tuple[int, ...]) -> None:
  if _last_packed and _last_packed[0][0] == key:
    _last_packed.clear()


def per_layer(stacked: dict[str, jax.Array], num_layers: int) -> tuple[dict[str, jax.Array], ...]:
  """The stack's arrays (`model.layers.arrays()`) as one dict per layer."""
  return tuple({name: array[layer] for name, array in stacked.items()} for layer in range(num_layers))


# The decode's products, in the order a layer runs them: one packed weight each (its projections' tiles in turn).
QKV, OUT, GATE_UP, DOWN = ("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",)
_PRODUCTS = (QKV, OUT, GATE_UP, DOWN)


def packed_key(product: tuple[str, ...]) -> str:
  return "+".join(product) + "_packed"


def _packable(stacked: dict[str, jax.Array]) -> bool:
  """Every projection float32 (no int8 scales), in whole tiles, without LoRA factors (which `model.project` adds;
  merged adapters are plain weights)."""
  return all(f"{name}_scale" not in stacked and f"{name}_lora_a" not in stacked
             and kernels.packable(stacked[name][0], len(ins)) for name, (ins, _) in model_lib.PROJECTIONS.items())


@functools.partial(jax.jit, static_argnames=("num_layers",))
def _packed_weights(stacked: dict[str, jax.Array], head: jax.Array, num_layers: int) -> UnrolledWeights:
  """Per layer, its norms and its four products' weights packed (`packed_key`), without a plain copy; and the
  output projection packed."""
  def pack_layer(p):
    packed = {name: p[name] for name in ("attn_norm", "mlp_norm")}
    for product in _PRODUCTS:
      packed[packed_key(product)] = jnp.concatenate(
          [kernels.pack(p[name], len(model_lib.PROJECTIONS[name][0])) for name in product])
    return packed
  layers = tuple(map(pack_layer, per_layer(stacked, num_layers)))
  return UnrolledWeights(layers, kernels.pack(head.astype(jnp.float32), 1))


def kernel_layer(p: dict[str, jax.Array], x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *,
                 write_at: jax.Array, cos: jax.Array, sin: jax.Array, config) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`engine._slot_layer` on the CPU kernels, for x [S, 1, D]: four products with the norms, the SwiGLU and the
  residual adds folded in, and one attention call that applies the rotary embedding (cos, sin: [S, head_dim/2]),
  writes the token's key and value at `write_at` (-1: a finished slot) and reads each slot's live positions.
  The keys in blocks of 16 positions (`cpu_kernels.block_keys`), the values [S, kv_heads, W, head_dim]."""
  b, d, eps = x.shape[0], config.hidden_size, config.rms_norm_eps
  h = x.reshape(b, d).astype(jnp.float32)
  qkv = kernels.packed_matmul(h, p[packed_key(QKV)], norm=p["attn_norm"], eps=eps)
  attn, k_cache, v_cache = kernels.decode_attention(qkv, k_cache, v_cache, write_at, cos, sin,
                                                    config.head_dim ** -0.5)
  h = kernels.packed_matmul(attn, p[packed_key(OUT)], residual=h)
  gate_up = kernels.packed_matmul(h, p[packed_key(GATE_UP)], norm=p["mlp_norm"], eps=eps)
  h = kernels.packed_matmul(gate_up, p[packed_key(DOWN)], swiglu=True, residual=h)
  return h.reshape(b, 1, d).astype(x.dtype), k_cache, v_cache


def last_logits(model: Llama, weights: UnrolledWeights | None, hidden: jax.Array) -> jax.Array:
  """Float32 logits [B, V] of the last position of `hidden` [B, S, D], through the packed head if there is one."""
  if weights is None or weights.head is None:
    return sampling.last_logits(model, hidden)
  return kernels.packed_matmul(hidden[:, -1], weights.head)
