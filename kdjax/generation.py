"""Batched autoregressive generation with a KV cache, shared by the teacher and evaluation.

Prompts are grouped by length into batches, left-padded to a bucketed length (so only a few shapes compile),
prefilled in one jitted call, and decoded by a single jitted `jax.lax.while_loop` that stops as soon as every
row is done. Model parameters enter the compiled functions as arguments (`nnx.split`), never as constants.

Sampling is reproducible per example: row i draws its token at step t with
`fold_in(fold_in(PRNGKey(seed), example_id_i), t)`, so results do not depend on batch size or composition.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.models.llama.model import KVCache, Llama

FinishReason = Literal["stop", "length"]
# progress(tokens generated so far, seconds elapsed, examples done, examples in total)
ProgressCallback = Callable[[int, float, int, int], None]


class GenerationError(ValueError):
  """Bad input to `generate`: an empty or out-of-vocabulary prompt, mismatched ids, a bad setting."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen. temperature 0 means greedy (argmax); top_k 0 and top_p 1 disable filtering."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 512
  seed: int = 0

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise GenerationError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    if self.max_new_tokens < 1:
      raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not 0 <= self.seed < 2**32:
      raise GenerationError(f"seed must be in [0, 2**32), got {self.seed}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@dataclasses.dataclass
class Generation:
  """One response. With top-k log-probs, row j describes the distribution that produced `tokens[j]`."""
  tokens: list[int]                      # response ids, including the stop token that ended it
  finish_reason: FinishReason
  topk_ids: np.ndarray | None = None     # [n, k] int32
  topk_logprobs: np.ndarray | None = None  # [n, k] float32, log-softmax at temperature 1
  tail_mass: np.ndarray | None = None    # [n] float32: probability outside the top k
  tail_log_mass: np.ndarray | None = None  # [n, len(tail_temperatures)] float32: log tail mass at each T


class _DecodeOptions(NamedTuple):
  """Everything that changes the compiled decode program (hashable, passed as a static argument)."""
  max_new_tokens: int
  greedy: bool
  top_k: int
  use_top_p: bool
  topk_logprobs: int
  pad_id: int
  tail_temperatures: tuple[float, ...] = ()


class _DecodeResult(NamedTuple):
  tokens: jax.Array         # [B, N] int32, pad after a row is done
  lengths: jax.Array        # [B] int32: response tokens per row
  stopped: jax.Array        # [B] bool: ended by a stop token
  topk_ids: jax.Array       # [B, N, k] int32 (k may be 0)
  topk_logprobs: jax.Array  # [B, N, k] float32
  tail_mass: jax.Array      # [B, N] float32 (N=0 when k=0)
  tail_log_mass: jax.Array  # [B, N, len(tail_temperatures)] float32


# ----------------------------------------------------------------------------- pure pieces

def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads `prompts` to `length`: (ids [B, length] int32, mask [B, length] bool, True on real tokens)."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    if len(prompt) > length:
      raise GenerationError(f"prompt of {len(prompt)} tokens does not fit in length {length}")
    if len(prompt):
      ids[row, length - len(prompt):] = prompt
      mask[row, length - len(prompt):] = True
  return ids, mask


def last_logits(model: Llama, hidden: jax.Array) -> jax.Array:
  """Float32 logits [B, V] of the last position of `hidden` [B, S, D], computed like `model.forward` does."""
  return jnp.einsum("bd,dv->bv", hidden[:, -1], model.lm_head_weight().astype(model.dtype),
                    preferred_element_type=jnp.float32)


def topk_logprobs(logits: jax.Array, k: int, tail_temperatures: Sequence[float] = ()
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Top-k of log-softmax(logits) [B, V], the probability left outside them, and its log at other temperatures.

  Returns (ids [B, k], log-probs [B, k] at temperature 1, tail [B] at temperature 1, tail_log_mass [B, n]):
  tail_log_mass[:, j] = log of the mass that softmax(logits / T_j) puts outside the same k ids, for T_j in
  `tail_temperatures`. The top-k log-probs at T = 1 and the tail at T fix the tempered distribution over
  (k ids, rest) exactly (see kdjax.distill.losses); the tail at T is not a function of the top-k alone.

  Tails are computed as log_sigmoid(logsumexp(rest) - logsumexp(top k)) of max-shifted logits rather than as
  1 - sum(top-k probs), so they keep their precision both when the top k hold nearly all the mass (tiny
  tail) and when they hold little of it (tail near 1, as at high temperatures).
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logits = logits.astype(dtype)
  values, ids = jax.lax.top_k(logits, k)
  # Relative to the largest logit (<= 0), so the log-normalisers below are small numbers with small rounding:
  # real logits reach 30-40, where float32 itself is only good to ~4e-6.
  shifted = logits - values[:, :1]
  total = jax.nn.logsumexp(shifted, axis=-1)
  rows = jnp.arange(logits.shape[0])[:, None]
  rest = shifted.at[rows, ids].set(-jnp.inf)
  top = values - values[:, :1]

  def log_tail(temperature: float) -> jax.Array:
    return jax.nn.log_sigmoid(jax.nn.logsumexp(rest / temperature, axis=-1)
                              - jax.nn.logsumexp(top / temperature, axis=-1))

  tail = jnp.exp(log_tail(1.0))
  tempered = jnp.stack([log_tail(t) for t in tail_temperatures], axis=-1) if tail_temperatures else \
      jnp.zeros((logits.shape[0], 0), dtype)
  return ids.astype(jnp.int32), top - total[:, None], tail, tempered


def filter_logits(scaled: jax.Array, top_k: int, top_p: jax.Array | float, use_top_p: bool) -> jax.Array:
  """Sets logits [B, V] outside the top-k and then the top-p nucleus to -inf (HF's order: k, then p).

  The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`; the most likely
  token is always kept. Ties with the last kept logit are kept too.
  """
  if top_k == 0 and not use_top_p:
    return scaled
  if top_k > 0:
    ordered = jax.lax.top_k(scaled, min(top_k, scaled.shape[-1]))[0]
  else:
    ordered = -jnp.sort(-scaled, axis=-1)
  if use_top_p:
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0 < top_p
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
  else:
    threshold = ordered[:, -1:]
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def choose_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  opts: _DecodeOptions) -> jax.Array:
  """Next token per row of `logits` [B, V]: argmax when greedy, else a filtered sample with key per row."""
  if opts.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / temperature
  filtered = filter_logits(scaled, opts.top_k, top_p, opts.use_top_p)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


# ----------------------------------------------------------------------------- compiled functions

@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array,
             cache: KVCache) -> tuple[KVCache, jax.Array]:
  """Runs the left-padded prompts through the model: (cache holding them, logits [B, V] of the last slot).

  The empty cache comes in as an argument: built inside the jit it would be a constant, and XLA would spend
  minutes constant-folding attention over it.
  """
  model = nnx.merge(graphdef, state)
  out = model.forward(ids, attention_mask=mask, cache=cache, cache_is_empty=True, return_logits=False)
  return out.cache, last_logits(model, out.hidden)


def _step(model: Llama, cache: KVCache, tokens: jax.Array) -> tuple[jax.Array, KVCache]:
  """Feeds one token per row [B]: (logits [B, V] for the next one, updated cache)."""
  out = model.forward(tokens[:, None], attention_mask=jnp.ones((tokens.shape[0], 1), bool), cache=cache,
                      return_logits=False)
  return last_logits(model, out.hidden), out.cache


_step_jit = jax.jit(lambda graphdef, state, cache, tokens: _step(nnx.merge(graphdef, state), cache, tokens),
                    static_argnums=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _decode(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, first_logits: jax.Array,
            example_ids: jax.Array, seed: jax.Array, temperature: jax.Array, top_p: jax.Array,
            stop_ids: jax.Array, opts: _DecodeOptions) -> _DecodeResult:
  """The whole decode loop: chooses token t from the logits of step t-1, stops when every row is done."""
  model = nnx.merge(graphdef, state)
  b, n, k = first_logits.shape[0], opts.max_new_tokens, opts.topk_logprobs
  base_key = jax.random.PRNGKey(seed)
  row_keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(example_ids)

  def record(result: _DecodeResult, done: jax.Array, logits: jax.Array, step: jax.Array):
    keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
    chosen = choose_tokens(logits, keys, temperature, top_p, opts)
    active = ~done
    chosen = jnp.where(active, chosen, opts.pad_id)
    hit_stop = active & jnp.any(chosen[:, None] == stop_ids[None, :], axis=-1)
    tokens = jax.lax.dynamic_update_index_in_dim(result.tokens, chosen, step, axis=1)
    result = result._replace(tokens=tokens, lengths=result.lengths + active.astype(jnp.int32),
                             stopped=result.stopped | hit_stop)
    if k:
      ids, logprobs, tail, tail_log_mass = topk_logprobs(logits, k, opts.tail_temperatures)
      result = result._replace(
          topk_ids=jax.lax.dynamic_update_index_in_dim(result.topk_ids, ids, step, axis=1),
          topk_logprobs=jax.lax.dynamic_update_index_in_dim(result.topk_logprobs, logprobs, step, axis=1),
          tail_mass=jax.lax.dynamic_update_index_in_dim(result.tail_mass, tail, step, axis=1),
          tail_log_mass=jax.lax.dynamic_update_index_in_dim(result.tail_log_mass, tail_log_mass, step, axis=1))
    return result, done | hit_stop, chosen

  empty = _DecodeResult(
      tokens=jnp.full((b, n), opts.pad_id, jnp.int32), lengths=jnp.zeros((b,), jnp.int32),
      stopped=jnp.zeros((b,), bool), topk_ids=jnp.zeros((b, n, k), jnp.int32),
      topk_logprobs=jnp.zeros((b, n, k), jnp.float32), tail_mass=jnp.zeros((b, n if k else 0), jnp.float32),
      tail_log_mass=jnp.zeros((b, n if k else 0, len(opts.tail_temperatures) if k else 0), jnp.float32))
  result, done, last = record(empty, jnp.zeros((b,), bool), first_logits, jnp.int32(0))

  def keep_going(carry):
    _, _, done, _, step = carry
    return (step < n) & ~jnp.all(done)

  def one_token(carry):
    result, cache, done, last, step = carry
    logits, cache = _step(model, cache, last)
    result, done, last = record(result, done, logits, step)
    return result, cache, done, last, step + 1

  result, *_ = jax.lax.while_loop(keep_going, one_token, (result, cache, done, last, jnp.int32(1)))
  return result


# ----------------------------------------------------------------------------- driver

def _batch_rows(n: int, batch_size: int) -> int:
  """Rows of a batch holding `n` prompts: `batch_size`, or the next power of two for a short last batch."""
  if n >= batch_size:
    return batch_size
  return min(batch_size, 1 << (n - 1).bit_length())


def _check_inputs(model: Llama, prompts: Sequence[Sequence[int]], example_ids: Sequence[int] | None,
                  stop_ids: Sequence[int], pad_id: int, batch_size: int, topk: int) -> list[int]:
  vocab = model.config.vocab_size
  if batch_size < 1:
    raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= topk <= vocab:
    raise GenerationError(f"topk_logprobs must be in [0, {vocab}], got {topk}")
  if not 0 <= pad_id < vocab:
    raise GenerationError(f"pad_id {pad_id} is outside the vocabulary [0, {vocab})")
  bad_stop = [s for s in stop_ids if not 0 <= s < vocab]
  if bad_stop:
    raise GenerationError(f"stop ids {bad_stop} are outside the vocabulary [0, {vocab})")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise GenerationError(f"prompt {i} is empty")
    if min(prompt) < 0 or max(prompt) >= vocab:
      raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
  if example_ids is None:
    return list(range(len(prompts)))
  if len(example_ids) != len(prompts):
    raise GenerationError(f"got {len(example_ids)} example_ids for {len(prompts)} prompts")
  if any(not 0 <= int(e) < 2**31 for e in example_ids):
    raise GenerationError("example_ids must be in [0, 2**31)")
  return [int(e) for e in example_ids]


def generate(model: Llama, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
             stop_ids: Sequence[int], pad_id: int, example_ids: Sequence[int] | None = None,
             batch_size: int = 16, topk_logprobs: int = 0, tail_temperatures: Sequence[float] = (),
             progress: ProgressCallback | None = None, length_bucket: int = 64) -> list[Generation]:
  """Generates a response for every prompt (token ids, without padding), in the order given.

  stop_ids end a row (the stop token is kept in `tokens`); `pad_id` fills finished rows and padding.
  `example_ids` (default: the prompt indices) seed each row's sampling key. With `topk_logprobs=k`, each
  Generation carries the top-k log-probs (temperature 1) of the distribution behind every response token,
  its tail mass, and the log of the tail mass at each of `tail_temperatures` (see `topk_logprobs`).
  `progress(tokens, elapsed_s, examples_done, examples_total)` is called after every batch.
  Prompt lengths round up to a multiple of `length_bucket`, so few prompt shapes compile.
  """
  if length_bucket < 1:
    raise GenerationError(f"length_bucket must be >= 1, got {length_bucket}")
  ids_of_example = _check_inputs(model, prompts, example_ids, stop_ids, pad_id, batch_size, topk_logprobs)
  results: list[Generation | None] = [None] * len(prompts)
  if not prompts:
    return []
  graphdef, state = nnx.split(model)
  opts = _DecodeOptions(max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy, top_k=sampling.top_k,
                        use_top_p=sampling.top_p < 1.0, topk_logprobs=topk_logprobs, pad_id=pad_id,
                        tail_temperatures=tuple(float(t) for t in tail_temperatures))
  # Padded with -1 (never a token) to a multiple of 8, so the number of stop ids rarely forces a recompile.
  stop_array = np.full(round_up(max(len(stop_ids), 1), 8), -1, np.int32)
  stop_array[:len(stop_ids)] = list(stop_ids)
  # Similar lengths share a batch, so little compute goes to padding; results return to the caller's order.
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  start, tokens_done = time.perf_counter(), 0
  for first in range(0, len(order), batch_size):
    members = order[first:first + batch_size]
    rows = _batch_rows(len(members), batch_size)
    # Filler rows repeat the first prompt; their outputs are dropped.
    batch_prompts = [prompts[i] for i in members] + [prompts[members[0]]] * (rows - len(members))
    batch_examples = [ids_of_example[i] for i in members] + [0] * (rows - len(members))
    length = round_up(max(len(p) for p in batch_prompts), length_bucket)
    ids, mask = left_pad(batch_prompts, length, pad_id)
    empty = KVCache.init(model.config, rows, length + sampling.max_new_tokens, model.dtype)
    cache, logits = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), empty)
    out = _decode(graphdef, state, cache, logits, jnp.asarray(batch_examples, jnp.int32),
                  jnp.uint32(sampling.seed), jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
                  jnp.asarray(stop_array), opts=opts)
    out = jax.device_get(out)
    for row, index in enumerate(members):
      n = int(out.lengths[row])
      gen = Generation(tokens=out.tokens[row, :n].tolist(),
                       finish_reason="stop" if out.stopped[row] else "length")
      if topk_logprobs:
        gen.topk_ids = np.asarray(out.topk_ids[row, :n], np.int32)
        gen.topk_logprobs = np.asarray(out.topk_logprobs[row, :n], np.float32)
        gen.tail_mass = np.asarray(out.tail_mass[row, :n], np.float32)
        gen.tail_log_mass = np.asarray(out.tail_log_mass[row, :n], np.float32)
      results[index] = gen
      tokens_done += n
    if progress is not None:
      progress(tokens_done, time.perf_counter() - start, first + len(members), len(prompts))
  return results  # type: ignore[return-value]
