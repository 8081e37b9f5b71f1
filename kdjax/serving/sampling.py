"""The pieces of autoregressive generation that the engine's compiled decode step uses: settings, the token choice
(greedy, temperature, top-k, top-p), top-k log-probs with their exact tails, and the decode options.

Sampling is reproducible per example: row i draws its token at step t with
`fold_in(fold_in(PRNGKey(seed), example_id_i), t)`, so results do not depend on batch size or composition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models.llama.model import Llama

FinishReason = Literal["stop", "length"]
# progress(tokens generated so far, seconds elapsed, examples done, examples in total)
ProgressCallback = Callable[[int, float, int, int], None]
# on_finish(index of the prompt in the list given, its Generation): called as soon as that prompt is finished
FinishCallback = Callable[[int, "Generation"], None]


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
  # With `continuations`: the summed NLL (nats, teacher-forced, T = 1) of the continuation after the prompt,
  # and its number of tokens; None when none was asked for.
  continuation_nll: float | None = None
  continuation_tokens: int | None = None


class DecodeOptions(NamedTuple):
  """Everything that changes the compiled decode program (hashable, passed as a static argument)."""
  max_new_tokens: int
  greedy: bool
  top_k: int
  use_top_p: bool
  topk_logprobs: int
  pad_id: int
  tail_temperatures: tuple[float, ...] = ()


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


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` whose results are materialised before use. XLA:CPU otherwise fuses the TopK into consumers that
  read the whole row (a threshold mask, a scatter over the vocabulary) and recomputes it inside their loops:
  `topk_logprobs` on [16, 49152] took 128 ms per call that way and takes 2 ms with the barrier, the same values.
  One barrier per result: one barrier over both (or over a TopK whose ids go unused) reaches XLA:CPU's
  TopkDecomposer as the TopK's direct user on a multi-device mesh, and it crashes there (a failed HLO cast)."""
  values, ids = jax.lax.top_k(x, k)
  return jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(ids)


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
  values, ids = _top_k(logits, k)
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


# Top-p alone first looks for the nucleus among this many most likely tokens (`filter_logits`).
TOP_P_CANDIDATES = 1024


def _nucleus_threshold(ordered: jax.Array, probs: jax.Array, top_p: jax.Array | float
                       ) -> tuple[jax.Array, jax.Array]:
  """(the smallest logit the nucleus keeps [B, 1], the probability of all of `ordered` [B]), from logits in
  descending order and their probabilities."""
  mass = jnp.cumsum(probs, axis=-1)
  kept = jnp.sum(mass - probs < top_p, axis=-1, keepdims=True)  # >= 1: the first mass before is 0 < top_p
  return jnp.take_along_axis(ordered, kept - 1, axis=-1), mass[:, -1]


def filter_logits(scaled: jax.Array, top_k: int, top_p: jax.Array | float, use_top_p: bool,
                  candidates: int = TOP_P_CANDIDATES) -> jax.Array:
  """Sets logits [B, V] outside the top-k and then the top-p nucleus to -inf (HF's order: k, then p).

  The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`; the most likely
  token is always kept. Ties with the last kept logit are kept too.

  Top-p without top-k needs the row in order only as far as the nucleus reaches: the `candidates` most likely
  tokens (`lax.top_k`) decide it whenever their probability reaches `top_p` in every row, and only otherwise
  (a flat distribution) is the whole row sorted (`lax.cond`). Both ways accumulate the same probabilities
  (normalised over the whole row) in the same order, so they keep the same tokens. On [16, 49152] (2-core CPU,
  loaded) a step took 200-260 ms with the full sort and 22-24 ms with 1024 candidates.
  """
  if top_k == 0 and not use_top_p:
    return scaled
  if top_k > 0:
    ordered = _top_k(scaled, min(top_k, scaled.shape[-1]))[0]
    threshold = (_nucleus_threshold(ordered, jax.nn.softmax(ordered, axis=-1), top_p)[0] if use_top_p
                 else ordered[:, -1:])
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)
  largest = jnp.max(scaled, axis=-1, keepdims=True)
  normaliser = jnp.sum(jnp.exp(scaled - largest), axis=-1, keepdims=True)
  probs_of = lambda ordered: jnp.exp(ordered - largest) / normaliser
  best = _top_k(scaled, min(candidates, scaled.shape[-1]))[0]
  threshold, best_mass = _nucleus_threshold(best, probs_of(best), top_p)

  def from_full_sort():
    ordered = jax.lax.optimization_barrier(-jnp.sort(-scaled, axis=-1))  # as in _top_k
    return _nucleus_threshold(ordered, probs_of(ordered), top_p)[0]

  # The candidates hold the nucleus when the mass before the first token outside them reaches top_p.
  threshold = jax.lax.cond(jnp.all(best_mass >= top_p), lambda: threshold, from_full_sort)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def greedy_tokens(logits: jax.Array) -> jax.Array:
  """`jnp.argmax(logits, axis=-1)` (the first maximum; the first NaN if a row has one) as plain reductions: XLA:CPU
  lowers argmax to a reduction over (value, index) pairs that does not vectorise, 1.7 ms on [16, 49152] against
  0.35 ms for a max and then the smallest index holding it (AMD EPYC, once per decode step)."""
  nan = jnp.isnan(logits)
  top = jnp.max(jnp.where(nan, -jnp.inf, logits), axis=-1, keepdims=True)
  hits = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == top)
  return jnp.min(jnp.where(hits, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def choose_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  opts: DecodeOptions) -> jax.Array:
  """Next token per row of `logits` [B, V]: argmax when greedy, else a filtered sample with key per row."""
  if opts.greedy:
    return greedy_tokens(logits)
  scaled = logits.astype(jnp.float32) / temperature
  filtered = filter_logits(scaled, opts.top_k, top_p, opts.use_top_p)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
