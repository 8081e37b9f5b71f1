"""What a hinted teacher copies: mentions of a provided solution, and word overlap with the reference solution.

In `gold_hint` the teacher reads the question's GSM8K reference solution; a response that restates it word for word
teaches the student GSM8K's text, not the teacher's reasoning. Two measures per response, and their store totals:

- `mentions_hint(text)`: the response speaks of a provided solution or hint ("the provided solution", "the hint",
  ...; `HINT_PHRASES`, case-insensitive, whole words). The phrases name a solution, answer or hint as given,
  provided or referenced; generic wording a plain solution uses as well ("given that", "as given in the problem",
  "the solution is") is left out on purpose, so a mention is evidence that the teacher saw a hint.
- `rouge_l_f1(response, reference)`: ROUGE-L F1 over word tokens against the reference solution with its
  calculator annotations (`<<48/2=24>>`) removed, i.e. the text the gold hint shows. 1.0 only when both are the
  same word sequence.

`store_statistics` gives a store's share of mentions, mean overlap and share of overlaps above `COPY_THRESHOLD`;
`select` drops the responses above `teacher.max_reference_overlap` before training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kdjax.gsm8k import data

# A response whose overlap with the reference exceeds this is counted as (nearly) a copy in the store table.
COPY_THRESHOLD = 0.8

HINT_PHRASES = (
    "provided solution", "given solution", "reference solution", "solution provided", "solution given",
    "solution you provided", "solution that was provided", "above solution", "solution above",
    "according to the solution", "reference answer", "provided answer", "answer provided",
    "the hint", "provided hint", "given hint", "hint provided",
)
# Whole words, any run of whitespace between them, any case.
_HINT_PATTERN = re.compile(
    r"\b(?:" + "|".join(r"\s+".join(map(re.escape, phrase.split())) for phrase in HINT_PHRASES) + r")\b",
    re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")


def mentions_hint(text: str) -> bool:
  """True when `text` contains one of `HINT_PHRASES` (case-insensitive, as whole words)."""
  return _HINT_PATTERN.search(text or "") is not None


def words(text: str) -> list[str]:
  """The word tokens the overlap compares: maximal runs of ASCII letters and digits of the lowercased text.

  Punctuation, operators and spacing are not tokens ("48/2 = 24." is 48, 2, 24). This is the tokenizer of Google's
  `rouge_score` without stemming, so the figures are ROUGE-L as usually reported.
  """
  return _WORD.findall((text or "").lower())


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
  """The length of a longest common subsequence of two token sequences.

  Bit-parallel (Allison and Dix 1986, in Hyyroe's form, 2004): `v` holds one row of the dynamic-programming table
  as its increments, bit i being 0 where the LCS of the tokens of `a` read so far with `b[:i + 1]` is one longer
  than with `b[:i]`, so the row's last value is the count of 0 bits; each token of `a` costs a few integer
  operations on len(b) bits instead of a row of the len(a) x len(b) table.
  """
  if len(a) < len(b):
    a, b = b, a  # the bit vector spans the shorter sequence
  if not b:
    return 0
  masks: dict[Any, int] = {}
  for i, token in enumerate(b):
    masks[token] = masks.get(token, 0) | (1 << i)
  full = (1 << len(b)) - 1
  v = full
  for token in a:
    match = masks.get(token)
    if match:
      u = v & match
      v = ((v + u) | (v - u)) & full
  return len(b) - bin(v).count("1")


def rouge_l_f1(response: str, reference: str) -> float:
  """ROUGE-L F1 of `response` against `reference` over `words`: with L the length of their longest common
  subsequence, precision L / |response|, recall L / |reference| and F1 = 2 L / (|response| + |reference|).

  In [0, 1]; 0 when either has no words. A response that repeats the reference and adds as many words again scores
  2/3: F1, unlike recall alone, does not call a long answer that happens to contain the reference's words a copy.
  """
  response_words, reference_words = words(response), words(reference)
  if not response_words or not reference_words:
    return 0.0
  return 2.0 * lcs_length(response_words, reference_words) / (len(response_words) + len(reference_words))


def reference_text(question: Mapping) -> str:
  """A question's reference solution as the gold hint shows it: calculator annotations removed."""
  return data.strip_calculator_annotations(question["answer"]).strip()


def reference_overlaps(records: Iterable, questions: Sequence[Mapping]) -> list[float | None]:
  """Per record (`question_id`, `question_hash`, `response_text`, as store records and their metadata have), the
  ROUGE-L F1 of its response against its question's reference solution; None for a record whose question is not in
  `questions` under the same text (the overlap is only taken against the solution of the question it answered)."""
  by_id = {int(q["id"]): q for q in questions}
  overlaps = []
  for record in records:
    get = record.get if isinstance(record, Mapping) else lambda name, r=record: getattr(r, name)
    question = by_id.get(int(get("question_id")))
    if question is None or data.question_hash(question["question"]) != get("question_hash"):
      overlaps.append(None)
    else:
      overlaps.append(rouge_l_f1(get("response_text") or "", reference_text(question)))
  return overlaps


def store_statistics(reader: Any, questions: Sequence[Mapping] | None) -> dict:
  """A store's hint and copy measures, from its records' metadata (`store.StoreReader`).

  `hint_mention_share`: responses that `mentions_hint`. `reference_overlap_mean` and `reference_overlap_high_share`
  (above `COPY_THRESHOLD`): over the `reference_overlap_n` responses whose question is in `questions` (the store's
  question list, with the reference solutions); None without them.
  """
  metadata = [reader.metadata(i) for i in range(len(reader))]
  n = len(metadata)
  overlaps = [o for o in reference_overlaps(metadata, questions or []) if o is not None]
  return {
      "hint_mention_share": sum(mentions_hint(m["response_text"]) for m in metadata) / n if n else None,
      "reference_overlap_n": len(overlaps),
      "reference_overlap_mean": sum(overlaps) / len(overlaps) if overlaps else None,
      "reference_overlap_high_share": sum(o > COPY_THRESHOLD for o in overlaps) / len(overlaps) if overlaps else None,
      "reference_overlap_high_threshold": COPY_THRESHOLD,
  }


def select(records: Sequence, questions: Sequence[Mapping], max_overlap: float) -> tuple[list, int]:
  """(the records whose overlap with their reference solution is at most `max_overlap`, how many were dropped).

  `max_overlap` is `teacher.max_reference_overlap` in (0, 1]; at 1.0 nothing is dropped (an overlap is at most 1)
  and no overlap is computed. A record whose question is not in `questions` raises ValueError: it cannot be
  measured, and keeping it unmeasured would pass a copy through the filter.
  """
  if max_overlap >= 1.0:
    return list(records), 0
  overlaps = reference_overlaps(records, questions)
  unknown = [r.question_id for r, o in zip(records, overlaps) if o is None]
  if unknown:
    raise ValueError(f"teacher.max_reference_overlap: the store's responses to question(s) {unknown[:5]} answer "
                     f"no question of this run's list, so their overlap cannot be measured")
  kept = [r for r, o in zip(records, overlaps) if o <= max_overlap]
  return kept, len(records) - len(kept)
