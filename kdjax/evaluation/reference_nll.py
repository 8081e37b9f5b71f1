"""Mean per-token negative log-likelihood of GSM8K reference solutions under the student prompt.

Accuracy moves in steps of 1/n and a small student scores near zero, so arms that differ slightly look the same;
the likelihood the student gives the reference solution moves smoothly with the adapter. The sequence is the one
the fine-tuning control trains on (`distill.batches.gold_examples`): the eval prompt (the same tokens generation
starts from), then the solution with GSM8K's calculator annotations removed, then the first stop token. The NLL
counts the solution's tokens and the stop token, teacher-forced, at temperature 1, in nats.

All batches have one shape (the longest sequence of the question set, rounded up to 64, and a fixed row count),
so the pass compiles once per model. Only the solution's positions reach the vocabulary projection (a window of
the longest solution of the question set, rounded up to 64, cut from each row at its solution's start): the
prompt's logits are never used, and at the demo's shapes the projection of every position was a third of the
pass. It runs one row at a time, so no [batch, seq, vocab] logits are held.

The evaluation loop scores the same tokens (`continuation`) inside generation's prefill of the prompt
(`generation.generate(..., continuations=...)`), which computes the prompt's forward anyway; `reference_nll`
serves records that lack the NLL (folders written before it existed) and is the tested reference for that path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.gsm8k import data
from kdjax.distill import batches
from kdjax.models import heads

PAD_MULTIPLE = 64


def reference_example(prompt_ids: Sequence[int], answer: str, tokenizer, end_token_id: int,
                      question_id: int | None = None) -> batches.TrainExample:
  """The teacher-forced sequence of one question: prompt, annotation-free solution, end token."""
  solution = tokenizer.encode(data.strip_calculator_annotations(answer).strip(), add_special_tokens=False)
  return batches.ce_example(prompt_ids, solution, end_token_id, question_id=question_id)


def continuation(example: batches.TrainExample) -> list[int]:
  """The tokens `example` scores after its prompt (solution and end token): the continuation that
  `generation.generate(..., continuations=...)` scores in the prompt's own prefill, the same sum as here."""
  start, end = _loss_span(example)
  return [int(t) for t in example.target_ids[start:end]]


def padded_length(examples: Sequence[batches.TrainExample]) -> int:
  """The one sequence length every batch of `examples` is padded to."""
  return batches.round_up(max(len(e) for e in examples), PAD_MULTIPLE)


def _loss_span(example: batches.TrainExample) -> tuple[int, int]:
  """(first, one past the last) position of the example's loss tokens."""
  where = np.flatnonzero(example.loss_mask)
  return int(where[0]), int(where[-1]) + 1


def solution_window(examples: Sequence[batches.TrainExample]) -> int:
  """The one number of positions per row, from each solution's start, that reach the vocabulary projection."""
  return batches.round_up(max(end - start for start, end in map(_loss_span, examples)), PAD_MULTIPLE)


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def _row_sums(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array,
              target_ids: jax.Array, loss_mask: jax.Array, loss_start: jax.Array, window: int) -> jax.Array:
  """Per row: the summed token cross-entropy over the loss tokens, which lie within `window` positions from the
  row's `loss_start`."""
  model = nnx.merge(graphdef, state)
  hidden = model.forward(input_ids, attention_mask=attention_mask, return_logits=False).hidden
  head = model.lm_head_weight().astype(model.dtype)
  positions = loss_start[:, None] + jnp.arange(window)[None, :]
  inside = positions < input_ids.shape[1]  # a window that runs past the row's end: those positions count nothing
  positions = jnp.minimum(positions, input_ids.shape[1] - 1)
  target_ids = jnp.take_along_axis(target_ids, positions, axis=1)
  counted = inside & (jnp.take_along_axis(loss_mask, positions, axis=1) > 0)
  return heads.window_cross_entropy_sums(hidden, head, positions, target_ids, counted)


def reference_nll(model, examples: Sequence[batches.TrainExample], *, batch_size: int, length: int,
                  window: int | None = None) -> dict[int, tuple[float, int]]:
  """{question id: (mean NLL per reference token in nats, number of reference tokens)} of `examples`.

  `length` (see `padded_length`) and `batch_size` fix the one batch shape; a short last batch gets empty rows.
  `window` (see `solution_window`; default: that of `examples`) fixes the projected positions per row: callers
  that score a question set in parts pass the whole set's, so every part runs the same compiled program.
  """
  if any(e.question_id is None for e in examples):
    raise ValueError("reference examples need question ids")
  if any(len(e) > length for e in examples):
    raise ValueError(f"a reference sequence is longer than the padded length {length}")
  window = solution_window(examples) if window is None else window
  spans = [_loss_span(e) for e in examples]
  if any(end - start > window for start, end in spans):
    raise ValueError(f"a reference solution is longer than the window {window}")
  graphdef, state = nnx.split(model)
  out = {}
  for first in range(0, len(examples), batch_size):
    chunk = examples[first:first + batch_size]
    batch = batches.collate(chunk, pad_multiple=length, batch_size=batch_size)
    loss_start = np.zeros(batch_size, np.int32)  # empty rows: a window of padding, no loss tokens
    loss_start[:len(chunk)] = [start for start, _ in spans[first:first + batch_size]]
    sums = np.asarray(jax.device_get(_row_sums(graphdef, state, batch["input_ids"], batch["attention_mask"],
                                               batch["target_ids"], batch["loss_mask"], loss_start,
                                               window=window)), np.float64)
    for row, example in enumerate(chunk):
      count = example.num_loss_tokens
      out[int(example.question_id)] = (float(sums[row]) / count, count)
  return out


def mean_of(records: Sequence[Mapping]) -> float | None:
  """The mean over questions of their per-token reference NLL (every question weighs the same)."""
  values = [float(r["ref_nll"]) for r in records if r.get("ref_nll") is not None]
  return sum(values) / len(values) if values else None
