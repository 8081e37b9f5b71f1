"""What a hinted teacher copies (kdjax/reference_overlap.py): hint mentions, ROUGE-L against a hand-computed case and
a brute-force LCS, and teacher.max_reference_overlap dropping copies from a kd arm's training data."""

import itertools
import json
import random
import types

import numpy as np
import pytest

from kdjax.experiment import config as config_lib
from kdjax.gsm8k import data, reference_overlap
from kdjax.experiment import pipeline
from kdjax.teacher import store


# ------------------------------------------------------------------------------------------ the measures


def _brute_force_lcs(a, b) -> int:
  """The longest subsequence of the shorter sequence that is also one of the other, by trying them all."""
  short, long = (a, b) if len(a) <= len(b) else (b, a)
  for size in range(len(short), 0, -1):
    for kept in itertools.combinations(range(len(short)), size):
      rest = iter(long)
      if all(any(token == other for other in rest) for token in (short[i] for i in kept)):
        return size
  return 0


def test_lcs_equals_brute_force_on_random_sequences():
  rng = random.Random(0)
  for _ in range(1500):
    a = [rng.choice("abc") for _ in range(rng.randint(0, 9))]
    b = [rng.choice("abcd") for _ in range(rng.randint(0, 9))]
    assert reference_overlap.lcs_length(a, b) == _brute_force_lcs(a, b), (a, b)
  long = [rng.choice("abcdefgh") for _ in range(300)]  # more than 64 bits: the bit vector is a Python integer
  assert reference_overlap.lcs_length(long, long[::3]) == 100
  assert reference_overlap.lcs_length(long, []) == reference_overlap.lcs_length([], []) == 0


def test_rouge_l_f1_by_hand():
  reference = "Natalia sold 48/2 = 24 clips in May."
  response = "In May, Natalia sold 24 clips!"
  # Words: natalia sold 48 2 24 clips in may (8) and in may natalia sold 24 clips (6). The longest common
  # subsequence is "natalia sold 24 clips" (4; "in may" comes first in one and last in the other).
  assert reference_overlap.words(reference) == ["natalia", "sold", "48", "2", "24", "clips", "in", "may"]
  assert reference_overlap.lcs_length(reference_overlap.words(response), reference_overlap.words(reference)) == 4
  precision, recall = 4 / 6, 4 / 8
  assert reference_overlap.rouge_l_f1(response, reference) == pytest.approx(2 * precision * recall
                                                                              / (precision + recall))
  assert reference_overlap.rouge_l_f1(response, reference) == pytest.approx(4 / 7)
  assert reference_overlap.rouge_l_f1(reference.upper(), reference) == 1.0  # case and punctuation are not words
  assert reference_overlap.rouge_l_f1(reference + " " + reference, reference) == pytest.approx(2 / 3)
  assert reference_overlap.rouge_l_f1("", reference) == reference_overlap.rouge_l_f1("?!", reference) == 0.0


def test_rouge_l_f1_equals_rouge_score_where_installed():
  rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  rng = random.Random(1)
  vocabulary = ["The", "store", "sold", "48", "24", "clips", "in", "May", "=", "#### 72", "and", "$5"]
  for _ in range(200):
    a = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 30)))
    b = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 30)))
    assert reference_overlap.rouge_l_f1(a, b) == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure)


@pytest.mark.parametrize("text", [
    "Using the provided solution, 36 - 7 = 29.", "The GIVEN\nsolution says 29.", "As the reference solution shows",
    "The solution provided is right.", "the hint tells us to subtract", "Following the solution above: 29",
    "According to the solution, he keeps 29.", "The reference answer is 29.",
])
def test_mentions_of_a_provided_solution_or_hint(text):
  assert reference_overlap.mentions_hint(text)


@pytest.mark.parametrize("text", [
    "Given that Tom has 3 boxes, 3*12 = 36.", "We are given 3 boxes of 12 pencils.", "As given in the problem, 7.",
    "Solution: 36 - 7 = 29.\n#### 29", "The solution is 29.", "This hints at a subtraction.", "", "the hinted value",
])
def test_ordinary_solutions_do_not_mention_a_hint(text):
  assert not reference_overlap.mentions_hint(text)


def _record(question: dict, text: str, **fields):
  return types.SimpleNamespace(question_id=question["id"], question_hash=data.question_hash(question["question"]),
                               response_text=text, **fields)


QUESTIONS = [{"id": i, "question": f"Question {i}?", "answer": answer} for i, answer in enumerate([
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nFor 50 minutes she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    "Betty has 100 / 2 = $<<100/2=50>>50.\n#### 5"])]


def test_select_drops_copies_above_the_threshold():
  copy = _record(QUESTIONS[0], reference_overlap.reference_text(QUESTIONS[0]))  # the hint, annotations removed
  near = _record(QUESTIONS[1], "Weng earns 12/60 = $0.2 per minute. For 50 minutes she earned 0.2 x 50 = $10. "
                               "So the answer is 10.\n#### 10")
  own = _record(QUESTIONS[2], "Half of 100 is 50, so she needs 5 more.\n#### 5")
  overlaps = reference_overlap.reference_overlaps([copy, near, own], QUESTIONS)
  assert overlaps[0] == 1.0 and 0.8 < overlaps[1] < 1.0 and overlaps[2] < 0.5
  assert reference_overlap.select([copy, near, own], QUESTIONS, 1.0) == ([copy, near, own], 0)
  assert reference_overlap.select([copy, near, own], QUESTIONS, 0.99) == ([near, own], 1)
  assert reference_overlap.select([copy, near, own], QUESTIONS, 0.8) == ([own], 2)
  # A response to a question of another list (same id, other text) cannot be measured: never passed unmeasured.
  stranger = types.SimpleNamespace(question_id=0, question_hash="0123456789abcdef", response_text="x")
  assert reference_overlap.reference_overlaps([stranger], QUESTIONS) == [None]
  with pytest.raises(ValueError, match=r"question\(s\) \[0\] answer no question of this run's list"):
    reference_overlap.select([stranger], QUESTIONS, 0.8)


# ------------------------------------------------------------------------------------------ the train stage


def _store_record(question: dict, text: str, tokens: int) -> store.TeacherRecord:
  return store.TeacherRecord(
      question_id=question["id"], question_hash=data.question_hash(question["question"]), strategy="gold_hint",
      teacher_model="t", sampling={}, student_prompt_ids=np.array([1, 2, 3], np.int32),
      teacher_prompt_ids=np.array([1, 2, 3, 4], np.int32), response_text=text,
      response_ids=np.arange(5, 5 + tokens, dtype=np.int32), topk_ids=np.zeros((tokens, 2), np.int32),
      topk_logprobs=np.full((tokens, 2), -1.0, np.float32), tail_mass=np.full((tokens,), 0.2, np.float32),
      finish_reason="stop", extracted_answer=question["gold"], gold_answer=question["gold"], correct=True,
      tail_log_mass=np.full((tokens, 1), np.log(0.2), np.float32), tail_temperatures=(1.0,))


def test_train_stage_drops_and_counts_copies(gsm8k_dir, tmp_path):
  """`_train_examples` of a gold_hint arm: 4 train + 2 validation responses, one copy in each split."""
  c = config_lib.get_default_config()
  c.data.source, c.data.num_train_questions, c.data.num_validation = str(gsm8k_dir), 4, 2
  c.arms, c.distill.temperature = "gold_hint", 1.0
  train_q, val_q = pipeline.settings.train_and_validation(c)
  questions = train_q + val_q
  copies = {train_q[1]["id"], val_q[0]["id"]}
  records = [_store_record(q, reference_overlap.reference_text(q) if q["id"] in copies else
                           f"I think the answer is {q['gold']:g}.\n#### {q['gold']:g}", tokens=3 + i)
             for i, q in enumerate(questions)]
  wd = pipeline.Workdir(tmp_path)
  spec = store.StoreSpec(teacher_model="t", strategy="gold_hint", vocab_size=100, k=2, tail_temperatures=(1.0,))
  writer = store.StoreWriter(wd.store("gold_hint"), spec, num_examples=len(records), shard_size=len(records))
  writer.write_shard(0, records)
  writer.finalize()

  train, val, selected = pipeline._train_examples(c, wd, "gold_hint", tokenizer=None)
  assert (len(train), len(val)) == (4, 2)
  assert selected["train_dropped_reference_overlap"] == selected["validation_dropped_reference_overlap"] == 0
  c.teacher.max_reference_overlap = 0.8
  train, val, selected = pipeline._train_examples(c, wd, "gold_hint", tokenizer=None)
  assert sorted(e.question_id for e in train) == sorted(q["id"] for q in train_q if q["id"] not in copies)
  assert [e.question_id for e in val] == [val_q[1]["id"]]
  assert selected == {"mode": "kd", "store": "stores/gold_hint", "store_responses": 6, "dropped_incorrect": 0,
                      "max_reference_overlap": 0.8, "train_dropped_reference_overlap": 1, "train_examples": 3,
                      "validation_dropped_reference_overlap": 1, "validation_examples": 1}
  line = pipeline._selection_line(selected)
  assert "1 train + 1 validation dropped above reference overlap 0.8 (teacher.max_reference_overlap)" in line
  json.dumps(selected, allow_nan=False)  # train_data.json is strict JSON
