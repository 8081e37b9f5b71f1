"""GSM8K loading, gold parsing, hashing and the train/validation split."""

import hashlib
import json
import sys
import types

import pytest

from kdjax.gsm8k import data


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_real_gsm8k_train_and_test(gsm8k_dir):
  train = data.load_gsm8k(gsm8k_dir, "train")
  test = data.load_gsm8k(gsm8k_dir, "test")
  assert len(train) == 7473 and len(test) == 1319
  assert [ex["id"] for ex in train[:3]] == [0, 1, 2]
  first = train[0]
  assert first["question"].startswith("Natalia sold clips to 48 of her friends")
  assert first["answer"].endswith("#### 72")
  assert first["gold"] == 72.0
  # Independent reference: the raw file's last line, parsed with a regex.
  with open(gsm8k_dir / "train.jsonl") as f:
    raw = [json.loads(line) for line in f]
  for example, row in zip(train, raw):
    tail = row["answer"].strip().splitlines()[-1]
    assert tail.startswith("#### ")
    assert example["gold"] == float(tail[5:].replace(",", ""))
  # GSM8K writes thousands with commas ("#### 1,600"); they must parse.
  assert any("," in row["answer"].splitlines()[-1] for row in raw)


def test_file_path_equals_directory(tmp_path):
  rows = [{"question": "q0?", "answer": "a\n#### 1,234"}, {"question": "q1?", "answer": "b\n#### -2.5"}]
  _write_jsonl(tmp_path / "train.jsonl", rows)
  from_dir = data.load_gsm8k(tmp_path, "train")
  from_file = data.load_gsm8k(str(tmp_path / "train.jsonl"), "train")
  assert from_dir == from_file
  assert from_dir == [
      {"id": 0, "question": "q0?", "answer": "a\n#### 1,234", "gold": 1234.0},
      {"id": 1, "question": "q1?", "answer": "b\n#### -2.5", "gold": -2.5},
  ]


def test_a_file_is_read_only_as_the_split_it_is_named_after(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "#### 1"}])
  with pytest.raises(data.DataError, match="the test split is read only from a GSM8K test set") as info:
    data.load_gsm8k(tmp_path / "train.jsonl", "test")
  assert str(tmp_path / "train.jsonl") in str(info.value)
  (tmp_path / "train.jsonl").rename(tmp_path / "gsm8k.jsonl")
  with pytest.raises(data.DataError, match="the train split is read only"):
    data.load_gsm8k(tmp_path / "gsm8k.jsonl", "train")
  with pytest.raises(data.DataError, match="unknown GSM8K split"):
    data.load_gsm8k(tmp_path, "validation")


def test_missing_path_is_a_data_error(tmp_path):
  with pytest.raises(data.DataError, match="neither an existing path"):
    data.load_gsm8k(tmp_path / "nope", "train")
  with pytest.raises(data.DataError, match="no test.jsonl"):
    data.load_gsm8k(tmp_path, "test")


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    (json.dumps({"question": "q"}), "answer"),
    (json.dumps({"question": "q", "answer": "no marker here"}), "no '#### N' line"),
    (json.dumps({"question": "q", "answer": "x\n#### twelve"}), "not a number"),
    (json.dumps(["q", "a"]), "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
  good = json.dumps({"question": "q", "answer": "#### 1"})
  path = tmp_path / "train.jsonl"
  path.write_text(good + "\n" + line + "\n")
  with pytest.raises(data.DataError, match=message) as info:
    data.load_gsm8k(path, "train")
  assert f"{path}:2" in str(info.value)
  assert "\n" not in str(info.value)


def test_hub_branch_calls_load_dataset(monkeypatch):
  calls = []

  def fake_load_dataset(name, config, split):
    calls.append((name, config, split))
    return [{"question": "hub q", "answer": "work\n#### 7"}]

  # A stand-in module: the hub branch must go through datasets.load_dataset with the main config.
  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
  examples = data.load_gsm8k("openai/gsm8k", "test")
  assert calls == [("openai/gsm8k", "main", "test")]
  assert examples == [{"id": 0, "question": "hub q", "answer": "work\n#### 7", "gold": 7.0}]


def test_hub_failure_is_a_data_error(monkeypatch):
  def failing_load_dataset(name, config, split):
    raise ConnectionError("no network\nsecond line")

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing_load_dataset))
  with pytest.raises(data.DataError, match="could not load openai/gsm8k split 'train'.*no network$"):
    data.load_gsm8k("openai/gsm8k", "train")


def test_question_hash_and_annotation_stripping():
  question = "How many apples? — ünïcode"
  assert data.question_hash(question) == hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]
  assert len(data.question_hash("")) == 16
  assert data.question_hash("a") != data.question_hash("a ")
  solution = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 72"
  assert data.strip_calculator_annotations(solution) == "She sold 48/2 = 24 clips.\n#### 72"


def _examples(n):
  return [{"id": i, "question": f"q{i}", "answer": f"#### {i}", "gold": float(i)} for i in range(n)]


def test_split_takes_the_first_n_and_holds_validation_out_of_the_rest():
  examples = _examples(100)
  train, validation = data.split_train_validation(examples, 30, 10, seed=0)
  assert [ex["id"] for ex in train] == list(range(30))  # the paper's "first 2638": the first N, in order
  validation_ids = [ex["id"] for ex in validation]
  assert len(validation_ids) == 10 and all(i >= 30 for i in validation_ids)
  # Reference: the rest ordered by the sha256 of "kdjax-split:<seed>:<id>", computed here from its definition.
  key = lambda i: hashlib.sha256(f"kdjax-split:0:{i}".encode()).hexdigest()
  assert validation_ids == sorted(range(30, 100), key=key)[:10]
  assert validation_ids != list(range(30, 40))  # a shuffle happened, not the next rows
  assert data.split_train_validation(examples, 30, 10, seed=0) == (train, validation)  # deterministic
  assert data.split_train_validation(examples[::-1], 30, 10, seed=0) == (train, validation)  # order-free
  other_train, other_validation = data.split_train_validation(examples, 30, 10, seed=1)
  assert other_train == train and other_validation != validation
  # num_train=None: validation from all examples, train is everything else in id order.
  all_train, held_out = data.split_train_validation(examples, None, 10, seed=0)
  assert [ex["id"] for ex in held_out] == sorted(range(100), key=key)[:10]
  assert [ex["id"] for ex in all_train] == [i for i in range(100) if i not in {ex["id"] for ex in held_out}]


def test_example_hash_covers_question_and_solution():
  example = {"id": 0, "question": "How many?", "answer": "2 + 2 = 4\n#### 4"}
  assert data.example_hash(example) == hashlib.sha256("How many?\x002 + 2 = 4\n#### 4".encode()).hexdigest()[:16]
  assert data.example_hash({**example, "answer": "#### 5"}) != data.example_hash(example)


def test_split_rejects_impossible_sizes():
  with pytest.raises(data.DataError, match="cannot take"):
    data.split_train_validation(_examples(10), 8, 5, seed=0)
  with pytest.raises(data.DataError, match="cannot take"):
    data.split_train_validation(_examples(10), None, 11, seed=0)
  with pytest.raises(data.DataError, match="duplicate ids"):
    data.split_train_validation(_examples(3) + _examples(1), 1, 1, seed=0)
