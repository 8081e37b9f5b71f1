"""Autoregressive generation, shared by the teacher and evaluation: `generate` checks its inputs and runs them on the
continuous-batching engine of `kdjax.serving.engine` (decode slots refilled as rows finish).

Model parameters enter the compiled functions as arguments (`nnx.split`), never as constants. The settings and
results (`SamplingConfig`, `Generation`) and the token choice live in `kdjax.serving.sampling`; they are this
module's API too.
"""

from __future__ import annotations

from collections.abc import Sequence

from kdjax.models.llama.model import Llama
from kdjax.serving import engine
from kdjax.serving.sampling import (FinishCallback, Generation, GenerationError, ProgressCallback, SamplingConfig,
                                    left_pad, round_up, topk_logprobs)

__all__ = ["FinishCallback", "Generation", "GenerationError", "ProgressCallback", "SamplingConfig", "generate",
           "left_pad", "round_up", "topk_logprobs"]


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


def _check_continuations(continuations: Sequence[Sequence[int]], num_prompts: int, vocab: int) -> None:
  if len(continuations) != num_prompts:
    raise GenerationError(f"got {len(continuations)} continuations for {num_prompts} prompts")
  for i, continuation in enumerate(continuations):
    if len(continuation) and (min(continuation) < 0 or max(continuation) >= vocab):
      raise GenerationError(f"continuation {i} has token ids outside the vocabulary [0, {vocab})")


def generate(model: Llama, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
             stop_ids: Sequence[int], pad_id: int, example_ids: Sequence[int] | None = None,
             batch_size: int = 16, topk_logprobs: int = 0, tail_temperatures: Sequence[float] = (),
             progress: ProgressCallback | None = None, length_bucket: int = 64,
             on_finish: FinishCallback | None = None, few_programs: bool = False,
             continuations: Sequence[Sequence[int]] | None = None) -> list[Generation]:
  """Generates a response for every prompt (token ids, without padding), in the order given.

  stop_ids end a row (the stop token is kept in `tokens`); `pad_id` fills finished rows and padding.
  `example_ids` (default: the prompt indices) seed each row's sampling key. With `topk_logprobs=k`, each
  Generation carries the top-k log-probs (temperature 1) of the distribution behind every response token,
  its tail mass, and the log of the tail mass at each of `tail_temperatures` (see `topk_logprobs`).
  `batch_size` is the number of decode slots (`kdjax.serving.engine`): prompts are prefilled into slots as others
  finish. `progress(tokens, elapsed_s, examples_done, examples_total)` is called whenever examples finish, and
  `on_finish(i, generation)` once for each prompt i as soon as it is finished (callers write results as they
  come, so a kill loses only the rows in flight). Prompts enter the slots shortest first; the order changes no
  result (greedy rows are what a full forward gives, sampled rows depend on their example id and step alone).
  Prompt lengths round up to a multiple of `length_bucket`, so few prefill shapes compile. `few_programs`
  (`engine.run`) trades per-step work for fewer compiled programs, for callers that run them once.
  `continuations` (one token list per prompt, may be empty) are scored teacher-forced after their prompts in
  the prompts' own prefill: each Generation's `continuation_nll` is the summed cross-entropy of its
  continuation's tokens and `continuation_tokens` their number. Generation itself is unchanged.
  """
  if length_bucket < 1:
    raise GenerationError(f"length_bucket must be >= 1, got {length_bucket}")
  ids_of_example = _check_inputs(model, prompts, example_ids, stop_ids, pad_id, batch_size, topk_logprobs)
  if continuations is not None:
    _check_continuations(continuations, len(prompts), model.config.vocab_size)
  if not prompts:
    return []
  # A few prompts need no more slots than the next power of two above their number (fewer shapes compile).
  num_slots = min(batch_size, 1 << (len(prompts) - 1).bit_length())
  return engine.run(model, prompts, ids_of_example, sampling, stop_ids=stop_ids, pad_id=pad_id,
                    num_slots=num_slots, topk_logprobs=topk_logprobs,
                    tail_temperatures=tuple(float(x) for x in tail_temperatures), length_bucket=length_bucket,
                    progress=progress, on_finish=on_finish, few_programs=few_programs, continuations=continuations)
