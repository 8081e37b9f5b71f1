"""Rescore saved GSM8K outputs under an extraction rule and print accuracy with its interval.

  python -m kdjax.evaluation.rescore --input=outputs.jsonl --rule=paper
  python -m kdjax.evaluation.rescore --input=outputs.csv --rule=strict \
      --output_column=model_answer --gsm8k=/path/to/gsm8k/test.jsonl

Gold answers come from `--gold_column` when given; else from matching the question text against
GSM8K test (`--gsm8k`: a jsonl path, or the hub name `openai/gsm8k`); else from a `gold` column.
Bad input prints one error line on stderr and exits with status 2.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys
from typing import Optional

from absl import app
from absl import flags

from kdjax.gsm8k import extract
from kdjax.evaluation import report
from kdjax.evaluation import stats

_INPUT = flags.DEFINE_string("input", None, "Saved outputs: a .jsonl or .csv file.")
# A plain string, validated in main, so a bad rule gets the same exit status 2 as other bad input.
_RULE = flags.DEFINE_string("rule", extract.PRIMARY_RULE, f"Extraction rule, one of {extract.RULES}.")
_QUESTION_COLUMN = flags.DEFINE_string("question_column", "question", "Column with the question.")
_OUTPUT_COLUMN = flags.DEFINE_string("output_column", "output", "Column with the model output.")
_GOLD_COLUMN = flags.DEFINE_string(
    "gold_column", None, "Column with the gold answer: a number or a GSM8K `#### N` solution.")
_GSM8K = flags.DEFINE_string(
    "gsm8k", None, "GSM8K test split to match questions against: jsonl path or `openai/gsm8k`.")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.95, "Confidence level of the Wilson interval.")

EXIT_BAD_INPUT = 2


class RescoreError(Exception):
  """Bad input to the rescoring CLI; its message is the one line shown to the user."""


def read_rows(path: pathlib.Path) -> list[dict]:
  """Rows of a jsonl or csv file as dicts."""
  if not path.is_file():
    raise RescoreError(f"input file not found: {path}")
  # utf-8-sig: spreadsheet exports often begin with a byte-order mark, which would otherwise
  # rename the first column.
  if path.suffix.lower() == ".csv":
    # Model outputs can exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8-sig", newline="") as f:
      try:
        return list(csv.DictReader(f))
      except csv.Error as e:
        raise RescoreError(f"{path}: not valid CSV ({e})") from None
  return report.read_jsonl_objects(path, RescoreError)


def _normalise_question(question: str) -> str:
  return " ".join(question.split())


def parse_gold(value) -> float:
  """A gold answer given as a number, a numeric string or a GSM8K solution ending in `#### N`."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  text = str(value)
  if "####" in text:
    return extract.gold_answer(text)
  return float(text.replace(",", "").replace("$", "").strip())


def load_gsm8k_gold(source: str) -> dict[str, float]:
  """Normalised question text -> gold answer, from a jsonl path or the hub name."""
  path = pathlib.Path(source)
  if path.is_dir() and (path / "test.jsonl").is_file():
    path = path / "test.jsonl"
  if path.is_file():
    records = read_rows(path)
  elif source.endswith((".jsonl", ".json")) or "/" not in source:
    raise RescoreError(f"GSM8K file not found: {source}")
  else:
    try:
      import datasets  # pylint: disable=import-outside-toplevel
      records = list(datasets.load_dataset(source, "main", split="test"))
    except Exception as e:  # pylint: disable=broad-except
      # The hub loader raises many unrelated types (network, auth, missing config).
      raise RescoreError(f"could not load {source!r} from the hub: {e}") from None
  gold = {}
  for i, record in enumerate(records):
    if "question" not in record or "answer" not in record:
      raise RescoreError(f"GSM8K record {i} of {source} lacks 'question'/'answer'")
    gold[_normalise_question(record["question"])] = extract.gold_answer(record["answer"])
  return gold


def _column(row: dict, column: str, row_index: int, path: pathlib.Path):
  if column not in row:
    raise RescoreError(f"{path}: row {row_index} has no column {column!r} "
                       f"(columns: {sorted(map(str, row))})")
  return row[column]


def rescore(path: pathlib.Path, rule: str, *, question_column: str = "question",
            output_column: str = "output", gold_column: Optional[str] = None,
            gsm8k: Optional[str] = None, confidence: float = 0.95) -> dict:
  """Accuracy of the outputs in `path` under `rule`, with its Wilson interval."""
  if rule not in extract.RULES:
    raise RescoreError(f"unknown rule {rule!r}; expected one of {extract.RULES}")
  rows = read_rows(path)
  if not rows:
    raise RescoreError(f"{path}: no rows")
  if gold_column is None and gsm8k is None:
    if "gold" not in rows[0]:
      raise RescoreError(f"{path}: no gold answers: pass --gold_column or --gsm8k")
    gold_column = "gold"
  gsm8k_gold = load_gsm8k_gold(gsm8k) if gold_column is None else None

  correct = no_answer = 0
  for index, row in enumerate(rows):
    output = _column(row, output_column, index, path)
    if gold_column is not None:
      raw_gold = _column(row, gold_column, index, path)
      try:
        gold = parse_gold(raw_gold)
      except ValueError:
        raise RescoreError(f"{path}: row {index}: gold {raw_gold!r} is not a number") from None
    else:
      question = _normalise_question(str(_column(row, question_column, index, path)))
      if question not in gsm8k_gold:
        raise RescoreError(f"{path}: row {index}: question not found in GSM8K test "
                           f"({question[:60]!r}...)")
      gold = gsm8k_gold[question]
    answer = extract.extract_answer("" if output is None else str(output), rule)
    no_answer += answer is None
    correct += extract.is_correct(answer, gold)
  low, high = stats.wilson_interval(correct, len(rows), confidence)
  return {"rule": rule, "n": len(rows), "correct": correct, "accuracy": correct / len(rows),
          "ci_low": low, "ci_high": high, "confidence": confidence, "no_answer": no_answer}


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f"rescore: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return EXIT_BAD_INPUT
  if not _INPUT.value:
    print("rescore: error: --input is required", file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    result = rescore(pathlib.Path(_INPUT.value), _RULE.value,
                     question_column=_QUESTION_COLUMN.value, output_column=_OUTPUT_COLUMN.value,
                     gold_column=_GOLD_COLUMN.value, gsm8k=_GSM8K.value,
                     confidence=_CONFIDENCE.value)
  except (RescoreError, extract.GoldAnswerError, ValueError, UnicodeDecodeError) as e:
    print(f"rescore: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  confidence = round(100 * result["confidence"])
  print(f"rule={result['rule']} accuracy={result['accuracy']:.4f} "
        f"{confidence}% CI=[{result['ci_low']:.4f}, {result['ci_high']:.4f}] "
        f"correct={result['correct']} n={result['n']} no_answer={result['no_answer']}")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  app.run(main)
