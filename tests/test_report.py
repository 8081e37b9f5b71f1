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


def _stored_sample(i, ok):
  gold = float(10 + i)
  answer = gold if ok else None
  return {"id": i, "question": f"q{i}", "output": f"The answer is {answer}", "gold": gold,
          "answers": {"paper": answer}, "correct": {"paper": bool(ok)},
          "num_output_tokens": 10 * (i + 1), "hit_token_limit": i == 9}


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
                             [_stored_sample(i, ok) for i, ok in enumerate(FINETUNE)]),
      "ground_truth": _write_arm(tmp_path / "ground_truth",
                                 [_stored_sample(i, ok) for i, ok in enumerate(GROUND_TRUTH)]),
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
  assert "| ground_truth | 80.0% | [49.0%, 94.3%] | 8 / 10 |" in markdown
  assert "| 75.0% |" in markdown


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

REPO = pathlib.Path(__file__).resolve().parents[1]


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
