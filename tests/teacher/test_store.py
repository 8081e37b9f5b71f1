"""The teacher top-k store: round trips, kills and resumes, two writer processes, size budget."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import helpers
from kdjax.teacher import store

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOLLM2_VOCAB = 49152
LLAMA3_VOCAB = 128256
QWEN2_VOCAB = 151936


def _spec(vocab_size=SMOLLM2_VOCAB, k=6, **overrides):
  fields = dict(teacher_model="teacher/model-1.7b", strategy="teacher", vocab_size=vocab_size, k=k,
                sampling={"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 64}, questions="unit")
  return store.StoreSpec(**{**fields, **overrides})


def _record(spec, position, num_tokens=None, text_chars_per_token=None, prompt_tokens=None):
  """A random but position-determined record (so separate processes build identical ones)."""
  rng = np.random.default_rng(position)
  num_tokens = int(rng.integers(0, 30)) if num_tokens is None else num_tokens
  vocab, k = spec.vocab_size, spec.k
  topk_ids = rng.integers(0, vocab, size=(num_tokens, k))
  if num_tokens:
    topk_ids[0, 0], topk_ids[-1, -1] = vocab - 1, 0  # the extreme ids must survive packing
  logits = rng.normal(size=(num_tokens, k + 20)) * 3
  logprobs64 = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  top = np.sort(logprobs64, axis=-1)[:, ::-1][:, :k]
  tail = 1.0 - np.exp(top).sum(-1)
  prompt_s, prompt_t = (rng.integers(1, 40), rng.integers(1, 60)) if prompt_tokens is None else prompt_tokens
  if text_chars_per_token is None:
    text = "".join(rng.choice(list("abc 12+=\n€😀ü"), size=num_tokens * 3))
  else:
    text = "x" * (num_tokens * text_chars_per_token)
  correct = bool(rng.integers(0, 2))
  return store.TeacherRecord(
      question_id=position * 3 + 1, question_hash=hashlib.sha256(str(position).encode()).hexdigest()[:16],
      strategy=spec.strategy, teacher_model=spec.teacher_model, sampling=dict(spec.sampling),
      student_prompt_ids=rng.integers(0, vocab, size=prompt_s),
      teacher_prompt_ids=rng.integers(0, vocab, size=prompt_t),
      response_text=text, response_ids=rng.integers(0, vocab, size=num_tokens),
      topk_ids=topk_ids, topk_logprobs=top.astype(np.float32), tail_mass=tail.astype(np.float32),
      finish_reason=("stop", "length")[position % 2],
      extracted_answer=None if position % 3 == 0 else float(position) + 0.5,
      gold_answer=float(position), correct=correct, tail_temperatures=spec.tail_temperatures,
      tail_log_mass=-rng.exponential(3.0, (num_tokens, len(spec.tail_temperatures))).astype(np.float32))


def _assert_same_record(got, want):
  for name in ("question_id", "question_hash", "strategy", "teacher_model", "sampling",
               "response_text", "finish_reason", "extracted_answer", "gold_answer", "correct"):
    assert getattr(got, name) == getattr(want, name), name
  for name in ("student_prompt_ids", "teacher_prompt_ids", "response_ids", "topk_ids"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert getattr(got, name).dtype == np.int32
  for name in ("topk_logprobs", "tail_mass"):
    assert getattr(got, name).dtype == np.float32
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def _fill(path, spec, num_examples, shard_size, process_index=0, process_count=1, skip=()):
  writer = store.StoreWriter(path, spec, num_examples=num_examples, shard_size=shard_size,
                             process_index=process_index, process_count=process_count)
  for i in writer.pending_shards():
    if i in skip:
      continue
    start, stop = writer.shard_range(i)
    writer.write_shard(i, [_record(spec, p) for p in range(start, stop)])
  return writer


def _child_main(path, process_index, process_count, num_examples, shard_size, kill_in_shard=-1):
  """Runs in a separate process: writes one share; optionally SIGKILLs itself mid-shard."""
  if kill_in_shard >= 0:
    real_write_npz = store._write_npz

    def write_then_die(f, arrays):
      if arrays["response_offsets"].size and os.path.basename(f.name).startswith(
          store.shard_name(kill_in_shard)):
        f.write(b"PK\x03\x04 half a shard")
        f.flush()
        os.kill(os.getpid(), 9)
      real_write_npz(f, arrays)

    store._write_npz = write_then_die
  _fill(path, _spec(), num_examples, shard_size, process_index, process_count)


def _spawn(path, process_index, process_count, num_examples, shard_size, kill_in_shard=-1):
  code = (f"from teacher import test_store; test_store._child_main({str(path)!r}, {process_index}, {process_count}, "
          f"{num_examples}, {shard_size}, {kill_in_shard})")
  return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=helpers.worker_env(), stderr=subprocess.PIPE,
                          text=True)


@pytest.mark.parametrize("vocab_size, id_dtype", [
    (SMOLLM2_VOCAB, np.uint16), (1 << 16, np.uint16), (LLAMA3_VOCAB, np.uint8), (QWEN2_VOCAB, np.uint8)])
def test_round_trip_is_exact(tmp_path, vocab_size, id_dtype):
  spec = _spec(vocab_size)
  _fill(tmp_path, spec, num_examples=11, shard_size=4).finalize()
  want = [_record(spec, p) for p in range(11)]
  reader = store.StoreReader(tmp_path)
  assert len(reader) == 11 and reader.complete and reader.finalized
  assert reader.spec == spec and reader.positions == list(range(11))
  for got, expected in zip(reader, want):
    _assert_same_record(got, expected)
  _assert_same_record(reader[-1], want[-1])
  for got, expected in zip(reader[3:6], want[3:6]):
    _assert_same_record(got, expected)
  assert max(int(r.topk_ids.max()) for r in want if r.num_tokens) == vocab_size - 1
  with pytest.raises(IndexError):
    reader[11]
  # On disk: compact ids; a packed id costs ceil(log2(vocab)) bits.
  with np.load(tmp_path / "shard-00000.npz") as shard:
    assert shard["topk_ids"].dtype == id_dtype and shard["topk_logprobs"].dtype == np.float32
    num_ids = int(shard["response_offsets"][-1]) * spec.k
    bits = 16 if id_dtype == np.uint16 else (vocab_size - 1).bit_length()
    assert shard["topk_ids"].nbytes == -(-num_ids * bits // 8)
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert [s["index"] for s in manifest["shards"]] == [0, 1, 2]
  assert [s["examples"] for s in manifest["shards"]] == [4, 4, 3]
  assert manifest["total_tokens"] == sum(r.num_tokens for r in want) == reader.total_tokens
  sizes = [(tmp_path / store.shard_name(i)).stat().st_size for i in range(3)]
  assert manifest["total_bytes"] == sum(sizes)
  assert manifest["bytes_per_token"] == pytest.approx(sum(sizes) / manifest["total_tokens"])
  assert manifest["spec"]["k"] == spec.k and manifest["num_examples"] == 11


def test_float64_logprobs_are_kept_to_1e4(tmp_path):
  spec = _spec(k=5)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(40, 300)) * 4
  logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # float64 reference
  order = np.argsort(-logprobs, axis=-1)[:, :5]
  top = np.take_along_axis(logprobs, order, axis=-1)
  record = _record(spec, 0, num_tokens=40)
  record.topk_ids, record.topk_logprobs, record.tail_mass = order, top, 1 - np.exp(top).sum(-1)
  writer = store.StoreWriter(tmp_path, spec, num_examples=1, shard_size=1)
  writer.write_shard(0, [record])
  got = store.StoreReader(tmp_path)[0]
  assert np.abs(got.topk_logprobs - top).max() <= 1e-4
  assert np.abs(got.tail_mass - (1 - np.exp(top).sum(-1))).max() <= 1e-6
  np.testing.assert_array_equal(got.topk_ids, order)


def test_killed_writer_resumes_to_the_same_store(tmp_path):
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  _fill(reference, _spec(), num_examples=10, shard_size=3).finalize()
  # A real kill: the child dies (SIGKILL) halfway through writing shard 2 of 4.
  child = _spawn(resumed, 0, 1, 10, 3, kill_in_shard=2)
  child.wait(timeout=60)
  assert child.returncode == -9, child.stderr.read()
  assert (resumed / "shard-00002.npz.tmp").is_file()
  (resumed / "manifest-0.json.tmp").write_text("{ half a manifest")  # a second kind of leftover
  assert sorted(p.name for p in resumed.glob("shard-*.npz")) == ["shard-00000.npz", "shard-00001.npz"]
  with pytest.raises(store.StoreIncompleteError, match="2 of 4 shards missing"):
    store.StoreReader(resumed)
  partial = store.StoreReader(resumed, allow_partial=True)
  assert partial.positions == list(range(6)) and not partial.complete
  # Shard 3 existing while 2 is missing: pending lists only the missing one.
  writer = store.StoreWriter(resumed, _spec(), num_examples=10, shard_size=3)
  writer.write_shard(3, [_record(_spec(), p) for p in range(9, 10)])
  assert writer.pending_shards() == [2]
  writer.write_shard(2, [_record(_spec(), p) for p in range(6, 9)])
  assert writer.pending_shards() == []
  writer.finalize()
  assert not list(resumed.glob("*.tmp"))
  for i in range(4):
    assert (resumed / store.shard_name(i)).read_bytes() == (reference / store.shard_name(i)).read_bytes()
  assert (resumed / "manifest.json").read_text() == (reference / "manifest.json").read_text()
  for got, want in zip(store.StoreReader(resumed), store.StoreReader(reference)):
    _assert_same_record(got, want)


def test_two_processes_fill_one_store(tmp_path):
  children = [_spawn(tmp_path, p, 2, 14, 3) for p in range(2)]
  for child in children:
    child.wait(timeout=60)
    assert child.returncode == 0, child.stderr.read()
  shares = [json.loads((tmp_path / f"manifest-{p}.json").read_text()) for p in range(2)]
  assert [s["index"] for s in shares[0]["shards"]] == [0, 2, 4]
  assert [s["index"] for s in shares[1]["shards"]] == [1, 3]
  assert store.StoreWriter(tmp_path, _spec(), num_examples=14, shard_size=3, process_index=1,
                           process_count=2).pending_shards() == []
  with pytest.raises(store.StoreError, match="process 0's job"):
    store.StoreWriter(tmp_path, _spec(), num_examples=14, shard_size=3, process_index=1,
                      process_count=2).finalize()
  manifest = store.StoreWriter(tmp_path, _spec(), num_examples=14, shard_size=3,
                               process_index=0, process_count=2).finalize()
  assert [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3, 4]
  assert sum(s["examples"] for s in manifest["shards"]) == 14
  reader = store.StoreReader(tmp_path)
  assert len(reader) == 14
  for position, got in enumerate(reader):
    _assert_same_record(got, _record(_spec(), position))


def test_finalize_and_reader_refuse_an_incomplete_store(tmp_path):
  writer = _fill(tmp_path, _spec(), num_examples=9, shard_size=3, skip={1})
  assert writer.pending_shards() == [1]
  with pytest.raises(store.StoreIncompleteError, match=r"1 of 3 shards missing \(1\)"):
    writer.finalize()
  with pytest.raises(store.StoreIncompleteError, match="re-run the generate stage") as info:
    store.StoreReader(tmp_path)
  assert "allow_partial" not in str(info.value)  # a CLI user cannot pass a Python argument
  reader = store.StoreReader(tmp_path, allow_partial=True)
  assert reader.positions == [0, 1, 2, 6, 7, 8]
  _assert_same_record(reader[3], _record(_spec(), 6))
  with pytest.raises(store.StoreError, match="belongs to process 0, not 1"):
    store.StoreWriter(tmp_path, _spec(), num_examples=9, shard_size=3, process_index=1,
                      process_count=2).write_shard(0, [])


def _flip_byte(path: pathlib.Path, offset: int) -> None:
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x10
  path.write_bytes(bytes(data))


def _member_data_offset(path: pathlib.Path, member: str) -> int:
  """Where the bytes of `member`.npy start inside the (uncompressed) shard zip."""
  import zipfile
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(f"{member}.npy")
  header = path.read_bytes()[info.header_offset:info.header_offset + 30]
  name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
  return info.header_offset + 30 + name_len + extra_len


def test_bit_flipped_shard_is_named_in_one_line(tmp_path):
  from kdjax.teacher import jax_engine as teacher
  spec = _spec()
  manifest = _fill(tmp_path, spec, num_examples=9, shard_size=3).finalize()
  for shard in manifest["shards"]:  # the writer recorded the sha256 of what it wrote
    assert shard["sha256"] == hashlib.sha256((tmp_path / shard["file"]).read_bytes()).hexdigest()
  damaged = tmp_path / store.shard_name(1)
  # One byte in the middle of the top-k log-probs: the offsets and metadata still read fine.
  _flip_byte(damaged, _member_data_offset(damaged, "topk_logprobs") + 200)
  checks = {"reader": lambda: store.StoreReader(tmp_path),
            "generate's completeness check": lambda: teacher._finished_manifest(tmp_path, 3),
            "resuming writer": lambda: store.StoreWriter(tmp_path, spec, num_examples=9, shard_size=3)}
  for name, check in checks.items():
    with pytest.raises(store.StoreError) as info:
      check()
    message = str(info.value)
    assert str(damaged) in message and "sha256" in message and "\n" not in message, name
    assert "re-run the generate stage" in message, name

  # A store written before checksums (no sha256 in its manifests): the zip's own CRC still gives one line,
  # from the first read of the damaged arrays, never a raw zipfile.BadZipFile.
  for manifest_path in tmp_path.glob("manifest*.json"):
    value = json.loads(manifest_path.read_text())
    for shard in value["shards"]:
      shard.pop("sha256")
    manifest_path.write_text(json.dumps(value))
  reader = store.StoreReader(tmp_path)
  _assert_same_record(reader[0], _record(spec, 0))
  with pytest.raises(store.StoreError, match=f"store shard {damaged} is corrupt"):
    reader[4]


def test_spec_mismatch_is_refused(tmp_path):
  _fill(tmp_path, _spec(), num_examples=4, shard_size=2, skip={1})
  with pytest.raises(store.StoreSpecMismatchError, match=r"k: store has 6, given 8") as info:
    store.StoreWriter(tmp_path, _spec(k=8), num_examples=4, shard_size=2)
  assert "\n" not in str(info.value)
  with pytest.raises(store.StoreSpecMismatchError, match="strategy: store has 'teacher', given 'confidence'"):
    store.StoreWriter(tmp_path, _spec(strategy="confidence"), num_examples=4, shard_size=2)
  with pytest.raises(store.StoreSpecMismatchError, match="num_examples: store has 4, given 5"):
    store.StoreWriter(tmp_path, _spec(), num_examples=5, shard_size=2)
  with pytest.raises(store.StoreSpecMismatchError, match="shard_size"):
    store.StoreWriter(tmp_path, _spec(), num_examples=4, shard_size=4)
  with pytest.raises(store.StoreSpecMismatchError, match="temperature"):
    store.StoreWriter(tmp_path, _spec(sampling={"temperature": 1.0}), num_examples=4, shard_size=2)
  # The same spec resumes (a tuple in sampling equals the list it became in the manifest).
  same = _spec(sampling={"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 64})
  assert store.StoreWriter(tmp_path, same, num_examples=4, shard_size=2).pending_shards() == [1]
  tuple_spec = _spec(sampling={"stop": (1, 2)})
  other = tmp_path / "other"
  store.StoreWriter(other, tuple_spec, num_examples=1, shard_size=1)
  store.StoreWriter(other, _spec(sampling={"stop": [1, 2]}), num_examples=1, shard_size=1)


def test_bad_records_are_refused(tmp_path):
  spec = _spec()
  writer = store.StoreWriter(tmp_path, spec, num_examples=2, shard_size=2)
  good = [_record(spec, 0, num_tokens=3), _record(spec, 1, num_tokens=2)]
  with pytest.raises(store.StoreError, match="expected 2 records, got 1"):
    writer.write_shard(0, good[:1])
  cases = [
      ("topk_ids", np.zeros((3, 5), np.int64), r"topk_ids has shape \(3, 5\), expected \(3, 6\)"),
      ("response_ids", np.array([0, 1, SMOLLM2_VOCAB]), r"must be integers in \[0, 49152\)"),
      ("student_prompt_ids", np.array([-1]), "student_prompt_ids must be integers"),
      ("teacher_prompt_ids", np.array([0.5]), "teacher_prompt_ids must be integers"),
      ("finish_reason", "eos", "finish_reason 'eos'"),
      ("strategy", "base", "strategy/teacher 'base'"),
  ]
  for name, value, message in cases:
    bad = _record(spec, 0, num_tokens=3)
    setattr(bad, name, value)
    with pytest.raises(store.StoreError, match=message):
      writer.write_shard(0, [bad, good[1]])
  assert writer.pending_shards() == [0] and not (tmp_path / "shard-00000.npz").exists()
  with pytest.raises(store.StoreError, match="k <= vocab_size"):
    _spec(vocab_size=4, k=5)


def test_correct_only_reads_the_last_answer_under_the_final_rule(tmp_path):
  """A response with two `#### N` lines answers the last one (eval's `final` rule), whatever flag was stored."""
  spec = _spec()
  records = []
  for position, gold in enumerate((6.0, 5.0)):
    record = _record(spec, position)
    record.response_text, record.gold_answer, record.correct = "#### 5\nNo wait, plus one.\n#### 6", gold, gold == 5.0
    records.append(record)
  store.StoreWriter(tmp_path, spec, num_examples=2, shard_size=2).write_shard(0, records)
  reader = store.StoreReader(tmp_path, allow_partial=True)
  assert [reader.is_correct(i) for i in range(2)] == [False, True]  # as stored (here: the first `#### N`)
  assert [reader.is_correct(i, "final") for i in range(2)] == [True, False]
  assert [reader.is_correct(i, "strict") for i in range(2)] == [False, True]
  assert store.CORRECT_RULE == "final"
  assert reader.filter(correct_only=True, rule=store.CORRECT_RULE).positions == [0]
  assert reader.filter(correct_only=False, rule=store.CORRECT_RULE).positions == [0, 1]


def test_filter_correct_only_and_metadata(tmp_path):
  spec = _spec()
  _fill(tmp_path, spec, num_examples=12, shard_size=5).finalize()
  reader = store.StoreReader(tmp_path, cached_shards=1)
  want = [_record(spec, p) for p in range(12)]
  correct = reader.filter(correct_only=True)
  assert correct.positions == [p for p in range(12) if want[p].correct]
  assert 0 < len(correct) < 12
  for got, position in zip(correct, correct.positions):
    _assert_same_record(got, want[position])
  assert len(reader.filter(correct_only=False)) == 12
  assert reader.metadata(4)["response_text"] == want[4].response_text
  # numpy scalars in records are stored as plain JSON values.
  record = _record(spec, 0)
  record.question_id, record.correct, record.gold_answer = np.int64(7), np.bool_(True), np.float64(2)
  other = tmp_path / "numpy-scalars"
  store.StoreWriter(other, spec, num_examples=1, shard_size=1).write_shard(0, [record])
  meta = store.StoreReader(other).metadata(0)
  assert (meta["question_id"], meta["correct"], meta["gold_answer"]) == (7, True, 2.0)


def test_not_a_store(tmp_path):
  with pytest.raises(store.StoreError, match="not a teacher store"):
    store.StoreReader(tmp_path)
  (tmp_path / "shard-00000.npz").write_bytes(b"junk")
  with pytest.raises(store.StoreError, match="shard files but no manifest"):
    store.StoreWriter(tmp_path, _spec(), num_examples=1, shard_size=1)


# GSM8K train: 7473 questions x ~250 response tokens = 1,868,250 tokens. Per token at k=50:
#   vocab 49152 (uint16 ids):      50*2 (top-k ids) + 50*4 (log-probs) + 4 (tail) + 2 (id) = 306 B
#   vocab 128256 (17-bit packing): 50*17/8 = 106.25 + 200 + 4 + 17/8 = 312.4 B  (uint32: 408 B)
# so the per-token arrays cost 1,868,250 * 306 = 0.572 GB (0.584 GB packed, 0.762 GB as uint32).
# On top come per example ~300 prompt ids (~0.6 KB) and ~1.2 KB of JSON metadata (the ~1000-char
# response text dominates): 7473 * ~1.8 KB = ~0.013 GB. The test measures a real store built
# with those sizes and extrapolates from its bytes per token.
GSM8K_TRAIN_QUESTIONS = 7473
TOKENS_PER_RESPONSE = 250


@pytest.mark.parametrize("vocab_size, per_token_arrays", [(SMOLLM2_VOCAB, 306.0), (LLAMA3_VOCAB, 312.375)])
def test_gsm8k_train_store_fits_in_0_6_gb(tmp_path, vocab_size, per_token_arrays):
  spec = _spec(vocab_size, k=50)
  writer = store.StoreWriter(tmp_path, spec, num_examples=16, shard_size=16)
  for i in writer.pending_shards():
    start, stop = writer.shard_range(i)
    writer.write_shard(i, [_record(spec, p, num_tokens=TOKENS_PER_RESPONSE, text_chars_per_token=4,
                                   prompt_tokens=(110, 190)) for p in range(start, stop)])
  manifest = writer.finalize()
  bytes_per_token = manifest["bytes_per_token"]
  assert manifest["total_tokens"] == 16 * TOKENS_PER_RESPONSE
  # The arithmetic above, plus overhead (prompts, metadata, zip/npy headers) of at most 10 B/token.
  assert per_token_arrays < bytes_per_token < per_token_arrays + 10
  total = bytes_per_token * GSM8K_TRAIN_QUESTIONS * TOKENS_PER_RESPONSE
  print(f"vocab {vocab_size}: {bytes_per_token:.1f} B/token -> GSM8K train {total / 1e9:.3f} GB")
  assert total <= 0.6e9, f"{total / 1e9:.3f} GB"
  assert store.StoreReader(tmp_path).bytes_per_token == pytest.approx(bytes_per_token)


def test_tempered_tails_round_trip_and_are_checked(tmp_path):
  """tail_log_mass (T, n) at the spec's tail_temperatures: stored exactly, and a record that does not match the
  spec, or a resume with other temperatures, is refused."""
  spec = _spec(LLAMA3_VOCAB, tail_temperatures=(1.0, 5.94))
  assert store.StoreSpec.from_json(spec.to_json()) == spec and spec.tail_temperatures == (1.0, 5.94)
  writer = _fill(tmp_path / "s", spec, num_examples=5, shard_size=2)
  writer.finalize()
  reader = store.StoreReader(tmp_path / "s")
  assert reader.spec.tail_temperatures == (1.0, 5.94)
  for position, got in enumerate(reader):
    want = _record(spec, position)
    assert got.tail_temperatures == (1.0, 5.94) and got.tail_log_mass.dtype == np.float32
    np.testing.assert_array_equal(got.tail_log_mass, want.tail_log_mass)
  fresh = store.StoreWriter(tmp_path / "t", spec, num_examples=2, shard_size=2)
  wrong_shape = _record(spec, 0)
  wrong_shape.tail_log_mass = wrong_shape.tail_log_mass[:, :1]
  with pytest.raises(store.StoreError, match="tail_log_mass has shape"):
    fresh.write_shard(0, [wrong_shape, _record(spec, 1)])
  other = _record(_spec(LLAMA3_VOCAB, tail_temperatures=(1.0, 2.0)), 0)
  with pytest.raises(store.StoreError, match="tail_temperatures"):
    fresh.write_shard(0, [other, _record(spec, 1)])
  with pytest.raises(store.StoreSpecMismatchError, match="tail_temperatures"):
    store.StoreWriter(tmp_path / "s", _spec(LLAMA3_VOCAB, tail_temperatures=(1.0, 2.0)), num_examples=5,
                      shard_size=2)
  with pytest.raises(store.StoreError, match="positive"):
    _spec(tail_temperatures=(0.0,))
