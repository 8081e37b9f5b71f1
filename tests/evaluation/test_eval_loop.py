"""The GSM8K evaluation loop with the real SmolLM2-135M-Instruct: records, scoring, resume, skip, report."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from kdjax.gsm8k import data
from kdjax.serving import generation
from kdjax.teacher import priming
from kdjax.evaluation import exemplars
from kdjax.gsm8k import extract
from kdjax.evaluation import loop
from kdjax.evaluation import report
from kdjax.evaluation import stats

REPO = pathlib.Path(__file__).resolve().parents[2]
CFG = loop.EvalConfig(num_questions=4, max_new_tokens=64, batch_size=2)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
  import kdjax
  model, _ = kdjax.load_model(smollm2_gguf)
  return model, kdjax.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def questions(gsm8k_dir):
  return data.load_gsm8k(gsm8k_dir, "test")


@pytest.fixture(scope="module")
def finished(smollm2, questions, tmp_path_factory):
  """One complete evaluation folder (generated once for the module) and its summary."""
  model, tokenizer = smollm2
  out_dir = tmp_path_factory.mktemp("eval") / "base"
  summary = loop.evaluate(model, tokenizer, questions, CFG, out_dir, arm="base", progress=False)
  return out_dir, summary


class GenerateSpy:
  """Wraps `generation.generate`, recording the example ids it is asked for, call by call."""

  def __init__(self, monkeypatch):
    self.example_ids: list[int] = []
    self.calls: list[list[int]] = []
    real = generation.generate

    def spy(model, prompts, sampling, **kwargs):
      self.example_ids.extend(kwargs["example_ids"])
      self.calls.append(list(kwargs["example_ids"]))
      return real(model, prompts, sampling, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)


def _lines(path) -> list[str]:
  return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_samples_have_fields_and_agree_with_extract(finished, questions):
  out_dir, summary = finished
  samples = report.load_samples(out_dir)
  assert sorted(s["id"] for s in samples) == [0, 1, 2, 3]
  for sample in samples:
    assert set(loop.SAMPLE_FIELDS) <= set(sample)
    question = questions[sample["id"]]
    assert sample["question"] == question["question"]
    assert sample["gold"] == extract.gold_answer(question["answer"])
    assert sample["prompt"].endswith("<|im_start|>assistant\n") and question["question"] in sample["prompt"]
    assert 1 <= sample["num_output_tokens"] <= CFG.max_new_tokens
    assert sample["hit_token_limit"] == (sample["finish_reason"] == "length")
    if sample["hit_token_limit"]:
      assert sample["num_output_tokens"] == CFG.max_new_tokens
    assert set(sample["answers"]) == set(sample["correct"]) == set(extract.RULES)
    for rule in extract.RULES:
      answer = extract.extract_answer(sample["output"], rule)
      assert sample["answers"][rule] == answer
      assert sample["correct"][rule] == extract.is_correct(answer, sample["gold"])
  assert summary["n"] == 4 and summary["arm"] == "base"
  for rule in extract.RULES:
    k = sum(s["correct"][rule] for s in samples)
    assert summary["correct"][rule] == k and summary["accuracy"][rule] == k / 4
    assert summary["wilson_interval"][rule] == list(stats.wilson_interval(k, 4))
  tokens = sum(s["num_output_tokens"] for s in samples)
  assert summary["output_tokens"] == tokens and summary["mean_output_tokens"] == tokens / 4
  assert summary["tokens_per_second"] == pytest.approx(tokens / summary["seconds"])
  assert json.loads((out_dir / loop.SUMMARY_FILE).read_text()) == summary


def test_finished_folder_is_skipped(smollm2, questions, finished, monkeypatch):
  out_dir, summary = finished
  spy = GenerateSpy(monkeypatch)
  again = loop.evaluate(*smollm2, questions, CFG, out_dir, arm="base", progress=False)
  assert spy.example_ids == [] and again == summary


def test_resume_redoes_only_the_missing_questions(smollm2, questions, finished, monkeypatch, tmp_path):
  out_dir, summary = finished
  resumed = tmp_path / "resumed"
  shutil.copytree(out_dir, resumed)
  (resumed / loop.SUMMARY_FILE).unlink()
  lines = _lines(resumed / loop.SAMPLES_FILE)
  assert len(lines) == 4
  # Keep two records, then a torn write: half of the third record and no newline.
  (resumed / loop.SAMPLES_FILE).write_text("".join(lines[:2]) + lines[2][:len(lines[2]) // 2], encoding="utf-8")
  missing = sorted(json.loads(line)["id"] for line in lines[2:])
  spy = GenerateSpy(monkeypatch)
  again = loop.evaluate(*smollm2, questions, CFG, resumed, arm="base", progress=False)
  assert sorted(spy.example_ids) == missing and len(spy.calls) == 1
  new_lines = _lines(resumed / loop.SAMPLES_FILE)
  assert len(new_lines) == 4 and new_lines[:2] == lines[:2]
  by_id = {s["id"]: s for s in report.load_samples(out_dir)}
  for sample in report.load_samples(resumed):
    # Greedy, and the redone questions form the same batch as before: the same outputs.
    assert sample["output"] == by_id[sample["id"]]["output"]
  assert again["accuracy"] == summary["accuracy"] and again["n"] == 4


def test_two_processes_split_the_questions_and_merge_one_samples_file(smollm2, questions, finished, monkeypatch,
                                                                      tmp_path):
  """Processes 0 and 1 of 2, run one after another (no jax.distributed): each generates its strided share into
  its own part; process 0 refuses to merge while a part is missing, then merges into the samples.jsonl one
  process writes: the same records, in the same order (the per-question timing aside)."""
  out_dir, summary = finished
  folder = tmp_path / "two"
  spy = GenerateSpy(monkeypatch)
  with pytest.raises(loop.EvalError, match=r"no process evaluated questions \[1, 3\]"):
    loop.evaluate(*smollm2, questions, CFG, folder, arm="base", progress=False, process_index=0, process_count=2)
  assert sorted(spy.example_ids) == [0, 2] and not (folder / loop.SAMPLES_FILE).exists()
  assert loop.evaluate(*smollm2, questions, CFG, folder, arm="base", progress=False, process_index=1,
                       process_count=2) is None
  assert sorted(spy.example_ids) == [0, 1, 2, 3]
  assert sorted(p.name for p in folder.iterdir()) == [loop.CONFIG_FILE, loop.part_name(0, 2), loop.part_name(1, 2)]
  merged = loop.evaluate(*smollm2, questions, CFG, folder, arm="base", progress=False, process_index=0,
                         process_count=2)
  assert sorted(spy.example_ids) == [0, 1, 2, 3]  # the merge generated nothing again
  assert sorted(p.name for p in folder.iterdir()) == [loop.CONFIG_FILE, loop.SAMPLES_FILE, loop.SUMMARY_FILE]
  one, two = report.load_samples(out_dir), report.load_samples(folder)
  assert [s["id"] for s in two] == [s["id"] for s in one]
  for a, b in zip(one, two):
    assert b["ref_nll"] == pytest.approx(a["ref_nll"], abs=1e-6)
    assert {k: v for k, v in b.items() if k not in ("seconds", "ref_nll")} == \
        {k: v for k, v in a.items() if k not in ("seconds", "ref_nll")}
  timing = ("seconds", "tokens_per_second", "run_seconds", "ref_nll_mean")
  assert {k: v for k, v in merged.items() if k not in timing} == {k: v for k, v in summary.items() if k not in timing}
  assert merged["ref_nll_mean"] == pytest.approx(summary["ref_nll_mean"], abs=1e-6)


def test_slot_refilling_outputs_equal_one_static_batch_at_a_time(smollm2, questions, finished):
  """The evaluation feeds all 4 questions to 2 decode slots in one call (slots refill as answers finish); its
  greedy outputs equal the former path's: `generate` on one batch of `batch_size` questions at a time."""
  out_dir, _ = finished
  model, tokenizer = smollm2
  samples = report.load_samples(out_dir)
  stop_ids = priming.stop_token_ids(tokenizer)
  prompts = {s["id"]: priming.encode_chat(tokenizer, loop.prompt_messages(questions[s["id"]]["question"],
                                                                         CFG.prompt_format)) for s in samples}
  ordered = sorted(prompts, key=lambda i: (len(prompts[i]), i))
  assert [s["id"] for s in samples] == ordered  # the finished file is in the order questions enter generation
  by_id = {s["id"]: s for s in samples}
  for first in range(0, len(ordered), CFG.batch_size):
    batch = ordered[first:first + CFG.batch_size]
    generations = generation.generate(model, [prompts[i] for i in batch], CFG.sampling(), stop_ids=stop_ids,
                                      pad_id=stop_ids[0], example_ids=batch, batch_size=CFG.batch_size)
    for i, gen in zip(batch, generations):
      tokens = gen.tokens[:-1] if gen.finish_reason == "stop" else gen.tokens
      assert by_id[i]["output"] == tokenizer.decode(tokens, skip_special_tokens=False)
      assert (by_id[i]["num_output_tokens"], by_id[i]["finish_reason"]) == (len(gen.tokens), gen.finish_reason)


_KILLED_CHILD = """
import sys, time
import kdjax
from kdjax.gsm8k import data
from kdjax.evaluation import loop
gguf, gsm8k, folder, num_questions, max_new_tokens, batch_size = sys.argv[1:]
add = loop._RecordSink.add
def add_then_pause(self, record):  # after the first record, leave the killer time to strike mid-way
  add(self, record)
  time.sleep(30)
loop._RecordSink.add = add_then_pause
model, _ = kdjax.load_model(gguf)
cfg = loop.EvalConfig(num_questions=int(num_questions), max_new_tokens=int(max_new_tokens),
                      batch_size=int(batch_size))
loop.evaluate(model, kdjax.load_tokenizer(gguf), data.load_gsm8k(gsm8k, "test"), cfg, folder, arm="base",
              progress=False)
"""


# ~70 s on the shared 2-core machine (a child process loads SmolLM2 and compiles), hence slow.
@pytest.mark.slow
def test_kill_9_mid_evaluation_keeps_finished_questions_and_resumes_to_the_same_samples(
    smollm2, smollm2_gguf, gsm8k_dir, questions, finished, monkeypatch, tmp_path):
  """A run killed (SIGKILL) while questions are in flight has already written each question that finished; the
  resumed run generates only the others and ends with the uninterrupted run's samples."""
  out_dir, summary = finished
  folder = tmp_path / "killed"
  samples_path = folder / loop.SAMPLES_FILE
  child = subprocess.Popen(
      [sys.executable, "-c", _KILLED_CHILD, str(smollm2_gguf), str(gsm8k_dir), str(folder),
       str(CFG.num_questions), str(CFG.max_new_tokens), str(CFG.batch_size)],
      env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 300
    while not (samples_path.exists() and samples_path.read_bytes().endswith(b"\n")):
      assert child.poll() is None, child.stdout.read().decode()[-3000:]
      assert time.time() < deadline, "the child wrote no record in 300 s"
      time.sleep(0.05)
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  written = loop.read_samples(samples_path)
  assert len(written) == 1 and not (folder / loop.SUMMARY_FILE).exists()
  spy = GenerateSpy(monkeypatch)
  again = loop.evaluate(*smollm2, questions, CFG, folder, arm="base", progress=False)
  assert sorted(spy.example_ids) == sorted({0, 1, 2, 3} - {written[0]["id"]})
  resumed = {s["id"]: s for s in report.load_samples(folder)}
  assert resumed[written[0]["id"]] == written[0]  # kept as written before the kill
  for sample in report.load_samples(out_dir):
    got = resumed[sample["id"]]
    assert got["ref_nll"] == pytest.approx(sample["ref_nll"], abs=1e-6)
    assert {k: v for k, v in got.items() if k not in ("seconds", "ref_nll")} == \
        {k: v for k, v in sample.items() if k not in ("seconds", "ref_nll")}
  assert again["accuracy"] == summary["accuracy"] and again["n"] == 4


def test_report_builds_from_two_folders(finished, tmp_path):
  out_dir, summary = finished
  other = tmp_path / "copy"
  shutil.copytree(out_dir, other)
  built = report.build_report({"base": out_dir, "copy": other}, tmp_path / "report", controls=("base",))
  for name in ("base", "copy"):
    arm = built["arms"][name]
    assert arm["n"] == 4 and arm["accuracy"] == summary["accuracy"]["final"]
    assert arm["ref_nll"] == pytest.approx(summary["ref_nll_mean"])
    assert arm["mean_output_tokens"] == summary["mean_output_tokens"]
  assert built["comparisons"][0]["p_value"] == 1.0
  assert (tmp_path / "report" / "report.md").exists() and (tmp_path / "report" / report.ACCURACY_PLOT).exists()


# ----------------------------------------------------------------------------- without the model

def test_other_settings_in_a_used_folder_are_refused(finished, questions):
  out_dir, _ = finished
  with pytest.raises(loop.EvalConfigMismatchError, match="holds outputs made with"):
    loop.evaluate(None, None, questions, loop.EvalConfig(num_questions=4, max_new_tokens=32), out_dir, arm="base")


def test_torn_and_corrupt_samples_files(tmp_path):
  path = tmp_path / "samples.jsonl"
  good = "".join(json.dumps({"id": i}) + "\n" for i in range(3))
  for tail in ('{"id": 3', '{"id": 3}', "{broken\n", "\n\n"):
    path.write_text(good + tail)
    assert [r["id"] for r in loop.read_samples(path, repair=True)] == [0, 1, 2]
    assert path.read_text() in (good, good + "\n\n")
  path.write_text('{"id": 0}\nnot json\n{"id": 1}\n')
  with pytest.raises(loop.EvalError, match="corrupt record"):
    loop.read_samples(path)


def test_question_selection_and_config_validation():
  qs = [{"id": i, "question": f"q{i}", "gold": float(i)} for i in range(10)]
  assert [q["id"] for q in loop.select_questions(qs, loop.EvalConfig(start=2, stop=8, num_questions=3))] == [2, 3, 4]
  assert len(loop.select_questions(qs, loop.EvalConfig())) == 10
  with pytest.raises(loop.EvalError, match="no questions"):
    loop.select_questions(qs, loop.EvalConfig(start=20))
  with pytest.raises(loop.EvalError, match="prompt_format"):
    loop.EvalConfig(prompt_format="five_shot")
  with pytest.raises(loop.EvalError, match="primary_rule"):
    loop.EvalConfig(rules=("strict",), primary_rule="paper")
  with pytest.raises(loop.EvalError, match="temperature"):
    loop.EvalConfig(greedy=False, temperature=-1.0)


def test_eight_shot_prompt():
  messages = loop.prompt_messages("How many legs do 3 cats have?", "eight_shot_cot")
  assert len(messages) == 17 and [m["role"] for m in messages[:2]] == ["user", "assistant"]
  answers = [m["content"] for m in messages if m["role"] == "assistant"]
  # Every exemplar ends "The final answer is N", which the strict (lm-eval) rule reads.
  for (question, reasoning, answer), text in zip(exemplars.WEI_ET_AL_EXEMPLARS, answers):
    assert text.endswith(f"The final answer is {answer}")
    assert extract.extract_answer(text, "strict") == answer
  assert "How many legs do 3 cats have?" in messages[-1]["content"]
  assert loop.prompt_messages("Q?", "zero_shot_cot")[0]["role"] == "system"


# ----------------------------------------------------------------------------- reference-solution NLL vs torch

@pytest.fixture(scope="module")
def tiny_torch_student(smollm2_gguf, tmp_path_factory):
  """A random Llama with SmolLM2's vocabulary, saved by transformers and loaded by kdjax; and the tokenizer."""
  import torch
  import transformers
  import kdjax
  tokenizer = kdjax.load_tokenizer(smollm2_gguf)
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
  torch_model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():  # spread the logits so the NLL is far from log(vocab) and differs between tokens
    torch_model.lm_head.weight.mul_(40.0)
  folder = tmp_path_factory.mktemp("tiny_hf")
  torch_model.save_pretrained(folder)
  model, _ = kdjax.load_model(folder, dtype="float32")
  return model, tokenizer, torch_model


def _torch_reference_nll(torch_model, tokenizer, question: dict) -> tuple[float, int]:
  """Independent: the full sequence through transformers, float64 log-softmax, mean over solution + end token."""
  import torch
  from kdjax.teacher import priming
  prompt = priming.encode_chat(tokenizer, priming.student_messages(question["question"]))
  solution = tokenizer.encode(data.strip_calculator_annotations(question["answer"]).strip(),
                              add_special_tokens=False) + [priming.stop_token_ids(tokenizer)[0]]
  ids = prompt + solution
  with torch.no_grad():
    logits = torch_model(torch.tensor([ids])).logits[0].double()
  log_probs = torch.log_softmax(logits, dim=-1)
  positions = range(len(prompt) - 1, len(ids) - 1)  # position t predicts token t + 1
  nll = -sum(float(log_probs[t, ids[t + 1]]) for t in positions)
  return nll / len(solution), len(solution)


def test_reference_nll_matches_transformers_and_backfills(tiny_torch_student, questions, tmp_path, monkeypatch):
  model, tokenizer, torch_model = tiny_torch_student
  # 3 questions in batches of 2: the second batch carries a padding row; "final" only (no math-verify worker).
  cfg = loop.EvalConfig(num_questions=3, max_new_tokens=4, batch_size=2, rules=("final",))
  out_dir = tmp_path / "tiny"
  summary = loop.evaluate(model, tokenizer, questions, cfg, out_dir, arm="nodistill", progress=False)
  samples = {s["id"]: s for s in report.load_samples(out_dir)}
  expected = {}
  for question_id, sample in samples.items():
    nll, tokens = _torch_reference_nll(torch_model, tokenizer, questions[question_id])
    expected[question_id] = nll
    assert sample["ref_tokens"] == tokens
    assert sample["ref_nll"] == pytest.approx(nll, rel=1e-5, abs=1e-5)
  assert len(set(round(v, 3) for v in expected.values())) == 3  # the questions really differ
  assert summary["ref_nll_mean"] == pytest.approx(sum(expected.values()) / 3, rel=1e-5)

  # A folder written before the reference NLL existed: the NLL is added without generating again.
  stripped = [{k: v for k, v in s.items() if k not in ("ref_nll", "ref_tokens")} for s in samples.values()]
  (out_dir / loop.SAMPLES_FILE).write_text("".join(json.dumps(s) + "\n" for s in stripped), encoding="utf-8")
  old_summary = {k: v for k, v in summary.items() if k != "ref_nll_mean"}
  (out_dir / loop.SUMMARY_FILE).write_text(json.dumps(old_summary), encoding="utf-8")
  spy = GenerateSpy(monkeypatch)
  again = loop.evaluate(model, tokenizer, questions, cfg, out_dir, arm="nodistill", progress=False)
  assert spy.example_ids == []
  assert again["ref_nll_mean"] == pytest.approx(summary["ref_nll_mean"], rel=1e-6)
  for sample in report.load_samples(out_dir):
    assert sample["ref_nll"] == pytest.approx(expected[sample["id"]], rel=1e-5, abs=1e-5)
    assert sample["output"] == samples[sample["id"]]["output"]
