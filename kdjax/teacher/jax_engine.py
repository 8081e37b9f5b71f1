"""The teacher stage: response-primed generation into a resumable top-k store.

For every GSM8K question the teacher answers its *primed* prompt (the strategy's priming text and,
for `gold_hint`, the reference solution; for `mismatched_hint`, another question's, `priming.hint_donors`);
the store keeps the response, the teacher's top-k
log-probabilities per response token, and the *student* prompt (no priming) the student is later
trained on. Work goes shard by shard (`kdjax.teacher.store`): a shard is generated in one `generate` call
and written atomically, so a killed run resumes at the first missing shard; with several processes,
see "Multi-process runs" below for who writes which shard.

Reproducibility: each question's sampling key is derived from its GSM8K id (`example_ids`), and a
shard always holds the same questions, batched the same way, so a resumed or multi-process run
writes the same shards as one uninterrupted single-process run.

Feeding the engine: a shard is one `generate` call with `batch_size` decode slots, which refill from
the shard's queue as responses finish; only the shard's last responses leave slots idle. So
`shard_size` should be several times `batch_size` (the config's default is 4x). One call per shard,
rather than one call over several shards, is deliberate: a shard's bytes then depend only on its own
questions and settings, never on which shards happened to share the slots with it, and that is what
keeps a killed and resumed run byte-identical to an uninterrupted one (in float arithmetic a row's
log-probs can move in the last bit with the cache window its neighbours set).

Correctness of a response uses eval's primary extraction rule, `final` (`store.CORRECT_RULE`): the
last answer the response states, so a response that writes `#### 5` and then corrects itself to
`#### 6` counts as 6 for the teacher exactly as it would in eval. Every response is kept; `correct`
is a per-record field, and the trainer (`distill.correct_only`) selects by the response text read
again under `final`, so a store written under another rule (`strict`, the default before) is
selected the same way. A store keeps the rule it was started with for its flags (`teacher_job.json`).

Multi-process runs, two ways, chosen by where the teacher's parameters live:
- process-local teachers (each process holds a complete teacher on its own devices): the processes
  split the shards, process p generating and writing the shards i with i % n == p;
- one teacher spanning the processes (its mesh covers every process's devices, as a 405B teacher
  larger than one host's memory needs): every process runs every shard together, one SPMD program
  (`kdjax.serving.engine` feeds and reads it so), and process 0 alone writes the shards and the manifest.
  Process 0 decides which shards are pending and tells the others (`parallel.broadcast_json`), so a
  resumed pod agrees on the work even while its store is being written. A mesh spanning some
  processes but not all is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from kdjax.gsm8k import data, reference_overlap
from kdjax.serving import generation
from kdjax.infra import parallel, storage
from kdjax.teacher import priming, store
from kdjax.gsm8k import extract
from kdjax.serving.generation import SamplingConfig
from kdjax.models.llama.model import Llama

JOB_FILE = "teacher_job.json"
# Fields of the job file that change what a shard holds beyond the store spec.
_JOB_IDENTITY_KEYS = ("answer_rule", "hint_seed")
_QUESTION_KEYS = ("id", "question", "answer", "gold")


class TeacherError(ValueError):
  """Bad input to the teacher stage (questions, settings, a model it cannot use, a changed job)."""


@dataclasses.dataclass(frozen=True)
class TeacherJob:
  """The settings of one teacher run; recorded in the store folder as `teacher_job.json`."""

  strategy: str
  teacher_model: str
  sampling: SamplingConfig
  k: int = 50
  placement: str = "system"
  shard_size: int = 64  # several times batch_size, so slots refill within a shard (module docstring)
  batch_size: int = 16  # decode slots
  answer_rule: str = store.CORRECT_RULE  # the rule of the stored `correct` flags
  correct_only: bool = False  # recorded for the trainer; the store keeps every response
  tail_temperatures: tuple[float, ...] = ()  # temperatures of the stored tempered tails (see kdjax.teacher.store)
  hint_seed: int | None = None  # draws whose solution each question's hint shows (None: the strategy shows none)

  def __post_init__(self):
    priming.get_strategy(self.strategy)  # raises PrimingError for an unknown name
    if self.placement not in priming.PLACEMENTS:
      raise TeacherError(f"unknown placement {self.placement!r}; expected one of {priming.PLACEMENTS}")
    if self.answer_rule not in extract.RULES:
      raise TeacherError(f"unknown answer rule {self.answer_rule!r}; expected one of {extract.RULES}")
    if self.shard_size < 1 or self.batch_size < 1 or self.k < 1:
      raise TeacherError(f"need shard_size, batch_size and k >= 1, got {self.shard_size}, "
                         f"{self.batch_size}, {self.k}")

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "sampling": dataclasses.asdict(self.sampling)}


# ----------------------------------------------------------------------------- inputs


def _check_questions(questions: Sequence[dict], needs_gold_solution: bool) -> None:
  ids = set()
  for position, question in enumerate(questions):
    missing = [key for key in _QUESTION_KEYS if key not in question]
    if missing:
      raise TeacherError(f"question at position {position} lacks {', '.join(missing)} "
                         f"(expected dicts from kdjax.gsm8k.data.load_gsm8k)")
    if not isinstance(question["id"], (int, np.integer)) or not 0 <= question["id"] < 2**31:
      raise TeacherError(f"question at position {position}: id must be an int in [0, 2**31), "
                         f"got {question['id']!r}")
    if question["id"] in ids:
      # Ids seed the sampling; two questions with one id would share their random draws.
      raise TeacherError(f"question id {question['id']} appears more than once")
    ids.add(question["id"])
    if needs_gold_solution and not str(question["answer"]).strip():
      raise TeacherError(f"question {question['id']} has an empty reference solution")


def questions_fingerprint(questions: Sequence[dict]) -> str:
  """A short hash of the question list (ids and texts, in order): a resume must see the same list."""
  digest = hashlib.sha256()
  for question in questions:
    digest.update(f"{question['id']}:{data.question_hash(question['question'])}\n".encode())
  return digest.hexdigest()[:16]


def _spans_processes(model: Llama) -> bool:
  """True for a teacher whose mesh spans processes (one program on all of them); False for a process-local
  one. Raises TeacherError for a teacher it cannot run: spanning some processes but not all, or parameters
  other processes hold that are not on the mesh of its embedding."""
  from kdjax.serving import engine  # the engine imports generation, which this module needs first
  mesh = engine.model_mesh(model)
  if parallel.spans_processes(mesh):
    if not parallel.covers_every_process(mesh):
      raise TeacherError(
          f"the teacher's mesh spans processes {sorted(parallel.processes_of(mesh.devices.flat))} of "
          f"{jax.process_count()}; use a mesh over every process's devices or over each process's own")
    return True
  for leaf in jax.tree.leaves(nnx.state(model)):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      raise TeacherError("the teacher's parameters span devices of other processes but its embedding does not; "
                         "place the whole teacher on one mesh")
  return False


def teacher_prompt_ids(tokenizer: Any, question: dict, strategy: str, placement: str, *,
                       hint_question: dict | None = None) -> list[int]:
  """The primed chat the teacher answers (with a reference solution for gold-hint strategies).

  `hint_question`: the question whose solution the hint shows, required by strategies that show another
  question's (`mismatched_hint`, see `hint_questions`); the others show `question`'s own.
  """
  gold_solution = None
  strategy_object = priming.get_strategy(strategy)
  if strategy_object.needs_gold_solution:
    shown = question
    if getattr(strategy_object, "other_question", False):
      if hint_question is None or hint_question["id"] == question["id"]:
        raise TeacherError(f"strategy {strategy!r} shows another question's solution: give hint_question")
      shown = hint_question
    # Calculator annotations (`<<48/2=24>>`) are tool markup, not part of the worked solution.
    gold_solution = data.strip_calculator_annotations(shown["answer"])
  messages = priming.teacher_messages(question["question"], strategy, gold_solution=gold_solution,
                                      placement=placement)
  return priming.encode_chat(tokenizer, messages)


def hint_questions(questions: Sequence[dict], strategy: str, hint_seed: int | None) -> dict[int, dict] | None:
  """Question id -> the question whose solution its hint shows, for a strategy showing another question's
  (`priming.hint_donors` over `questions`, drawn from `hint_seed`); None for every other strategy."""
  if not getattr(priming.get_strategy(strategy), "other_question", False):
    return None
  by_id = {int(q["id"]): q for q in questions}
  try:
    donors = priming.hint_donors(list(by_id), 0 if hint_seed is None else hint_seed)
  except priming.PrimingError as err:
    raise TeacherError(f"strategy {strategy!r}: {err}") from None
  return {question: by_id[donor] for question, donor in donors.items()}


def student_prompt_ids(tokenizer: Any, question: dict) -> list[int]:
  """The plain chat the student is trained on: no priming text, no hint."""
  return priming.encode_chat(tokenizer, priming.student_messages(question["question"]))


# ----------------------------------------------------------------------------- job file


def _write_json_atomic(path: pathlib.Path, value: dict) -> None:
  storage.write_json(path, value, indent=1, sort_keys=True)


def _recorded_job(store_dir: pathlib.Path) -> dict:
  """The store's `teacher_job.json`, or {} when there is none yet."""
  path = store_dir / JOB_FILE
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise TeacherError(f"cannot read {path}: {err}") from None


def _check_job_file(store_dir: pathlib.Path, job: TeacherJob) -> None:
  recorded = _recorded_job(store_dir)
  if not recorded:
    return
  for key in _JOB_IDENTITY_KEYS:
    if recorded.get(key) != getattr(job, key):
      raise TeacherError(f"store {store_dir} was written with {key}={recorded.get(key)!r}, "
                         f"not {getattr(job, key)!r}; use a new folder")


def _finished_manifest(store_dir: pathlib.Path, num_shards: int) -> dict | None:
  """manifest.json when it exists and every shard it lists is on disk, else None; a shard that fails its
  recorded checksum raises StoreError."""
  path = store_dir / store.MANIFEST
  if not path.is_file():
    return None
  try:
    manifest = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None
  listed = sorted(shard["index"] for shard in manifest.get("shards", []))
  if listed != list(range(num_shards)):
    return None
  if not all((store_dir / store.shard_name(i)).is_file() for i in listed):
    return None
  for shard in manifest["shards"]:  # complete means undamaged too: one line naming a bad shard
    store.verify_shard(store_dir / store.shard_name(shard["index"]), shard.get("sha256"))
  return manifest


# ----------------------------------------------------------------------------- progress


class _Progress:
  """A tqdm bar over this process's pending examples, showing response tokens per second."""

  def __init__(self, enabled: bool, total: int, description: str):
    from tqdm.auto import tqdm  # only needed when a run actually shows progress
    self._bar = tqdm(total=total, desc=description, unit="ex", disable=not enabled, dynamic_ncols=True)
    self._start = time.perf_counter()
    self.tokens = 0

  def for_shard(self) -> generation.ProgressCallback:
    seen = {"tokens": 0, "examples": 0}

    def callback(tokens: int, elapsed_s: float, done: int, total: int) -> None:
      del elapsed_s, total
      self.tokens += tokens - seen["tokens"]
      self._bar.update(done - seen["examples"])
      seen.update(tokens=tokens, examples=done)
      rate = self.tokens / max(time.perf_counter() - self._start, 1e-9)
      self._bar.set_postfix(tok_s=f"{rate:.1f}", tokens=self.tokens, refresh=False)

    return callback

  def close(self) -> None:
    self._bar.close()


# ----------------------------------------------------------------------------- generation


def _shard_records(model: Llama, tokenizer: Any, questions: Sequence[dict], job: TeacherJob, *,
                   stop_ids: list[int], pad_id: int, hints: dict[int, dict] | None,
                   progress: generation.ProgressCallback | None) -> list[store.TeacherRecord]:
  """Generates the teacher's responses to `questions` and turns them into store records (`hints`: see
  `hint_questions`)."""
  teacher_prompts = [teacher_prompt_ids(tokenizer, q, job.strategy, job.placement,
                                        hint_question=None if hints is None else hints[int(q["id"])])
                     for q in questions]
  student_prompts = [student_prompt_ids(tokenizer, q) for q in questions]
  outputs = generation.generate(
      model, teacher_prompts, job.sampling, stop_ids=stop_ids, pad_id=pad_id,
      example_ids=[int(q["id"]) for q in questions], batch_size=job.batch_size,
      topk_logprobs=job.k, tail_temperatures=job.tail_temperatures, progress=progress)
  sampling = dataclasses.asdict(job.sampling)
  records = []
  for question, teacher_ids, student_ids, out in zip(questions, teacher_prompts, student_prompts, outputs):
    # Special tokens (the end-of-turn stop token) stay in response_ids, which the student learns to
    # emit, but not in the text answers are extracted from.
    text = tokenizer.decode(out.tokens, skip_special_tokens=True)
    answer = extract.extract_answer(text, job.answer_rule)
    records.append(store.TeacherRecord(
        question_id=int(question["id"]), question_hash=data.question_hash(question["question"]),
        strategy=job.strategy, teacher_model=job.teacher_model, sampling=sampling,
        student_prompt_ids=np.asarray(student_ids, np.int32),
        teacher_prompt_ids=np.asarray(teacher_ids, np.int32),
        response_text=text, response_ids=np.asarray(out.tokens, np.int32),
        topk_ids=out.topk_ids, topk_logprobs=out.topk_logprobs, tail_mass=out.tail_mass,
        finish_reason=out.finish_reason, extracted_answer=answer,
        gold_answer=float(question["gold"]), correct=extract.is_correct(answer, float(question["gold"])),
        tail_log_mass=out.tail_log_mass, tail_temperatures=job.tail_temperatures))
  return records


def _barrier(name: str) -> None:
  parallel.sync(name)


def _summary(store_dir: pathlib.Path, job: TeacherJob, manifest: dict | None, questions: Sequence[dict],
             **run: Any) -> dict:
  """What a generate call did and, for a finished store, its size, accuracy and hint measures
  (`reference_overlap.store_statistics`)."""
  summary = {"store_dir": str(store_dir), "strategy": job.strategy, "teacher_model": job.teacher_model,
             "answer_rule": job.answer_rule, "correct_rule": store.CORRECT_RULE, "correct_only": job.correct_only,
             "finalized": manifest is not None, **run}
  if manifest is not None:
    reader = store.StoreReader(store_dir)
    num_correct = sum(reader.is_correct(i, store.CORRECT_RULE) for i in range(len(reader)))  # what correct_only keeps
    summary.update(
        num_examples=manifest["num_examples"], num_shards=manifest["num_shards"],
        shards=[shard["file"] for shard in manifest["shards"]], total_tokens=manifest["total_tokens"],
        total_bytes=manifest["total_bytes"], bytes_per_token=manifest["bytes_per_token"],
        num_correct=num_correct, accuracy=num_correct / len(reader) if len(reader) else None,
        **reference_overlap.store_statistics(reader, questions))
  return summary


def generate_store(
    model: Llama,
    tokenizer: Any,
    questions: Sequence[dict],
    strategy: str,
    store_dir: str | os.PathLike,
    *,
    teacher_model_id: str,
    sampling: SamplingConfig,
    student_tokenizer: Any = None,
    k: int = 50,
    placement: str = "system",
    shard_size: int = 64,
    batch_size: int = 16,
    correct_only: bool = False,
    answer_rule: str | None = None,
    tail_temperatures: Sequence[float] = (),
    questions_name: str = "",
    hint_seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
) -> dict:
  """Writes (or finishes) the teacher store for `questions` under `strategy`; returns a summary.

  `questions` are dicts from `kdjax.gsm8k.data.load_gsm8k` (id, question, answer, gold); their ids seed
  the sampling. A finished store with the same spec is left as it is; a partial one is resumed.
  With `student_tokenizer`, both tokenizers must map tokens to the same ids (checked first).
  `answer_rule` is the rule of the stored `correct` flags: by default `store.CORRECT_RULE` for a new store and the
  recorded one for a store already started (its flags keep one rule); a rule other than the recorded one is refused.
  `questions_name` (e.g. "gsm8k:train n=7000") goes into the store spec next to a fingerprint of
  the list. `tail_temperatures`: the temperatures at which every token's exact tail mass outside the
  top-k is stored as well (training in "tail" mode at T != 1 needs T among them). With a process-local
  teacher, process `process_index` of `process_count` (default: jax's) writes its share of the shards;
  with a teacher spanning every process (module docstring) all processes generate every shard and process
  0 writes them. Under `jax.distributed` all processes meet at a barrier, process 0 writes manifest.json,
  and every process returns the finished store's summary (`spanning` says which way it ran). `hint_seed`: for a
  strategy showing another question's solution (`mismatched_hint`), the seed of `priming.hint_donors` over
  `questions`; recorded in the job file, a resume must use the same.
  """
  if student_tokenizer is not None:
    # Before any heavy work: a store of top-k ids is useless to a student that reads them differently.
    priming.check_same_tokenizer(tokenizer, student_tokenizer)
  store_dir = storage.path(store_dir)
  if answer_rule is None:
    answer_rule = _recorded_job(store_dir).get("answer_rule") or store.CORRECT_RULE
  job = TeacherJob(strategy=strategy, teacher_model=teacher_model_id, sampling=sampling, k=k,
                   placement=placement, shard_size=shard_size, batch_size=batch_size,
                   answer_rule=answer_rule, correct_only=correct_only,
                   tail_temperatures=tuple(sorted({float(t) for t in tail_temperatures})),
                   hint_seed=hint_seed if getattr(priming.get_strategy(strategy), "other_question", False) else None)
  _check_questions(questions, priming.get_strategy(strategy).needs_gold_solution)
  hints = hint_questions(questions, strategy, job.hint_seed)
  distributed = jax.process_count() > 1
  spanning = _spans_processes(model)
  if spanning and (process_index, process_count) not in ((None, None), (jax.process_index(), jax.process_count())):
    raise TeacherError(f"a teacher spanning processes runs as process {jax.process_index()} of "
                       f"{jax.process_count()}, not {process_index} of {process_count}")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count

  spec = store.StoreSpec(
      teacher_model=teacher_model_id, strategy=strategy, vocab_size=model.config.vocab_size, k=k,
      sampling=dataclasses.asdict(sampling), placement=placement, tail_temperatures=job.tail_temperatures,
      questions=f"{questions_name} n={len(questions)} sha={questions_fingerprint(questions)}".strip())
  run = {"process_index": process_index, "process_count": process_count, "spanning": spanning, "skipped": False,
         "shards_written": [], "tokens_generated": 0, "seconds": 0.0}
  # A spanning teacher's shards are all process 0's to write (a writer of one process there, none elsewhere); it
  # alone reads the store's state and tells the others what to generate, errors included.
  writer, manifest, work, num_shards = None, None, [], 0
  try:
    if not spanning or process_index == 0:
      writer = store.StoreWriter(store_dir, spec, num_examples=len(questions), shard_size=shard_size,
                                 process_index=0 if spanning else process_index,
                                 process_count=1 if spanning else process_count)
      _check_job_file(store_dir, job)
      num_shards = writer.num_shards
      manifest = _finished_manifest(store_dir, num_shards)
      work = [] if manifest is not None else [(i, *writer.shard_range(i)) for i in writer.pending_shards()]
  except Exception as err:
    if spanning:
      parallel.broadcast_json(f"kdjax.teacher.jax_engine:{strategy}:work", {"error": f"{type(err).__name__}: {err}"})
    raise
  if spanning:
    told = parallel.broadcast_json(f"kdjax.teacher.jax_engine:{strategy}:work",
                                   {"finished": manifest is not None, "work": work, "num_shards": num_shards})
    if "error" in told:
      raise TeacherError(f"process 0 refused the store: {told['error']}")
    work, num_shards = [tuple(w) for w in told["work"]], told["num_shards"]
    if told["finished"] and manifest is None:  # the others read the finished store process 0 found
      manifest = _finished_manifest(store_dir, num_shards)
  if manifest is not None:
    return _summary(store_dir, job, manifest, questions, **{**run, "skipped": True})
  if process_index == 0:
    _write_json_atomic(store_dir / JOB_FILE, job.to_json())

  start = time.perf_counter()
  shows = progress and (not spanning or process_index == 0)
  bar = _Progress(shows, sum(stop - first for _, first, stop in work),
                  f"teacher {strategy}" + (f" [{process_index}/{process_count}]" if process_count > 1 else ""))
  stop_ids, pad_id = priming.stop_token_ids(tokenizer), priming.pad_token_id(tokenizer)
  try:
    for index, first, stop in work:
      records = _shard_records(model, tokenizer, questions[first:stop], job, stop_ids=stop_ids,
                               pad_id=pad_id, hints=hints, progress=bar.for_shard())
      if writer is not None:
        writer.write_shard(index, records)
        run["shards_written"].append(index)
      run["tokens_generated"] += sum(record.num_tokens for record in records)
  finally:
    bar.close()
  run["seconds"] = time.perf_counter() - start

  if distributed:
    _barrier(f"kdjax.teacher.jax_engine:{strategy}:shards-written")
  if process_index == 0:
    missing = [i for i in range(writer.num_shards) if not (store_dir / store.shard_name(i)).is_file()]
    if not missing:
      manifest = writer.finalize()
    else:
      run["missing_shards"] = missing  # independent processes without jax.distributed: not all done
  if distributed:
    _barrier(f"kdjax.teacher.jax_engine:{strategy}:finalized")
    manifest = _finished_manifest(store_dir, num_shards)
  return _summary(store_dir, job, manifest, questions, **run)
