"""Training sequences and padded batches for the student, from the teacher store or from GSM8K gold solutions.

Alignment. A sequence is ``x = student prompt + response`` (the response ends with the stop token when the
teacher stopped; gold solutions get the end token appended). The causal shift is done once, here: position ``t``
of every per-token array describes the token ``x[t + 1]`` that the model predicts there:

  input_ids[t] = x[t]             target_ids[t] = x[t + 1]          (0 at the last position)
  loss_mask[t] = 1 iff x[t + 1] is a response token, i.e. t in [P - 1, n - 2] for a prompt of P tokens
  teacher_*[t] = the teacher's top-k for response token t - (P - 1)

so the last prompt position predicts the first response token and the position before the end token predicts
the end token. Nothing downstream shifts again.

Batches are right-padded to a length rounded up to a multiple (``pad_multiple``), which bounds the number of
distinct shapes (compilations). `BatchIterator` shuffles deterministically per epoch from a seed (hash based, so
the order never depends on numpy's generator) and its state is a small JSON dict ``{epoch, position}`` from which
it resumes exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

BATCH_KEYS = ("input_ids", "attention_mask", "target_ids", "loss_mask", "teacher_ids", "teacher_logprobs",
              "teacher_log_tail")
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_log_tail")


class BatchError(ValueError):
  """A record, example or iterator state that cannot be turned into training batches."""


@dataclasses.dataclass(frozen=True, eq=False)
class TrainExample:
  """One already-shifted training sequence (see the module docstring).

  The teacher arrays hold only the response rows: row ``i`` belongs to position ``teacher_offset + i``
  (``teacher_offset = P - 1``), which keeps a whole store in memory without zero rows for the prompts. They are
  None for CE-only data.
  """

  input_ids: np.ndarray                       # [n] int32
  target_ids: np.ndarray                      # [n] int32
  loss_mask: np.ndarray                       # [n] float32
  teacher_offset: int = 0
  teacher_ids: np.ndarray | None = None       # [m, k] int32
  teacher_logprobs: np.ndarray | None = None  # [m, k] float32
  teacher_log_tail: np.ndarray | None = None  # [m] float32, log-mass outside the top-k at the loss temperature
  question_id: int | None = None              # GSM8K train id, when known

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def has_teacher(self) -> bool:
    return self.teacher_ids is not None

  @property
  def num_loss_tokens(self) -> int:
    return int(np.count_nonzero(self.loss_mask))

  def truncated(self, max_length: int) -> "TrainExample":
    """The first `max_length` positions; response tokens beyond them lose their loss."""
    if len(self) <= max_length:
      return self
    rows = max(0, max_length - self.teacher_offset)
    teacher = {name: None if getattr(self, name) is None else getattr(self, name)[:rows] for name in TEACHER_KEYS}
    return dataclasses.replace(self, input_ids=self.input_ids[:max_length], target_ids=self.target_ids[:max_length],
                               loss_mask=self.loss_mask[:max_length], **teacher)


def count_loss_tokens(examples: Sequence[TrainExample], max_length: int | None = None) -> tuple[int, int]:
  """(loss tokens left after truncating every example to `max_length`, examples left with none)."""
  counts = [(e if max_length is None else e.truncated(max_length)).num_loss_tokens for e in examples]
  return sum(counts), sum(1 for c in counts if c == 0)


def _ids(values: Any, name: str) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
    raise BatchError(f"{name} must be a 1-D integer sequence, got shape {array.shape} dtype {array.dtype}")
  return array.astype(np.int32)


def _shifted(prompt: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  if prompt.size < 1 or response.size < 1:
    raise BatchError(f"need a non-empty prompt and response, got {prompt.size} and {response.size} tokens")
  x = np.concatenate([prompt, response])
  targets = np.zeros_like(x)
  targets[:-1] = x[1:]
  mask = np.zeros(x.shape, np.float32)
  mask[prompt.size - 1:x.size - 1] = 1.0
  return x, targets, mask


def distill_example(prompt_ids: Any, response_ids: Any, topk_ids: Any, topk_logprobs: Any,
                    tail_log_mass: Any | None = None, *, question_id: int | None = None) -> TrainExample:
  """A KD sequence: student prompt + teacher response, with the teacher's top-k for each response token.

  Args:
    prompt_ids: [P] the student's prompt (no priming text).
    response_ids: [T] the teacher's response tokens (including its stop token when it stopped).
    topk_ids, topk_logprobs: [T, k] teacher top-k for each response token (log-probs at T = 1).
    tail_log_mass: [T] log of the teacher's mass outside the top-k at the loss temperature (None: the log of
      1 - sum of the top-k probabilities, the tail at temperature 1).
  """
  prompt, response = _ids(prompt_ids, "prompt_ids"), _ids(response_ids, "response_ids")
  topk_ids, topk_logprobs = np.asarray(topk_ids), np.asarray(topk_logprobs, np.float32)
  num = response.size
  if topk_ids.ndim != 2 or topk_ids.shape[0] != num or topk_logprobs.shape != topk_ids.shape:
    raise BatchError(f"topk_ids {topk_ids.shape} and topk_logprobs {topk_logprobs.shape} must be "
                     f"[{num}, k] for {num} response tokens")
  if tail_log_mass is None:
    with np.errstate(divide="ignore"):  # a tail that rounds to 0 is -inf; the loss guards it
      tail = np.log(np.clip(-np.expm1(np.logaddexp.reduce(topk_logprobs.astype(np.float64), axis=-1)), 0.0, 1.0))
    tail = tail.astype(np.float32)
  else:
    tail = np.asarray(tail_log_mass, np.float32)
    if tail.shape != (num,):
      raise BatchError(f"tail_log_mass must be [{num}], got {tail.shape}")
  x, targets, mask = _shifted(prompt, response)
  return TrainExample(x, targets, mask, prompt.size - 1, topk_ids.astype(np.int32), topk_logprobs, tail,
                      question_id)


def ce_example(prompt_ids: Any, solution_ids: Any, end_token_id: int | None, *,
               question_id: int | None = None) -> TrainExample:
  """A cross-entropy-only sequence: prompt + solution (+ end token), loss on the solution and end token."""
  solution = _ids(solution_ids, "solution_ids")
  if end_token_id is not None:
    solution = np.concatenate([solution, np.asarray([end_token_id], np.int32)])
  x, targets, mask = _shifted(_ids(prompt_ids, "prompt_ids"), solution)
  return TrainExample(x, targets, mask, question_id=question_id)


def _tail_column(temperature: float, store_temperatures: Sequence[float]) -> int | None:
  """Index of `temperature` in `store_temperatures`, or None."""
  for index, stored in enumerate(store_temperatures):
    if math.isclose(float(stored), temperature, rel_tol=1e-9):
      return index
  return None


def require_tail_temperature(temperature: float, store_temperatures: Sequence[float], topk_mode: str,
                             where: str = "the teacher store") -> None:
  """Raises BatchError (one line) when "tail" mode at `temperature` needs a tail the store does not keep.

  At T = 1 the store's `tail_mass` serves; at other T the exact tempered tail (`tail_log_mass`) must have been
  generated at T (see kdjax.distill.losses for why it cannot be derived from the top-k).
  """
  if topk_mode != "tail" or temperature == 1.0 or _tail_column(temperature, store_temperatures) is not None:
    return
  kept = ", ".join(f"{t:g}" for t in sorted({1.0, *map(float, store_temperatures)}))
  raise BatchError(
      f"distill.temperature={temperature:g} with topk_mode=tail needs the teacher's exact tail mass at "
      f"T={temperature:g}, but {where} keeps it only at T in {{{kept}}}; regenerate the store with "
      f"--config.teacher.tail_temperatures=1,{temperature:g} or use --config.distill.topk_mode=renormalize")


def examples_from_records(records: Iterable[Any], *, temperature: float = 1.0,
                          topk_mode: str = "tail") -> list[TrainExample]:
  """KD sequences from teacher-store records (`kdjax.teacher.store.TeacherRecord`, e.g. a `StoreReader.filter()`).

  `teacher_log_tail` is the tail's log-mass at the loss `temperature`: the record's stored one at that
  temperature (`tail_log_mass`), else at T = 1 the log of its `tail_mass` (stores older than the field);
  "tail" mode at any other temperature raises BatchError. Renormalize mode never reads the tail.
  """
  out = []
  for record in records:
    temperatures = tuple(getattr(record, "tail_temperatures", ()))
    require_tail_temperature(temperature, temperatures, topk_mode)
    column = _tail_column(temperature if topk_mode == "tail" else 1.0, temperatures)
    if column is not None:
      tail = np.asarray(record.tail_log_mass, np.float32)[:, column]
    else:
      with np.errstate(divide="ignore"):
        tail = np.log(np.asarray(record.tail_mass, np.float32))
    out.append(distill_example(record.student_prompt_ids, record.response_ids, record.topk_ids,
                               record.topk_logprobs, tail, question_id=int(record.question_id)))
  return out


def gold_examples(gsm8k_examples: Sequence[Mapping[str, Any]], tokenizer: Any, *,
                  end_token_id: int | None = None, strip_annotations: bool = True) -> list[TrainExample]:
  """CE sequences on GSM8K gold solutions (the fine-tuning control), from `kdjax.gsm8k.data.load_gsm8k` dicts.

  The prompt is the student chat (`priming.student_messages`); the end token defaults to the first of
  `priming.stop_token_ids(tokenizer)`. Calculator annotations `<<a=b>>` are removed unless told otherwise.
  """
  from kdjax.gsm8k import data  # light, but keeps this module importable without a tokenizer stack
  from kdjax.teacher import priming
  if end_token_id is None:
    stops = priming.stop_token_ids(tokenizer)
    if not stops:
      raise BatchError("the student's tokenizer has no eos or end-of-turn token to end a gold solution with; "
                       "use a student whose tokenizer defines one")
    end_token_id = stops[0]
  out = []
  for example in gsm8k_examples:
    answer = example["answer"]
    if strip_annotations:
      answer = data.strip_calculator_annotations(answer)
    prompt = priming.encode_chat(tokenizer, priming.student_messages(example["question"]))
    solution = tokenizer.encode(answer.strip(), add_special_tokens=False)
    out.append(ce_example(prompt, solution, end_token_id, question_id=example.get("id")))
  return out


# ---------------------------------------------------------------------------------------------------- batches


def round_up(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


def collate(examples: Sequence[TrainExample], *, pad_multiple: int = 64, batch_size: int | None = None,
            max_length: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Right-pads `examples` into one batch dict (see BATCH_KEYS); teacher keys only if the examples have them.

  The length is the longest example rounded up to `pad_multiple` (capped at `max_length`, which also truncates).
  With `batch_size`, missing rows are added as all-padding rows (no loss tokens), so the shape stays fixed.
  """
  if not examples:
    raise BatchError("cannot collate an empty list of examples")
  if pad_multiple < 1:
    raise BatchError(f"pad_multiple must be >= 1, got {pad_multiple}")
  if max_length is not None:
    examples = [e.truncated(max_length) for e in examples]
  rows = batch_size if batch_size is not None else len(examples)
  if rows < len(examples):
    raise BatchError(f"batch_size {rows} is smaller than the {len(examples)} examples given")
  with_teacher = {e.has_teacher for e in examples}
  if len(with_teacher) > 1:
    raise BatchError("cannot mix examples with and without teacher arrays in one batch")
  length = round_up(max(len(e) for e in examples), pad_multiple)
  if max_length is not None:
    length = min(length, max_length)
  batch = {"input_ids": np.full((rows, length), pad_id, np.int32),
           "attention_mask": np.zeros((rows, length), np.int32),
           "target_ids": np.zeros((rows, length), np.int32),
           "loss_mask": np.zeros((rows, length), np.float32)}
  if with_teacher == {True}:
    k = examples[0].teacher_ids.shape[1]
    if any(e.teacher_ids.shape[1] != k for e in examples):
      raise BatchError("examples have different top-k sizes")
    batch["teacher_ids"] = np.zeros((rows, length, k), np.int32)
    batch["teacher_logprobs"] = np.zeros((rows, length, k), np.float32)
    batch["teacher_log_tail"] = np.zeros((rows, length), np.float32)
  for row, example in enumerate(examples):
    n = len(example)
    batch["input_ids"][row, :n] = example.input_ids
    batch["attention_mask"][row, :n] = 1
    batch["target_ids"][row, :n] = example.target_ids
    batch["loss_mask"][row, :n] = example.loss_mask
    if "teacher_ids" in batch:
      start = example.teacher_offset
      for key in TEACHER_KEYS:
        rows = getattr(example, key)
        batch[key][row, start:start + len(rows)] = rows
  return batch


def eval_batches(examples: Sequence[TrainExample], batch_size: int, *, pad_multiple: int = 64,
                 max_length: int | None = None) -> list[dict[str, np.ndarray]]:
  """Fixed-order batches of `examples` (the last one filled with padding rows)."""
  return [collate(examples[i:i + batch_size], pad_multiple=pad_multiple, batch_size=batch_size,
                  max_length=max_length) for i in range(0, len(examples), batch_size)]


def _hash_order(keys: Sequence[Any], salt: str) -> list[int]:
  """A permutation of range(len(keys)) from sha256, identical on every platform and numpy version."""
  digests = [hashlib.sha256(f"{salt}:{key}".encode()).digest() for key in keys]
  return sorted(range(len(keys)), key=digests.__getitem__)


class BatchIterator:
  """Endless, deterministic, resumable batches over `examples`, epoch after epoch.

  Each epoch is a seeded permutation of all examples cut into batches of `batch_size` (the last one topped up
  with padding rows). With `sort_window` > 1, windows of that many batches are sorted by length before being
  cut, and the batch order is shuffled again, so a batch holds similar lengths (less padding) while the epoch
  stays random. `state()` is ``{"epoch", "position", "seed", "num_examples"}``: JSON, and `restore` resumes
  at exactly the next batch.
  """

  def __init__(self, examples: Sequence[TrainExample], batch_size: int, *, seed: int = 0, shuffle: bool = True,
               pad_multiple: int = 64, max_length: int | None = None, sort_window: int = 1, pad_id: int = 0):
    if not examples:
      raise BatchError("BatchIterator needs at least one example")
    if batch_size < 1 or sort_window < 1:
      raise BatchError(f"batch_size and sort_window must be >= 1, got {batch_size}, {sort_window}")
    self.examples = examples
    self.batch_size = batch_size
    self.seed = int(seed)
    self.shuffle = shuffle
    self.pad_multiple = pad_multiple
    self.max_length = max_length
    self.sort_window = sort_window
    self.pad_id = pad_id
    self.epoch = 0
    self.position = 0
    self._epoch_cache: tuple[int, list[list[int]]] | None = None

  @property
  def batches_per_epoch(self) -> int:
    return -(-len(self.examples) // self.batch_size)

  def epoch_plan(self, epoch: int) -> list[list[int]]:
    """Example indices of every batch of `epoch`, in order."""
    if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
      return self._epoch_cache[1]
    n = len(self.examples)
    order = _hash_order(range(n), f"kdjax-epoch:{self.seed}:{epoch}") if self.shuffle else list(range(n))
    if self.sort_window > 1:
      window = self.sort_window * self.batch_size
      order = [i for start in range(0, n, window)
               for i in sorted(order[start:start + window], key=lambda j: len(self.examples[j]))]
    plan = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
    if self.sort_window > 1 and self.shuffle:
      plan = [plan[i] for i in _hash_order(range(len(plan)), f"kdjax-batches:{self.seed}:{epoch}")]
    self._epoch_cache = (epoch, plan)
    return plan

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    indices = self.epoch_plan(self.epoch)[self.position]
    self.position += 1
    if self.position == self.batches_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
    return collate([self.examples[i] for i in indices], pad_multiple=self.pad_multiple,
                   batch_size=self.batch_size, max_length=self.max_length, pad_id=self.pad_id)

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
            "num_examples": len(self.examples)}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state()` of an iterator over the same examples with the same seed."""
    try:
      epoch, position = int(state["epoch"]), int(state["position"])
    except (KeyError, TypeError, ValueError):
      raise BatchError(f"iterator state needs integer 'epoch' and 'position', got {dict(state)!r}") from None
    for key, mine in (("seed", self.seed), ("num_examples", len(self.examples))):
      if key in state and int(state[key]) != mine:
        raise BatchError(f"iterator state was saved with {key}={state[key]}, this iterator has {mine}")
    if epoch < 0 or not 0 <= position < self.batches_per_epoch:
      raise BatchError(f"iterator state epoch={epoch} position={position} out of range "
                       f"({self.batches_per_epoch} batches per epoch)")
    self.epoch, self.position = epoch, position
