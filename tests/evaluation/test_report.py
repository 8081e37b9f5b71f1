"""Cross-arm report built from synthetic samples, checked against hand computations; and the
rescoring CLI that shares its scoring."""

import csv
import json
import pathlib
import struct
import subprocess
import sys

import pytest

from kdjax.evaluation import report as report_lib

# Per-question correctness of each arm (ids 0..9), chosen so every McNemar count is easy to
# count by hand.
NODISTILL = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]  # 2 / 10
FINETUNE = [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]  # 4 / 10
GROUND_TRUTH = [1, 1, 1, 1, 1, 1, 1, 0, 0, 1]  # 8 / 10


# Reference-solution NLL per question: nodistill's, and each arm's offset from it.
NODISTILL_NLL = [1.0 + 0.1 * i for i in range(10)]
NLL_OFFSET = {"nodistill": 0.0, "finetune": 0.05, "ground_truth": -0.25}


def _stored_sample(i, ok, arm="nodistill"):
  gold = float(10 + i)
  answer = gold if ok else None
  return {"id": i, "question": f"q{i}", "output": f"The answer is {answer}", "gold": gold,
          "answers": {"paper": answer}, "correct": {"paper": bool(ok)},
          "num_output_tokens": 10 * (i + 1), "hit_token_limit": i == 9,
          "ref_nll": NODISTILL_NLL[i] + NLL_OFFSET[arm], "ref_tokens": 50}


def _write_arm(folder, samples, summary=None):
  folder.mkdir(parents=True)
  with (folder / "samples.jsonl").open("w", encoding="utf-8") as f:
    for sample in samples:
      f.write(json.dumps(sample) + "\n")
  if summary is not None:
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
  return folder


@pytest.fixture()
def arms(tmp_path):
  arms = {
      "nodistill": _write_arm(tmp_path / "nodistill",
                              [_stored_sample(i, ok) for i, ok in enumerate(NODISTILL)],
                              summary={"model": "student"}),
      "finetune": _write_arm(tmp_path / "finetune",
                             [_stored_sample(i, ok, "finetune") for i, ok in enumerate(FINETUNE)]),
      # Written in reverse question order: pairing goes by id, not by line.
      "ground_truth": _write_arm(tmp_path / "ground_truth",
                                 [_stored_sample(i, ok, "ground_truth") for i, ok in enumerate(GROUND_TRUTH)][::-1]),
  }
  # An arm without stored scores (re-extracted from `output`), covering ids 0..7 and an id 99
  # no other arm has: right on ids 0, 1, 2 and 99, wrong (an answer of 0) elsewhere.
  teacher = []
  for i in list(range(8)) + [99]:
    gold = float(10 + i)
    said = gold if i in (0, 1, 2, 99) else 0.0
    teacher.append({"id": i, "question": f"q{i}", "gold": gold,
                    "output": f"Thinking 1 2.\nThe answer is {said:g}.",
                    "num_output_tokens": 20, "hit_token_limit": False})
  arms["teacher"] = _write_arm(tmp_path / "teacher", teacher)
  return arms


def test_report_numbers_match_hand_computation(arms, tmp_path):
  out_dir = tmp_path / "report"
  result = report_lib.build_report(arms, out_dir, rule="paper",
                                   paper_numbers={"ground_truth": 0.75, "nodistill": None})
  on_disk = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
  assert on_disk == json.loads(json.dumps(result))

  gt = on_disk["arms"]["ground_truth"]
  assert (gt["correct"], gt["n"], gt["accuracy"]) == (8, 10, 0.8)
  # Wilson 95% for 8/10 by hand: centre 0.716737, half-width 0.226576.
  assert gt["ci_low"] == pytest.approx(0.49016, abs=1e-5)
  assert gt["ci_high"] == pytest.approx(0.94331, abs=1e-5)
  assert gt["mean_output_tokens"] == pytest.approx(55.0)  # mean of 10, 20, ..., 100
  assert gt["hit_token_limit_share"] == pytest.approx(0.1)
  assert gt["no_answer_share"] == pytest.approx(0.2)
  assert gt["paper_accuracy"] == 0.75
  assert on_disk["arms"]["nodistill"]["paper_accuracy"] is None
  assert on_disk["arms"]["nodistill"]["eval_summary"] == {"model": "student"}

  teacher = on_disk["arms"]["teacher"]
  assert (teacher["correct"], teacher["n"]) == (4, 9)
  assert teacher["no_answer_share"] == 0.0

  comparisons = {(c["arm"], c["control"]): c for c in on_disk["comparisons"]}
  # Every non-control arm against both controls, and each control against the other.
  assert set(comparisons) == {
      ("finetune", "nodistill"), ("ground_truth", "nodistill"), ("teacher", "nodistill"),
      ("nodistill", "finetune"), ("ground_truth", "finetune"), ("teacher", "finetune")}
  c = comparisons[("ground_truth", "nodistill")]
  # Gained ids 1, 2, 3, 4, 6, 9; lost none: p = 2 / 2**6.
  assert (c["n_paired"], c["arm_only_correct"], c["control_only_correct"]) == (10, 6, 0)
  assert c["p_value"] == pytest.approx(2 / 64)
  assert (c["arm_accuracy"], c["control_accuracy"]) == (0.8, 0.2)
  c = comparisons[("ground_truth", "finetune")]
  assert (c["arm_only_correct"], c["control_only_correct"]) == (4, 0)
  assert c["p_value"] == pytest.approx(2 / 16)
  c = comparisons[("nodistill", "finetune")]
  assert (c["arm_only_correct"], c["control_only_correct"], c["p_value"]) == (0, 2, 0.5)
  # Teacher vs nodistill on the shared ids 0..7 only: teacher right on 0, 1, 2; nodistill on
  # 0, 5. Gained 1, 2; lost 5: p = 2 * (1 + 3) / 8 = 1.0.
  c = comparisons[("teacher", "nodistill")]
  assert (c["n_paired"], c["arm_only_correct"], c["control_only_correct"]) == (8, 2, 1)
  assert c["p_value"] == pytest.approx(1.0)
  assert (c["arm_accuracy"], c["control_accuracy"]) == (3 / 8, 2 / 8)

  markdown = (out_dir / "report.md").read_text(encoding="utf-8")
  # Primary rule first, then strict, flexible (both read "The answer is 18.0" as written) and paper.
  assert "| ground_truth | 10 | 80.0% [49.0, 94.3] | 80.0% [49.0, 94.3] | 80.0% [49.0, 94.3] |" in markdown
  assert "| 75.0% |" in markdown


def test_report_shows_four_rules_ref_nll_holm_and_agreement(arms, tmp_path):
  out_dir = tmp_path / "report"
  result = report_lib.build_report(arms, out_dir, paper_numbers={}, bootstrap_resamples=500)
  assert result["rule"] == "final" and result["rules"] == ["final", "strict", "flexible", "paper"]
  for arm in result["arms"].values():
    assert list(arm["by_rule"]) == result["rules"]
  # "Thinking 1 2.\nThe answer is N." is read as N (the marker comes last): ids 0, 1, 2 and 99 are right.
  assert result["arms"]["teacher"]["by_rule"]["final"]["correct"] == 4

  # Reference NLL: ground_truth sits 0.25 below nodistill on every question, so its paired interval is a point;
  # against finetune it is -0.30 everywhere.
  ref = {(c["arm"], c["control"]): c for c in result["ref_nll_comparisons"]}
  gt = ref[("ground_truth", "nodistill")]
  assert gt["n_paired"] == 10 and gt["resamples"] == 500
  assert (gt["difference"], gt["ci_low"], gt["ci_high"]) == pytest.approx((-0.25, -0.25, -0.25))
  assert ref[("ground_truth", "finetune")]["difference"] == pytest.approx(-0.30)
  assert ("teacher", "nodistill") not in ref  # the teacher arm recorded no NLL
  assert result["arms"]["nodistill"]["ref_nll"] == pytest.approx(sum(NODISTILL_NLL) / 10)
  assert any("no reference-solution NLL" in note and "teacher" in note for note in result["notes"])

  # Holm over the 5 distinct McNemar tests (nodistill/finetune both ways is one). Raw p: gt/nd 2/64, gt/ft 2/16,
  # nd/ft 0.5, teacher/nd 1.0, and teacher/ft (teacher right on 0, 1, 2; finetune on 0, 1, 5, 6: gained 2,
  # lost 5, 6: p = 2 * 4 / 8 = 1). Sorted: 5 * 1/32 = 0.15625, 4 * 1/8 = 0.5, 3 * 0.5 = 1.5 -> 1, then 1, 1.
  assert result["num_tests"] == 5
  holm = {(c["arm"], c["control"]): c["p_holm"] for c in result["comparisons"]}
  assert holm[("ground_truth", "nodistill")] == pytest.approx(0.15625)
  assert holm[("ground_truth", "finetune")] == pytest.approx(0.5)
  assert {holm[k] for k in holm if k[0] != "ground_truth"} == {1.0}

  # Against nodistill (NODISTILL right on 0, 5): ground_truth repeats the outputs of ids 0, 5, 7, 8 and gains 6;
  # teacher words every output differently, agrees on the answer of id 0 only, loses 5 and gains 1, 2.
  agreement = {a["arm"]: a for a in result["agreement"]}
  assert set(agreement) == {"ground_truth", "teacher"}  # controls are not listed
  a = agreement["ground_truth"]
  assert (a["n_paired"], a["identical_outputs"], a["identical_answers"]) == (10, 4, 4)
  assert (a["right_to_wrong"], a["wrong_to_right"], a["barely_changed"]) == (0, 6, False)
  a = agreement["teacher"]
  assert (a["n_paired"], a["identical_outputs"], a["identical_answers"]) == (8, 0, 1)
  assert (a["right_to_wrong"], a["wrong_to_right"]) == (1, 2)

  markdown = (out_dir / "report.md").read_text(encoding="utf-8")
  assert "| `final` | `strict` | `flexible` | `paper` |" in markdown
  assert "| ground_truth | 10 | 1.2000 | -0.2500 [-0.2500, -0.2500] | -0.3000 [-0.3000, -0.3000] |" in markdown
  # Issue 24: right under the reference-NLL table, the line saying what else a GSM8K-style arm gains there.
  nll_section = markdown.split("## Reference-solution NLL", 1)[1].split("\n## ", 1)[0].strip().splitlines()
  assert nll_section[-2:] == ["", "Arms trained on GSM8K-style text (finetune on the reference solutions, gold_hint on "
                              "a teacher that read them) gain on this metric by style as well as by reasoning."]
  assert nll_section[-3].startswith("| ") and nll_section[-3].count("|") == 6  # the table's last row
  assert "| ground_truth | nodistill | 10 | 80.0% | 20.0% | 6 | 0 | 0.0312 | 0.156 |" in markdown
  assert "| ground_truth | 10 | 4 | 4 | 0 | 6 |  |" in markdown


def test_report_flags_an_unchanged_arm_and_shows_update_norms(arms, tmp_path):
  import shutil
  shutil.copytree(arms["nodistill"], tmp_path / "base")  # an adapter that changed nothing
  norms = tmp_path / "update_norms.json"
  norms.write_text(json.dumps({"per_module": {"0.wq": 1e-4, "0.wv": 3e-4}, "mean": 2e-4, "max": 3e-4}))
  result = report_lib.build_report({"nodistill": arms["nodistill"], "base": tmp_path / "base"}, tmp_path / "r",
                                   paper_numbers={}, update_norms={"base": norms, "nodistill": tmp_path / "none"})
  (agreement,) = result["agreement"]
  assert agreement["identical_outputs"] == 10 and agreement["barely_changed"]
  assert result["update_norms"] == {"base": {"mean": 2e-4, "max": 3e-4, "num_modules": 2}}
  markdown = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
  assert "**barely changed (< 1%)**" in markdown and "| base | 2 | 0.0002 | 0.0003 |" in markdown


def test_report_shows_the_median_kd_and_ce_gradient_per_arm(arms, tmp_path):
  """Medians over the logged steps that measured both parts (the on-policy step and the val line have none)."""
  metrics = tmp_path / "metrics.jsonl"
  steps = [(0.3, 1.0), (0.1, 0.2), (0.6, 0.4), (0.2, 0.8)]  # ratios 0.3, 0.5, 1.5, 0.25 -> median (0.3 + 0.5) / 2
  lines = [{"step": i + 1, "kd": 1.0, "grad_norm_kd": kd, "grad_norm_ce": ce, "grad_ratio_kd_ce": kd / ce}
           for i, (kd, ce) in enumerate(steps)]
  lines += [{"step": 5, "kd": 1.0, "on_policy": 1.0}, {"step": 5, "val_loss": 2.0}]
  metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
  result = report_lib.build_report(arms, tmp_path / "out", paper_numbers={},
                               train_metrics={"base": metrics, "nodistill": tmp_path / "absent.jsonl"})
  assert result["loss_gradients"] == {"base": {"steps": 4, "median_kd_norm": pytest.approx(0.25),
                                               "median_ce_norm": pytest.approx(0.6),
                                               "median_ratio": pytest.approx(0.4)}}
  text = (tmp_path / "out" / "report.md").read_text()
  assert "## What the KD term does" in text and "| base | 4 | 0.25 | 0.6 | 0.4 |" in text


def _summary_with(max_new_tokens):
  return {"config": {"split": "test", "num_questions": None, "start": 0, "stop": None,
                     "prompt_format": "zero_shot_cot", "greedy": True, "temperature": 1.0, "top_p": 1.0,
                     "seed": 0, "max_new_tokens": max_new_tokens, "rules": ["final", "paper"]}}


def test_arms_with_other_eval_settings_are_set_apart(tmp_path):
  arms = {name: _write_arm(tmp_path / name, [_stored_sample(i, ok) for i, ok in enumerate(NODISTILL)],
                           summary=_summary_with(tokens))
          for name, tokens in (("nodistill", 512), ("ground_truth", 512), ("teacher", 256))}
  result = report_lib.build_report(arms, tmp_path / "r", paper_numbers={})
  assert set(result["arms"]) == {"nodistill", "ground_truth"} and set(result["set_apart"]) == {"teacher"}
  assert result["set_apart"]["teacher"]["differs_in"] == {"max_new_tokens": 256}
  assert all("teacher" not in (c["arm"], c["control"]) for c in result["comparisons"])
  markdown = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
  assert "## Arms evaluated with other settings (not compared)" in markdown and "- teacher: max_new_tokens=256" in markdown


def test_teacher_store_table(tmp_path):
  import numpy as np
  from kdjax.gsm8k import data
  from kdjax.teacher import store
  spec = store.StoreSpec(teacher_model="t", strategy="ground_truth", vocab_size=100, k=2, questions="unit")
  texts = [("So 2 + 2 = 4.\nThe answer is 4.", "stop", 4.0), ("First, 71 is the lowest.\n#### 85", "stop", 85.0),
           ("We add 3 and", "length", 7.0), ("Using the hint, answer: 10", "stop", 11.0)]
  # The reference solutions of questions 0-2 (question 3 is not in the list: no overlap is taken for it).
  questions = [{"id": i, "question": f"Question {i}?", "answer": answer} for i, answer in enumerate(
      ["2 + 2 = <<2+2=4>>4.\n#### 4", "First, 71 is the <<71=71>>lowest.\n#### 85", "Add 3 and 4 to get 7.\n#### 7"])]
  records = []
  for i, (text, finish, gold) in enumerate(texts):
    tokens = 3 + 2 * i  # 3, 5, 7, 9 response tokens: mean 6
    records.append(store.TeacherRecord(
        question_id=i, question_hash=data.question_hash(f"Question {i}?"), strategy="ground_truth",
        teacher_model="t", sampling={},
        student_prompt_ids=np.array([1, 2], np.int32), teacher_prompt_ids=np.array([1, 2, 3], np.int32),
        response_text=text, response_ids=np.arange(tokens, dtype=np.int32),
        topk_ids=np.zeros((tokens, 2), np.int32), topk_logprobs=np.full((tokens, 2), -1.0, np.float32),
        tail_mass=np.full((tokens,), 1 - 2 * np.exp(-1.0), np.float32), finish_reason=finish,
        extracted_answer=None, gold_answer=gold, correct=i == 0))
  writer = store.StoreWriter(tmp_path / "store", spec, num_examples=4, shard_size=2)
  writer.write_shard(0, records[:2])
  writer.write_shard(1, records[2:])
  writer.finalize()
  arm = _write_arm(tmp_path / "nodistill", [_stored_sample(i, ok) for i, ok in enumerate(NODISTILL)])
  result = report_lib.build_report({"nodistill": arm}, tmp_path / "r", paper_numbers={},
                                   stores={"ground_truth": tmp_path / "store"}, store_questions=questions)
  table = result["stores"]["ground_truth"]
  # final reads 4 (right), 85 (right), 3 (wrong, cut off), 10 (wrong: gold 11).
  assert (table["n"], table["correct"], table["accuracy"]) == (4, 2, 0.5)
  assert (table["stored_correct_share"], table["truncation_rate"], table["mean_response_tokens"]) == (0.25, 0.25, 6.0)
  # By hand, ROUGE-L F1 = 2 LCS / (words of response + words of reference), annotations removed:
  # 0: so 2 2 4 the answer is 4 | 2 2 4 4: LCS 4, 8 / 12; 1: the same 7 words, 1; 2: we add 3 and | add 3 and 4 to
  # get 7 7: LCS 3, 6 / 12. One of the three above 0.8; one response of four mentions "the hint".
  assert table["hint_mention_share"] == 0.25 and table["reference_overlap_n"] == 3
  assert table["reference_overlap_mean"] == pytest.approx((8 / 12 + 1 + 6 / 12) / 3)
  assert table["reference_overlap_high_share"] == pytest.approx(1 / 3)
  markdown = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
  assert "| ground_truth | 4 | 50.0% [15.0, 85.0] | 25.0% | 25.0% | 6.0 | 25.0% | 0.722 | 33.3% |" in markdown
  assert "| hint mentions | overlap mean | overlap > 0.8 |" in markdown
  # Without the questions the overlap is not taken (n/a), the mentions still are.
  without = report_lib.build_report({"nodistill": arm}, tmp_path / "r2", paper_numbers={},
                                    stores={"ground_truth": tmp_path / "store"})
  assert without["stores"]["ground_truth"]["reference_overlap_mean"] is None
  assert "| 6.0 | 25.0% | n/a | n/a |" in (tmp_path / "r2" / "report.md").read_text(encoding="utf-8")


def test_training_data_table(arms, tmp_path):
  selected = {"mode": "kd", "store": "stores/gold_hint", "store_responses": 10, "dropped_incorrect": 2,
              "max_reference_overlap": 0.8, "train_dropped_reference_overlap": 3, "train_examples": 4,
              "validation_dropped_reference_overlap": 1, "validation_examples": 0}
  (tmp_path / "gold").mkdir()
  (tmp_path / "gold" / "train_data.json").write_text(json.dumps(selected))
  (tmp_path / "ft").mkdir()
  (tmp_path / "ft" / "train_data.json").write_text(json.dumps({"mode": "finetune"}))
  result = report_lib.build_report(arms, tmp_path / "r", paper_numbers={},
                                   train_data={"ground_truth": tmp_path / "gold" / "train_data.json",
                                               "finetune": tmp_path / "ft" / "train_data.json",
                                               "nodistill": tmp_path / "absent.json"})
  assert result["train_data"] == {"ground_truth": selected}
  markdown = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
  assert "## Training data of the kd arms" in markdown
  assert "| ground_truth | stores/gold_hint | 10 | 2 | 0.8 | 4 | 4 | 0 |" in markdown


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def test_report_writes_valid_pngs(arms, tmp_path):
  out_dir = tmp_path / "report"
  result = report_lib.build_report(arms, out_dir)
  assert result["plots"] == [report_lib.ACCURACY_PLOT, report_lib.LENGTH_PLOT]
  for name in result["plots"]:
    width, height = _png_size(out_dir / name)
    assert width > 100 and height > 100
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  pixels = matplotlib.image.imread(out_dir / report_lib.ACCURACY_PLOT)
  assert pixels.ndim == 3 and pixels.std() > 0  # decodes, and is not a blank canvas


def test_report_without_controls_and_with_other_rule(arms, tmp_path):
  only = {"teacher": arms["teacher"]}
  result = report_lib.build_report(only, tmp_path / "r", rule="strict", paper_numbers={})
  assert result["comparisons"] == []
  # Strict matches "The answer is N." exactly as written in these outputs.
  assert result["arms"]["teacher"]["correct"] == 4
  assert any("control arm(s) absent" in note for note in result["notes"])


def test_load_samples_errors(tmp_path):
  with pytest.raises(report_lib.SamplesFormatError, match="not found"):
    report_lib.load_samples(tmp_path / "missing")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 1, "gold": 2}\n{not json\n', encoding="utf-8")
  with pytest.raises(report_lib.SamplesFormatError, match=r"bad.jsonl:2: not valid JSON"):
    report_lib.load_samples(bad)
  bad.write_text('{"id": 1}\n', encoding="utf-8")
  with pytest.raises(report_lib.SamplesFormatError, match="missing field"):
    report_lib.load_samples(bad)


def test_build_report_rejects_bad_input(arms, tmp_path):
  duplicate = _write_arm(tmp_path / "dup", [_stored_sample(0, 1), _stored_sample(0, 0)])
  with pytest.raises(report_lib.SamplesFormatError, match="appears twice"):
    report_lib.build_report({"dup": duplicate}, tmp_path / "r1")
  with pytest.raises(ValueError, match="fraction"):
    report_lib.build_report(arms, tmp_path / "r2", paper_numbers={"ground_truth": 75.0})
  with pytest.raises(ValueError, match="unknown extraction rule"):
    report_lib.build_report(arms, tmp_path / "r3", rule="bogus")


# ----------------------------------------------------------------------------------------------
# The rescoring CLI (kdjax.evaluation.rescore), run as a subprocess like a user would.

REPO = pathlib.Path(__file__).resolve().parents[2]


def _rescore(*args):
  return subprocess.run([sys.executable, "-m", "kdjax.evaluation.rescore", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=False)


def _result_line(completed):
  assert completed.returncode == 0, completed.stderr
  return json.loads(completed.stdout.strip().splitlines()[-1])


def test_rescore_csv_matched_against_gsm8k(tmp_path, gsm8k_dir):
  with (gsm8k_dir / "test.jsonl").open(encoding="utf-8") as f:
    records = [json.loads(next(f)) for _ in range(4)]
  golds = [float(r["answer"].split("####")[-1].strip().replace(",", "")) for r in records]
  outputs = [
      f"Some steps 1 2.\nThe answer is ${golds[0]:,.0f}.",  # right, with `$` and commas
      f"Working: 3, 4\n\\boxed{{{golds[1]:g}}}",  # right, boxed
      "I get 1 and 2.\nSo -123456.",  # wrong
      "No idea.",  # no answer
  ]
  path = tmp_path / "outputs.csv"
  with path.open("w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["question", "output"])
    for record, output in zip(records, outputs):
      # Extra spacing must not defeat the question match.
      writer.writerow(["  " + record["question"].replace(" ", "  ") + "\n", output])
  result = _result_line(_rescore(f"--input={path}", "--rule=paper",
                                 f"--gsm8k={gsm8k_dir / 'test.jsonl'}"))
  assert (result["correct"], result["n"], result["no_answer"]) == (2, 4, 1)
  assert result["accuracy"] == 0.5
  # Wilson 95% for 2/4 by hand: 0.5 -/+ 0.349961.
  assert result["ci_low"] == pytest.approx(0.150039, abs=1e-5)
  assert result["ci_high"] == pytest.approx(0.849961, abs=1e-5)


def test_rescore_jsonl_with_gold_column(tmp_path):
  rows = [
      {"model_answer": "#### 1,000", "solution": "a\n#### 1000"},
      {"model_answer": "The answer is 7.", "solution": "b\n#### 7"},
      {"model_answer": "the answer is 7.", "solution": "#### 7"},  # strict is case-sensitive
      {"model_answer": "#### 5", "solution": 6},
  ]
  path = tmp_path / "outputs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  completed = _rescore(f"--input={path}", "--rule=strict", "--output_column=model_answer",
                       "--gold_column=solution")
  result = _result_line(completed)
  assert result["rule"] == "strict"
  assert (result["correct"], result["n"], result["no_answer"]) == (2, 4, 1)
  assert completed.stdout.startswith("rule=strict accuracy=0.5000 95% CI=[")


@pytest.mark.parametrize("make_args,message", [
    (lambda tmp: ["--input=" + str(tmp / "missing.jsonl")], "input file not found"),
    (lambda tmp: ["--input=" + str(tmp / "ok.jsonl"), "--output_column=nope"], "no column 'nope'"),
    (lambda tmp: ["--input=" + str(tmp / "ok.jsonl"), "--rule=bogus"], "unknown rule"),
    (lambda tmp: ["--input=" + str(tmp / "ok.jsonl"), "--gsm8k=" + str(tmp / "none.jsonl")],
     "GSM8K file not found"),
    (lambda tmp: [], "--input is required"),
])
def test_rescore_bad_input_exits_2_with_one_line(tmp_path, make_args, message):
  (tmp_path / "ok.jsonl").write_text(json.dumps({"output": "1", "gold": 1}) + "\n",
                                     encoding="utf-8")
  completed = _rescore(*make_args(tmp_path))
  assert completed.returncode == 2
  assert completed.stdout == ""
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], completed.stderr


def test_pipeline_checks_report_keys_before_any_stage():
  from kdjax.experiment import config as config_lib
  from kdjax.experiment import pipeline
  c = config_lib.get_default_config()
  c.stages = "report"
  assert c.eval.rule == c.report.rule == "final" and c.report.arms == ""
  pipeline.validate(c)
  c.report.rule = "bogus"
  with pytest.raises(pipeline.ConfigError, match="report.rule must be one of"):
    pipeline.validate(c)
  c.report.rule = "paper"
  c.report.arms = "nodistill,magic"
  with pytest.raises(pipeline.ConfigError, match="report.arms: unknown arm"):
    pipeline.validate(c)


def test_report_stage_reports_this_runs_arms(arms, tmp_path):
  import shutil
  from kdjax.experiment import config as config_lib
  from kdjax.experiment import pipeline
  wd = pipeline.Workdir(tmp_path / "work")
  for name in ("nodistill", "finetune", "ground_truth"):
    shutil.copytree(arms[name], wd.arm(name) / "eval")
  c = config_lib.get_default_config()
  c.workdir, c.stages, c.arms = str(wd.root), "report", "ground_truth,nodistill"
  # finetune was evaluated by another run: shown only when asked for
  assert pipeline.report_arm_names(c, wd) == ["ground_truth", "nodistill"]
  c.report.arms = "all"
  assert set(pipeline.report_arm_names(c, wd)) == {"ground_truth", "nodistill", "finetune"}
  c.report.arms = "finetune,nodistill"
  assert pipeline.report_arm_names(c, wd) == ["finetune", "nodistill"]
  c.report.arms, c.arms = "", "teacher"
  with pytest.raises(pipeline.ConfigError, match="not evaluated"):
    pipeline.stage_report(c, wd, pipeline.Records(c, wd))


def test_tiny_nll_differences_keep_their_digits():
  from kdjax.evaluation import report_render
  assert report_render._signed(-0.25) == "-0.2500"
  assert report_render._signed(2.3e-7) == "+2.30e-07" and report_render._signed(-4.2e-8) == "-4.20e-08"
  assert report_render._signed(0.0) == "+0.0000"
