"""Training sequences and batches: causal alignment, padding buckets, deterministic shuffles, resumable state."""

import json

import numpy as np
import pytest

from kdjax.distill import batches


def _record(prompt, response, k=3, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 100, (len(response), k))
  logprobs = -rng.random((len(response), k)).astype(np.float32) - 1.0
  tail = np.log(rng.uniform(0.01, 0.1, len(response))).astype(np.float32)  # log tail masses
  return ids, logprobs, tail


def test_alignment_on_hand_made_record():
  prompt, response = [11, 12, 13], [21, 22, 2]  # 2 = the end token that stopped the teacher
  ids, logprobs, tail = _record(prompt, response)
  example = batches.distill_example(prompt, response, ids, logprobs, tail)
  # x = 11 12 13 21 22 2: position t predicts x[t+1].
  assert example.input_ids.tolist() == [11, 12, 13, 21, 22, 2]
  assert example.target_ids.tolist() == [12, 13, 21, 22, 2, 0]
  assert example.loss_mask.tolist() == [0, 0, 1, 1, 1, 0]
  assert example.target_ids[2] == 21  # the last prompt position targets the first response token
  assert example.target_ids[4] == 2 and example.loss_mask[4] == 1  # the end token is a target

  batch = batches.collate([example], pad_multiple=8)
  assert batch["input_ids"].shape == (1, 8) and batch["teacher_ids"].shape == (1, 8, 3)
  assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 2, 0, 0]]
  assert batch["target_ids"].tolist() == [[12, 13, 21, 22, 2, 0, 0, 0]]
  assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]
  assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]  # no loss on prompt or padding
  # Position 2 holds the teacher's distribution of response token 0, position 4 that of the end token.
  for position, row in ((2, 0), (3, 1), (4, 2)):
    np.testing.assert_array_equal(batch["teacher_ids"][0, position], ids[row])
    np.testing.assert_array_equal(batch["teacher_logprobs"][0, position], logprobs[row])
    assert batch["teacher_log_tail"][0, position] == tail[row]
  assert not batch["teacher_ids"][0, [0, 1, 5, 6, 7]].any() and not batch["teacher_log_tail"][0, [0, 1, 5]].any()
  assert batch["input_ids"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
  assert batch["teacher_logprobs"].dtype == np.float32 and batch["teacher_ids"].dtype == np.int32


def test_tail_defaults_to_missing_mass_and_bad_shapes_raise():
  logprobs = np.log(np.array([[0.5, 0.25], [0.9, 0.05]], np.float32))
  example = batches.distill_example([1], [5, 6], [[5, 7], [6, 8]], logprobs)
  np.testing.assert_allclose(example.teacher_log_tail, np.log([0.25, 0.05]), rtol=1e-6)
  with pytest.raises(batches.BatchError, match="topk_ids"):
    batches.distill_example([1], [5, 6], [[5, 7]], logprobs[:1])
  with pytest.raises(batches.BatchError, match="non-empty"):
    batches.distill_example([], [5], [[5]], [[-0.1]])


def test_ce_example_appends_end_token_and_has_no_teacher():
  example = batches.ce_example([7, 8], [30, 31], end_token_id=2)
  assert example.input_ids.tolist() == [7, 8, 30, 31, 2]
  assert example.target_ids.tolist() == [8, 30, 31, 2, 0]
  assert example.loss_mask.tolist() == [0, 1, 1, 1, 0]
  batch = batches.collate([example], pad_multiple=4)
  assert set(batch) == {"input_ids", "attention_mask", "target_ids", "loss_mask"}
  with pytest.raises(batches.BatchError, match="mix"):
    batches.collate([example, batches.distill_example([1], [2], [[2]], [[-0.1]])])


def test_gold_examples_use_student_chat_and_solution(smollm2_gguf):
  transformers = pytest.importorskip("transformers")
  from kdjax.teacher import priming
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
  gsm = [{"id": 3, "question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}]
  (example,) = batches.gold_examples(gsm, tokenizer)
  prompt = priming.encode_chat(tokenizer, priming.student_messages("What is 2+3?"))
  solution = tokenizer.encode("2+3=5\n#### 5", add_special_tokens=False)
  end = priming.stop_token_ids(tokenizer)[0]
  assert example.input_ids.tolist() == prompt + solution + [end]
  assert example.num_loss_tokens == len(solution) + 1 and example.question_id == 3
  assert example.target_ids[len(prompt) - 1] == solution[0]


def test_truncation_keeps_alignment():
  ids, logprobs, tail = _record([1, 2], [3, 4, 5, 6])
  example = batches.distill_example([1, 2], [3, 4, 5, 6], ids, logprobs, tail).truncated(4)
  assert example.input_ids.tolist() == [1, 2, 3, 4]
  assert example.target_ids.tolist() == [2, 3, 4, 5]  # position 3 still has its target, x[4] = 5
  assert example.loss_mask.tolist() == [0, 1, 1, 1]
  batch = batches.collate([example], pad_multiple=4)
  np.testing.assert_array_equal(batch["teacher_ids"][0, 1:4], ids[:3])
  assert batch["input_ids"].shape == (1, 4)
  assert batches.collate([batches.distill_example([1, 2], [3, 4, 5, 6], ids, logprobs, tail)],
                         pad_multiple=4, max_length=4)["loss_mask"].tolist() == [[0, 1, 1, 1]]


def _examples(lengths):
  return [batches.ce_example(list(range(1, 3)), list(range(10, 10 + n - 2)), None, question_id=i)
          for i, n in enumerate(lengths)]


def test_bucketing_rounds_up_and_fills_rows():
  examples = _examples([5, 70, 12])
  batch = batches.collate(examples, pad_multiple=64, batch_size=4)
  assert batch["input_ids"].shape == (4, 128)
  assert batch["attention_mask"].sum(1).tolist() == [5, 70, 12, 0]  # right padding; row 4 all padding
  assert batch["loss_mask"][3].sum() == 0
  assert batches.collate(examples[:1], pad_multiple=64)["input_ids"].shape == (1, 64)
  capped = batches.collate(examples, pad_multiple=64, max_length=80)
  assert capped["input_ids"].shape == (3, 80)
  # The length-sorted windows put similar lengths together: less padding than random batches.
  rng = np.random.default_rng(0)
  many = _examples(rng.integers(3, 300, 64).tolist())
  plain = batches.BatchIterator(many, 8, seed=1, pad_multiple=8)
  grouped = batches.BatchIterator(many, 8, seed=1, pad_multiple=8, sort_window=8)
  padded_plain = sum(next(plain)["input_ids"].size for _ in range(8))
  padded_grouped = sum(next(grouped)["input_ids"].size for _ in range(8))
  assert padded_grouped < 0.8 * padded_plain
  assert sorted(i for b in grouped.epoch_plan(0) for i in b) == list(range(64))


def test_shuffles_are_deterministic_permutations():
  examples = _examples([4] * 10)
  a = batches.BatchIterator(examples, 3, seed=7)
  b = batches.BatchIterator(examples, 3, seed=7)
  assert a.epoch_plan(0) == b.epoch_plan(0) and a.epoch_plan(5) == b.epoch_plan(5)
  for epoch in range(3):
    plan = a.epoch_plan(epoch)
    assert [len(batch) for batch in plan] == [3, 3, 3, 1]
    assert sorted(i for batch in plan for i in batch) == list(range(10))
  assert a.epoch_plan(0) != a.epoch_plan(1)
  assert a.epoch_plan(0) != batches.BatchIterator(examples, 3, seed=8).epoch_plan(0)
  ordered = batches.BatchIterator(examples, 3, shuffle=False).epoch_plan(0)
  assert ordered == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
  # The last, short batch keeps the batch shape with padding rows.
  it = batches.BatchIterator(examples, 3, seed=7, pad_multiple=4)
  shapes = [next(it)["input_ids"].shape for _ in range(4)]
  assert shapes == [(3, 4)] * 4 and it.state()["epoch"] == 1


def test_iterator_state_round_trip():
  examples = _examples(list(range(3, 23)))
  original = batches.BatchIterator(examples, 4, seed=3, pad_multiple=8)
  for _ in range(7):  # into the second epoch (5 batches per epoch)
    next(original)
  state = json.loads(json.dumps(original.state()))
  assert state == {"epoch": 1, "position": 2, "seed": 3, "num_examples": 20}
  restored = batches.BatchIterator(examples, 4, seed=3, pad_multiple=8)
  restored.restore(state)
  for _ in range(6):
    want, got = next(original), next(restored)
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  with pytest.raises(batches.BatchError, match="seed"):
    batches.BatchIterator(examples, 4, seed=4).restore(state)
  with pytest.raises(batches.BatchError, match="position"):
    batches.BatchIterator(examples, 4, seed=3).restore({"epoch": 0, "position": 99})
