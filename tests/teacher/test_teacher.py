"""The teacher stage against fresh full forwards, a kill -9 and a resume, and two jax.distributed processes.

Stores from SmolLM2 are checked against an independent reference: a plain (uncached, unbatched by
the generation engine) forward over teacher prompt + response, log-softmax in float64. The resume
and multi-process tests use a tiny random teacher with SmolLM2's vocabulary (tests/workers/teacher_worker.py)
so the subprocesses stay fast; their stores must equal one uninterrupted single-process run.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kdjax
import helpers
from workers import teacher_worker
from kdjax.gsm8k import data
from kdjax.serving import generation
from kdjax.teacher import priming, store, jax_engine as teacher
from kdjax.gsm8k import extract
from kdjax.serving.generation import SamplingConfig

SMOLLM2_ID = "smollm2-135m-instruct-q4_1-fp32"
TINY_QUESTIONS = 8  # with SHARD_SIZE 3: shards of 3, 3 and 2 questions
WORKER_TIMEOUT_S = 600
TAIL_TEMPERATURES = (1.0, 2.0, 5.94)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
  return kdjax.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, smollm2_tokenizer):
  model, _ = kdjax.load_model(smollm2_gguf, dtype="float32")
  return model, smollm2_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_tokenizer, tmp_path_factory) -> pathlib.Path:
  """SmolLM2's tokenizer saved as plain files: reading it from the GGUF takes ~30 s on a busy machine."""
  path = tmp_path_factory.mktemp("tokenizer")
  smollm2_tokenizer.save_pretrained(str(path))
  return path


@pytest.fixture(scope="module")
def train_questions(gsm8k_dir) -> list[dict]:
  return data.load_gsm8k(gsm8k_dir, "train")[:64]


# ----------------------------------------------------------------------------- helpers


def reference_logprobs(model, sequences: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
  """float64 log-softmax [len, V] of each sequence from a plain causal forward (no cache, no left padding).

  Sequences are right-padded to one length so a single program compiles; causal attention keeps the
  padding invisible to the real tokens, whose positions are 0..len-1 as in a single-sequence forward.
  """
  length = generation.round_up(max(len(s) for s in sequences), 64)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
  outputs = []
  for first in range(0, len(sequences), batch_size):
    chunk = sequences[first:first + batch_size]
    ids = np.zeros((batch_size, length), np.int32)
    for row, sequence in enumerate(chunk):
      ids[row, :len(sequence)] = sequence
    logits = np.asarray(forward(state, jnp.asarray(ids)), np.float64)
    for row, sequence in enumerate(chunk):
      rows = logits[row, :len(sequence)]
      shifted = rows - rows.max(axis=-1, keepdims=True)
      outputs.append(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))
  return outputs


def assert_records_match_forward(model, tokenizer, records: list[store.TeacherRecord], k: int,
                                 sampling: SamplingConfig) -> None:
  """Every stored top-k row is the full forward's distribution behind that response token."""
  stop_ids = set(priming.stop_token_ids(tokenizer))
  sequences = [np.concatenate([r.teacher_prompt_ids, r.response_ids]) for r in records]
  references = reference_logprobs(model, sequences)
  for record, reference in zip(records, references):
    where = f"question {record.question_id} ({record.strategy})"
    n, prompt_len = record.num_tokens, len(record.teacher_prompt_ids)
    assert n >= 1 and record.topk_ids.shape == (n, k), where
    # Row j is the distribution at the position before response token j.
    expected = reference[prompt_len - 1:prompt_len - 1 + n]
    ids = record.topk_ids.astype(np.int64)
    # 1e-4, plus float32 noise that grows with the log-prob's magnitude: cached decoding and this
    # forward sum in different orders. Over 64 SmolLM2 answers (75850 entries) the largest gap was
    # 1.2e-4, at log-prob -16.2; the 99.9th percentile was 5e-5.
    np.testing.assert_allclose(record.topk_logprobs, np.take_along_axis(expected, ids, axis=1),
                               atol=1e-4, rtol=1e-5, err_msg=where)
    tail = 1.0 - np.exp(np.take_along_axis(expected, ids, axis=1)).sum(axis=1)
    np.testing.assert_allclose(record.tail_mass, tail, atol=1e-4, rtol=0, err_msg=where)
    # The tempered tails: log of the mass softmax(logits / T) puts outside the stored ids, from the full row.
    assert record.tail_log_mass.shape == (n, len(record.tail_temperatures)), where
    for column, temperature in enumerate(record.tail_temperatures):
      tempered = expected / temperature
      tempered = tempered - np.log(np.exp(tempered - tempered.max(1, keepdims=True)).sum(1, keepdims=True)) \
          - tempered.max(1, keepdims=True)
      outside = np.ones(tempered.shape, bool)
      np.put_along_axis(outside, ids, False, axis=1)
      log_tail = np.log(np.where(outside, np.exp(tempered), 0.0).sum(axis=1))
      np.testing.assert_allclose(record.tail_log_mass[:, column], log_tail, atol=1e-4, rtol=1e-4,
                                 err_msg=f"{where} T={temperature}")
    # The stored ids are a top-k set: no other id is more likely than the least likely stored one.
    kth_best = -np.sort(-expected, axis=1)[:, k - 1]
    assert np.all(np.take_along_axis(expected, ids, axis=1).min(axis=1) >= kth_best - 1e-4), where
    assert np.all(np.diff(record.topk_logprobs, axis=1) <= 1e-6), where
    if sampling.greedy:
      np.testing.assert_array_equal(record.response_ids, expected.argmax(axis=1), err_msg=where)
    assert record.response_text == tokenizer.decode(record.response_ids.tolist(), skip_special_tokens=True)
    ends_with_stop = int(record.response_ids[-1]) in stop_ids
    assert record.finish_reason == ("stop" if ends_with_stop else "length"), where
    if not ends_with_stop:
      assert n == sampling.max_new_tokens, where


def assert_prompts(tokenizer, record: store.TeacherRecord, question: dict, strategy: str,
                   hint_question: dict | None = None) -> None:
  """The teacher prompt carries the priming (and the hint: `hint_question`'s solution for mismatched_hint); the
  student prompt is the plain question."""
  teacher_text = tokenizer.decode(record.teacher_prompt_ids.tolist())
  student_text = tokenizer.decode(record.student_prompt_ids.tolist())
  assert record.student_prompt_ids.tolist() == priming.encode_chat(
      tokenizer, priming.student_messages(question["question"]))
  assert question["question"].strip() in student_text and question["question"].strip() in teacher_text
  instruction = getattr(priming.STRATEGIES[strategy], "instruction", None)
  if instruction is None:  # "base": the teacher answers exactly the student's prompt
    assert record.teacher_prompt_ids.tolist() == record.student_prompt_ids.tolist()
    return
  assert instruction in teacher_text and instruction not in student_text
  if strategy in ("gold_hint", "mismatched_hint"):
    shown = question if strategy == "gold_hint" else hint_question
    assert shown["id"] != question["id"] or strategy == "gold_hint"
    hint = data.strip_calculator_annotations(shown["answer"]).strip()
    assert "<<" not in hint and hint in teacher_text and hint not in student_text
    assert shown["answer"].strip().splitlines()[-1] not in student_text  # the `#### N` line


def assert_same_store(left: pathlib.Path, right: pathlib.Path) -> None:
  """Two stores hold the same records: every array and every field, and byte-identical shard files."""
  a, b = store.StoreReader(left), store.StoreReader(right)
  assert a.spec == b.spec and len(a) == len(b) and a.positions == b.positions
  for x, y in zip(a, b):
    for field in ("student_prompt_ids", "teacher_prompt_ids", "response_ids", "topk_ids",
                  "topk_logprobs", "tail_mass", "tail_log_mass"):
      np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)
    for field in ("question_id", "question_hash", "strategy", "teacher_model", "sampling", "response_text",
                  "finish_reason", "extracted_answer", "gold_answer", "correct"):
      assert getattr(x, field) == getattr(y, field), field
  for i in range(a.num_shards):
    assert (left / store.shard_name(i)).read_bytes() == (right / store.shard_name(i)).read_bytes()


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def worker_command(store_dir, tokenizer_dir, gsm8k_dir, *extra: str,
                   num_questions: int = TINY_QUESTIONS) -> list[str]:
  return helpers.worker_command("teacher_worker", "--store", str(store_dir), "--tokenizer", str(tokenizer_dir),
                                "--gsm8k", str(gsm8k_dir), "--num-questions", str(num_questions), *extra)


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory) -> dict:
  """The workers' environment; they share a compilation cache, so only the first one compiles."""
  return helpers.worker_env({**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                             "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
                             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})


def worker_summary(proc: subprocess.CompletedProcess | subprocess.Popen, stdout: str, stderr: str) -> dict:
  assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{stderr[-3000:]}"
  return json.loads(stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- SmolLM2 stores


def _smollm2_stores(smollm2, questions, root: pathlib.Path, sampling: SamplingConfig, k: int):
  model, tokenizer = smollm2
  results = {}
  for strategy in priming.STRATEGIES:
    summary = teacher.generate_store(
        model, tokenizer, questions, strategy, root / strategy, teacher_model_id=SMOLLM2_ID,
        student_tokenizer=tokenizer, k=k, sampling=sampling, shard_size=8, batch_size=8,
        tail_temperatures=TAIL_TEMPERATURES, progress=False)
    results[strategy] = summary
  return results


def _check_smollm2_stores(smollm2, questions, root, summaries, sampling, k) -> None:
  model, tokenizer = smollm2
  for strategy, summary in summaries.items():
    assert summary["finalized"] and not summary["skipped"]
    reader = store.StoreReader(root / strategy)
    assert reader.finalized and len(reader) == len(questions)
    assert reader.spec.strategy == strategy and reader.spec.k == k
    assert reader.spec.tail_temperatures == TAIL_TEMPERATURES
    assert summary["total_tokens"] == sum(r.num_tokens for r in reader)
    assert summary["reference_overlap_n"] == len(questions) and 0.0 <= summary["reference_overlap_mean"] <= 1.0
    records = list(reader)
    hints = teacher.hint_questions(questions, strategy, 0)  # generate_store's default hint_seed
    for record, question in zip(records, questions):
      assert record.question_id == question["id"]
      assert record.question_hash == data.question_hash(question["question"])
      assert record.gold_answer == question["gold"]
      assert record.extracted_answer == extract.extract_answer(record.response_text, "final")
      assert record.correct == extract.is_correct(record.extracted_answer, question["gold"])
      assert_prompts(tokenizer, record, question, strategy, hints and hints[question["id"]])
    assert_records_match_forward(model, tokenizer, records, k, sampling)


def test_smollm2_store_equals_full_forward(smollm2, train_questions, tmp_path, monkeypatch):
  """Issue acceptance 1 (small): 3 questions x 6 strategies; then a rerun finds every store finished."""
  questions = train_questions[:3]
  sampling = SamplingConfig(temperature=0.0, max_new_tokens=12, seed=0)
  summaries = _smollm2_stores(smollm2, questions, tmp_path, sampling, k=20)
  _check_smollm2_stores(smollm2, questions, tmp_path, summaries, sampling, k=20)
  print("bytes per token (3 questions, 12 new tokens, k=20):",
        {s: round(store.StoreReader(tmp_path / s).bytes_per_token, 1) for s in summaries})

  # Idempotent: nothing is generated again and no shard is rewritten.
  before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "base").glob("shard-*.npz")}
  monkeypatch.setattr(generation, "generate", lambda *a, **kw: pytest.fail("generated again"))
  again = teacher.generate_store(*smollm2, questions, "base", tmp_path / "base", teacher_model_id=SMOLLM2_ID,
                                 k=20, sampling=sampling, shard_size=8, batch_size=8,
                                 tail_temperatures=TAIL_TEMPERATURES, progress=False)
  assert again["skipped"] and again["finalized"] and again["total_tokens"] == summaries["base"]["total_tokens"]
  assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "base").glob("shard-*.npz")}


@pytest.mark.slow
def test_smollm2_store_equals_full_forward_64_questions(smollm2, train_questions, tmp_path):
  """Issue acceptance 1 in full: 64 questions x 6 strategies, k=50, sampled at temperature 0.7."""
  sampling = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=48, seed=3)
  summaries = _smollm2_stores(smollm2, train_questions, tmp_path, sampling, k=50)
  _check_smollm2_stores(smollm2, train_questions, tmp_path, summaries, sampling, k=50)
  for strategy in summaries:
    reader = store.StoreReader(tmp_path / strategy)
    print(f"{strategy}: {reader.total_tokens} tokens, {reader.bytes_per_token:.1f} bytes/token, "
          f"accuracy {summaries[strategy]['accuracy']:.3f}")


# ----------------------------------------------------------------------------- tiny teacher: resume, processes


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory, tokenizer_dir, train_questions) -> pathlib.Path:
  """One uninterrupted single-process run (in this process) of the worker's store."""
  from transformers import AutoTokenizer
  path = tmp_path_factory.mktemp("tiny_reference") / "store"
  summary = teacher_worker.run_store(path, train_questions[:TINY_QUESTIONS],
                                     AutoTokenizer.from_pretrained(str(tokenizer_dir)))
  assert summary["finalized"] and summary["shards_written"] == [0, 1, 2]
  return path


def test_tiny_teacher_records_equal_full_forward(tiny_reference, tokenizer_dir):
  """The tiny teacher's sampled store is checked like SmolLM2's, so the other tests compare real stores."""
  from transformers import AutoTokenizer
  reader = store.StoreReader(tiny_reference)
  assert reader.spec.sampling["temperature"] > 0 and reader.spec.k == teacher_worker.K
  # Sampling must actually vary: distinct questions get distinct responses.
  assert len({tuple(r.response_ids.tolist()) for r in reader}) == len(reader)
  assert_records_match_forward(teacher_worker.tiny_teacher(), AutoTokenizer.from_pretrained(str(tokenizer_dir)),
                               list(reader), teacher_worker.K, teacher_worker.SAMPLING)


def test_kill_9_then_resume_equals_uninterrupted_run(tiny_reference, tokenizer_dir, gsm8k_dir, train_questions,
                                                     worker_env, tmp_path):
  """Issue acceptance 2: SIGKILL after the first shard is on disk; the resumed store equals the reference."""
  from transformers import AutoTokenizer
  path = tmp_path / "store"
  proc = subprocess.Popen(worker_command(path, tokenizer_dir, gsm8k_dir, "--pause-s", "120"),
                          env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + WORKER_TIMEOUT_S
  try:
    while not (path / store.shard_name(0)).exists():
      assert proc.poll() is None, f"worker ended early:\n{proc.stderr.read()[-3000:]}"
      assert time.monotonic() < deadline, "no shard within the time limit"
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert not (path / store.MANIFEST).exists()
  assert sorted(p.name for p in path.glob("shard-*.npz")) == [store.shard_name(0)]
  with pytest.raises(store.StoreIncompleteError):
    store.StoreReader(path)
  # A kill in the middle of writing the next shard leaves a stale temporary file behind.
  (path / (store.shard_name(1) + ".tmp")).write_bytes(b"half a shard")
  first_shard = (path / store.shard_name(0)).stat()

  summary = teacher_worker.run_store(path, train_questions[:TINY_QUESTIONS],
                                     AutoTokenizer.from_pretrained(str(tokenizer_dir)))
  assert summary["finalized"] and summary["shards_written"] == [1, 2]
  assert (path / store.shard_name(0)).stat().st_mtime_ns == first_shard.st_mtime_ns  # not regenerated
  assert not list(path.glob("*.tmp"))
  assert_same_store(path, tiny_reference)


def test_two_processes_fill_one_store(tiny_reference, tokenizer_dir, gsm8k_dir, worker_env, tmp_path):
  """Issue acceptance 3: two jax.distributed processes write disjoint shards of one store."""
  path = tmp_path / "store"
  port = str(free_port())
  procs = [subprocess.Popen(worker_command(path, tokenizer_dir, gsm8k_dir, "--num-processes", "2",
                                           "--process-id", str(i), "--port", port),
                            env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = helpers.communicate_all(procs, WORKER_TIMEOUT_S)
  summaries = [worker_summary(proc, *out) for proc, out in zip(procs, outputs)]
  assert [s["shards_written"] for s in summaries] == [[0, 2], [1]]
  assert all(s["finalized"] and s["process_count"] == 2 for s in summaries)
  manifest = json.loads((path / store.MANIFEST).read_text())
  assert [shard["index"] for shard in manifest["shards"]] == [0, 1, 2]
  shares = [json.loads((path / f"manifest-{i}.json").read_text())["shards"] for i in range(2)]
  assert [[s["index"] for s in share] for share in shares] == [[0, 2], [1]]
  assert_same_store(path, tiny_reference)


@pytest.mark.slow  # one more subprocess, whose sharded programs compile afresh (~20 s on an idle machine)
def test_int8_teacher_sharded_over_two_devices(tokenizer_dir, gsm8k_dir, worker_env, tmp_path):
  """An int8 teacher tensor-sharded over two devices writes a store that equals its own full forward."""
  from transformers import AutoTokenizer

  from kdjax.models import quantization
  path = tmp_path / "store"
  env = {**worker_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run(worker_command(path, tokenizer_dir, gsm8k_dir, "--int8-devices", "2", num_questions=4),
                        env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
  summary = worker_summary(proc, proc.stdout, proc.stderr)
  assert summary["finalized"] and summary["teacher_model"].endswith("int8")
  model = teacher_worker.int8_teacher()  # the same weights on one device
  assert quantization.is_quantized(model)
  records = list(store.StoreReader(path))
  assert len(records) == 4
  assert_records_match_forward(model, AutoTokenizer.from_pretrained(str(tokenizer_dir)), records,
                               teacher_worker.K, teacher_worker.SAMPLING)


@pytest.mark.parametrize("placement", ["system", "user_prefix"])
def test_teacher_prompt_placement(tokenizer_dir, train_questions, placement):
  """The priming lands in the system turn or before the question in the user turn, as asked."""
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
  question = train_questions[0]
  text = tokenizer.decode(teacher.teacher_prompt_ids(tokenizer, question, "teacher", placement))
  system_turn, user_turn = text.split("<|im_start|>user")
  instruction = priming.STRATEGIES["teacher"].instruction
  assert (instruction in system_turn) == (placement == "system")
  assert (instruction in user_turn) == (placement == "user_prefix")
  if placement == "user_prefix":
    assert user_turn.index(instruction) < user_turn.index(question["question"].strip())
  assert text.endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- refusals


class _SwappedVocab:
  """A tokenizer whose vocabulary has the same tokens as `base` but two ids exchanged."""

  def __init__(self, base):
    self._vocab = dict(base.get_vocab())
    a, b = sorted(self._vocab, key=self._vocab.get)[100:102]
    self._vocab[a], self._vocab[b] = self._vocab[b], self._vocab[a]

  def get_vocab(self):
    return dict(self._vocab)


def test_tokenizer_mismatch_stops_before_generation(tokenizer_dir, train_questions, tmp_path, monkeypatch):
  """Issue acceptance 4: a student tokenizer with other ids is refused before any work or file."""
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
  monkeypatch.setattr(generation, "generate", lambda *a, **kw: pytest.fail("generation started"))
  extended = copy.deepcopy(tokenizer)
  extended.add_tokens(["<kdjax-extra-token>"])
  for student, message in ((extended, "vocabulary sizes 49152 \\(teacher\\) vs 49153 \\(student\\)"),
                           (_SwappedVocab(tokenizer), "has id")):
    with pytest.raises(priming.TokenizerMismatchError, match=message):
      teacher_worker.run_store(tmp_path / "store", train_questions[:2], tokenizer, student_tokenizer=student)
  assert not (tmp_path / "store").exists()


def test_resume_with_other_settings_is_refused(tiny_reference, tokenizer_dir, train_questions, monkeypatch):
  """A finished store is never mixed with another seed, question list or answer rule."""
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
  monkeypatch.setattr(generation, "generate", lambda *a, **kw: pytest.fail("generation started"))
  questions = train_questions[:TINY_QUESTIONS]
  other_seed = SamplingConfig(**{**teacher_worker.SAMPLING.__dict__, "seed": 8})
  with pytest.raises(store.StoreSpecMismatchError, match="seed"):
    teacher_worker.run_store(tiny_reference, questions, tokenizer, sampling=other_seed)
  with pytest.raises(store.StoreSpecMismatchError, match="questions"):
    teacher_worker.run_store(tiny_reference, questions[::-1], tokenizer)
  with pytest.raises(teacher.TeacherError, match="answer_rule='final'"):
    teacher_worker.run_store(tiny_reference, questions, tokenizer, answer_rule="paper")
  summary = teacher_worker.run_store(tiny_reference, questions, tokenizer)
  assert summary["skipped"] and summary["finalized"]


def test_mismatched_hint_store_resumes_only_with_its_hint_seed(tokenizer_dir, train_questions, tmp_path):
  """The derangement is drawn from hint_seed; a store written with one is never continued with another."""
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
  questions = train_questions[:3]
  generate = lambda seed, path=tmp_path / "store": teacher.generate_store(
      teacher_worker.tiny_teacher(), tokenizer, questions, "mismatched_hint", path, teacher_model_id="tiny",
      sampling=SamplingConfig(max_new_tokens=2), k=2, shard_size=2, batch_size=2, hint_seed=seed, progress=False)
  assert generate(4)["finalized"]
  hints = teacher.hint_questions(questions, "mismatched_hint", 4)
  for record, question in zip(store.StoreReader(tmp_path / "store"), questions):
    assert_prompts(tokenizer, record, question, "mismatched_hint", hints[question["id"]])
  with pytest.raises(teacher.TeacherError, match="hint_seed=4, not 5"):
    generate(5)
  assert generate(4)["skipped"]
  with pytest.raises(teacher.TeacherError, match="needs at least 2 questions"):
    teacher.generate_store(teacher_worker.tiny_teacher(), tokenizer, questions[:1], "mismatched_hint", tmp_path / "one",
                           teacher_model_id="tiny", sampling=SamplingConfig(max_new_tokens=2), progress=False)


def test_bad_questions_are_refused(tokenizer_dir, train_questions, tmp_path):
  """Duplicate ids, missing fields and unknown strategies stop with their own errors."""
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
  duplicate = [train_questions[0], dict(train_questions[1], id=train_questions[0]["id"])]
  with pytest.raises(teacher.TeacherError, match="appears more than once"):
    teacher_worker.run_store(tmp_path / "a", duplicate, tokenizer)
  with pytest.raises(teacher.TeacherError, match="lacks gold"):
    teacher_worker.run_store(tmp_path / "b", [{"id": 0, "question": "q", "answer": "a"}], tokenizer)
  with pytest.raises(priming.PrimingError, match="unknown priming strategy"):
    teacher.generate_store(teacher_worker.tiny_teacher(), tokenizer, train_questions[:1], "shouting", tmp_path / "c",
                           teacher_model_id="x", sampling=teacher_worker.SAMPLING)


# ----------------------------------------------------------------------------- correctness


def test_teacher_counts_the_last_answer_correct_as_eval_does(tokenizer_dir, train_questions, tmp_path, monkeypatch):
  """Issue 24 section 5: a response that writes `#### 5` and then corrects itself to `#### 6` answers 6, as eval's
  `final` rule reads it: correct for gold 6, wrong for gold 5, in the stored flag, the summary's count and the
  trainer's `correct_only` selection. A store already started under `strict` keeps that rule for its flags, and
  the selection still reads the text under `final`."""
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
  text = "#### 5\nWait, I forgot the tip.\n#### 6"
  response = tokenizer.encode(text, add_special_tokens=False)
  assert tokenizer.decode(response, skip_special_tokens=True) == text

  def same_response_to_every_prompt(model, prompts, sampling, *, topk_logprobs, tail_temperatures, **kwargs):
    n, k = len(response), topk_logprobs
    tail = 1.0 - k * np.exp(-3.0)
    return [generation.Generation(tokens=list(response), finish_reason="stop",
                                  topk_ids=np.tile(np.arange(k, dtype=np.int32), (n, 1)),
                                  topk_logprobs=np.full((n, k), -3.0, np.float32),
                                  tail_mass=np.full((n,), tail, np.float32),
                                  tail_log_mass=np.full((n, len(tail_temperatures)), np.log(tail), np.float32))
            for _ in prompts]

  monkeypatch.setattr(generation, "generate", same_response_to_every_prompt)
  questions = [dict(train_questions[0], gold=6.0), dict(train_questions[1], gold=5.0)]
  summary = teacher_worker.run_store(tmp_path / "final", questions, tokenizer)
  reader = store.StoreReader(tmp_path / "final")
  assert [reader.metadata(i)["extracted_answer"] for i in range(2)] == [6.0, 6.0]
  assert [reader.metadata(i)["correct"] for i in range(2)] == [True, False]
  assert (summary["answer_rule"], summary["correct_rule"], summary["num_correct"]) == ("final", "final", 1)
  assert reader.filter(correct_only=True, rule="final").positions == [0]
  assert json.loads((tmp_path / "final" / teacher.JOB_FILE).read_text())["answer_rule"] == "final"

  # A store written under the old default: its flags say the opposite, the selection and the count do not.
  old = teacher_worker.run_store(tmp_path / "strict", questions, tokenizer, answer_rule="strict")
  reader = store.StoreReader(tmp_path / "strict")
  assert [reader.metadata(i)["correct"] for i in range(2)] == [False, True]
  assert reader.filter(correct_only=True).positions == [1]  # the flags as stored
  assert reader.filter(correct_only=True, rule=store.CORRECT_RULE).positions == [0]
  assert (old["answer_rule"], old["num_correct"]) == ("strict", 1)
  again = teacher_worker.run_store(tmp_path / "strict", questions, tokenizer)  # the default adopts its rule
  assert again["skipped"] and again["answer_rule"] == "strict"
