"""What serving and training share of the output head: token cross-entropy at T = 1 from logits, and its sums over
teacher-forced continuations computed through the output projection row by row, so no [rows, positions, V] logits
are ever held (the eval's reference NLL, in its own pass or in the engine's prefill; the distillation loss's CE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _float_dtype(dtype):
  """At least float32 (float64 stays float64 under jax_enable_x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def token_cross_entropy(student_logits: jax.Array, target_ids: jax.Array,
                        student_logsumexp: jax.Array | None = None) -> jax.Array:
  """-log softmax(student_logits)[target] at T = 1; targets are clipped into [0, V).

  `student_logsumexp` [...]: the logits' logsumexp when the caller has it already (one pass fewer).
  """
  logits = student_logits.astype(_float_dtype(student_logits.dtype))
  target = jnp.clip(target_ids, 0, logits.shape[-1] - 1)[..., None]
  picked = jnp.take_along_axis(logits, target, axis=-1)[..., 0]
  if student_logsumexp is None:
    student_logsumexp = jax.nn.logsumexp(logits, axis=-1)
  return student_logsumexp.astype(logits.dtype) - picked


def window_cross_entropy_sums(hidden: jax.Array, head: jax.Array, positions: jax.Array, target_ids: jax.Array,
                              mask: jax.Array) -> jax.Array:
  """Per row of `hidden` [C, P, D]: the summed `token_cross_entropy` of `target_ids` [C, W] predicted at
  `positions` [C, W] (in [0, P)) through the output projection `head` [D, V], over the `mask` [C, W] (bool)
  entries. Only those W positions reach the projection, one row at a time, so no [C, P, V] logits are held:
  teacher-forced scoring of a continuation (the eval's reference NLL, in its own pass or in generation's
  prefill)."""
  hidden = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)

  def row(args):
    row_hidden, targets, row_mask = args
    logits = jnp.einsum("sd,dv->sv", row_hidden, head, preferred_element_type=jnp.float32)
    return jnp.sum(jnp.where(row_mask, token_cross_entropy(logits, targets), 0.0))

  return jax.lax.map(row, (hidden, target_ids, mask))


def continuation_cross_entropy_sums(hidden: jax.Array, head: jax.Array, ids: jax.Array, lengths: jax.Array,
                                    continuation_lengths: jax.Array, window: int) -> jax.Array:
  """Per row of a prefill of prompt + continuation (`ids` [C, P], its `hidden` [C, P, D]; prompt lengths [C]):
  the summed cross-entropy of the continuation ids[len .. len+n-1] (n = `continuation_lengths`), position t
  predicting t + 1. Only the `window` positions from each prompt's last token reach `head`
  (`window_cross_entropy_sums`, as in evaluation's `reference_nll`)."""
  p = ids.shape[1]
  offsets = jnp.arange(window)[None, :]
  inside = offsets < continuation_lengths[:, None]
  at = jnp.minimum(lengths[:, None] - 1 + offsets, p - 1)  # positions past the continuation count nothing
  targets = jnp.take_along_axis(ids, jnp.minimum(at + 1, p - 1), axis=1)
  return window_cross_entropy_sums(hidden, head, at, targets, inside)
