"""GSM8K loading, gold-answer parsing and a deterministic train/validation split.

The training questions are the first N of GSM8K train, as in the paper (2638); validation is held out from the
rest of train by a seeded hash, so it never overlaps them. A split is read only from its own GSM8K file: a folder
holding `{split}.jsonl`, the hub's `openai/gsm8k`, or a file named `{split}.jsonl` (so a single train file can
never be read, or labelled, as the test split).

Every example is a plain dict with keys `id` (index in its split), `question`, `answer` (the full
reference solution) and `gold` (the number on the solution's `#### N` line, as a float).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from typing import Any, Sequence

from kdjax.infra import storage

HUB_NAME = "openai/gsm8k"
HUB_CONFIG = "main"
GOLD_MARKER = "####"
SPLITS = ("train", "test")

# GSM8K solutions annotate arithmetic as `<<48/2=24>>` for a calculator tool; readers (and a
# teacher shown the solution as a hint) only need the surrounding prose.
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


class DataError(ValueError):
  """A dataset source is missing or holds a malformed record."""


def parse_gold(answer: str) -> float:
  """Returns the number on the last `#### N` line of a GSM8K solution (commas stripped)."""
  for line in reversed(answer.strip().splitlines()):
    line = line.strip()
    if line.startswith(GOLD_MARKER):
      text = line[len(GOLD_MARKER):].strip().replace(",", "")
      try:
        return float(text)
      except ValueError:
        raise DataError(f"gold answer {text!r} after {GOLD_MARKER!r} is not a number") from None
  raise DataError(f"solution has no '{GOLD_MARKER} N' line")


def strip_calculator_annotations(answer: str) -> str:
  """Removes GSM8K's `<<expr=value>>` calculator annotations from a solution."""
  return _CALCULATOR_ANNOTATION.sub("", answer)


def question_hash(question: str) -> str:
  """A short stable fingerprint of a question: first 16 hex chars of its sha256."""
  return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def example_hash(example: dict) -> str:
  """A short stable fingerprint of a question and its reference solution (both decide results)."""
  content = f"{example['question']}\x00{example['answer']}"
  return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def _make_example(index: int, row: Any, where: str) -> dict:
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
  missing = [key for key in ("question", "answer") if not isinstance(row.get(key), str)]
  if missing:
    raise DataError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
  try:
    gold = parse_gold(row["answer"])
  except DataError as err:
    raise DataError(f"{where}: {err}") from None
  return {"id": index, "question": row["question"], "answer": row["answer"], "gold": gold}


def _load_jsonl(path: pathlib.Path) -> list[dict]:
  examples = []
  with path.open(encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue  # a trailing blank line is not a record
      where = f"{path}:{line_number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg})") from None
      examples.append(_make_example(len(examples), row, where))
  return examples


def _load_hub(split: str) -> list[dict]:
  import datasets  # heavy import, only needed for the hub branch

  try:
    rows = datasets.load_dataset(HUB_NAME, HUB_CONFIG, split=split)
  except Exception as err:  # network, cache or split errors all mean "cannot load this source"
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise DataError(f"could not load {HUB_NAME} split {split!r} from the hub: {first_line}") from err
  return [_make_example(i, dict(row), f"{HUB_NAME}[{split}][{i}]") for i, row in enumerate(rows)]


def load_gsm8k(source: str | os.PathLike, split: str) -> list[dict]:
  """Loads one GSM8K split.

  Args:
    source: a directory holding `{split}.jsonl`, a file named `{split}.jsonl`, or the hub name `openai/gsm8k`.
      An existing local path wins over the hub name.
    split: `train` or `test` (selects the file in a directory, or the hub split, and must match a file's name).
  """
  if split not in SPLITS:
    raise DataError(f"unknown GSM8K split {split!r}; expected one of {SPLITS}")
  path = storage.path(source)
  if path.is_dir():
    file_path = path / f"{split}.jsonl"
    if not file_path.is_file():
      raise DataError(f"no {split}.jsonl in GSM8K directory {path}")
    return _load_jsonl(file_path)
  if path.is_file():
    check_split_file(path, split)
    return _load_jsonl(path)
  if str(source) == HUB_NAME:
    return _load_hub(split)
  raise DataError(f"GSM8K source {str(source)!r} is neither an existing path nor {HUB_NAME!r}")


def check_split_file(path: str | os.PathLike, split: str) -> None:
  """A single file is read only as the split it is named after: never a train file as test, or the reverse."""
  if pathlib.Path(path).name != f"{split}.jsonl":
    raise DataError(f"the {split} split is read only from a GSM8K {split} set (a folder with {split}.jsonl or "
                    f"{HUB_NAME}), not from the single file {path}")


def _split_order_key(seed: int, example_id: int) -> str:
  # A hash instead of a seeded RNG: the order never depends on numpy's generator implementation.
  return hashlib.sha256(f"kdjax-split:{seed}:{example_id}".encode()).hexdigest()


def split_train_validation(
    examples: Sequence[dict], num_train: int | None, num_validation: int, seed: int
) -> tuple[list[dict], list[dict]]:
  """Splits GSM8K train examples into disjoint (train, validation) lists.

  Train is the first `num_train` examples by id (the paper trains on the first 2638 GSM8K train questions);
  validation is `num_validation` examples of the rest, picked in the order of a seeded hash of their ids.
  With `num_train=None`, validation is picked from all examples and train is everything else, in id order.
  The result does not depend on the order the examples are passed in.
  """
  if num_validation < 0 or (num_train is not None and num_train < 0):
    raise DataError(f"split sizes must be >= 0, got num_train={num_train}, num_validation={num_validation}")
  available = len(examples) - num_validation
  if available < 0 or (num_train is not None and num_train > available):
    raise DataError(f"cannot take num_train={num_train} + num_validation={num_validation} "
                    f"from {len(examples)} examples")
  ids = [example["id"] for example in examples]
  if len(set(ids)) != len(ids):
    raise DataError("examples have duplicate ids; split one GSM8K split at a time")
  by_id = sorted(examples, key=lambda example: example["id"])
  first = by_id if num_train is None else by_id[:num_train]
  pool = by_id if num_train is None else by_id[num_train:]
  validation = sorted(pool, key=lambda example: _split_order_key(seed, example["id"]))[:num_validation]
  if num_train is None:
    held_out = {example["id"] for example in validation}
    first = [example for example in by_id if example["id"] not in held_out]
  return list(first), validation
