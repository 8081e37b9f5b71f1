"""The GSM8K evaluation loop: batched greedy generation, scoring under every extraction rule, resumable output.

An evaluation folder holds
  eval_config.json  the settings that decide the outputs (written first; a restart with other settings fails)
  samples.jsonl     one record per question (fields in `SAMPLE_FIELDS`), appended and fsynced as each question
                    finishes (so a kill loses only the questions in flight), and once complete rewritten in the
                    order questions enter generation (prompt length, then id); `ref_nll` and `ref_tokens` are
                    the reference solution's mean per-token NLL (nats) under the same prompt and its token
                    count (`kdjax.evaluation.reference_nll`)
  summary.json      accuracy per rule with Wilson intervals, `ref_nll_mean` (the mean of the questions' `ref_nll`),
                    lengths and speed (written atomically at the end)
`kdjax.evaluation.report.build_report` reads these folders.

On several processes (a pod) each process evaluates its strided share of the selected questions (question i
goes to process i % count) and appends to its own part, `samples-<p>-of-<count>.jsonl`, so no two processes
write one object and a preempted process resumes its part after its last complete line. When every part is
complete (a barrier), process 0 merges them into samples.jsonl, in the order questions enter generation (prompt
length, then id), writes summary.json and deletes the parts; the others wait for that and read the summary.

Generation is fed `GENERATE_ROUNDS * eval.batch_size` questions per call, with `eval.batch_size` decode slots,
so slots that finish refill at once instead of waiting for a static batch's longest answer.

Scoring under the math_verify rule uses a worker started with multiprocessing's "spawn", which re-imports the
caller's main module: scripts that call `evaluate` must keep their work under `if __name__ == "__main__":`.

The model is any `Llama` object: a base model, one with LoRA factors attached, or merged weights.

Primary rule: "final" (`extract.PRIMARY_RULE`: the last answer marker, else the last number; also the report's
default). Every rule in `extract.RULES` is stored per question, so any other rule, "paper" (the authors'
extraction, for comparison with their table) included, can be reported without re-running; "strict" doubles as
a check that the model followed the requested answer format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kdjax.serving import generation
from kdjax.infra import parallel
from kdjax.teacher import priming
from kdjax.infra import storage
from kdjax.evaluation import exemplars
from kdjax.gsm8k import extract
from kdjax.evaluation import reference_nll
from kdjax.evaluation import stats

PROMPT_FORMATS = ("zero_shot_cot", "eight_shot_cot")
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "eval_config.json"
PART_PATTERN = "samples-*-of-*.jsonl"
# Questions per generate call, in units of eval.batch_size (the decode slots): slots refill from the call's queue,
# and only its last questions leave slots idle; the call's reference NLLs are computed first (see `evaluate`).
GENERATE_ROUNDS = 8
SAMPLE_FIELDS = ("id", "question", "prompt", "output", "num_output_tokens", "hit_token_limit", "finish_reason",
                 "gold", "answers", "correct", "seconds", "ref_nll", "ref_tokens")


class EvalError(ValueError):
  """Bad evaluation settings or an evaluation folder that cannot be used."""


class EvalConfigMismatchError(EvalError):
  """A folder holds outputs made with other generation settings than the ones asked for now."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate and how.

  Questions: `questions[start:stop]`, then the first `num_questions` of those (None: all; GSM8K test has 1319).
  `prompt_format`: "zero_shot_cot" is the student's own chat prompt (`priming.student_messages`, the prompt the
  student is trained with); "eight_shot_cot" is Meta's Llama 3.1 8-shot format (`exemplars.eight_shot_messages`).
  `greedy=True` ignores temperature / top_p / seed. `num_output_tokens` counts generated tokens including the
  stop token that ended the answer.
  """
  split: str = "test"
  num_questions: int | None = None
  start: int = 0
  stop: int | None = None
  prompt_format: str = "zero_shot_cot"
  greedy: bool = True
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int = 0
  max_new_tokens: int = 512
  batch_size: int = 16
  rules: tuple[str, ...] = extract.RULES
  primary_rule: str = extract.PRIMARY_RULE
  confidence: float = 0.95

  def __post_init__(self):
    if self.prompt_format not in PROMPT_FORMATS:
      raise EvalError(f"unknown prompt_format {self.prompt_format!r}; expected one of {PROMPT_FORMATS}")
    object.__setattr__(self, "rules", tuple(self.rules))
    unknown = [r for r in self.rules if r not in extract.RULES]
    if unknown or not self.rules:
      raise EvalError(f"rules must be a non-empty subset of {extract.RULES}, got {self.rules}")
    if self.primary_rule not in self.rules:
      raise EvalError(f"primary_rule {self.primary_rule!r} is not among the rules {self.rules}")
    if self.num_questions is not None and self.num_questions < 1:
      raise EvalError(f"num_questions must be >= 1 or None, got {self.num_questions}")
    if self.start < 0 or (self.stop is not None and self.stop <= self.start):
      raise EvalError(f"need 0 <= start < stop, got start={self.start}, stop={self.stop}")
    if self.batch_size < 1 or self.max_new_tokens < 1:
      raise EvalError(f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}")
    if not 0.0 < self.confidence < 1.0:
      raise EvalError(f"confidence must lie in (0, 1), got {self.confidence}")
    self.sampling()  # validates temperature, top_p and seed

  def sampling(self) -> generation.SamplingConfig:
    try:
      return generation.SamplingConfig(temperature=0.0 if self.greedy else self.temperature,
                                       top_p=1.0 if self.greedy else self.top_p,
                                       max_new_tokens=self.max_new_tokens, seed=self.seed)
    except generation.GenerationError as e:
      raise EvalError(str(e)) from None

  def output_settings(self) -> dict[str, Any]:
    """The settings that decide each question's output; a folder must not mix outputs of different ones."""
    settings = {"split": self.split, "prompt_format": self.prompt_format, "greedy": self.greedy,
                "max_new_tokens": self.max_new_tokens}
    if not self.greedy:
      settings.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
    return settings


def select_questions(questions: Sequence[Mapping], cfg: EvalConfig) -> list[Mapping]:
  """The questions `cfg` asks for: the slice [start:stop], then its first `num_questions`."""
  chosen = list(questions[cfg.start:cfg.stop])
  if cfg.num_questions is not None:
    chosen = chosen[:cfg.num_questions]
  if not chosen:
    raise EvalError(f"no questions selected from {len(questions)} (start={cfg.start}, stop={cfg.stop})")
  ids = [q["id"] for q in chosen]
  if len(set(ids)) != len(ids):
    raise EvalError("questions have duplicate ids")
  return chosen


def prompt_messages(question: str, prompt_format: str) -> list[dict]:
  """The chat shown to the model for one question."""
  if prompt_format == "zero_shot_cot":
    return priming.student_messages(question)
  if prompt_format == "eight_shot_cot":
    return exemplars.eight_shot_messages(question)
  raise EvalError(f"unknown prompt_format {prompt_format!r}; expected one of {PROMPT_FORMATS}")


def gold_of(question: Mapping) -> float:
  """The reference answer: the `gold` field of `data.load_gsm8k` records, else parsed from `answer`."""
  if question.get("gold") is not None:
    return float(question["gold"])
  return extract.gold_answer(question["answer"])


def score_output(output: str, gold: float, rules: Sequence[str]) -> tuple[dict, dict]:
  """({rule: extracted answer or None}, {rule: correct}) of one output."""
  answers = {rule: extract.extract_answer(output, rule) for rule in rules}
  return answers, {rule: extract.is_correct(answers[rule], gold) for rule in rules}


# ----------------------------------------------------------------------------- the samples file

def read_samples(path: pathlib.Path, *, repair: bool = False) -> list[dict]:
  """Complete records of a samples file.

  A torn last line (an interrupted write: no newline, or not valid JSON) is ignored, and with `repair` cut off
  the file so later appends start on a fresh line. A bad line before the last is an error.
  """
  if not path.exists():
    return []
  data = path.read_bytes()
  records, good_end, position = [], 0, 0
  lines = data.split(b"\n")  # the piece after the last newline is b"" when the file ends cleanly
  last_content = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for index, line in enumerate(lines):
    terminated = index < len(lines) - 1
    if line.strip():
      try:
        record = json.loads(line) if terminated else None
      except ValueError:
        record = None
      if not isinstance(record, dict) or "id" not in record:
        if index == last_content:
          break
        raise EvalError(f"{path}:{index + 1}: corrupt record before the end of the file")
      records.append(record)
    position += len(line) + 1
    good_end = min(position, len(data))
  if repair and good_end < len(data):
    storage.truncate(path, good_end)
  return records


def part_name(process_index: int, process_count: int) -> str:
  """The samples file process `process_index` of `process_count` appends to before the merge."""
  return f"samples-{process_index}-of-{process_count}.jsonl"


def _record_line(record: Mapping) -> str:
  return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def _append_records(path: pathlib.Path, records: Sequence[dict]) -> None:
  storage.append_text(path, "".join(_record_line(record) for record in records))


def _atomic_write_json(path: pathlib.Path, content: dict) -> None:
  storage.write_json(path, content, indent=2, allow_nan=False)


def _check_settings(out_dir: pathlib.Path, cfg: EvalConfig, *, write: bool = True) -> None:
  """Writes the folder's settings on first use (if `write`: process 0); refuses a folder made with other output
  settings."""
  path = out_dir / CONFIG_FILE
  wanted = cfg.output_settings()
  if path.exists():
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored != wanted:
      raise EvalConfigMismatchError(f"{out_dir} holds outputs made with {stored}, not {wanted}; use another folder")
  elif write:
    _atomic_write_json(path, wanted)


def _complete_samples_file(samples_path: pathlib.Path, done: dict, ordered_ids: Sequence[int], ref_nll_of) -> None:
  """One process's finished samples file: records written before the reference NLL existed get it, and the
  records go in `ordered_ids`' order (the order questions enter generation; they are appended as they finish).
  The file is rewritten atomically, and only when either changes it."""
  missing = [i for i in ordered_ids if "ref_nll" not in done[i]]
  if missing:
    for question_id, (nll, tokens) in ref_nll_of(missing).items():
      done[question_id] = {**done[question_id], "ref_nll": nll, "ref_tokens": tokens}
  present = read_samples(samples_path)
  wanted = set(ordered_ids)
  records = [done[i] for i in ordered_ids] + [r for r in present if r["id"] not in wanted]
  if missing or [r["id"] for r in records] != [r["id"] for r in present]:
    storage.write_text(samples_path, "".join(_record_line(record) for record in records))


# ----------------------------------------------------------------------------- summary

def summarise(records: Sequence[Mapping], cfg: EvalConfig, *, arm: str, run_seconds: float | None = None) -> dict:
  """summary.json content for the records of one arm."""
  n = len(records)
  accuracy, correct, interval, no_answer = {}, {}, {}, {}
  for rule in cfg.rules:
    k = sum(bool(r["correct"][rule]) for r in records)
    correct[rule] = k
    accuracy[rule] = k / n if n else None
    interval[rule] = list(stats.wilson_interval(k, n, cfg.confidence))
    no_answer[rule] = sum(r["answers"][rule] is None for r in records) / n if n else None
  tokens = sum(int(r["num_output_tokens"]) for r in records)
  seconds = sum(float(r.get("seconds") or 0.0) for r in records)
  primary = cfg.primary_rule
  return {
      "arm": arm,
      "n": n,
      "primary_rule": primary,
      "accuracy_primary": accuracy[primary],
      "ci_primary": interval[primary],
      "accuracy": accuracy,
      "correct": correct,
      "wilson_interval": interval,
      "confidence": cfg.confidence,
      "no_answer_share": no_answer,
      "mean_output_tokens": tokens / n if n else None,
      "hit_token_limit_share": sum(bool(r["hit_token_limit"]) for r in records) / n if n else None,
      "ref_nll_mean": reference_nll.mean_of(records),
      "output_tokens": tokens,
      # Generation time summed over every run that produced these records (compilation included).
      "seconds": seconds,
      "tokens_per_second": tokens / seconds if seconds > 0 else None,
      "run_seconds": run_seconds,
      "config": {**dataclasses.asdict(cfg), "rules": list(cfg.rules)},  # as it reads back from JSON
  }


# ----------------------------------------------------------------------------- progress

class _Progress:
  """A tqdm bar counting questions (rate and ETA) with output tokens/s; silent when disabled."""

  def __init__(self, enabled: bool, total: int, initial: int, arm: str):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total, initial=initial, unit="q", desc=f"eval {arm}", file=sys.stderr,
                       dynamic_ncols=True, smoothing=0.0)
    self._tokens, self._start = 0, time.perf_counter()

  def update(self, questions: int, tokens: int) -> None:
    self._tokens += tokens
    if self._bar is not None:
      rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
      self._bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
      self._bar.update(questions)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


# ----------------------------------------------------------------------------- the loop

def _sample_record(q: Mapping, gen: generation.Generation, tokenizer, prompt: Sequence[int], rules: Sequence[str],
                   *, seconds: float, ref: tuple[float, int]) -> dict:
  """The samples.jsonl record of question `q` answered by `gen`."""
  # The stop token is a chat marker, not part of the answer text.
  answer_tokens = gen.tokens[:-1] if gen.finish_reason == "stop" else gen.tokens
  output = tokenizer.decode(answer_tokens, skip_special_tokens=False)
  gold = gold_of(q)
  answers, correct = score_output(output, gold, rules)
  return {"id": q["id"], "question": q["question"], "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
          "output": output, "num_output_tokens": len(gen.tokens), "hit_token_limit": gen.finish_reason == "length",
          "finish_reason": gen.finish_reason, "gold": gold, "answers": answers, "correct": correct,
          "seconds": seconds, "ref_nll": ref[0], "ref_tokens": ref[1]}


class _RecordSink:
  """Appends records to a samples file as they come: each at once on local disk (fsynced), in groups of
  `flush_every` on gs://, where an append uploads the whole object again."""

  def __init__(self, path: pathlib.Path, flush_every: int):
    self._path, self._flush_every, self._pending = path, flush_every, []

  def add(self, record: dict) -> None:
    self._pending.append(record)
    if len(self._pending) >= self._flush_every:
      self.flush()

  def flush(self) -> None:
    if self._pending:
      _append_records(self._path, self._pending)
      self._pending = []


def evaluate(model, tokenizer, questions: Sequence[Mapping], cfg: EvalConfig, out_dir: str | os.PathLike, *,
             arm: str, progress: bool = True, process_index: int | None = None,
             process_count: int | None = None) -> dict | None:
  """Evaluates `model` on the questions `cfg` selects; returns (and writes) the summary.

  `questions` are records with `id`, `question`, `answer` (the reference solution, scored by its NLL) and `gold`
  (else parsed from `answer`), as from `data.load_gsm8k`. Each question's reference NLL is scored in its
  prompt's own prefill (generate's `continuations`); the separate `reference_nll` pass only backfills records
  written without one (older folders). Resumable:
  questions already in `out_dir/samples.jsonl` (or a part) are not redone; a folder whose summary covers all
  selected questions is returned as is. Process `process_index` of `process_count` (default: jax's) evaluates its share and, under
  `jax.distributed`, meets the others for the merge (module docstring); a process other than 0 returns None
  when no merged summary exists yet (processes run one after another, without jax.distributed).
  """
  import jax  # pylint: disable=import-outside-toplevel
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise EvalError(f"process_index {process_index} not in [0, {process_count})")
  out_dir = storage.makedirs(out_dir)
  selected = select_questions(questions, cfg)
  wanted_ids = [q["id"] for q in selected]
  _check_settings(out_dir, cfg, write=process_index == 0)
  samples_path, summary_path = out_dir / SAMPLES_FILE, out_dir / SUMMARY_FILE
  own_path = samples_path if process_count == 1 else out_dir / part_name(process_index, process_count)

  done = {}
  for path in dict.fromkeys([samples_path, own_path, *sorted(out_dir.glob(PART_PATTERN))]):
    # Only this process's own file may be cut back; another's may be growing under its writer.
    for record in read_samples(path, repair=path == own_path):
      done.setdefault(record["id"], record)
  if summary_path.exists() and set(wanted_ids) <= set(done):
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if summary.get("n") == len(selected) and summary.get("arm") == arm and "ref_nll_mean" in summary:
      return summary
  lacking = [q["id"] for q in selected if not isinstance(q.get("answer"), str)]
  if lacking:
    raise EvalError(f"questions {lacking[:5]} have no reference solution 'answer' (needed for the reference NLL)")

  share = [selected[i] for i in parallel.host_slice(len(selected), process_index, process_count)]
  todo = [q for q in share if q["id"] not in done]
  stop_ids = priming.stop_token_ids(tokenizer)
  pad_id = priming.pad_token_id(tokenizer)
  prompts = {q["id"]: priming.encode_chat(tokenizer, prompt_messages(q["question"], cfg.prompt_format))
             for q in selected}
  # Every question's reference sequence, so the padded length (one compilation) never depends on what is left.
  references = {q["id"]: reference_nll.reference_example(prompts[q["id"]], q["answer"], tokenizer, stop_ids[0],
                                                         q["id"]) for q in selected}
  ref_length = reference_nll.padded_length(list(references.values()))
  ref_window = reference_nll.solution_window(list(references.values()))

  def ref_nll_of(ids: Sequence[int]) -> dict[int, tuple[float, int]]:
    return reference_nll.reference_nll(model, [references[i] for i in ids], batch_size=cfg.batch_size,
                                       length=ref_length, window=ref_window)

  # Shortest prompts first: similar lengths share prefill chunks; ids keep the records apart.
  order_key = lambda q: (len(prompts[q["id"]]), q["id"])
  todo.sort(key=order_key)
  sampling = cfg.sampling()
  bar = _Progress(progress, len(share), len(share) - len(todo), arm)
  sink = _RecordSink(own_path, flush_every=cfg.batch_size if storage.is_remote(own_path) else 1)
  run_start = time.perf_counter()
  per_call = GENERATE_ROUNDS * cfg.batch_size
  try:
    for first in range(0, len(todo), per_call):
      chunk = todo[first:first + per_call]
      last_finish = time.perf_counter()

      def finished(index: int, gen: generation.Generation, chunk=chunk) -> None:
        nonlocal last_finish
        now = time.perf_counter()
        q = chunk[index]
        # The time since the previous question finished, so a run's records sum to its generation time.
        ref = (gen.continuation_nll / gen.continuation_tokens, gen.continuation_tokens)
        record = _sample_record(q, gen, tokenizer, prompts[q["id"]], cfg.rules, seconds=now - last_finish,
                                ref=ref)
        last_finish = now
        sink.add(record)
        done[record["id"]] = record
        bar.update(1, record["num_output_tokens"])

      generation.generate(model, [prompts[q["id"]] for q in chunk], sampling, stop_ids=stop_ids, pad_id=pad_id,
                          example_ids=[int(q["id"]) for q in chunk], batch_size=cfg.batch_size,
                          on_finish=finished, few_programs=True,  # each arm's model compiles its own
                          # The reference NLL, scored in the prompt's prefill (a separate pass repeats the prompt).
                          continuations=[reference_nll.continuation(references[q["id"]]) for q in chunk])
  finally:
    sink.flush()
    bar.close()

  parts = process_count > 1 or any(True for _ in out_dir.glob(PART_PATTERN))
  if not parts:
    _complete_samples_file(samples_path, done, [q["id"] for q in sorted(selected, key=order_key)], ref_nll_of)
  else:
    parallel.sync(f"kdjax.eval:{arm}:parts-written")  # every part is complete before process 0 reads them
    if process_index != 0:
      parallel.sync(f"kdjax.eval:{arm}:merged")
      return json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    done = _merge_parts(out_dir, [q for q in sorted(selected, key=order_key)], ref_nll_of)
  summary = summarise([done[i] for i in wanted_ids], cfg, arm=arm, run_seconds=time.perf_counter() - run_start)
  _atomic_write_json(summary_path, summary)
  if parts:
    for path in sorted(out_dir.glob(PART_PATTERN)):  # after the commit of samples.jsonl: nothing is lost
      storage.remove_tree(path)
    parallel.sync(f"kdjax.eval:{arm}:merged")
  return summary


def _merge_parts(out_dir, ordered: Sequence[Mapping], ref_nll_of) -> dict:
  """Process 0: samples.jsonl and every part become one samples.jsonl holding each of the `ordered` questions
  once, in that order; returns {id: record}. The parts stay until the summary is written too."""
  samples_path = out_dir / SAMPLES_FILE
  done = {}
  for path in [samples_path] + sorted(out_dir.glob(PART_PATTERN)):
    for record in read_samples(path):
      done.setdefault(record["id"], record)
  missing = [q["id"] for q in ordered if q["id"] not in done]
  if missing:
    raise EvalError(f"{out_dir}: no process evaluated questions {missing[:5]} ({len(missing)} missing); "
                    "run the eval stage again on every process")
  without_nll = [q["id"] for q in ordered if "ref_nll" not in done[q["id"]]]
  if without_nll:  # records written before the reference NLL existed
    for question_id, (nll, tokens) in ref_nll_of(without_nll).items():
      done[question_id] = {**done[question_id], "ref_nll": nll, "ref_tokens": tokens}
  storage.write_text(samples_path, "".join(_record_line(done[q["id"]]) for q in ordered))
  return done


def format_summary(summary: Mapping) -> str:
  """One line per rule: accuracy, interval and counts; then lengths and speed."""
  confidence = round(100 * summary["confidence"])
  lines = [f"arm {summary['arm']}: n={summary['n']}"]
  for rule, accuracy in summary["accuracy"].items():
    low, high = summary["wilson_interval"][rule]
    mark = " (primary)" if rule == summary["primary_rule"] else ""
    lines.append(f"  {rule:<12} accuracy {100 * accuracy:5.1f}%  {confidence}% Wilson CI "
                 f"[{100 * low:5.1f}%, {100 * high:5.1f}%]  {summary['correct'][rule]}/{summary['n']}{mark}")
  tps = summary["tokens_per_second"]
  lines.append(f"  mean output {summary['mean_output_tokens']:.1f} tokens, "
               f"{100 * summary['hit_token_limit_share']:.1f}% hit the limit; generation {summary['seconds']:.1f} s, "
               f"{'n/a' if tps is None else f'{tps:.1f}'} tokens/s")
  if summary.get("ref_nll_mean") is not None:
    lines.append(f"  reference solution NLL {summary['ref_nll_mean']:.4f} nats/token (mean over questions)")
  return "\n".join(lines)
