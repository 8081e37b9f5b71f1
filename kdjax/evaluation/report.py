"""Cross-arm GSM8K report: accuracy with Wilson intervals, exact McNemar tests against the
control arms, output-length statistics and the paper's published numbers side by side.

Input per arm: a folder holding `samples.jsonl` (one record per test question, see
`REQUIRED_FIELDS`) and optionally `summary.json`. Output: `report.md`, `report.json` and PNG plots.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Optional, Sequence

from kdjax import storage
from kdjax.evaluation import extract
from kdjax.evaluation import paper_numbers as paper_numbers_lib
from kdjax.evaluation import stats

REQUIRED_FIELDS = ("id", "gold")
ACCURACY_PLOT = "accuracy.png"
LENGTH_PLOT = "output_length.png"


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


def summarise_arm(samples: Sequence[Mapping], rule: str, confidence: float = 0.95) -> dict:
  """Accuracy, Wilson interval, no-answer share and output-length statistics of one arm."""
  n = len(samples)
  scored = [score_sample(s, rule) for s in samples]
  correct = sum(1 for _, ok in scored if ok)
  low, high = stats.wilson_interval(correct, n, confidence)
  tokens = [float(s["num_output_tokens"]) for s in samples
            if s.get("num_output_tokens") is not None]
  hit_limit = [bool(s["hit_token_limit"]) for s in samples if s.get("hit_token_limit") is not None]
  return {
      "n": n,
      "correct": correct,
      "accuracy": correct / n if n else None,
      "ci_low": low,
      "ci_high": high,
      "no_answer_share": sum(1 for answer, _ in scored if answer is None) / n if n else None,
      "mean_output_tokens": _mean(tokens),
      "hit_token_limit_share": _mean([float(h) for h in hit_limit]),
  }


def _correct_by_id(samples: Sequence[Mapping], rule: str, arm: str) -> dict[int, bool]:
  by_id = {}
  for sample in samples:
    sample_id = sample["id"]
    if sample_id in by_id:
      raise SamplesFormatError(f"arm {arm!r}: question id {sample_id} appears twice")
    by_id[sample_id] = score_sample(sample, rule)[1]
  return by_id


def compare_to_control(arm_correct: Mapping[int, bool],
                       control_correct: Mapping[int, bool]) -> dict:
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


def _check_paper_numbers(numbers: Mapping[str, Optional[float]]) -> None:
  for arm, value in numbers.items():
    if value is not None and not 0.0 <= value <= 1.0:
      raise ValueError(f"paper number for {arm!r} must be a fraction in [0, 1], got {value}")


def _percent(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _number(value: Optional[float], digits: int = 1) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(report: dict) -> str:
  confidence = round(100 * report["confidence"])
  lines = [
      "# GSM8K report",
      "",
      f"Extraction rule: `{report['rule']}`. Intervals: {confidence}% Wilson score.",
      "",
      f"| arm | accuracy | {confidence}% CI | correct / n | no answer | mean output tokens "
      "| hit token limit | paper |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, arm in report["arms"].items():
    lines.append(
        f"| {name} | {_percent(arm['accuracy'])} | [{_percent(arm['ci_low'])}, "
        f"{_percent(arm['ci_high'])}] | {arm['correct']} / {arm['n']} | "
        f"{_percent(arm['no_answer_share'])} | {_number(arm['mean_output_tokens'])} | "
        f"{_percent(arm['hit_token_limit_share'])} | {_percent(arm['paper_accuracy'])} |")
  lines += ["", "## Exact McNemar tests against controls", ""]
  if report["comparisons"]:
    lines += [
        "| arm | control | paired n | arm acc. | control acc. | arm-only correct "
        "| control-only correct | p (two-sided) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
      lines.append(
          f"| {c['arm']} | {c['control']} | {c['n_paired']} | {_percent(c['arm_accuracy'])} | "
          f"{_percent(c['control_accuracy'])} | {c['arm_only_correct']} | "
          f"{c['control_only_correct']} | {c['p_value']:.3g} |")
  else:
    lines.append("No control arm present; no tests run.")
  lines += ["", "## Notes", ""]
  lines += [f"- {note}" for note in report["notes"]]
  lines += ["", f"![accuracy]({ACCURACY_PLOT})", "", f"![output length]({LENGTH_PLOT})", ""]
  return "\n".join(lines)


def _plot_accuracy(report: dict, path: pathlib.Path) -> None:
  # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
  from matplotlib.backends import backend_agg  # pylint: disable=import-outside-toplevel
  from matplotlib import figure as figure_lib  # pylint: disable=import-outside-toplevel

  names = list(report["arms"])
  arms = [report["arms"][name] for name in names]
  positions = list(range(len(names)))
  accuracy = [a["accuracy"] or 0.0 for a in arms]
  errors = [[acc - a["ci_low"] for acc, a in zip(accuracy, arms)],
            [a["ci_high"] - acc for acc, a in zip(accuracy, arms)]]
  figure = figure_lib.Figure(figsize=(max(4.0, 1.2 * len(names) + 2.0), 4.0))
  backend_agg.FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  axes.bar(positions, accuracy, yerr=errors, capsize=4, color="tab:blue",
           label=f"kdjax ({round(100 * report['confidence'])}% Wilson CI)")
  paper = [(i, a["paper_accuracy"]) for i, a in zip(positions, arms)
           if a["paper_accuracy"] is not None]
  if paper:
    axes.scatter([i for i, _ in paper], [v for _, v in paper], marker="D", color="tab:red",
                 zorder=3, label="paper")
  axes.set_xticks(positions, names, rotation=30, ha="right")
  axes.set_ylim(0.0, 1.0)
  axes.set_ylabel(f"GSM8K accuracy ({report['rule']} rule)")
  axes.legend(loc="upper left")
  figure.tight_layout()
  storage.save_figure(figure, path, format="png", dpi=120)


def _plot_lengths(report: dict, path: pathlib.Path) -> None:
  from matplotlib.backends import backend_agg  # pylint: disable=import-outside-toplevel
  from matplotlib import figure as figure_lib  # pylint: disable=import-outside-toplevel

  names = list(report["arms"])
  arms = [report["arms"][name] for name in names]
  positions = list(range(len(names)))
  figure = figure_lib.Figure(figsize=(max(4.0, 1.2 * len(names) + 2.0), 4.0))
  backend_agg.FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  bars = axes.bar(positions, [a["mean_output_tokens"] or 0.0 for a in arms], color="tab:gray")
  for bar, arm in zip(bars, arms):
    axes.annotate(f"{_percent(arm['hit_token_limit_share'])} at limit",
                  (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  ha="center", va="bottom", fontsize=8)
  axes.set_xticks(positions, names, rotation=30, ha="right")
  axes.set_ylabel("mean output tokens")
  figure.tight_layout()
  storage.save_figure(figure, path, format="png", dpi=120)


def build_report(arms: Mapping[str, pathlib.Path], out_dir: str | pathlib.Path, *,
                 rule: str = "paper", controls: Sequence[str] = ("nodistill", "finetune"),
                 paper_numbers: Optional[Mapping[str, Optional[float]]] = None,
                 confidence: float = 0.95) -> dict:
  """Writes report.md, report.json and plots to `out_dir`; returns the report.json content.

  `arms` maps an arm name to its folder (or samples.jsonl). `paper_numbers` maps arm names to
  published accuracies as fractions; None uses `paper_numbers.PAPER_GSM8K_ACCURACY`.
  """
  if rule not in extract.RULES:
    raise ValueError(f"unknown extraction rule {rule!r}; expected one of {extract.RULES}")
  if not arms:
    raise ValueError("build_report needs at least one arm")
  if paper_numbers is None:
    paper_numbers = paper_numbers_lib.PAPER_GSM8K_ACCURACY
  _check_paper_numbers(paper_numbers)
  out_dir = storage.makedirs(out_dir)

  samples = {name: load_samples(path) for name, path in arms.items()}
  correct_by_id = {name: _correct_by_id(s, rule, name) for name, s in samples.items()}
  report = {"rule": rule, "confidence": confidence, "arms": {}, "comparisons": [], "notes": []}
  for name, path in arms.items():
    summary = summarise_arm(samples[name], rule, confidence)
    summary["paper_accuracy"] = paper_numbers.get(name)
    summary["samples_path"] = str(_samples_path(path))
    summary_file = storage.path(path) / "summary.json"
    if summary_file.is_file():
      try:
        summary["eval_summary"] = json.loads(summary_file.read_text(encoding="utf-8"))
      except json.JSONDecodeError as e:
        raise SamplesFormatError(f"{summary_file}: not valid JSON ({e.msg})") from None
    report["arms"][name] = summary

  present_controls = [c for c in controls if c in arms]
  for control in present_controls:
    for name in arms:
      if name == control:
        continue
      comparison = {"arm": name, "control": control}
      comparison.update(compare_to_control(correct_by_id[name], correct_by_id[control]))
      report["comparisons"].append(comparison)

  missing_controls = [c for c in controls if c not in arms]
  if missing_controls:
    report["notes"].append(f"control arm(s) absent, not tested against: {missing_controls}")
  unverified = [name for name in arms if paper_numbers.get(name) is None]
  if unverified:
    report["notes"].append(f"no verified published accuracy for: {unverified}")
  sizes = {a["n"] for a in report["arms"].values()}
  if len(sizes) > 1:
    report["notes"].append("arms differ in sample count; McNemar uses shared question ids only")

  _plot_accuracy(report, out_dir / ACCURACY_PLOT)
  _plot_lengths(report, out_dir / LENGTH_PLOT)
  report["plots"] = [ACCURACY_PLOT, LENGTH_PLOT]
  # allow_nan=False: the file must stay strict JSON for other tools.
  storage.write_json(out_dir / "report.json", report, indent=2, allow_nan=False)
  storage.write_text(out_dir / "report.md", _markdown(report))
  return report
