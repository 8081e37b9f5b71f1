"""On-policy primed distillation: the student writes, the primed teacher grades (GKD, Agarwal et al. 2024).

With `distill.on_policy_fraction = f` (GKD's lambda), a training step is on-policy with probability f:

1. Choice. Step `s` is on-policy iff `uniform(fold_in(fold_in(PRNGKey(seed), DECIDE), s)) < f`, a function of
   (seed, step) only, so a resumed run makes the same choices, f = 0 never samples nor touches the teacher
   (`train` then runs exactly its off-policy loop) and f = 1 always samples. The salt keeps the choice
   independent of the step's dropout key, which is `fold_in(PRNGKey(seed), s)`.
2. Sampling. The step's questions are the ones the store batch of that step would have held (the batch
   iterator advances either way, so the data order is that of an off-policy run). The student answers its bare
   prompt with its CURRENT LoRA weights on the generation engine (`generation.generate`; the engine applies
   `W x + scale * B A x` itself, so an int8 base needs no merge), at `distill.on_policy_temperature`, up to
   `teacher.max_new_tokens` tokens, with sampling seed `bits(fold_in(fold_in(PRNGKey(seed), SAMPLE), s))` and
   the GSM8K question id as example id: per-(step, example) keys, independent of batch composition. Nothing
   about the sampler lives outside (seed, step), so a checkpoint needs no extra RNG state to resume exactly.
3. Scoring. The resident teacher reads the arm's primed prompt (`teacher_prompt_ids`, as stored with the
   teacher's own responses, so `gold_hint` sees the reference solution) followed by the SAME response tokens;
   its final hidden states (after its final norm) at the response positions are moved to the student's layout
   (student prompt + response), and the train step gets them with the teacher's output projection: the loss
   forms the teacher's logits chunk by chunk of tokens, beside the student's, and is the configured divergence
   at `distill.temperature` over the whole vocabulary (`losses.dense_divergence` inside `losses.distill_loss`):
   no top-k approximation, and no [B, S, V] teacher array. Teacher and student must share the vocabulary (the
   Llama 3.1 family, SmolLM2 with itself).
4. Loss weights. Cross-entropy on the student's own samples would teach it to repeat whatever it wrote,
   mistakes included; GKD uses none. On-policy steps therefore train on KD alone (`ce_weight` is 0 there), and
   `distill.ce_weight` keeps its meaning on the store's steps. `loss` and `kd` of an on-policy step are the
   dense KD per token.

Metrics, added to the step's line of `metrics.jsonl` whenever the fraction is > 0: `on_policy` (0/1),
`sampled_len` (mean sampled tokens per question), `teacher_logprob` (the teacher's mean log-prob at T = 1 of
the sampled tokens under its priming, computed by the loss from the same chunks of teacher logits),
`sample_s`, `score_s` (the teacher's forward) and `update_s` (seconds; the update is waited for, which costs
the loop its overlap of host and device work, the price of an honest split).

Validation on-policy (in the eval-every hook): the student answers the fixed validation questions GREEDILY
(a function of its weights alone, so the curve compares checkpoints, not random draws: with sampling, one flipped
token early in an answer changes the whole rest of it, and on a few questions that noise hid the trend), the
primed teacher scores the answers, and `val_on_policy_kd` is the dense KD per token, beside `val_on_policy_teacher_logprob`
and `val_on_policy_sampled_len`. With `distill.on_policy_probe_questions = N`, the same is measured on the
first N TRAIN questions (`val_train_probe_kd`, `_teacher_logprob`, `_sampled_len`): what the student learns
from the primed teacher on the questions it trains on, beside what transfers to held-out ones. The best
checkpoint is still chosen by the store's validation loss.

Costs: the teacher is resident beside the student (the plan stage counts both), and every on-policy step adds
a sampling pass of `max_new_tokens` decode steps and one teacher forward. The step receives the teacher's
hidden states, [examples, length, D] (8 MB for one 1024-token sequence of Llama 8B's 4096 wide bf16 states),
not its logits, [examples, length, V] float32 (0.5 GB for that sequence on Llama's 128k vocabulary); the loss
holds one chunk of teacher logits at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.serving import generation
from kdjax.distill import batches as batches_lib
from kdjax.distill import losses

# Salts of the per-step random streams (any fixed, distinct numbers).
DECIDE, SAMPLE, VALIDATE = 0x0D1CE, 0x5A3B1E, 0x7A11D


class OnPolicyError(ValueError):
  """An on-policy setting, teacher or data set that cannot be used as asked."""


@dataclasses.dataclass(frozen=True)
class OnPolicySettings:
  """`distill.on_policy_fraction` (GKD's lambda), `distill.on_policy_temperature`, `teacher.max_new_tokens`."""

  fraction: float = 0.0
  temperature: float = 1.0
  max_new_tokens: int = 512
  decode_slots: int = 16  # the engine's slots while sampling (eval.batch_size in the pipeline)
  probe_questions: int = 0  # train questions graded greedily at each evaluation (`validation_metrics`)

  def __post_init__(self):
    if not 0.0 <= self.fraction <= 1.0:
      raise OnPolicyError(f"distill.on_policy_fraction must be in [0, 1], got {self.fraction}")
    if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
      raise OnPolicyError(f"distill.on_policy_temperature must be finite and >= 0, got {self.temperature}")
    if self.probe_questions < 0:
      raise OnPolicyError(f"distill.on_policy_probe_questions must be >= 0, got {self.probe_questions}")
    if self.max_new_tokens < 1 or self.decode_slots < 1:
      raise OnPolicyError(f"need teacher.max_new_tokens and decode slots >= 1, got {self.max_new_tokens}, "
                          f"{self.decode_slots}")


def dense_loss_config(loss_cfg: losses.LossConfig) -> losses.LossConfig:
  """The loss of an on-policy step: the configured divergence and temperature, no CE (module docstring, 4)."""
  return dataclasses.replace(loss_cfg, ce_weight=0.0)


def _stream(seed: int, salt: int, step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), salt), step)


def is_on_policy_step(seed: int, step: int, fraction: float) -> bool:
  """Whether step `step` (0-based) samples from the student: a function of (seed, step, fraction) only."""
  if fraction <= 0.0:
    return False
  if fraction >= 1.0:
    return True
  return float(jax.random.uniform(_stream(seed, DECIDE, step))) < fraction


def sampling_seed(seed: int, salt: int, step: int) -> int:
  """The engine's sampling seed (uint32) of one step; rows then use their question id (`generation`)."""
  return int(jax.random.bits(_stream(seed, salt, step), dtype=jnp.uint32))


def _student_prompt(example: batches_lib.TrainExample) -> np.ndarray:
  """The student's bare prompt: the tokens up to the first response token (the first loss position predicts
  it), for store (KD) and gold (CE) examples alike."""
  return example.input_ids[:int(np.argmax(example.loss_mask > 0)) + 1]


@functools.partial(jax.jit, static_argnums=0)
def _teacher_hidden(graphdef, state, ids, mask, positions, valid):
  """The teacher's final hidden states [B, S, D] (after its final norm) at `positions` (its own layout) of every
  student position, zero where not `valid`: the loss projects them onto the vocabulary chunk by chunk."""
  model = nnx.merge(graphdef, state)
  hidden = model.forward(ids, attention_mask=mask, return_logits=False).hidden
  hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # only the scored positions
  return jnp.where(valid[..., None], hidden, 0)


def head_arrays(teacher: nnx.Module) -> dict[str, jax.Array]:
  """The teacher's output projection as it is stored, in its compute dtype: {"lm_head": [D, V]}, or
  {"embed": [V, D]} when tied (transposed inside the jitted step, `output_projection`: no resident copy)."""
  if teacher.config.tie_word_embeddings:
    return {"embed": teacher.embed[...].astype(teacher.dtype)}
  return {"lm_head": teacher.lm_head[...].astype(teacher.dtype)}


def output_projection(arrays: Mapping[str, jax.Array]) -> jax.Array:
  """[D, V] from `head_arrays`, as `Llama.lm_head_weight` gives it."""
  return arrays["lm_head"] if "lm_head" in arrays else arrays["embed"].T


@jax.jit
def _full_logits(hidden, head):
  """[B, S, V] float32 teacher logits of `_teacher_hidden`'s states: the batch of `teacher_scoring="logits"`."""
  return jnp.einsum("bsd,dv->bsv", hidden, output_projection(head), preferred_element_type=jnp.float32)


class OnPolicy:
  """The resident primed teacher, its prompts per question, and the on-policy steps of `train.train`.

  `teacher_prompts` maps each GSM8K id (train and validation) to the arm's primed teacher prompt; the
  student's prompt is read from the example itself (its tokens before the response).

  A scored batch carries the teacher's final hidden states, `teacher_hidden` [B, S, D], and the train step
  gets `teacher_head` (`head_arrays`: the teacher's own lm_head or tied embedding, no copy): the loss forms the
  teacher logits per chunk of tokens. `teacher_scoring="logits"` puts the full [B, S, V] float32 logits in the
  batch instead, and `teacher_head` is None (the path before, kept for the benchmark and the equivalence test;
  same loss).
  """

  def __init__(self, teacher: nnx.Module, teacher_prompts: Mapping[int, Sequence[int]],
               settings: OnPolicySettings, *, stop_ids: Sequence[int], pad_id: int, teacher_scoring: str = "hidden"):
    if teacher_scoring not in ("hidden", "logits"):
      raise OnPolicyError(f"teacher_scoring must be 'hidden' or 'logits', got {teacher_scoring!r}")
    self.teacher_scoring = teacher_scoring
    self._head = head_arrays(teacher)
    self.teacher_graphdef, self.teacher_state = nnx.split(teacher)
    self.vocab_size = teacher.config.vocab_size
    self.teacher_prompts = {int(q): np.asarray(p, np.int32) for q, p in teacher_prompts.items()}
    self.settings = settings
    self.stop_ids, self.pad_id = [int(s) for s in stop_ids], int(pad_id)

  @classmethod
  def from_store(cls, teacher: nnx.Module, store_dir: Any, settings: OnPolicySettings, *,
                 stop_ids: Sequence[int], pad_id: int) -> "OnPolicy":
    """Teacher prompts from the arm's store: the very prompts its off-policy responses were written under."""
    from kdjax.teacher import store
    prompts = {int(r.question_id): r.teacher_prompt_ids for r in store.StoreReader(store_dir)}
    return cls(teacher, prompts, settings, stop_ids=stop_ids, pad_id=pad_id)

  # ----------------------------------------------------------------------------------------- checks

  def check(self, student: nnx.Module, *datasets: Sequence[batches_lib.TrainExample]) -> None:
    """Refuses, before the first step, a student of another vocabulary or a question without a teacher prompt."""
    if student.config.vocab_size != self.vocab_size:
      raise OnPolicyError(f"on-policy scoring needs one vocabulary: the student has {student.config.vocab_size} "
                          f"tokens, the teacher {self.vocab_size}")
    for data in datasets:
      missing = sorted({e.question_id for e in data} - set(self.teacher_prompts), key=str)
      if missing:
        raise OnPolicyError(f"{len(missing)} questions have no primed teacher prompt (first: {missing[0]}): "
                            f"on-policy steps need each example's GSM8K id and the arm's store")

  @property
  def teacher_head(self) -> dict[str, jax.Array] | None:
    """What the on-policy train step needs of the teacher beside the batch (`train.make_train_step`)."""
    return self._head if self.teacher_scoring == "hidden" else None

  def is_on_policy(self, seed: int, step: int) -> bool:
    return is_on_policy_step(seed, step, self.settings.fraction)

  # ----------------------------------------------------------------------------------------- batches

  def _sample(self, student: nnx.Module, examples: Sequence[batches_lib.TrainExample], seed: int,
              temperature: float | None = None) -> list[np.ndarray]:
    prompts = [_student_prompt(e) for e in examples]
    temperature = self.settings.temperature if temperature is None else temperature
    sampling = generation.SamplingConfig(temperature=temperature,
                                         max_new_tokens=self.settings.max_new_tokens, seed=seed)
    out = generation.generate(student, prompts, sampling, stop_ids=self.stop_ids, pad_id=self.pad_id,
                              example_ids=[e.question_id for e in examples], batch_size=self.settings.decode_slots)
    return [np.asarray(g.tokens, np.int32) for g in out]

  def _scored_batch(self, examples, responses, rows: int, pad_multiple: int, max_length: int | None) -> dict:
    """The student's batch (bare prompt + its response) with the primed teacher's final hidden states (or
    logits) at its loss positions."""
    student_rows = [batches_lib.ce_example(_student_prompt(e), r, None, question_id=e.question_id)
                    for e, r in zip(examples, responses)]
    batch = batches_lib.collate(student_rows, pad_multiple=pad_multiple, batch_size=rows, max_length=max_length)
    length = batch["input_ids"].shape[1]
    teacher_seqs = [np.concatenate([self.teacher_prompts[e.question_id], r]) for e, r in zip(examples, responses)]
    teacher_len = batches_lib.round_up(max(len(s) for s in teacher_seqs), pad_multiple)
    teacher_ids = np.full((rows, teacher_len), self.pad_id, np.int32)
    teacher_mask = np.zeros((rows, teacher_len), np.int32)
    positions = np.zeros((rows, length), np.int32)
    valid = batch["loss_mask"] > 0
    for row, (example, seq) in enumerate(zip(examples, teacher_seqs)):
      teacher_ids[row, :len(seq)], teacher_mask[row, :len(seq)] = seq, 1
      # Student position t predicts response token t - P + 1; the teacher predicts it at t - P + P_teacher.
      shift = len(self.teacher_prompts[example.question_id]) - len(_student_prompt(example))
      positions[row] = np.clip(np.arange(length) + shift, 0, teacher_len - 1)
    hidden = _teacher_hidden(self.teacher_graphdef, self.teacher_state, teacher_ids, teacher_mask, positions, valid)
    if self.teacher_scoring == "logits":
      return dict(batch, teacher_logits=_full_logits(hidden, self._head))
    return dict(batch, teacher_hidden=hidden)

  def step_batch(self, student: nnx.Module, iterator: batches_lib.BatchIterator,
                 data: Sequence[batches_lib.TrainExample], step: int, cfg: Any) -> tuple[dict, dict]:
    """The batch of on-policy step `step` and its metrics; advances `iterator` past the store batch it replaces.

    `cfg` is the run's `train.TrainConfig` (seed, examples per step, padding, max length).
    """
    indices = iterator.epoch_plan(iterator.epoch)[iterator.position]
    next(iterator)  # the store batch is not used, but the data order stays the off-policy run's
    examples = [data[i] for i in indices]
    start = time.perf_counter()
    responses = self._sample(student, examples, sampling_seed(cfg.seed, SAMPLE, step))
    sampled = time.perf_counter()
    batch = self._scored_batch(examples, responses, cfg.examples_per_step, cfg.pad_multiple, cfg.max_length)
    jax.block_until_ready(batch)
    metrics = {"on_policy": 1.0, "sampled_len": float(np.mean([len(r) for r in responses])),
               "sample_s": sampled - start, "score_s": time.perf_counter() - sampled}
    return batch, metrics

  def validation_batches(self, student: nnx.Module, data: Sequence[batches_lib.TrainExample], cfg: Any
                         ) -> tuple[list[dict], dict]:
    """Scored batches of the student's greedy answers to `data` and their mean length in tokens; the caller
    measures the dense KD and the teacher's log-prob on the batches (`train.evaluate_loss`)."""
    rows = cfg.eval_batch_size or cfg.batch_size
    responses = self._sample(student, data, sampling_seed(cfg.seed, VALIDATE, 0), temperature=0.0)
    out = [self._scored_batch(data[start:start + rows], responses[start:start + rows], rows, cfg.pad_multiple,
                              cfg.max_length) for start in range(0, len(data), rows)]
    return out, float(np.mean([len(r) for r in responses]))

  def validation_metrics(self, student: nnx.Module, val_data: Sequence[batches_lib.TrainExample],
                         train_data: Sequence[batches_lib.TrainExample], cfg: Any, dense_eval) -> dict:
    """The eval hook's on-policy figures: `on_policy_*` on the validation questions and, with
    `probe_questions`, `train_probe_*` on the first that many train questions (the ones the student trains on:
    what it learns there from the primed teacher shows in them, while held-out questions show what transfers).

    `dense_eval(student, batches)` gives the token means of scored batches (`train.evaluate_loss` with the
    on-policy loss and `teacher_head`): their "kd" and "teacher_logprob" are reported.
    """
    out = {}
    for prefix, data in (("on_policy", val_data), ("train_probe", train_data[:self.settings.probe_questions])):
      if not data:
        continue
      scored, sampled_len = self.validation_batches(student, data, cfg)
      means = dense_eval(student, scored)
      out.update({f"{prefix}_kd": means["kd"], f"{prefix}_teacher_logprob": means["teacher_logprob"],
                  f"{prefix}_sampled_len": sampled_len})
    return out

  def timed_update(self, metrics: dict, extra: dict, lora: Any, started: float) -> dict:
    """`metrics` of a step with the on-policy ones (`extra`, empty for a store step) and its update time."""
    jax.block_until_ready(lora)
    return {**metrics, "on_policy": 0.0, **extra, "update_s": time.perf_counter() - started}
