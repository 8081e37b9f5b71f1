"""Llama 3.x in Flax NNX, written for TPU pods and checked against transformers on CPU.

Layers are stacked (every layer parameter has a leading `layers` axis) and run with `jax.lax.scan`, so compile
time does not grow with depth. The layer body is a pure function of a dict of arrays: LoRA adapters and int8
weights enter it as extra entries of that dict (`{name}_lora_a`, `{name}_lora_b`, `{name}_scale`).

Parameters carry logical axis names (`logical_axes` metadata); `kdjax.infra.parallel` maps them to mesh axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.models.llama.config import LlamaConfig

# Each projection: (input letters, output letters) of its einsum, and the logical axes of its weight.
# d: hidden, h: query heads, g: kv heads, k: head_dim, f: mlp.
PROJECTIONS: dict[str, tuple[str, str]] = {
    "wq": ("d", "hk"), "wk": ("d", "gk"), "wv": ("d", "gk"), "wo": ("hk", "d"),
    "w_gate": ("d", "f"), "w_up": ("d", "f"), "w_down": ("f", "d"),
}
_PROJECTION_INDEX = {name: i for i, name in enumerate(PROJECTIONS)}  # stable dropout streams
LETTER_AXES = {"d": "embed", "h": "q_heads", "g": "kv_heads", "k": "head_dim", "f": "mlp"}


def projection_axes(name: str) -> tuple[str, ...]:
  ins, outs = PROJECTIONS[name]
  return ("layers",) + tuple(LETTER_AXES[c] for c in ins + outs)


def projection_shape(config: LlamaConfig, name: str) -> tuple[int, ...]:
  sizes = {"d": config.hidden_size, "h": config.num_heads, "g": config.num_kv_heads,
           "k": config.head_dim, "f": config.intermediate_size}
  ins, outs = PROJECTIONS[name]
  return (config.num_layers,) + tuple(sizes[c] for c in ins + outs)


class KVCache(NamedTuple):
  """Keys and values of every layer, plus which slots hold real tokens.

  Slot `t` of every row is the t-th token fed to the model (padding included), so all rows share one write
  index; `valid` masks padding slots and `positions` are the rotary positions of each row's next token.
  Keys and values are laid out [layers, batch, kv_heads, slots, head_dim]: attention contracts over head_dim
  and slots with (batch, kv_heads) as batch dimensions, so it reads the cache without transposing it.
  """
  k: jax.Array          # [layers, batch, kv_heads, max_len, head_dim]
  v: jax.Array
  valid: jax.Array      # [batch, max_len] bool
  index: jax.Array      # int32 scalar: next slot to write
  positions: jax.Array  # int32 [batch]: rotary position of the next token of each row

  @staticmethod
  def kv_shape(config: LlamaConfig, batch: int, max_len: int) -> tuple[int, ...]:
    return (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
    shape = cls.kv_shape(config, batch, max_len)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
               jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


KV_CACHE_AXES = ("layers", "batch", "kv_heads", "seq", "head_dim")


@dataclasses.dataclass
class ForwardOutput:
  logits: jax.Array | None        # [batch, seq, vocab] float32
  hidden: jax.Array | None        # [batch, seq, hidden] after the final norm
  cache: KVCache | None
  attention: jax.Array | None     # [layers, batch, heads, seq, keys] float32, when asked for


jax.tree_util.register_dataclass(ForwardOutput, data_fields=["logits", "hidden", "cache", "attention"],
                                 meta_fields=[])


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse rotary frequencies, with Llama 3.1's "llama3" scaling when configured (float32, like HF)."""
  dim = config.head_dim
  inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv_freq
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates `x` [batch, seq, heads, head_dim] by `positions` [batch, seq] (HF's rotate-half layout)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, hd/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def project(x: jax.Array, p: dict[str, jax.Array], name: str, dtype, lora_scale: float,
            dropout: tuple[float, jax.Array | None] = (0.0, None)) -> jax.Array:
  """`x @ W` for projection `name`, dequantising int8 weights and adding a LoRA update when present."""
  ins, outs = PROJECTIONS[name]
  w = p[name]
  y = jnp.einsum(f"bs{ins},{ins}{outs}->bs{outs}", x, w.astype(dtype))
  if f"{name}_scale" in p:  # int8 weight-only: per-output-channel scale applied after the matmul, in float32
    y = (y.astype(jnp.float32) * p[f"{name}_scale"].astype(jnp.float32)).astype(dtype)
  if f"{name}_lora_a" in p:
    rate, key = dropout
    xin = x
    if rate > 0.0 and key is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(key, _PROJECTION_INDEX[name]), 1.0 - rate, x.shape)
      xin = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
    a = p[f"{name}_lora_a"].astype(dtype)
    b = p[f"{name}_lora_b"].astype(dtype)
    low = jnp.einsum(f"bs{ins},{ins}r->bsr", xin, a)
    y = y + lora_scale * jnp.einsum(f"bsr,r{outs}->bs{outs}", low, b)
  return y


def decoder_layer(p: dict[str, jax.Array], x: jax.Array, *, config: LlamaConfig, positions: jax.Array,
                  inv_freq: jax.Array, mask: jax.Array, cached: tuple[jax.Array, jax.Array, jax.Array] | None,
                  dtype, lora_scale: float = 0.0, dropout: tuple[float, jax.Array | None] = (0.0, None),
                  return_attention: bool = False):
  """One pre-norm Llama block; returns (x, this step's (k, v), attention probabilities or None).

  `mask` [batch, seq, seq] says which of the current tokens each query may attend to. With `cached` (this layer's
  cache keys and values [batch, kv_heads, max_len, head_dim] and the mask of their valid slots [batch, max_len]),
  queries also attend to the cache. The cache is only read here: the caller writes the new keys/values once for
  all layers, so a decode step never copies the cache.
  """
  b, s, _ = x.shape
  h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
  q = apply_rope(project(h, p, "wq", dtype, lora_scale, dropout), positions, inv_freq)
  k = apply_rope(project(h, p, "wk", dtype, lora_scale, dropout), positions, inv_freq)
  v = project(h, p, "wv", dtype, lora_scale, dropout)
  n_kv, groups, head_dim = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
  # Attention runs as plain batched matmuls over (batch, kv_head): the `groups` query heads that share a kv head
  # and the s query positions form one [groups * s, head_dim] matrix. Keys and values are in the cache layout.
  q = q.reshape(b, s, n_kv, groups, head_dim).transpose(0, 2, 3, 1, 4).reshape(b, n_kv, groups * s, head_dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, g, s, head_dim]
  scale, neg = head_dim ** -0.5, jnp.finfo(jnp.float32).min

  def scores_against(keys, keep):  # -> [b, g, groups, s, keys]
    raw = jnp.einsum("bgmk,bgtk->bgmt", q, keys.astype(dtype), preferred_element_type=jnp.float32) * scale
    return jnp.where(keep, raw.reshape(b, n_kv, groups, s, keys.shape[2]), neg)

  def weighted(weights, values):  # [b, g, groups, s, keys] x [b, g, keys, head_dim] -> [b, g, groups * s, head_dim]
    return jnp.einsum("bgmt,bgtk->bgmk", weights.reshape(b, n_kv, groups * s, -1).astype(dtype),
                      values.astype(dtype))

  scores = scores_against(k, mask[:, None, None, :, :])
  if cached is not None:
    k_cache, v_cache, valid = cached
    slots = k_cache.shape[2]
    probs = jax.nn.softmax(
        jnp.concatenate([scores_against(k_cache, valid[:, None, None, None, :]), scores], axis=-1), axis=-1)
    attn = weighted(probs[..., :slots], v_cache) + weighted(probs[..., slots:], v)
  else:
    probs = jax.nn.softmax(scores, axis=-1)
    attn = weighted(probs, v)
  attn = attn.reshape(b, n_kv, groups, s, head_dim).transpose(0, 3, 1, 2, 4).reshape(
      b, s, config.num_heads, head_dim)
  x = x + project(attn, p, "wo", dtype, lora_scale, dropout)
  h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
  gate = project(h, p, "w_gate", dtype, lora_scale, dropout)
  up = project(h, p, "w_up", dtype, lora_scale, dropout)
  x = x + project(jax.nn.silu(gate) * up, p, "w_down", dtype, lora_scale, dropout)
  attention = probs.reshape(b, config.num_heads, s, -1) if return_attention else None
  return x, (k, v), attention


class LayerStack(nnx.Module):
  """All decoder layers' parameters, each with a leading `layers` axis."""

  def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    for name in PROJECTIONS:
      setattr(self, name, nnx.Param(init(rngs.params(), projection_shape(config, name), param_dtype),
                                    logical_axes=projection_axes(name)))
    norm_shape = (config.num_layers, config.hidden_size)
    self.attn_norm = nnx.Param(jnp.ones(norm_shape, param_dtype), logical_axes=("layers", "norm"))
    self.mlp_norm = nnx.Param(jnp.ones(norm_shape, param_dtype), logical_axes=("layers", "norm"))

  def arrays(self) -> dict[str, jax.Array]:
    """Every array of the stack (base weights, int8 scales, LoRA factors) by attribute name."""
    return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Variable)}


class Llama(nnx.Module):
  """Llama 3.x causal LM. `model(input_ids)` returns float32 logits [batch, seq, vocab]."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.dtype = dtype
    self.remat = remat
    # LoRA settings live on the model so the layer body sees them as static values.
    self.lora_scale = 0.0
    self.lora_dropout = 0.0
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), param_dtype),
                           logical_axes=("vocab", "embed"))
    self.layers = LayerStack(config, param_dtype=param_dtype, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), param_dtype), logical_axes=("norm",))
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Param(init(rngs.params(), (config.hidden_size, config.vocab_size), param_dtype),
                               logical_axes=("embed", "vocab"))

  def lm_head_weight(self) -> jax.Array:
    """The output projection [hidden, vocab] (the embedding's transpose when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    return self.forward(input_ids, attention_mask=attention_mask).logits

  def forward(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
              positions: jax.Array | None = None, cache: KVCache | None = None,
              cache_is_empty: bool = False, return_logits: bool = True, return_attention: bool = False,
              dropout_key: jax.Array | None = None) -> ForwardOutput:
    """Runs the model on `input_ids` [batch, seq].

    attention_mask [batch, seq]: 1 for real tokens, 0 for (left) padding. Positions default to the count of
    real tokens before each one (plus the cache's positions when decoding), so left-padded rows get the
    positions they would have unpadded. With `cache`, the tokens are appended at the cache's write index.
    `cache_is_empty` (static) promises that the cache holds no tokens yet, as in a prefill: the tokens then
    attend only to each other, and no time goes to attention over empty slots.
    """
    config, dtype = self.config, self.dtype
    b, s = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, s), bool)
    attention_mask = attention_mask.astype(bool)
    offset = cache.positions[:, None] if cache is not None else 0
    if positions is None:
      positions = offset + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    slot = jnp.arange(s)
    mask = (slot[None, None, :] <= slot[None, :, None]) & attention_mask[:, None, :]  # causal, no padding keys

    x = jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)
    inv_freq = jnp.asarray(rope_inv_freq(config))
    lora_scale, dropout_rate = self.lora_scale, self.lora_dropout
    layer_keys = (jax.random.split(dropout_key, config.num_layers) if dropout_key is not None
                  else jnp.zeros((config.num_layers,), jnp.uint32))

    def body(x, xs):
      p, cache_kv, key = xs
      cached = None if cache_kv is None else (cache_kv[0], cache_kv[1], cache.valid)
      x, new_kv, attention = decoder_layer(
          p, x, config=config, positions=positions, inv_freq=inv_freq, mask=mask, cached=cached, dtype=dtype,
          lora_scale=lora_scale, dropout=(dropout_rate, key if dropout_key is not None else None),
          return_attention=return_attention)
      return x, (new_kv if cache is not None else None, attention)

    if self.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    cache_kv = (cache.k, cache.v) if cache is not None and not cache_is_empty else None
    x, (new_kv, attention) = jax.lax.scan(body, x, (self.layers.arrays(), cache_kv, layer_keys))

    hidden = rms_norm(x, self.final_norm[...], config.rms_norm_eps)
    logits = None
    if return_logits:
      logits = jnp.einsum("bsd,dv->bsv", hidden, self.lm_head_weight().astype(dtype),
                          preferred_element_type=jnp.float32)
    new_cache = None
    if cache is not None:  # one in-place write of every layer's new keys/values
      start = (0, 0, 0, cache.index, 0)
      new_cache = KVCache(
          jax.lax.dynamic_update_slice(cache.k, new_kv[0].astype(cache.k.dtype), start),
          jax.lax.dynamic_update_slice(cache.v, new_kv[1].astype(cache.v.dtype), start),
          jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index)), cache.index + s,
          cache.positions + attention_mask.sum(axis=1).astype(jnp.int32))
    return ForwardOutput(logits=logits, hidden=hidden, cache=new_cache, attention=attention)


def init_model(config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               seed: int = 0) -> Llama:
  return Llama(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(seed))


def abstract_model(config: LlamaConfig, **kwargs: Any) -> Llama:
  """The model's structure with ShapeDtypeStruct leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: init_model(config, **kwargs))
