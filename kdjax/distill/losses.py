"""Distillation divergences between a sparse top-k teacher and a dense student, chunked over tokens.

Conventions (all divergences are per position, over the vocabulary, in nats):

* ``p`` is the TEACHER distribution and ``q`` the STUDENT distribution.
* forward KL = KL(p || q) = sum p log(p / q)  (mean-seeking; classic Hinton KD).
  reverse KL = KL(q || p) = sum q log(q / p)  (mode-seeking).
* generalized JSD(beta) has the GKD paper (arXiv 2306.13649, Eq. 1) / TRL ``generalized_jsd_loss`` meaning
  of beta: beta is the TEACHER's weight in the mixture ``m = beta * p + (1 - beta) * q`` and
  ``JSD(beta) = beta * KL(p || m) + (1 - beta) * KL(q || m)``. As in TRL the end points are special-cased:
  beta = 0 is forward KL(p || q) and beta = 1 is reverse KL(q || p). (The mixture formula itself goes to 0
  at both ends, so the family is discontinuous there, exactly like TRL's.)
* skew forward KL(alpha) = KL(p || alpha * p + (1 - alpha) * q);
  skew reverse KL(alpha) = KL(q || alpha * q + (1 - alpha) * p)  (DistiLLM, arXiv 2402.03898).
  alpha = 0 is plain forward / reverse KL.
* total variation = 0.5 * sum |p - q|.
* Temperature T tempers both sides: the student is ``softmax(logits / T)`` over the full vocabulary, the
  teacher is ``softmax(teacher logits / T)``, coarse-grained exactly as described below. With
  ``scale_by_t2`` the KD term is multiplied by T**2 so its gradient scale stays comparable across
  temperatures.
* Cross-entropy is ``-log q(target)`` at T = 1 on ``target_ids`` (the teacher's response tokens or gold
  solution tokens: the data decides).
* ``total = (1 - ce_weight) * KD + ce_weight * CE``, each a mean over loss tokens (see ``total_loss``).

Sparse teacher. The teacher gives ``teacher_ids [..., k]``, ``teacher_logprobs [..., k]`` (full-vocabulary
log-probs ``lp(i)`` of those ids at T = 1) and optionally ``teacher_log_tail [...]``: the log of the mass that the
teacher's distribution AT THE LOSS TEMPERATURE T puts outside the k ids. ``LossConfig.topk_mode`` picks how
the student is compared with it:

* "renormalize": both distributions are restricted to the k ids and renormalised there. At any T this is
  the exact restriction of the tempered teacher: ``p_T(i) / sum_K p_T`` = ``softmax_K(lp / T)``.
* "tail": k + 1 buckets, the k ids plus one "rest of vocabulary" bucket; both sides are the full tempered
  distributions coarse-grained onto these buckets, exactly, at any T:

  - student: exact tempered log-probabilities of the k ids from its full logits; the rest bucket is a
    logsumexp over the other ids (not ``1 - sum`` of the k probabilities, which is rounding noise when the k
    ids hold nearly all the mass); the normaliser is ``logaddexp`` of the two, so the buckets sum to 1.
  - teacher: with logits z, ``lp(i) = z_i - logsumexp(z)``, so
    ``log p_T(i) = z_i / T - logsumexp(z / T) = lp(i) / T - logsumexp_V(lp / T)``. The normaliser runs over the
    FULL vocabulary and cannot be recovered from the top-k: that is what the stored tail supplies. With
    ``tail_T`` = mass of p_T outside the k ids, ``sum_K exp(lp / T - N_T) = 1 - tail_T``, hence
    ``N_T = logsumexp_K(lp / T) - log(1 - tail_T)`` and ``log p_T(i) = log_softmax_K(lp / T)(i) + log(1 - tail_T)``,
    rest bucket = ``tail_T``. The buckets sum to 1 by construction.

  Scheme: the teacher store keeps, per response token, the tail's log-mass at each temperature named in
  ``teacher.tail_temperatures`` (default 1 and ``distill.temperature``), computed from the full logits inside
  the jitted decode step (``kdjax.serving.generation.topk_logprobs``); the batch carries ``teacher_log_tail`` at the
  loss temperature. It is exact, costs one logsumexp over the vocabulary per temperature at generation time and
  4 bytes per token and temperature in the store, and needs nothing of the teacher's distribution inside the
  tail, which a top-k store cannot know: the old ``tail ** (1 / T)`` (tempering the tail as one lump)
  disagrees with the student's token-by-token tempered tail by orders of magnitude at T = 5.94. Without
  ``teacher_log_tail`` the T = 1 tail ``1 - sum exp(lp)`` is used, which is only right at T = 1; other
  temperatures then raise. Tails travel as log-masses, which float32 keeps to a relative ~1e-7 both when
  they are tiny (a confident token at T = 1: a probability would lose everything below 1e-38, and a floor
  would change reverse KL by nats) and when they are near 1 (T = 5.94 on a 128k vocabulary, where the top-k
  hold ~0.1%). Guard: a tail bucket that is exactly empty on one side only (k = V, or an old store's tail
  rounded to 0) gets ``MIN_TAIL_MASS``, because it would only make KL infinite; real tails are untouched.

With k = vocabulary size both modes equal ``dense_divergence``. Teacher ids should be distinct at each
position; teacher log-probs of -inf are allowed (zero teacher mass) but make reverse-type divergences infinite
wherever the student puts mass there, which is the mathematically correct value.

Memory. ``distill_loss`` never builds a ``[B, S, V]`` buffer: it flattens tokens, pads them to a multiple
of ``chunk_size`` with masked tokens, and scans over chunks. When the chunks' ``[chunk_size, V]`` residuals
would exceed ``residual_budget_bytes`` in total, each chunk is wrapped in ``jax.checkpoint`` so the backward
pass recomputes its logits instead of storing them. It returns SUMS
over loss tokens so callers can take one token mean over all micro-batches and devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.models.heads import token_cross_entropy  # CE is the loss's other part, shared with scoring

# Up to this many bytes of [tokens, V] softmax residuals are kept for the backward pass (a 1024-token batch of
# a 49k vocabulary); larger batches, or 128k vocabularies, recompute each chunk's logits instead.
DEFAULT_RESIDUAL_BUDGET = 256 << 20
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv", "none")
TOPK_MODES = ("renormalize", "tail")

# Mass given to a "rest of vocabulary" bucket that is exactly empty (k = V, or a T = 1 tail derived as
# 1 - sum(top-k probs) that rounded to 0): it keeps KL finite; tails that are not exactly 0 are kept as they are.
MIN_TAIL_MASS = 1e-8

# Log-probs below this are exactly zero probability in float64 as well; clamping there keeps logaddexp of
# two -inf values (nan gradient) out of the mixture distributions.
_LOG_PROB_CLAMP = -1e4


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss configuration (hashable, so it can be a jit static argument)."""

  divergence: str = "forward_kl"
  beta: float = 0.5  # generalized JSD: teacher weight in the mixture; 0 = forward KL, 1 = reverse KL.
  skew_alpha: float = 0.1  # skew KLs: weight of the "own" distribution in the mixture, in [0, 1).
  temperature: float = 1.0
  scale_by_t2: bool = True
  ce_weight: float = 0.0  # total = (1 - ce_weight) * KD + ce_weight * CE.
  topk_mode: str = "tail"

  def __post_init__(self):
    if self.divergence not in DIVERGENCES:
      raise ValueError(f"LossConfig.divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
    if self.topk_mode not in TOPK_MODES:
      raise ValueError(f"LossConfig.topk_mode must be one of {TOPK_MODES}, got {self.topk_mode!r}")
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"LossConfig.beta must be in [0, 1], got {self.beta}")
    if not 0.0 <= self.skew_alpha < 1.0:
      raise ValueError(f"LossConfig.skew_alpha must be in [0, 1), got {self.skew_alpha}")
    if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
      raise ValueError(f"LossConfig.temperature must be a positive finite number, got {self.temperature}")
    if not 0.0 <= self.ce_weight <= 1.0:
      raise ValueError(f"LossConfig.ce_weight must be in [0, 1], got {self.ce_weight}")
    if self.divergence == "none" and self.ce_weight != 1.0:
      # Otherwise the loss would silently be CE scaled by ce_weight.
      raise ValueError(f"LossConfig.divergence='none' (plain SFT) needs ce_weight=1.0, got {self.ce_weight}")

  @property
  def uses_teacher(self) -> bool:
    return self.divergence != "none"


class LossSums(NamedTuple):
  """Sums over loss tokens (weighted by ``loss_mask``); add them across micro-batches / devices."""

  kd_sum: jax.Array
  ce_sum: jax.Array
  num_tokens: jax.Array


def total_loss(sums: LossSums, cfg: LossConfig) -> jax.Array:
  """Token-mean ``(1 - ce_weight) * KD + ce_weight * CE``; 0 when there are no loss tokens."""
  total = (1.0 - cfg.ce_weight) * sums.kd_sum + cfg.ce_weight * sums.ce_sum
  num = sums.num_tokens
  return jnp.where(num > 0, total / jnp.where(num > 0, num, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Divergences between two normalised log-distributions over the last axis.


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
  """KL(a || b) over the last axis; terms with a = 0 are 0 (and have finite, zero gradients)."""
  a = jnp.exp(log_a)
  support = a > 0
  # Double `where`: outside a's support log_a or log_b may be -inf and 0 * inf would be nan in the value
  # or in the gradient.
  diff = jnp.where(support, log_a, 0.0) - jnp.where(support, log_b, 0.0)
  return jnp.sum(a * diff, axis=-1)


def _log_mixture(log_a: jax.Array, log_b: jax.Array, weight_a: float) -> jax.Array:
  """log(weight_a * a + (1 - weight_a) * b) for a python weight in [0, 1)."""
  if weight_a == 0.0:
    return log_b
  log_a = jnp.maximum(log_a, _LOG_PROB_CLAMP)
  log_b = jnp.maximum(log_b, _LOG_PROB_CLAMP)
  return jnp.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _bucket_divergence(log_p: jax.Array, log_q: jax.Array, cfg: LossConfig) -> jax.Array:
  """cfg.divergence between teacher log_p and student log_q (both normalised over the last axis)."""
  name = cfg.divergence
  if name == "forward_kl" or (name == "jsd" and cfg.beta == 0.0):
    return _kl(log_p, log_q)
  if name == "reverse_kl" or (name == "jsd" and cfg.beta == 1.0):
    return _kl(log_q, log_p)
  if name == "jsd":
    log_m = _log_mixture(log_p, log_q, cfg.beta)
    return cfg.beta * _kl(log_p, log_m) + (1.0 - cfg.beta) * _kl(log_q, log_m)
  if name == "skew_forward_kl":
    return _kl(log_p, _log_mixture(log_p, log_q, cfg.skew_alpha))
  if name == "skew_reverse_kl":
    return _kl(log_q, _log_mixture(log_q, log_p, cfg.skew_alpha))
  if name == "tv":
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)
  raise ValueError(f"no bucket divergence for {name!r}")


def _float_dtype(dtype: Any) -> Any:
  """At least float32 (float64 stays float64 under jax_enable_x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def _t2_scale(div: jax.Array, cfg: LossConfig) -> jax.Array:
  return div * (cfg.temperature ** 2) if cfg.scale_by_t2 else div


def _log_rest(log_mass: jax.Array) -> jax.Array:
  """log(1 - exp(log_mass)), -inf when the mass rounds to >= 1 (gradient stays finite there)."""
  rest = -jnp.expm1(log_mass)
  positive = rest > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, rest, 1.0)), -jnp.inf)


def _fill_empty_tail(log_probs: jax.Array) -> jax.Array:
  """A tail bucket (last) that is exactly empty gets MIN_TAIL_MASS, taken from the other buckets.

  Only an exact zero is touched, so every real tail, however small, stays exact.
  """
  empty = log_probs[..., -1:] == -jnp.inf
  ids = jnp.where(empty, log_probs[..., :-1] - math.log1p(MIN_TAIL_MASS), log_probs[..., :-1])
  return jnp.concatenate([ids, jnp.where(empty, math.log(MIN_TAIL_MASS), log_probs[..., -1:])], axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Per-position divergences.


def dense_divergence(student_logits: jax.Array, teacher_logprobs_full: jax.Array, cfg: LossConfig) -> jax.Array:
  """cfg.divergence per position for a full teacher distribution.

  Args:
    student_logits: [..., V] student logits (T = 1).
    teacher_logprobs_full: [..., V] teacher log-probs or logits (T = 1); renormalised after tempering.
    cfg: loss configuration (topk_mode is irrelevant here).

  Returns:
    [...] divergence, times T**2 when cfg.scale_by_t2.
  """
  if student_logits.shape != teacher_logprobs_full.shape:
    raise ValueError(f"student_logits {student_logits.shape} and teacher_logprobs_full "
                     f"{teacher_logprobs_full.shape} must have the same shape")
  dtype = _float_dtype(student_logits.dtype)
  if not cfg.uses_teacher:
    return jnp.zeros(student_logits.shape[:-1], dtype)
  temp = cfg.temperature
  log_q = jax.nn.log_softmax(student_logits.astype(dtype) / temp, axis=-1)
  teacher = jax.lax.stop_gradient(teacher_logprobs_full).astype(dtype)
  log_p = jax.nn.log_softmax(teacher / temp, axis=-1)
  return _t2_scale(_bucket_divergence(log_p, log_q, cfg), cfg)


def per_token_divergence(student_logits: jax.Array, teacher_ids: jax.Array, teacher_logprobs: jax.Array,
                         teacher_log_tail: jax.Array | None, cfg: LossConfig) -> jax.Array:
  """cfg.divergence per position between dense student logits and a sparse top-k teacher.

  Args:
    student_logits: [..., V] student logits (T = 1).
    teacher_ids: [..., k] distinct int token ids (clipped into [0, V)).
    teacher_logprobs: [..., k] full-vocabulary teacher log-probs of those ids at T = 1.
    teacher_log_tail: [...] log of the mass the teacher's softmax(logits / T) puts outside the k ids, at the
      loss temperature T; or None for ``log(1 - sum exp(teacher_logprobs))``, which is that only at T = 1.
      Only read in "tail" mode.
    cfg: loss configuration.

  Returns:
    [...] divergence, times T**2 when cfg.scale_by_t2. No gradient flows into teacher inputs.
  """
  dtype = _float_dtype(student_logits.dtype)
  if not cfg.uses_teacher:
    return jnp.zeros(student_logits.shape[:-1], dtype)
  if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
    raise ValueError(f"teacher_ids {teacher_ids.shape} and teacher_logprobs {teacher_logprobs.shape} must be "
                     f"[..., k] with leading dims of student_logits {student_logits.shape}")
  vocab = student_logits.shape[-1]
  temp = cfg.temperature
  scaled = student_logits.astype(dtype) / temp
  ids = jnp.clip(teacher_ids, 0, vocab - 1)
  student_at_ids = jnp.take_along_axis(scaled, ids, axis=-1)
  teacher_lp = jax.lax.stop_gradient(teacher_logprobs).astype(dtype)

  if cfg.topk_mode == "renormalize":
    log_q = jax.nn.log_softmax(student_at_ids, axis=-1)
    log_p = jax.nn.log_softmax(teacher_lp / temp, axis=-1)
  else:
    # Student: the rest bucket is a logsumexp over the other ids, not 1 - sum of the k probabilities, which is
    # only rounding noise when the k ids hold nearly everything (a peaked token at T = 1). Logits are taken
    # relative to the largest one among the k ids (shift invariance; no extra pass over the vocabulary), so
    # the normalisers are small numbers: raw logits of 30-40 carry ~4e-6 of float32 rounding themselves.
    shift = jax.lax.stop_gradient(jnp.max(student_at_ids, axis=-1, keepdims=True))
    at_ids = student_at_ids - shift
    rest = jnp.put_along_axis(scaled - shift, ids, -jnp.inf, axis=-1, inplace=False)
    log_q_rest = jax.nn.logsumexp(rest, axis=-1, keepdims=True)
    normaliser = jnp.logaddexp(jax.nn.logsumexp(at_ids, axis=-1, keepdims=True), log_q_rest)
    log_q = _fill_empty_tail(jnp.concatenate([at_ids, log_q_rest], axis=-1) - normaliser)
    # Teacher: the k ids' tempered probabilities inside the top-k, scaled to the top-k's tempered mass
    # 1 - tail_T (derived in the module docstring).
    if teacher_log_tail is None:
      if temp != 1.0:
        raise ValueError(f"tail mode at temperature {temp} needs the teacher's tail mass at that temperature "
                         f"(teacher_log_tail); 1 - sum of the top-k probabilities is the tail at T = 1 only")
      log_p_rest = _log_rest(jax.nn.logsumexp(teacher_lp, axis=-1, keepdims=True))
    else:
      if teacher_log_tail.shape != teacher_ids.shape[:-1]:
        raise ValueError(f"teacher_log_tail {teacher_log_tail.shape} must be {teacher_ids.shape[:-1]}")
      log_p_rest = jnp.minimum(jax.lax.stop_gradient(teacher_log_tail).astype(dtype)[..., None], 0.0)
    log_p_ids = jax.nn.log_softmax(teacher_lp / temp, axis=-1) + _log_rest(log_p_rest)
    log_p = _fill_empty_tail(jnp.concatenate([log_p_ids, log_p_rest], axis=-1))
  return _t2_scale(_bucket_divergence(log_p, log_q, cfg), cfg)


# ----------------------------------------------------------------------------------------------------------
# Chunked loss over a batch.


def _check_batch(hidden: jax.Array, lm_head: jax.Array, batch: Mapping[str, jax.Array], cfg: LossConfig,
                 chunk_size: int, teacher_head: jax.Array | None) -> None:
  if hidden.ndim != 3:
    raise ValueError(f"hidden must be [B, S, D], got shape {hidden.shape}")
  if lm_head.ndim != 2 or lm_head.shape[0] != hidden.shape[2]:
    raise ValueError(f"lm_head must be [D={hidden.shape[2]}, V], got shape {lm_head.shape}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  dense = _dense_teacher_key(batch)
  teacher_keys = [dense] if dense else ["teacher_ids", "teacher_logprobs"]
  required = ["target_ids", "loss_mask"] + (teacher_keys if cfg.uses_teacher else [])
  missing = [key for key in required if key not in batch]
  if missing:
    raise KeyError(f"batch is missing {missing} (divergence={cfg.divergence!r})")
  tokens_shape = hidden.shape[:2]
  for key in ("target_ids", "loss_mask") + (("teacher_log_tail",) if "teacher_log_tail" in batch else ()):
    if batch[key].shape != tokens_shape:
      raise ValueError(f"batch[{key!r}] must be [B, S] = {tokens_shape}, got {batch[key].shape}")
  if cfg.uses_teacher and dense == "teacher_logits":
    want = tokens_shape + (lm_head.shape[1],)
    if batch["teacher_logits"].shape != want:
      raise ValueError(f"batch['teacher_logits'] must be [B, S, V] = {want}, got {batch['teacher_logits'].shape}")
  elif cfg.uses_teacher and dense:
    if teacher_head is None or teacher_head.ndim != 2 or teacher_head.shape[1] != lm_head.shape[1]:
      raise ValueError(f"batch['teacher_hidden'] needs teacher_head [D_teacher, V={lm_head.shape[1]}], got "
                       f"{None if teacher_head is None else teacher_head.shape}")
    want = tokens_shape + (teacher_head.shape[0],)
    if batch["teacher_hidden"].shape != want:
      raise ValueError(f"batch['teacher_hidden'] must be [B, S, D] = {want}, got {batch['teacher_hidden'].shape}")
  elif cfg.uses_teacher:
    ids_shape, lp_shape = batch["teacher_ids"].shape, batch["teacher_logprobs"].shape
    if ids_shape != lp_shape or ids_shape[:2] != tokens_shape or len(ids_shape) != 3:
      raise ValueError(f"teacher_ids {ids_shape} and teacher_logprobs {lp_shape} must both be [B, S, k] "
                       f"with [B, S] = {tokens_shape}")
    if ids_shape[2] > lm_head.shape[1]:
      raise ValueError(f"top-k size {ids_shape[2]} exceeds the vocabulary size {lm_head.shape[1]}")


def _dense_teacher_key(batch: Mapping[str, jax.Array]) -> str | None:
  """The batch's resident-teacher entry: "teacher_hidden", "teacher_logits", or None (a top-k store batch)."""
  return next((key for key in ("teacher_hidden", "teacher_logits") if key in batch), None)


def _recomputes_chunks(num_tokens: int, chunk_size: int, vocab: int, itemsize: int, sides: int,
                       budget: int) -> bool:
  """Whether `distill_loss` recomputes each chunk's logits in the backward pass: keeping every chunk's
  [chunk, V] residuals (`sides` of them: the student's, and the teacher's when it forms them from hidden states)
  would take more than `budget` bytes."""
  chunk = min(chunk_size, num_tokens)
  return sides * -(-num_tokens // chunk) * chunk * vocab * itemsize > budget


def dense_teacher_logit_bytes(num_tokens: int, chunk_size: int, vocab: int,
                              budget: int = DEFAULT_RESIDUAL_BUDGET) -> int:
  """Bytes of float32 teacher logits that `distill_loss` holds with `teacher_hidden` (an on-policy step of
  `num_tokens` tokens): every chunk's, kept for the backward pass, or one chunk's when it recomputes them."""
  chunk = min(chunk_size, num_tokens)
  chunks = 1 if _recomputes_chunks(num_tokens, chunk_size, vocab, 4, 2, budget) else -(-num_tokens // chunk)
  return chunks * chunk * vocab * 4


def distill_loss(hidden: jax.Array, lm_head: jax.Array, batch: Mapping[str, jax.Array], cfg: LossConfig, *,
                 chunk_size: int = 128, residual_budget_bytes: int = DEFAULT_RESIDUAL_BUDGET,
                 teacher_head: jax.Array | None = None) -> tuple[LossSums, dict[str, jax.Array]]:
  """Chunked KD + CE sums over loss tokens, never materialising [B, S, V] logits.

  Args:
    hidden: [B, S, D] final hidden states; position t predicts ``target_ids[:, t]`` (already shifted).
    lm_head: [D, V] output projection; logits = hidden @ lm_head, accumulated in (at least) float32.
    batch: ``target_ids [B, S]`` int, ``loss_mask [B, S]`` bool or float weights, and unless
      divergence == "none": ``teacher_ids [B, S, k]``, ``teacher_logprobs [B, S, k]``, optionally
      ``teacher_log_tail [B, S]`` (the tail's log-mass at cfg.temperature); teacher arrays at t describe the
      token predicted at t. A resident teacher (on-policy steps, `kdjax.distill.on_policy`) gives
      ``teacher_logits [B, S, V]`` instead: the KD term is then `dense_divergence` over the whole vocabulary,
      with no top-k approximation (and no top-k mass metrics). Better, it gives the teacher's final hidden
      states ``teacher_hidden [B, S, D_teacher]`` (after its final norm) and `teacher_head`: each chunk then
      computes its teacher logits ``teacher_hidden @ teacher_head`` itself (float32 accumulation), so no
      [B, S, V] teacher array exists anywhere. Either dense form adds ``teacher_logprob_sum``: the teacher's
      T = 1 log-prob of the target tokens.
    cfg: loss configuration.
    chunk_size: tokens per chunk (capped at B * S); the token count is padded with masked tokens.
    teacher_head: [D_teacher, V] the resident teacher's output projection, with ``teacher_hidden``.
    residual_budget_bytes: when keeping every chunk's float32 [chunk, V] residuals for the backward pass
      would take more than this, each chunk's logits are recomputed in the backward pass instead.

  Returns:
    (LossSums(kd_sum, ce_sum, num_tokens), metrics) where metrics are loss-token sums too:
    ``student_target_acc_sum`` (student argmax == target), and with a teacher ``teacher_top1_agree_sum``
    (student argmax == teacher's top id), ``teacher_topk_mass_sum`` and ``student_topk_mass_sum``
    (probability at T = 1 on the teacher's k ids).
  """
  _check_batch(hidden, lm_head, batch, cfg, chunk_size, teacher_head)
  batch_size, seq_len, _ = hidden.shape
  num = batch_size * seq_len
  chunk = min(chunk_size, num)
  num_chunks = -(-num // chunk)
  pad = num_chunks * chunk - num

  def to_chunks(x: jax.Array) -> jax.Array:
    x = x.reshape((num,) + x.shape[2:])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))  # padded tokens get weight 0
    return x.reshape((num_chunks, chunk) + x.shape[1:])

  xs = {"hidden": to_chunks(hidden), "target_ids": to_chunks(batch["target_ids"]),
        "weight": to_chunks(jnp.asarray(batch["loss_mask"]).astype(jnp.float32))}
  dense = _dense_teacher_key(batch)
  if cfg.uses_teacher and dense:
    xs[dense] = to_chunks(batch[dense])
  elif cfg.uses_teacher:
    xs["teacher_ids"] = to_chunks(batch["teacher_ids"])
    xs["teacher_logprobs"] = to_chunks(batch["teacher_logprobs"])
    if "teacher_log_tail" in batch:
      xs["teacher_log_tail"] = to_chunks(batch["teacher_log_tail"])
  compute_dtype = jnp.promote_types(hidden.dtype, lm_head.dtype)
  logits_dtype = _float_dtype(compute_dtype)

  def chunk_sums(head: jax.Array, part: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits = jnp.matmul(part["hidden"].astype(compute_dtype), head.astype(compute_dtype),
                        preferred_element_type=logits_dtype)
    weight = part["weight"].astype(logits_dtype)
    valid = weight > 0

    def masked_sum(values: jax.Array) -> jax.Array:
      # `where`, not a product: padding / masked tokens may hold garbage (inf, nan) that must not leak.
      return jnp.sum(jnp.where(valid, weight * values, 0.0))

    student_top1 = jnp.argmax(logits, axis=-1)
    # One pass over the vocabulary for the log-normaliser, shared by CE and the metrics.
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = {"ce": masked_sum(token_cross_entropy(logits, part["target_ids"], lse)), "num_tokens": jnp.sum(weight),
           "student_target_acc_sum": masked_sum((student_top1 == part["target_ids"]).astype(logits_dtype))}
    if not cfg.uses_teacher:
      out["kd"] = jnp.zeros((), logits_dtype)
      return out
    if dense:
      if dense == "teacher_hidden":  # this chunk's teacher logits: its hidden states times its output projection
        teacher_dtype = jnp.promote_types(part["teacher_hidden"].dtype, teacher_head.dtype)
        teacher_logits = jnp.matmul(part["teacher_hidden"].astype(teacher_dtype), teacher_head.astype(teacher_dtype),
                                    preferred_element_type=jnp.float32)
      else:
        teacher_logits = part["teacher_logits"]
      # Masked tokens may hold anything: zero logits keep the divergence and its gradient finite there.
      teacher_logits = jax.lax.stop_gradient(jnp.where(valid[:, None], teacher_logits.astype(logits_dtype), 0.0))
      out["kd"] = masked_sum(dense_divergence(logits, teacher_logits, cfg))
      teacher_top1 = jnp.argmax(teacher_logits, axis=-1)
      out["teacher_top1_agree_sum"] = masked_sum((student_top1 == teacher_top1).astype(logits_dtype))
      out["teacher_logprob_sum"] = masked_sum(-token_cross_entropy(teacher_logits, part["target_ids"]))
      return out
    teacher_ids = jnp.clip(part["teacher_ids"], 0, logits.shape[-1] - 1)
    teacher_lp = jnp.where(valid[:, None], part["teacher_logprobs"].astype(logits_dtype), 0.0)
    teacher_log_tail = part.get("teacher_log_tail")
    if teacher_log_tail is not None:
      # Masked tokens get a harmless finite tail (half the mass): an infinite KL there would be 0 in the sum
      # but NaN in its gradient.
      teacher_log_tail = jnp.where(valid, teacher_log_tail.astype(logits_dtype), math.log(0.5))
    out["kd"] = masked_sum(per_token_divergence(logits, teacher_ids, teacher_lp, teacher_log_tail, cfg))
    teacher_top1 = jnp.take_along_axis(teacher_ids, jnp.argmax(teacher_lp, axis=-1)[:, None], axis=-1)[:, 0]
    out["teacher_top1_agree_sum"] = masked_sum((student_top1 == teacher_top1).astype(logits_dtype))
    out["teacher_topk_mass_sum"] = masked_sum(jnp.sum(jnp.exp(teacher_lp), axis=-1))
    student_lp = jnp.take_along_axis(logits, teacher_ids, axis=-1) - lse[:, None]
    out["student_topk_mass_sum"] = masked_sum(jax.lax.stop_gradient(jnp.sum(jnp.exp(student_lp), axis=-1)))
    return out

  # The backward pass needs each chunk's [chunk, V] probabilities. Kept for every chunk they would cost
  # about `residual_bytes`; above the budget each chunk recomputes its logits in the backward pass instead
  # (prevent_cse=False is safe, and faster, inside scan, which already keeps the recomputation apart).
  sides = 2 if cfg.uses_teacher and dense == "teacher_hidden" else 1  # the chunk's teacher logits are residuals too
  recompute = _recomputes_chunks(num, chunk_size, lm_head.shape[1], jnp.dtype(logits_dtype).itemsize, sides,
                                 residual_budget_bytes)
  chunk_fn = jax.checkpoint(chunk_sums, prevent_cse=False) if recompute else chunk_sums

  def step(carry: dict[str, jax.Array], part: dict[str, jax.Array]):
    out = chunk_fn(lm_head, part)
    return jax.tree.map(jnp.add, carry, out), None

  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      jax.eval_shape(chunk_sums, lm_head, jax.tree.map(lambda x: x[0], xs)))
  totals, _ = jax.lax.scan(step, init, xs)
  sums = LossSums(kd_sum=totals.pop("kd"), ce_sum=totals.pop("ce"), num_tokens=totals.pop("num_tokens"))
  return sums, totals
