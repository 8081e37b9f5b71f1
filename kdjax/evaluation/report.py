"""Cross-arm GSM8K report: accuracy under four extraction rules with Wilson intervals, reference-solution NLL with
paired bootstrap intervals against the controls, exact McNemar tests (Holm-adjusted), how many answers training
changed, adapter update norms, the KD and CE parts' gradient norms in training, teacher-store statistics
(with how much a hinted teacher copies), the training data each arm kept, and the paper's published numbers side
by side.

Input per arm: a folder holding `samples.jsonl` (one record per test question, see `REQUIRED_FIELDS`) and
optionally `summary.json` (whose `config` holds the eval settings). Arms evaluated with settings that differ from
the main group's (`COMPARED_SETTINGS`) are set apart: shown in their own table, never compared. Output:
`report.md`, `report.json` and PNG plots (`report_render`).
"""

from __future__ import annotations

import json
import pathlib
import statistics
from typing import Any, Mapping, Optional, Sequence

from kdjax.infra import storage
from kdjax.gsm8k import extract
from kdjax.evaluation import paper_numbers as paper_numbers_lib
from kdjax.evaluation import report_render
from kdjax.evaluation import stats

REQUIRED_FIELDS = ("id", "gold")
ACCURACY_PLOT = report_render.ACCURACY_PLOT
LENGTH_PLOT = report_render.LENGTH_PLOT
# Every arm is shown under the primary rule and these (lm-eval's two and the authors' own).
SHOWN_RULES = ("strict", "flexible", "paper")
# Eval settings that must agree for arms to be compared (keys of summary.json's `config`).
COMPARED_SETTINGS = ("split", "num_questions", "start", "stop", "prompt_format", "greedy", "temperature", "top_p",
                     "seed", "max_new_tokens", "rules")
# An arm whose adapter changed fewer than this share of nodistill's outputs is flagged.
UNCHANGED_FLAG_SHARE = 0.01
AGREEMENT_CONTROL = "nodistill"


class SamplesFormatError(ValueError):
  """A samples file is missing, unreadable or holds malformed records."""


def _samples_path(path: pathlib.Path) -> pathlib.Path:
  path = storage.path(path)
  return path / "samples.jsonl" if path.is_dir() else path


def read_jsonl_objects(path: pathlib.Path, error: type[Exception] = ValueError) -> list[dict]:
  """One JSON object per non-empty line; a bad line raises `error` naming the file and line."""
  rows = []
  with path.open(encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark from spreadsheet exports
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise error(f"{path}:{line_number}: expected a JSON object per line")
      rows.append(row)
  return rows


def load_samples(path: str | pathlib.Path) -> list[dict]:
  """Records of a `samples.jsonl` file (or of the one inside folder `path`)."""
  path = _samples_path(path)
  if not path.is_file():
    raise SamplesFormatError(f"samples file not found: {path}")
  samples = read_jsonl_objects(path, SamplesFormatError)
  for line_number, record in enumerate(samples, start=1):
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
      raise SamplesFormatError(f"{path}: record {line_number}: missing field(s) {missing}")
  return samples


def _read_json_file(path: pathlib.Path) -> Optional[dict]:
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise SamplesFormatError(f"{path}: not valid JSON ({e.msg})") from None


def score_sample(sample: Mapping, rule: str) -> tuple[Optional[float], bool]:
  """(answer, correct) of one record under `rule`.

  Stored `answers`/`correct` win; a rule the eval did not store is re-extracted from `output`.
  """
  answers = sample.get("answers") or {}
  if rule in answers:
    answer = answers[rule]
  else:
    answer = extract.extract_answer(sample.get("output") or "", rule)
  stored = sample.get("correct") or {}
  if rule in stored:
    return answer, bool(stored[rule])
  return answer, extract.is_correct(answer, float(sample["gold"]))


def _mean(values: Sequence[float]) -> Optional[float]:
  return sum(values) / len(values) if values else None


def accuracy_with_interval(correct: int, n: int, confidence: float) -> dict:
  low, high = stats.wilson_interval(correct, n, confidence)
  return {"correct": correct, "n": n, "accuracy": correct / n if n else None, "ci_low": low, "ci_high": high}


def summarise_arm(samples: Sequence[Mapping], rule: str, confidence: float = 0.95) -> dict:
  """Accuracy, Wilson interval, no-answer share, output lengths and reference NLL of one arm under `rule`."""
  n = len(samples)
  scored = [score_sample(s, rule) for s in samples]
  tokens = [float(s["num_output_tokens"]) for s in samples if s.get("num_output_tokens") is not None]
  hit_limit = [float(bool(s["hit_token_limit"])) for s in samples if s.get("hit_token_limit") is not None]
  ref = [float(s["ref_nll"]) for s in samples if s.get("ref_nll") is not None]
  return {
      **accuracy_with_interval(sum(1 for _, ok in scored if ok), n, confidence),
      "no_answer_share": sum(1 for answer, _ in scored if answer is None) / n if n else None,
      "mean_output_tokens": _mean(tokens),
      "hit_token_limit_share": _mean(hit_limit),
      "ref_nll": _mean(ref),
      "ref_nll_n": len(ref),
  }


def _correct_by_id(samples: Sequence[Mapping], rule: str, arm: str) -> dict[int, bool]:
  by_id = {}
  for sample in samples:
    sample_id = sample["id"]
    if sample_id in by_id:
      raise SamplesFormatError(f"arm {arm!r}: question id {sample_id} appears twice")
    by_id[sample_id] = score_sample(sample, rule)[1]
  return by_id


def compare_to_control(arm_correct: Mapping[int, bool], control_correct: Mapping[int, bool]) -> dict:
  """Exact McNemar on the questions both arms answered."""
  shared = sorted(set(arm_correct) & set(control_correct))
  control = [control_correct[i] for i in shared]
  arm = [arm_correct[i] for i in shared]
  test = stats.mcnemar_exact(control, arm)
  n = len(shared)
  return {
      "n_paired": n,
      "arm_accuracy": sum(arm) / n if n else None,
      "control_accuracy": sum(control) / n if n else None,
      # b01: control wrong and arm right, i.e. questions the arm gained.
      "arm_only_correct": test["b01"],
      "control_only_correct": test["b10"],
      "p_value": test["p_value"],
  }


def agreement_with_control(arm: Sequence[Mapping], control: Sequence[Mapping], rule: str) -> dict:
  """How many of the control's test answers the arm repeats: identical outputs, identical answers under `rule`,
  and the discordant counts (right -> wrong, wrong -> right going from the control to the arm)."""
  arm_by_id = {s["id"]: s for s in arm}
  shared = [s for s in control if s["id"] in arm_by_id]
  identical_outputs = identical_answers = right_to_wrong = wrong_to_right = 0
  for before in shared:
    after = arm_by_id[before["id"]]
    identical_outputs += before.get("output") == after.get("output")
    (answer_before, ok_before), (answer_after, ok_after) = score_sample(before, rule), score_sample(after, rule)
    identical_answers += answer_before == answer_after
    right_to_wrong += ok_before and not ok_after
    wrong_to_right += ok_after and not ok_before
  n = len(shared)
  changed = (n - identical_outputs) / n if n else None
  return {"n_paired": n, "identical_outputs": identical_outputs, "identical_answers": identical_answers,
          "right_to_wrong": right_to_wrong, "wrong_to_right": wrong_to_right, "changed_output_share": changed,
          "barely_changed": changed is not None and changed < UNCHANGED_FLAG_SHARE}


def read_update_norms(path: pathlib.Path) -> Optional[dict]:
  """{"mean", "max", "num_modules"} of a train stage's `update_norms.json`, or None when it is absent."""
  content = _read_json_file(storage.path(path))
  if content is None:
    return None
  try:
    return {"mean": float(content["mean"]), "max": float(content["max"]),
            "num_modules": len(content.get("per_module") or {})}
  except (KeyError, TypeError, ValueError):
    raise SamplesFormatError(f"{path}: expected {{'per_module': {{...}}, 'mean': float, 'max': float}}") from None


def summarise_loss_gradients(path: pathlib.Path) -> Optional[dict]:
  """Medians over the logged train steps of a train stage's `metrics.jsonl` that took the KD and CE gradients
  apart (`grad_norm_kd`, `grad_norm_ce`, each as weighted in the loss, and their per-step ratio); None when the
  file is absent or no step measured them (finetune, on-policy steps, a loss without both parts)."""
  path = storage.path(path)
  if not path.exists():
    return None
  steps = [r for r in read_jsonl_objects(path, SamplesFormatError) if "grad_ratio_kd_ce" in r]
  if not steps:
    return None
  median = lambda key: statistics.median(float(r[key]) for r in steps)
  return {"steps": len(steps), "median_kd_norm": median("grad_norm_kd"), "median_ce_norm": median("grad_norm_ce"),
          "median_ratio": median("grad_ratio_kd_ce")}


def read_train_data(path: pathlib.Path) -> Optional[dict]:
  """A train stage's `train_data.json` (what a kd arm kept of its store, and why it dropped the rest), or None."""
  return _read_json_file(storage.path(path))


def summarise_store(path: pathlib.Path, rule: str, confidence: float = 0.95,
                    questions: Optional[Sequence[Mapping]] = None) -> dict:
  """Teacher accuracy on the store's own (GSM8K train) questions under `rule`, truncation, response length, and
  the hint measures of `reference_overlap.store_statistics` (the overlap needs `questions`, the store's questions
  with their reference solutions; without them it is None)."""
  from kdjax.gsm8k import reference_overlap  # pylint: disable=import-outside-toplevel
  from kdjax.teacher import store
  reader = store.StoreReader(path)
  n = len(reader)
  correct = stored_correct = truncated = 0
  for index in range(n):
    meta = reader.metadata(index)
    correct += extract.is_correct(extract.extract_answer(meta["response_text"] or "", rule), meta["gold_answer"])
    stored_correct += bool(meta["correct"])
    truncated += meta["finish_reason"] == "length"
  return {**accuracy_with_interval(correct, n, confidence),
          "stored_correct_share": stored_correct / n if n else None,
          "truncation_rate": truncated / n if n else None,
          "mean_response_tokens": reader.total_tokens / n if n else None,
          **reference_overlap.store_statistics(reader, questions)}


def eval_settings(summary: Optional[Mapping]) -> Optional[dict]:
  """The settings of `COMPARED_SETTINGS` an arm was evaluated with (None: no summary.json to tell)."""
  if not summary or not isinstance(summary.get("config"), Mapping):
    return None
  config = summary["config"]
  settings = {key: config.get(key) for key in COMPARED_SETTINGS}
  settings["rules"] = sorted(settings["rules"] or [])
  return settings


def _main_group(settings: Mapping[str, Optional[dict]], controls: Sequence[str]) -> list[str]:
  """The arms compared with each other: those sharing the most common settings (ties: a control's)."""
  known = {name: s for name, s in settings.items() if s is not None}
  groups: dict[str, list[str]] = {}
  for name, s in known.items():
    groups.setdefault(json.dumps(s, sort_keys=True), []).append(name)
  if not groups:
    return list(settings)
  best = max(groups.values(), key=lambda names: (len(names), any(c in names for c in controls)))
  return [name for name in settings if settings[name] is None or name in best]


def _check_paper_numbers(numbers: Mapping[str, Optional[float]]) -> None:
  for arm, value in numbers.items():
    if value is not None and not 0.0 <= value <= 1.0:
      raise ValueError(f"paper number for {arm!r} must be a fraction in [0, 1], got {value}")


def build_report(arms: Mapping[str, pathlib.Path], out_dir: str | pathlib.Path, *,
                 rule: str = extract.PRIMARY_RULE, controls: Sequence[str] = ("nodistill", "finetune"),
                 paper_numbers: Optional[Mapping[str, Optional[float]]] = None, confidence: float = 0.95,
                 stores: Optional[Mapping[str, pathlib.Path]] = None,
                 update_norms: Optional[Mapping[str, pathlib.Path]] = None,
                 train_metrics: Optional[Mapping[str, pathlib.Path]] = None,
                 store_questions: Optional[Sequence[Mapping]] = None,
                 train_data: Optional[Mapping[str, pathlib.Path]] = None,
                 bootstrap_resamples: int = 2000, seed: int = 0) -> dict:
  """Writes report.md, report.json and plots to `out_dir`; returns the report.json content.

  `arms` maps an arm name to its eval folder (or samples.jsonl). `paper_numbers` maps arm names to published
  accuracies as fractions; None uses `paper_numbers.PAPER_GSM8K_ACCURACY`. `stores` maps a priming strategy to
  its teacher store, and `store_questions` are the stores' questions with their reference solutions (the overlap
  columns; None: not shown); `update_norms`, `train_data` and `train_metrics` map an arm to its `update_norms.json`,
  `train_data.json` and its train stage's `metrics.jsonl` (absent files are skipped).
  """
  if rule not in extract.RULES:
    raise ValueError(f"unknown extraction rule {rule!r}; expected one of {extract.RULES}")
  if not arms:
    raise ValueError("build_report needs at least one arm")
  if paper_numbers is None:
    paper_numbers = paper_numbers_lib.PAPER_GSM8K_ACCURACY
  _check_paper_numbers(paper_numbers)
  out_dir = storage.makedirs(out_dir)
  rules = [rule] + [r for r in SHOWN_RULES if r != rule]

  samples = {name: load_samples(path) for name, path in arms.items()}
  correct_by_id = {name: _correct_by_id(s, rule, name) for name, s in samples.items()}
  summaries = {name: _read_json_file(_samples_path(storage.path(path)).parent / "summary.json")
               for name, path in arms.items()}
  settings = {name: eval_settings(summary) for name, summary in summaries.items()}
  compared = _main_group(settings, controls)
  report: dict[str, Any] = {"rule": rule, "rules": rules, "confidence": confidence, "arms": {}, "set_apart": {},
                            "comparisons": [], "ref_nll_comparisons": [], "agreement": [], "update_norms": {},
                            "loss_gradients": {}, "stores": {}, "train_data": {}, "notes": []}
  for name, path in arms.items():
    summary = summarise_arm(samples[name], rule, confidence)
    summary["by_rule"] = {r: summarise_arm(samples[name], r, confidence) for r in rules}
    summary["paper_accuracy"] = paper_numbers.get(name)
    summary["samples_path"] = str(_samples_path(storage.path(path)))
    summary["eval_settings"] = settings[name]
    if summaries[name] is not None:
      summary["eval_summary"] = summaries[name]
    report["arms" if name in compared else "set_apart"][name] = summary

  main_settings = next((settings[n] for n in compared if settings[n] is not None), None)
  for name in report["set_apart"]:
    differing = sorted(k for k in COMPARED_SETTINGS if settings[name][k] != main_settings[k])
    report["set_apart"][name]["differs_in"] = {k: settings[name][k] for k in differing}
  unknown = [name for name in compared if settings[name] is None]
  if unknown:
    report["notes"].append(f"no summary.json, eval settings unchecked for: {unknown}")

  present_controls = [c for c in controls if c in compared]
  ref_by_id = {name: {s["id"]: float(s["ref_nll"]) for s in samples[name] if s.get("ref_nll") is not None}
               for name in compared}
  for control in present_controls:
    for name in compared:
      if name == control:
        continue
      comparison = {"arm": name, "control": control}
      comparison.update(compare_to_control(correct_by_id[name], correct_by_id[control]))
      report["comparisons"].append(comparison)
      if ref_by_id[name] and ref_by_id[control]:
        difference = stats.paired_bootstrap_difference(ref_by_id[name], ref_by_id[control],
                                                       resamples=bootstrap_resamples, seed=seed,
                                                       confidence=confidence)
        report["ref_nll_comparisons"].append({"arm": name, "control": control, **difference})
  # One family: every distinct McNemar test of this report (all arms against all controls, primary rule); the
  # two controls compared each way are one test.
  tests = {frozenset((c["arm"], c["control"])): c["p_value"] for c in report["comparisons"]}
  adjusted = dict(zip(tests, stats.holm_adjust(list(tests.values()))))
  for comparison in report["comparisons"]:
    comparison["p_holm"] = adjusted[frozenset((comparison["arm"], comparison["control"]))]
  report["num_tests"] = len(tests)

  if AGREEMENT_CONTROL in compared:
    for name in compared:
      if name not in controls:
        report["agreement"].append({"arm": name, **agreement_with_control(
            samples[name], samples[AGREEMENT_CONTROL], rule)})
  for name, path in (update_norms or {}).items():
    norms = read_update_norms(storage.path(path))
    if norms is not None:
      report["update_norms"][name] = norms
  for name, path in (train_metrics or {}).items():
    gradients = summarise_loss_gradients(path)
    if gradients is not None:
      report["loss_gradients"][name] = gradients
  for strategy, path in (stores or {}).items():
    report["stores"][strategy] = summarise_store(storage.path(path), rule, confidence, store_questions)
  for name, path in (train_data or {}).items():
    selected = read_train_data(storage.path(path))
    if selected is not None and selected.get("mode") == "kd":
      report["train_data"][name] = selected

  missing_controls = [c for c in controls if c not in compared]
  if missing_controls:
    report["notes"].append(f"control arm(s) absent, not tested against: {missing_controls}")
  unverified = [name for name in arms if paper_numbers.get(name) is None]
  if unverified:
    report["notes"].append(f"no verified published accuracy for: {unverified}")
  if len({a["n"] for a in report["arms"].values()}) > 1:
    report["notes"].append("arms differ in sample count; paired statistics use shared question ids only")
  without_ref = [name for name in compared if not ref_by_id[name]]
  if without_ref:
    report["notes"].append(f"no reference-solution NLL recorded for: {without_ref}")

  report["plots"] = report_render.write_plots(report, out_dir)
  # allow_nan=False: the file must stay strict JSON for other tools.
  storage.write_json(out_dir / "report.json", report, indent=2, allow_nan=False)
  storage.write_text(out_dir / "report.md", report_render.markdown(report, bootstrap_resamples, seed))
  return report
