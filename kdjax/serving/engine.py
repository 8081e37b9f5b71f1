"""The decode engine behind `generation.generate`: continuous batching over a fixed set of decode slots.

As in JetStream and vLLM, the engine holds one decode state of S slots, each with its own cache length,
rotary position, step count and sampling key, and three verbs act on it:

- `prefill`: runs a chunk of prompts (right-padded to a length bucket) through the model and returns their keys,
  values and last-token logits;
- `insert`: writes a prefilled chunk into free slots and chooses each row's first token from its logits;
- `decode_block`: one jitted `while_loop` of decode steps over all slots, each step feeding every live slot its
  last token at its own position. It returns to the host only when a slot finishes while prompts wait, when
  every slot is done, or when a slot's cache window is full, so the host does not sit between tokens.

The host (`run`) refills finished slots from the queue. Each slot's cache holds exactly its own tokens, without
padding, in a window of W positions shared by all slots; W is the live lengths rounded up to `window_bucket`
and follows them (grown by a bucket when a slot fills it, shrunk at a refill when long rows have left), so
attention reads what is live, not the longest possible context.

Layer layout. On CPU the layers are unrolled and each layer's weights and cache are separate arrays: XLA:CPU
copies every `dynamic-slice` of a scanned layer stack (all weights and the layer's cache, every step), which
costs more than the decode itself. Elsewhere the stacked layers run under `lax.scan`, where the slices fuse
into their consumers and the weights are not duplicated. The unrolled layout also keeps each layer's keys
transposed, [S, kv_heads, head_dim, W] (`_slot_layer` says why), or on the CPU kernels in blocks of 16 positions,
[S, kv_heads, ceil(W / 16), head_dim, 16] (`cpu_kernels.block_keys`), so that a slot's live keys are one read.

CPU kernels. On one CPU device with float32 weights, the decode runs its weight products and its attention on
`cpu_kernels` (our own kernels through XLA's FFI; that module says why): `layer_params` holds each layer's
projections packed for the kernel (q, k, v as one product, gate and up as one), and the output projection too,
reused while the model's arrays are the same; attention reads each slot's live positions only, not the window.
The prefill, many rows at once, runs the model's own weights in the scanned layout, on XLA's GEMM, and hands the
slots its caches split per layer. Without a compiler, with KDJAX_CPU_KERNELS=0, on a mesh or off CPU, XLA runs it
all as below. Results differ from XLA's by float32 rounding only.

Many devices: with the model on a mesh, the slot axis of every slot array is sharded like a batch (the data
axis; `place_slots`), so each device decodes its own slots; results equal the single-device ones.

Many hosts: a model whose mesh spans processes (a teacher larger than one host's memory) runs ONE program on all
of them. Every process calls `run` with the same prompts, so every host loop takes the same decisions and
dispatches the same programs in the same order (the SPMD contract). What the host feeds in goes in as replicated
global arrays (`_feed`); what it reads back is first replicated on device (`_host_read`, `_take_rows`), since a
process cannot read slots held by another's devices. On a process-local mesh both are the plain local calls.

Sampling is as before: the token of example e at response step t draws with
`fold_in(fold_in(PRNGKey(seed), e), t)`, so outputs do not depend on the number of slots or on scheduling.
"""

from __future__ import annotations

import collections
import enum
import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.serving.cpu import kernels as cpu_kernels
from kdjax.serving.cpu import packed_weights as decode_weights
from kdjax.serving import sampling as sampling_lib
from kdjax.infra import parallel
from kdjax.models import heads
from kdjax.serving.sampling import FinishCallback, Generation, ProgressCallback, SamplingConfig, DecodeOptions, round_up
from kdjax.models.llama import model as model_lib
from kdjax.models.llama.model import KVCache, Llama


# Prompts prefilled together into free slots, at most (a power-of-two chunk; the plans compile this size).
PREFILL_CHUNK = 4

class Slots(NamedTuple):
  """The decode state: S slots, each a row of every array."""
  k: tuple[jax.Array, ...]   # unrolled: one [S, kv_heads, head_dim, W] per layer (transposed), or on the CPU
                             # kernels [S, kv_heads, ceil(W / 16), head_dim, 16] (blocked); scanned: one
                             # [L, S, kv_heads, W, head_dim]
  v: tuple[jax.Array, ...]   # unrolled: one [S, kv_heads, W, head_dim] per layer; scanned: one [L, S, ...]
  lengths: jax.Array         # [S] int32: tokens in the slot's cache = rotary position of the token fed next
  last: jax.Array            # [S] int32: the token fed at the next step
  steps: jax.Array           # [S] int32: response tokens chosen so far
  done: jax.Array            # [S] bool: finished, or empty
  stopped: jax.Array         # [S] bool: ended by a stop token
  keys: jax.Array            # [S, 2] uint32: fold_in(PRNGKey(seed), example id)
  tokens: jax.Array          # [S, N] int32
  recorded: tuple[jax.Array, ...]  # outputs of sampling.topk_logprobs per step: each [S, N, ...] (empty: k=0)


class _Sampling(NamedTuple):
  """The sampling settings that enter the compiled programs as values."""
  seed: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  stop_ids: jax.Array


def unrolled_layers_default() -> bool:
  return jax.default_backend() == "cpu"


def layer_params(model: Llama, unrolled: bool) -> decode_weights.UnrolledWeights | None:
  """The decode's weights in the unrolled layout (`decode_weights`; on CPU kernels when it can), or None when
  scanned: the stacked arrays are used."""
  if not unrolled:
    return None
  return decode_weights.unrolled_weights(model, cpu_kernels=model_mesh(model) is None)


def window_of(slots: Slots) -> int:
  """The slots' cache window W (the values' position axis, in either layout)."""
  return slots.v[0].shape[-2]


class CacheLayout(str, enum.Enum):
  """How the slots hold their keys (`Slots.k`), chosen once per `run` from how the layers run (`choose`).

  STACKED: scanned layers (accelerators), one [L, S, kv_heads, W, head_dim] array, keys as values;
  TRANSPOSED: unrolled layers (CPU), one [S, kv_heads, head_dim, W] per layer;
  BLOCKED: unrolled on the CPU kernels, one [S, kv_heads, ceil(W / 16), head_dim, 16] per layer.
  """
  STACKED = "stacked"
  TRANSPOSED = "transposed"
  BLOCKED = "blocked"

  @classmethod
  def choose(cls, layers: decode_weights.UnrolledWeights | None) -> "CacheLayout":
    """The layout of `layer_params`'s result: None (scanned) stacks, the CPU kernels block, else transposed."""
    if layers is None:
      return cls.STACKED
    return cls.BLOCKED if layers.uses_cpu_kernels else cls.TRANSPOSED


def _row_keys(seed: jax.Array, example_ids: jax.Array) -> jax.Array:
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda e: jax.random.fold_in(base, e))(example_ids)


def _choose_and_measure(logits: jax.Array, keys: jax.Array, steps: jax.Array, sampling: _Sampling,
                        opts: DecodeOptions) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Each row's next token (key folded with its step) and what the store keeps about the distribution."""
  step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
  chosen = sampling_lib.choose_tokens(logits, step_keys, sampling.temperature, sampling.top_p, opts)
  recorded = (tuple(sampling_lib.topk_logprobs(logits, opts.topk_logprobs, opts.tail_temperatures))
              if opts.topk_logprobs else ())
  return chosen, recorded


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
  return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _feed(value, mesh: Mesh | None) -> jax.Array:
  """A host value as a program input: on a mesh that spans processes, a global array replicated over it (every
  process passes the same value); else the usual uncommitted local array."""
  if mesh is None:
    return jnp.asarray(value)
  return jax.device_put(np.asarray(value), NamedSharding(mesh, PartitionSpec()))


def _replicate(arrays, mesh: Mesh):
  """Inside a program: `arrays` replicated over `mesh`, so every process holds the whole value."""
  return jax.lax.with_sharding_constraint(arrays, NamedSharding(mesh, PartitionSpec()))


_replicated = jax.jit(_replicate, static_argnames=("mesh",))


def _host_read(arrays, mesh: Mesh | None):
  """`arrays` as numpy on this host; on a mesh that spans processes each is replicated on device first, so every
  process reads the whole value (the slot axis is sharded over devices of several processes)."""
  return jax.device_get(arrays if mesh is None else _replicated(arrays, mesh))


def model_mesh(model: Llama) -> Mesh | None:
  """The mesh the model's parameters are placed on (None: a single device, no NamedSharding, or an abstract model
  whose shape structs carry none)."""
  sharding = getattr(model.embed.get_value(), "sharding", None)
  return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def place_slots(slots: Slots, mesh: Mesh | None, layout: CacheLayout) -> Slots:
  """`slots` on `mesh`: the slot axis sharded like any batch (`parallel`'s "batch" rule: the data axis, with
  fsdp when it divides too), the caches' kv heads like the model's; unchanged without a mesh. Each device then
  holds and decodes its own slots, and the compiled programs keep that layout (their inputs fix it)."""
  if mesh is None:
    return slots
  def place(array: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    return jax.device_put(array, parallel.named_sharding(axes, array.shape, mesh))
  value_axes = ("batch", "kv_heads", "seq", "head_dim")
  if layout == CacheLayout.TRANSPOSED:
    key_axes = ("batch", "kv_heads", "head_dim", "seq")
  elif layout == CacheLayout.BLOCKED:
    key_axes = ("batch", "kv_heads", None, "head_dim", None)
  else:
    value_axes = key_axes = ("layers",) + value_axes
  per_slot = lambda a: place(a, ("batch",) + (None,) * (a.ndim - 1))
  return Slots(k=tuple(place(a, key_axes) for a in slots.k), v=tuple(place(a, value_axes) for a in slots.v),
               lengths=per_slot(slots.lengths), last=per_slot(slots.last), steps=per_slot(slots.steps),
               done=per_slot(slots.done), stopped=per_slot(slots.stopped), keys=per_slot(slots.keys),
               tokens=per_slot(slots.tokens), recorded=tuple(map(per_slot, slots.recorded)))


def empty_slots(model: Llama, num_slots: int, window: int, opts: DecodeOptions, layout: CacheLayout) -> Slots:
  """Empty slots with their keys in `layout` (`Slots.k`)."""
  config, n = model.config, opts.max_new_tokens
  layers = 1 if layout == CacheLayout.STACKED else config.num_layers
  shape = (num_slots, config.num_kv_heads, window, config.head_dim)  # the values'; the keys' transposed
  key_shape = (num_slots, config.num_kv_heads, config.head_dim, window)
  if layout == CacheLayout.BLOCKED:
    key_shape = (num_slots, config.num_kv_heads, cpu_kernels.key_blocks(window), config.head_dim, cpu_kernels.TILE)
  elif layout == CacheLayout.STACKED:  # one stacked array each, keys as values
    shape = key_shape = (config.num_layers,) + shape
  recorded = ()
  if opts.topk_logprobs:  # the shapes of sampling.topk_logprobs's outputs, with a step axis
    probe = jax.eval_shape(lambda x: sampling_lib.topk_logprobs(x, opts.topk_logprobs, opts.tail_temperatures),
                           jax.ShapeDtypeStruct((num_slots, config.vocab_size), jnp.float32))
    recorded = tuple(jnp.zeros((num_slots, n) + p.shape[1:], p.dtype) for p in probe)
  return place_slots(Slots(
      k=tuple(jnp.zeros(key_shape, model.dtype) for _ in range(layers)),
      v=tuple(jnp.zeros(shape, model.dtype) for _ in range(layers)),
      lengths=jnp.zeros((num_slots,), jnp.int32), last=jnp.zeros((num_slots,), jnp.int32),
      steps=jnp.zeros((num_slots,), jnp.int32), done=jnp.ones((num_slots,), bool),
      stopped=jnp.zeros((num_slots,), bool), keys=jnp.zeros((num_slots, 2), jnp.uint32),
      tokens=jnp.full((num_slots, n), opts.pad_id, jnp.int32), recorded=recorded), model_mesh(model), layout)


# ----------------------------------------------------------------------------- the three verbs

@functools.partial(jax.jit, static_argnames=("graphdef", "score_window", "kv_length"))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, layers, ids: jax.Array, lengths: jax.Array,
            empty: KVCache | None, continuation_lengths: jax.Array | None = None, score_window: int = 0,
            kv_length: int | None = None
            ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], jax.Array, jax.Array | None]:
  """Prompts right-padded into `ids` [C, P] (real lengths [C]): (keys, values, logits [C, V] of each last token,
  continuation NLL sums [C] or None).

  Right padding keeps every prompt at positions 0..len-1 and, attention being causal, out of the padding's way.
  Unrolled (`layers` given): per layer, keys [C, kv_heads, head_dim, P] (transposed, as the slots keep them; for
  the CPU kernels in blocks, `cpu_kernels.block_keys`) and values [C, kv_heads, P, head_dim]. Scanned:
  `model.forward` into `empty` (KVCache.init for [C, P], an argument because built inside the jit it would be a
  constant that XLA spends minutes folding), keys and values as one stacked array each. Unrolled weights packed
  for the CPU kernels serve the decode only: the prefill then runs the scanned forward into `empty` too (it runs and
  compiles faster than the unrolled one) and splits its caches.

  Teacher-forced scoring (`score_window` > 0): row r's prompt is followed in `ids` by a continuation of
  `continuation_lengths[r]` tokens (<= `score_window`), and the fourth result is the summed cross-entropy of those
  tokens, each predicted from the position before it. The prompt's forward is then shared with the scoring pass
  it would otherwise repeat (the eval's reference NLL). `lengths` stay the prompt lengths: the last-token logits
  are the prompt's. `kv_length` (default P) keeps only the first positions' keys and values, the prompts'
  bucket: the slots' windows then need no room for the continuations (whose keys decode would mask and
  overwrite anyway, being at positions >= a slot's length).
  """
  model = nnx.merge(graphdef, state)
  if _prefills_scanned(layers):
    out = model.forward(ids, cache=empty, cache_is_empty=True, return_logits=False)
    k, v, hidden = (out.cache.k,), (out.cache.v,), out.hidden
    if layers is not None:  # the decode's packed weights serve only it: the scanned forward, split per layer
      k, v = tuple(k[0]), tuple(v[0])
  else:
    config, (c, p) = model.config, ids.shape
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((p, p), bool)), (c, p, p))
    positions = jnp.broadcast_to(jnp.arange(p)[None, :], (c, p))
    inv_freq = jnp.asarray(model_lib.rope_inv_freq(config))
    x = jnp.take(model.embed[...], ids, axis=0).astype(model.dtype)
    k, v = [], []
    for weights in layers.layers:
      x, (layer_k, layer_v), _ = model_lib.decoder_layer(
          weights, x, config=config, positions=positions, inv_freq=inv_freq, mask=causal, cached=None,
          dtype=model.dtype, lora_scale=model.lora_scale)
      k.append(layer_k)
      v.append(layer_v)
    k, v = tuple(k), tuple(v)
    hidden = model_lib.rms_norm(x, model.final_norm[...], config.rms_norm_eps)
  last_hidden = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
  logits = decode_weights.last_logits(model, layers, last_hidden)
  if kv_length is not None:
    k, v = jax.tree.map(lambda a: jax.lax.slice_in_dim(a, 0, kv_length, axis=a.ndim - 2), (k, v))
  if layers is not None:
    k = tuple(cpu_kernels.block_keys(a) if layers.uses_cpu_kernels else jnp.swapaxes(a, -1, -2) for a in k)
  if not score_window:
    return k, v, logits, None
  head = model.lm_head_weight().astype(model.dtype)
  return k, v, logits, heads.continuation_cross_entropy_sums(hidden, head, ids, lengths, continuation_lengths,
                                                              score_window)


def _prefills_scanned(layers: decode_weights.UnrolledWeights | None) -> bool:
  """Whether `prefill` runs the scanned forward (into an `empty` cache): for the scanned layout, and for unrolled
  weights packed for the CPU kernels, which serve the decode only."""
  return layers is None or layers.uses_cpu_kernels


def _put_rows(cache: jax.Array, new: jax.Array, where: jax.Array) -> jax.Array:
  """`cache` [S, ...] with row r of `new` [C, ...] in slot `where[r]`, at the start of every other axis
  (positions 0..P-1, in any unrolled layout). One dynamic-update-slice per row: XLA:CPU compiles the 60 of an
  unrolled 30-layer insert about twice as fast as a scatter (2.1-3.6 s on the demo's shapes)."""
  for row in range(new.shape[0]):
    start = (where[row],) + (0,) * (cache.ndim - 1)
    cache = jax.lax.dynamic_update_slice(cache, new[row:row + 1].astype(cache.dtype), start)
  return cache


@functools.partial(jax.jit, static_argnames=("opts", "layout"), donate_argnames=("slots",))
def insert(slots: Slots, where: jax.Array, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], logits: jax.Array,
           lengths: jax.Array, example_ids: jax.Array, sampling: _Sampling, opts: DecodeOptions,
           layout: CacheLayout) -> Slots:
  """Puts prefilled prompts (`prefill`'s keys and values) into slots `where` [C] of `layout`; chooses their first
  tokens."""
  c, p = logits.shape[0], v[0].shape[-2]
  if layout != CacheLayout.STACKED:  # unrolled (CPU): one array per layer
    k = tuple(_put_rows(layer, new, where) for layer, new in zip(slots.k, k))
    v = tuple(_put_rows(layer, new, where) for layer, new in zip(slots.v, v))
  else:  # scanned (accelerators): a scatter
    k = (slots.k[0].at[:, where, :, :p].set(k[0]),)
    v = (slots.v[0].at[:, where, :, :p].set(v[0]),)
  keys = _row_keys(sampling.seed, example_ids)
  chosen, recorded = _choose_and_measure(logits, keys, jnp.zeros((c,), jnp.int32), sampling, opts)
  hit_stop = _is_stop(chosen, sampling.stop_ids)
  return Slots(
      k=k, v=v, lengths=slots.lengths.at[where].set(lengths), last=slots.last.at[where].set(chosen),
      steps=slots.steps.at[where].set(1), done=slots.done.at[where].set(hit_stop | (opts.max_new_tokens <= 1)),
      stopped=slots.stopped.at[where].set(hit_stop), keys=slots.keys.at[where].set(keys),
      tokens=slots.tokens.at[where, 0].set(chosen),
      recorded=tuple(buf.at[where, 0].set(r) for buf, r in zip(slots.recorded, recorded)))


def _slot_layer(p: dict[str, jax.Array], x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *,
                layer: jax.Array | None, write_at: jax.Array, valid: jax.Array, positions: jax.Array,
                inv_freq: jax.Array, config, dtype, lora_scale: float,
                kernel_rope: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decoder layer for one token per slot [S, 1, D]: (x, k_cache, v_cache) with this token written.

  The math of `model.decoder_layer`, ordered for slots: the token's key and value go into the cache at each
  slot's own position first, and attention then reads the cache alone (`valid` includes the new position).
  Writing before reading lets XLA update the loop-carried cache in place; reading first (as decoder_layer's
  cache-plus-current form does) makes it copy every layer's cache on every step. The caches are this layer's
  keys [S, kv_heads, head_dim, W] and values [S, kv_heads, W, head_dim], or with `layer` (scanned layout) every
  layer's, stacked and both [L, S, kv_heads, W, head_dim], carried through the scan.
  Why the unrolled (CPU) keys are transposed: XLA:CPU runs a batched dot as one small GEMM per (slot, kv head),
  and keys stored [W, head_dim] make each scores product transpose its right operand (~2.5x a plain one). The
  gain, measured whole with bench_decode interleaved against the untransposed form: about 3% (AMD EPYC, 2 cores).
  With `kernel_rope` (the CPU kernels: cos and sin of each slot's position) the layer is
  `decode_weights.kernel_layer`, its keys in blocks (`cpu_kernels.block_keys`; `write_at` -1: a finished slot).
  """
  if kernel_rope is not None:
    return decode_weights.kernel_layer(p, x, k_cache, v_cache, write_at=write_at, cos=kernel_rope[0],
                                       sin=kernel_rope[1], config=config)
  b = x.shape[0]
  n_kv, groups, head_dim = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
  rows = jnp.arange(b)
  h = model_lib.rms_norm(x, p["attn_norm"], config.rms_norm_eps)
  q = model_lib.apply_rope(model_lib.project(h, p, "wq", dtype, lora_scale), positions, inv_freq)
  k = model_lib.apply_rope(model_lib.project(h, p, "wk", dtype, lora_scale), positions, inv_freq)
  v = model_lib.project(h, p, "wv", dtype, lora_scale)
  if layer is None:  # unrolled: keys [S, kv_heads, head_dim, W]
    k_cache = k_cache.at[rows, :, :, write_at].set(k[:, 0].astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, :, write_at].set(v[:, 0].astype(v_cache.dtype), mode="drop")
    keys, values = k_cache, v_cache
    score_spec = "bgmk,bgkt->bgmt"
  else:
    at = (layer, rows, slice(None), write_at)
    k_cache = k_cache.at[at].set(k[:, 0].astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[at].set(v[:, 0].astype(v_cache.dtype), mode="drop")
    keys, values = k_cache[layer], v_cache[layer]
    score_spec = "bgmk,bgtk->bgmt"
  q = q.reshape(b, n_kv, groups, head_dim)  # query head g * groups + m shares kv head g
  scores = jnp.einsum(score_spec, q, keys.astype(dtype), preferred_element_type=jnp.float32)
  scores = jnp.where(valid[:, None, None, :], scores * head_dim ** -0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  attn = jnp.einsum("bgmt,bgtk->bgmk", probs.astype(dtype), values.astype(dtype))
  x = x + model_lib.project(attn.reshape(b, 1, config.num_heads, head_dim), p, "wo", dtype, lora_scale)
  h = model_lib.rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
  gate = model_lib.project(h, p, "w_gate", dtype, lora_scale)
  up = model_lib.project(h, p, "w_up", dtype, lora_scale)
  x = x + model_lib.project(jax.nn.silu(gate) * up, p, "w_down", dtype, lora_scale)
  return x, k_cache, v_cache


def _decode_step(model: Llama, layers, slots: Slots, sampling: _Sampling, opts: DecodeOptions) -> Slots:
  """One token for every live slot: feed `last` at position `lengths`, write its keys and values, choose next."""
  config, dtype = model.config, model.dtype
  num_slots, window = slots.lengths.shape[0], window_of(slots)
  live = ~slots.done
  rows = jnp.arange(num_slots)
  inv_freq = jnp.asarray(model_lib.rope_inv_freq(config))
  kernel_rope = None
  if layers is not None and layers.uses_cpu_kernels:  # the rotary angles of every slot's position, once per step
    angles = slots.lengths.astype(jnp.float32)[:, None] * inv_freq
    kernel_rope = (jnp.cos(angles), jnp.sin(angles))
  layer = functools.partial(
      # finished slots write nowhere: past the window (dropped by XLA's scatter), or -1 for the CPU kernel
      _slot_layer, write_at=jnp.where(live, slots.lengths, -1 if kernel_rope is not None else window),
      valid=jnp.arange(window)[None, :] <= slots.lengths[:, None], positions=slots.lengths[:, None],
      inv_freq=inv_freq, config=config, dtype=dtype, lora_scale=model.lora_scale, kernel_rope=kernel_rope)
  x = jnp.take(model.embed[...], slots.last[:, None], axis=0).astype(dtype)
  if layers is not None:  # unrolled: per-layer arrays, updated in place
    k, v = list(slots.k), list(slots.v)
    for i, p in enumerate(layers.layers):
      x, k[i], v[i] = layer(p, x, k[i], v[i], layer=None)
    k, v = tuple(k), tuple(v)
  else:  # scanned: the stacked caches ride in the carry, so each step writes one token per layer in place
    def body(carry, xs):
      p, index = xs
      return layer(p, *carry, layer=index), None
    (x, k_all, v_all), _ = jax.lax.scan(body, (x, slots.k[0], slots.v[0]),
                                        (model.layers.arrays(), jnp.arange(config.num_layers)))
    k, v = (k_all,), (v_all,)
  hidden = model_lib.rms_norm(x, model.final_norm[...], config.rms_norm_eps)
  logits = decode_weights.last_logits(model, layers, hidden)
  chosen, recorded = _choose_and_measure(logits, slots.keys, slots.steps, sampling, opts)
  chosen = jnp.where(live, chosen, opts.pad_id)
  record_at = jnp.where(live, slots.steps, opts.max_new_tokens)  # dropped for finished slots
  hit_stop = live & _is_stop(chosen, sampling.stop_ids)
  steps = slots.steps + live.astype(jnp.int32)
  return Slots(
      k=k, v=v, lengths=slots.lengths + live.astype(jnp.int32), last=chosen, steps=steps,
      done=slots.done | hit_stop | (steps >= opts.max_new_tokens), stopped=slots.stopped | hit_stop,
      keys=slots.keys, tokens=slots.tokens.at[rows, record_at].set(chosen, mode="drop"),
      recorded=tuple(buf.at[rows, record_at].set(r, mode="drop") for buf, r in zip(slots.recorded, recorded)))


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"), donate_argnames=("slots",))
def decode_block(graphdef: nnx.GraphDef, state: nnx.State, layers, slots: Slots, exit_when_done: jax.Array,
                 sampling: _Sampling, opts: DecodeOptions) -> Slots:
  """Decode steps until `exit_when_done` slots are done, every slot is done, or a live slot's window is full."""
  model = nnx.merge(graphdef, state)
  window = window_of(slots)

  def keep_going(slots: Slots):
    room = jnp.all(slots.done | (slots.lengths < window))
    return (jnp.sum(slots.done) < exit_when_done) & ~jnp.all(slots.done) & room

  return jax.lax.while_loop(keep_going, lambda s: _decode_step(model, layers, s, sampling, opts), slots)


def resize_window(slots: Slots, window: int, layout: CacheLayout) -> Slots:
  """The same slots (keys in `layout`) in a window of `window` positions (every slot's tokens must fit)."""
  k, v = _resize_caches((slots.k, slots.v), window=window, key_layout=layout)
  return slots._replace(k=k, v=v)


# Not donated: a cache of another window cannot reuse the old buffers (XLA would only warn that it did not).
@functools.partial(jax.jit, static_argnames=("window", "key_layout"))
def _resize_caches(caches, window: int, key_layout: CacheLayout):
  def fit(a, axis, size):
    have = a.shape[axis]
    if size <= have:
      return jax.lax.slice_in_dim(a, 0, size, axis=axis)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - have)
    return jnp.pad(a, pad)
  k, v = caches
  key_axis, key_size = {CacheLayout.TRANSPOSED: (3, window), CacheLayout.STACKED: (3, window),
                        CacheLayout.BLOCKED: (2, cpu_kernels.key_blocks(window))}[key_layout]
  return tuple(fit(a, key_axis, key_size) for a in k), tuple(fit(a, a.ndim - 2, window) for a in v)


# ----------------------------------------------------------------------------- the host loop

def _chunk_size(free: int, waiting: int, limit: int) -> int:
  """Prompts prefilled together: the largest power of two within the free slots, the queue and the limit."""
  n = min(free, waiting, limit)
  return 1 << (n.bit_length() - 1)


def run(model: Llama, prompts: Sequence[Sequence[int]], example_ids: Sequence[int], sampling: SamplingConfig, *,
        stop_ids: Sequence[int], pad_id: int, num_slots: int, topk_logprobs: int, length_bucket: int,
        tail_temperatures: tuple[float, ...] = (), progress: ProgressCallback | None = None,
        on_finish: FinishCallback | None = None, window_bucket: int = 128,
        prefill_chunk: int = PREFILL_CHUNK, unrolled: bool | None = None, few_programs: bool = False,
        continuations: Sequence[Sequence[int]] | None = None) -> list[Generation]:
  """Generates every prompt with `num_slots` decode slots (inputs already checked by `generation.generate`).

  Free slots take prompts up to `prefill_chunk` at a time, in chunks of a power of two (a refill is usually one
  prompt, as in JetStream; on CPU four 150-token prompts prefill ~12% faster per prompt together than alone);
  prompts enter shortest first (a chunk's prompts then share a length bucket). `on_finish(index, generation)`
  is called for each prompt as soon as it is finished.
  `window_bucket` rounds the cache window; `unrolled` picks the layer layout (default: on CPU).
  `few_programs`: when every prompt fits in the slots at once (one wave), the window is the final one from the
  start and every prefill chunk is padded to the longest prompt's bucket, so one decode, one prefill and one
  insert program compile and no cache is resized: for callers that run each program once (an evaluation arm, a
  new model), where compiling a program per window and length bucket (~2-4 s each) cost more than it saved.
  `continuations` (one per prompt, may be empty): each is scored teacher-forced after its prompt in the same
  prefill (`prefill`), and the prompt's Generation carries the summed NLL and token count; the prefill's rows
  are prompt + continuation (bucketed), but only the prompts' keys and values reach the slots, so windows,
  insert and decode are those of the prompts alone.
  """
  unrolled = unrolled_layers_default() if unrolled is None else unrolled
  n = sampling.max_new_tokens
  opts = DecodeOptions(max_new_tokens=n, greedy=sampling.greedy, top_k=sampling.top_k,
                        use_top_p=sampling.top_p < 1.0, topk_logprobs=topk_logprobs, pad_id=pad_id,
                        tail_temperatures=tail_temperatures)
  # Stop ids padded with -1 (never a token) to a multiple of 8, so their number rarely forces a recompile.
  stop_array = np.full(round_up(max(len(stop_ids), 1), 8), -1, np.int32)
  stop_array[:len(stop_ids)] = list(stop_ids)
  # A mesh over several processes' devices: inputs go in as global arrays, reads come back replicated (module
  # docstring); None on a process-local mesh, where both are the plain local calls.
  spanning = model_mesh(model)
  spanning = spanning if parallel.spans_processes(spanning) else None
  feed = functools.partial(_feed, mesh=spanning)
  values = _Sampling(seed=feed(np.uint32(sampling.seed)), temperature=feed(np.float32(sampling.temperature)),
                     top_p=feed(np.float32(sampling.top_p)), stop_ids=feed(stop_array))
  graphdef, state = nnx.split(model)
  layers = layer_params(model, unrolled)

  scored = continuations is not None
  continuations = [list(c) for c in continuations] if scored else [[] for _ in prompts]
  # The one scoring window of every prefill (one compiled program): the longest continuation, bucketed.
  score_window = round_up(max(1, *map(len, continuations)), length_bucket) if scored else 0
  prefilled = [list(p) + c for p, c in zip(prompts, continuations)]  # what each prefill row holds
  nll_sums: dict[int, tuple[jax.Array, int]] = {}  # prompt -> (its chunk's NLL sums on device, its row)
  # Shortest prompts first: a chunk's prompts then share a length bucket (continuations change no schedule).
  queue = collections.deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
  held: list[int | None] = [None] * num_slots  # the prompt in each slot
  results: list[Generation | None] = [None] * len(prompts)
  fixed_window = few_programs and len(prompts) <= num_slots
  longest, longest_prefill = max(map(len, prompts)), max(map(len, prefilled))
  if fixed_window:  # the longest prompt's bucket and every new token
    window = round_up(max(round_up(longest, length_bucket) + 1, longest + n), window_bucket)
  else:
    window = round_up(len(prompts[queue[0]]) + 1, window_bucket)
  layout = CacheLayout.choose(layers)  # once: every program below keeps it
  slots = _committed_like_outputs(empty_slots(model, num_slots, window, opts, layout), model)
  lengths = np.zeros(num_slots, np.int64)  # host copy of slots.lengths as of the last block
  start, tokens_done, examples_done = time.perf_counter(), 0, 0

  def fit_window(needed: int, shrink: bool) -> None:
    """Grows (or, when refilling, shrinks) the window to `needed` positions rounded up to the bucket."""
    nonlocal slots, window
    wanted = round_up(needed, window_bucket)
    if wanted > window or (shrink and wanted < window):
      slots, window = resize_window(slots, window=wanted, layout=layout), wanted

  while queue or any(h is not None for h in held):
    free = [s for s in range(num_slots) if held[s] is None]
    while free and queue:
      c = _chunk_size(len(free), len(queue), prefill_chunk)
      members = [queue.popleft() for _ in range(c)]
      where, free = free[:c], free[c:]
      # few_programs, one wave: every chunk at the longest prompt's bucket (one prefill and insert compile).
      length = round_up(longest if fixed_window else max(len(prompts[i]) for i in members), length_bucket)
      # The prefill's rows: prompt + continuation (the cache keeps the prompts' `length` positions).
      prefill_length = round_up(longest_prefill if fixed_window else max(len(prefilled[i]) for i in members),
                                length_bucket)
      ids = np.full((c, prefill_length), pad_id, np.int32)
      for row, i in enumerate(members):
        ids[row, :len(prefilled[i])] = prefilled[i]
      real = np.asarray([len(prompts[i]) for i in members], np.int32)
      live = [lengths[s] for s in range(num_slots) if held[s] is not None]
      fit_window(max(live + [length]) + 1, shrink=not fixed_window)
      empty = KVCache.init(model.config, c, prefill_length, model.dtype) if _prefills_scanned(layers) else None
      scored_lengths = feed(np.asarray([len(continuations[i]) for i in members], np.int32)) if scored else None
      # Positional, score_window included (static by name): tests wrap prefill in lambdas of positional args.
      k, v, logits, sums = prefill(graphdef, state, layers, feed(ids), feed(real), empty, scored_lengths,
                                   score_window, length if scored else None)
      if scored:  # read when the prompt finishes, so the host does not wait for the prefill here
        nll_sums.update((i, (sums, row)) for row, i in enumerate(members))
      slots = insert(slots, feed(np.asarray(where, np.int32)), k, v, logits, feed(real),
                     feed(np.asarray([example_ids[i] for i in members], np.int32)), values, opts=opts, layout=layout)
      for s, i, length_i in zip(where, members, real):
        held[s], lengths[s] = i, length_i
    done = _host_read(slots.done, spanning)
    exit_when = int(done.sum()) + 1 if queue else num_slots
    while True:
      if not done.all():
        fit_window(int(max(lengths[s] for s in range(num_slots) if not done[s])) + 1, shrink=False)
        slots = decode_block(graphdef, state, layers, slots, feed(np.int32(exit_when)), values, opts=opts)
      done, lengths = _host_read((slots.done, slots.lengths), spanning)
      lengths = lengths.astype(np.int64)
      if done.sum() >= exit_when or done.all():
        break  # else a slot filled the window: grow it and go on
    finished = [s for s in range(num_slots) if held[s] is not None and done[s]]
    if not finished:
      continue
    # Only the finished rows leave the device (padded to a power of two, so few gathers compile).
    picked = finished + finished[:1] * ((1 << (len(finished) - 1).bit_length()) - len(finished))
    tokens, steps, stopped, recorded = jax.device_get(_take_rows(
        (slots.tokens, slots.steps, slots.stopped, slots.recorded), feed(np.asarray(picked, np.int32)),
        mesh=spanning))
    for row, s in enumerate(finished):
      count = int(steps[row])
      results[held[s]] = _generation(tokens[row, :count], bool(stopped[row]), [r[row, :count] for r in recorded])
      if scored:
        sums, at = nll_sums.pop(held[s])
        results[held[s]].continuation_nll = float(_host_read(sums, spanning)[at])
        results[held[s]].continuation_tokens = len(continuations[held[s]])
      tokens_done += count
      examples_done += 1
      if on_finish is not None:
        on_finish(held[s], results[held[s]])
      held[s] = None
    if progress is not None:
      progress(tokens_done, time.perf_counter() - start, examples_done, len(prompts))
  return results  # type: ignore[return-value]


def _committed_like_outputs(slots: Slots, model: Llama) -> Slots:
  """`slots` with the placement the compiled programs give their outputs, when the model sits on a mesh of one
  device (`place_slots` leaves such slots as created): uncommitted inputs would make the first `insert` compile
  a program of its own, once for the first prefill and again for every later one."""
  sharding = getattr(model.embed.get_value(), "sharding", None)
  if model_mesh(model) is not None or not isinstance(sharding, NamedSharding):
    return slots
  return jax.device_put(slots, NamedSharding(sharding.mesh, PartitionSpec()))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _take_rows(arrays, rows: jax.Array, mesh: Mesh | None = None):
  """The slot rows `rows` of every array; with `mesh` (one spanning processes) replicated, so every host reads them."""
  taken = jax.tree.map(lambda a: a[rows], arrays)
  return taken if mesh is None else _replicate(taken, mesh)


def _generation(tokens: np.ndarray, stopped: bool, recorded: list[np.ndarray]) -> Generation:
  """A finished slot's response; `recorded` are sampling.topk_logprobs's outputs, in its order."""
  gen = Generation(tokens=tokens.tolist(), finish_reason="stop" if stopped else "length")
  if recorded:
    ids, logprobs, tail, tail_log_mass = recorded
    gen.topk_ids = np.asarray(ids, np.int32)
    gen.topk_logprobs = np.asarray(logprobs, np.float32)
    gen.tail_mass = np.asarray(tail, np.float32)
    gen.tail_log_mass = np.asarray(tail_log_mass, np.float32)
  return gen
