"""report.md and the PNG plots of a report built by `kdjax.evaluation.report.build_report`."""

from __future__ import annotations

import pathlib
from typing import Optional

from kdjax.infra import storage

ACCURACY_PLOT = "accuracy.png"
LENGTH_PLOT = "output_length.png"


def _percent(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _number(value: Optional[float], digits: int = 1) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def _signed(value: float) -> str:
  """A signed difference: 4 decimals, or 3 significant digits when smaller (an adapter that barely moved)."""
  return f"{value:+.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:+.2e}"


def _accuracy_cell(result: dict) -> str:
  """`12.3% [10.1, 14.6]`: accuracy and its interval, in percent."""
  if result["accuracy"] is None:
    return "n/a"
  return f"{100 * result['accuracy']:.1f}% [{100 * result['ci_low']:.1f}, {100 * result['ci_high']:.1f}]"


def _accuracy_table(arms: dict, rules: list[str]) -> list[str]:
  lines = ["| arm | n | " + " | ".join(f"`{r}`" for r in rules)
           + f" | no answer (`{rules[0]}`) | mean output tokens | hit token limit | published |",
           "|---|---|" + "---|" * len(rules) + "---|---|---|---|"]
  for name, arm in arms.items():
    cells = [_accuracy_cell(arm["by_rule"][r]) for r in rules]
    lines.append(f"| {name} | {arm['n']} | " + " | ".join(cells) + f" | {_percent(arm['no_answer_share'])} | "
                 f"{_number(arm['mean_output_tokens'])} | {_percent(arm['hit_token_limit_share'])} | "
                 f"{_percent(arm['paper_accuracy'])} |")
  return lines


# Under the reference-NLL table: the metric scores the reference solution's wording, not only its reasoning.
REF_NLL_STYLE_NOTE = ("Arms trained on GSM8K-style text (finetune on the reference solutions, gold_hint on a teacher "
                      "that read them) gain on this metric by style as well as by reasoning.")


def _ref_nll_section(report: dict, resamples: int, seed: int) -> list[str]:
  controls = list(dict.fromkeys(c["control"] for c in report["ref_nll_comparisons"]))
  by_pair = {(c["arm"], c["control"]): c for c in report["ref_nll_comparisons"]}
  confidence = round(100 * report["confidence"])
  lines = ["## Reference-solution NLL", "",
           "Mean per-token negative log-likelihood (nats) of the GSM8K reference solution under the student prompt, "
           "teacher-forced; lower is better. Differences are arm minus control, with a paired bootstrap "
           f"{confidence}% interval over questions ({resamples} resamples, seed {seed}).", "",
           "| arm | questions | ref NLL | " + " | ".join(f"Δ vs {c} [{confidence}% CI]" for c in controls) + " |",
           "|---|---|---|" + "---|" * len(controls)]
  for name, arm in report["arms"].items():
    cells = []
    for control in controls:
      c = by_pair.get((name, control))
      cells.append("—" if c is None or c["difference"] is None else
                   f"{_signed(c['difference'])} [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}]")
    lines.append(f"| {name} | {arm['ref_nll_n']} | {_number(arm['ref_nll'], 4)} | " + " | ".join(cells) + " |")
  return lines + ["", REF_NLL_STYLE_NOTE]


def _mcnemar_section(report: dict) -> list[str]:
  lines = [f"## Exact McNemar tests against controls (`{report['rule']}` rule)", ""]
  if not report["comparisons"]:
    return lines + ["No control arm present; no tests run."]
  lines += [f"Holm-adjusted over the {report['num_tests']} distinct tests of this table.", "",
            "| arm | control | paired n | arm acc. | control acc. | arm-only correct | control-only correct "
            "| p (two-sided) | p (Holm) |",
            "|---|---|---|---|---|---|---|---|---|"]
  for c in report["comparisons"]:
    lines.append(f"| {c['arm']} | {c['control']} | {c['n_paired']} | {_percent(c['arm_accuracy'])} | "
                 f"{_percent(c['control_accuracy'])} | {c['arm_only_correct']} | {c['control_only_correct']} | "
                 f"{c['p_value']:.3g} | {c['p_holm']:.3g} |")
  return lines


def _agreement_section(report: dict) -> list[str]:
  if not report["agreement"]:
    return []
  lines = ["## Answers changed by training (against nodistill)", "",
           f"Right/wrong under the `{report['rule']}` rule. Flagged: the adapter changed fewer than 1% of "
           "nodistill's outputs.", "",
           "| arm | paired n | identical outputs | identical answers | right → wrong | wrong → right | flag |",
           "|---|---|---|---|---|---|---|"]
  for a in report["agreement"]:
    flag = "**barely changed (< 1%)**" if a["barely_changed"] else ""
    lines.append(f"| {a['arm']} | {a['n_paired']} | {a['identical_outputs']} | {a['identical_answers']} | "
                 f"{a['right_to_wrong']} | {a['wrong_to_right']} | {flag} |")
  return lines + [""]


def _update_norms_section(report: dict) -> list[str]:
  if not report["update_norms"]:
    return []
  lines = ["## Adapter update norms", "", "Relative update ‖scale · B A‖_F / ‖W‖_F per LoRA module.", "",
           "| arm | modules | mean | max |", "|---|---|---|---|"]
  for name, norms in report["update_norms"].items():
    lines.append(f"| {name} | {norms['num_modules']} | {norms['mean']:.3g} | {norms['max']:.3g} |")
  return lines + [""]


def _loss_gradients_section(report: dict) -> list[str]:
  if not report.get("loss_gradients"):
    return []
  lines = ["## What the KD term does", "",
           "Gradient norms of the loss's two parts with respect to the LoRA weights, each as weighted in the loss "
           "((1 - ce_weight) · KD and ce_weight · CE), medians over the logged training steps. A ratio far below 1 "
           "trains nearly as plain fine-tuning on the teacher's text.", "",
           "| arm | logged steps | ‖∇ KD‖ | ‖∇ CE‖ | ‖∇ KD‖ / ‖∇ CE‖ |", "|---|---|---|---|---|"]
  for name, g in report["loss_gradients"].items():
    lines.append(f"| {name} | {g['steps']} | {g['median_kd_norm']:.3g} | {g['median_ce_norm']:.3g} | "
                 f"{g['median_ratio']:.3g} |")
  return lines + [""]


def _stores_section(report: dict) -> list[str]:
  if not report["stores"]:
    return []
  threshold = next(iter(report["stores"].values())).get("reference_overlap_high_threshold")
  lines = ["## Teacher stores", "",
           f"The teacher on its own (GSM8K train) questions; accuracy under the `{report['rule']}` rule, and the "
           "share the store marked correct when it was written (the rule it records). Hint mentions: responses "
           "that speak of a provided solution or hint (kdjax.gsm8k.reference_overlap.HINT_PHRASES). Overlap: ROUGE-L F1 "
           "over words with the question's own reference solution, calculator annotations removed (1 = the same "
           "words in the same order).", "",
           "| strategy | responses | teacher accuracy | marked correct | truncated | mean response tokens "
           f"| hint mentions | overlap mean | overlap > {threshold} |",
           "|---|---|---|---|---|---|---|---|---|"]
  for strategy, s in report["stores"].items():
    lines.append(f"| {strategy} | {s['n']} | {_accuracy_cell(s)} | {_percent(s['stored_correct_share'])} | "
                 f"{_percent(s['truncation_rate'])} | {_number(s['mean_response_tokens'])} | "
                 f"{_percent(s['hint_mention_share'])} | {_number(s['reference_overlap_mean'], 3)} | "
                 f"{_percent(s['reference_overlap_high_share'])} |")
  return lines + [""]


def _train_data_section(report: dict) -> list[str]:
  if not report["train_data"]:
    return []
  lines = ["## Training data of the kd arms", "",
           "Store responses each arm trained on, and those it dropped: a wrong answer (`distill.correct_only`), or "
           "an overlap with the reference solution above `teacher.max_reference_overlap` (train + validation).", "",
           "| arm | store | store responses | dropped: wrong | max overlap | dropped: overlap | train | validation |",
           "|---|---|---|---|---|---|---|---|"]
  for name, d in report["train_data"].items():
    lines.append(f"| {name} | {d['store']} | {d['store_responses']} | {d['dropped_incorrect']} | "
                 f"{d['max_reference_overlap']:g} | "
                 f"{d['train_dropped_reference_overlap'] + d['validation_dropped_reference_overlap']} | "
                 f"{d['train_examples']} | {d['validation_examples']} |")
  return lines + [""]


def _set_apart_section(report: dict) -> list[str]:
  if not report["set_apart"]:
    return []
  lines = ["## Arms evaluated with other settings (not compared)", "",
           "Their eval settings differ from the compared arms', so they enter no test or interval above.", ""]
  lines += _accuracy_table(report["set_apart"], report["rules"])
  lines.append("")
  for name, arm in report["set_apart"].items():
    differences = ", ".join(f"{k}={v}" for k, v in arm["differs_in"].items())
    lines.append(f"- {name}: {differences}")
  return lines + [""]


def markdown(report: dict, resamples: int, seed: int) -> str:
  confidence = round(100 * report["confidence"])
  lines = ["# GSM8K report", "",
           f"Primary extraction rule: `{report['rule']}`; also shown: "
           + ", ".join(f"`{r}`" for r in report["rules"][1:])
           + f". Cells: accuracy [{confidence}% Wilson interval].", "",
           "## Accuracy", ""]
  lines += _accuracy_table(report["arms"], report["rules"])
  lines += [""] + _ref_nll_section(report, resamples, seed) + [""]
  lines += _mcnemar_section(report) + [""]
  lines += _agreement_section(report) + _update_norms_section(report) + _loss_gradients_section(report)
  lines += _stores_section(report) + _train_data_section(report)
  lines += _set_apart_section(report)
  lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]]
  lines += ["", f"![accuracy]({ACCURACY_PLOT})", "", f"![output length]({LENGTH_PLOT})", ""]
  return "\n".join(lines)


def _figure(num_arms: int):
  # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
  from matplotlib.backends import backend_agg  # pylint: disable=import-outside-toplevel
  from matplotlib import figure as figure_lib  # pylint: disable=import-outside-toplevel
  figure = figure_lib.Figure(figsize=(max(4.0, 1.2 * num_arms + 2.0), 4.0))
  backend_agg.FigureCanvasAgg(figure)
  return figure


def _plot_accuracy(report: dict, path: pathlib.Path) -> None:
  names = list(report["arms"])
  arms = [report["arms"][name] for name in names]
  positions = list(range(len(names)))
  accuracy = [a["accuracy"] or 0.0 for a in arms]
  errors = [[acc - a["ci_low"] for acc, a in zip(accuracy, arms)],
            [a["ci_high"] - acc for acc, a in zip(accuracy, arms)]]
  figure = _figure(len(names))
  axes = figure.add_subplot()
  axes.bar(positions, accuracy, yerr=errors, capsize=4, color="tab:blue",
           label=f"kdjax ({round(100 * report['confidence'])}% Wilson CI)")
  paper = [(i, a["paper_accuracy"]) for i, a in zip(positions, arms) if a["paper_accuracy"] is not None]
  if paper:
    axes.scatter([i for i, _ in paper], [v for _, v in paper], marker="D", color="tab:red", zorder=3,
                 label="paper")
  axes.set_xticks(positions, names, rotation=30, ha="right")
  axes.set_ylim(0.0, 1.0)
  axes.set_ylabel(f"GSM8K accuracy ({report['rule']} rule)")
  axes.legend(loc="upper left")
  figure.tight_layout()
  storage.save_figure(figure, path, format="png", dpi=120)


def _plot_lengths(report: dict, path: pathlib.Path) -> None:
  names = list(report["arms"])
  arms = [report["arms"][name] for name in names]
  positions = list(range(len(names)))
  figure = _figure(len(names))
  axes = figure.add_subplot()
  bars = axes.bar(positions, [a["mean_output_tokens"] or 0.0 for a in arms], color="tab:gray")
  for bar, arm in zip(bars, arms):
    axes.annotate(f"{_percent(arm['hit_token_limit_share'])} at limit",
                  (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
  axes.set_xticks(positions, names, rotation=30, ha="right")
  axes.set_ylabel("mean output tokens")
  figure.tight_layout()
  storage.save_figure(figure, path, format="png", dpi=120)


def write_plots(report: dict, out_dir: pathlib.Path) -> list[str]:
  """The accuracy and output-length plots of the compared arms; returns their file names."""
  _plot_accuracy(report, out_dir / ACCURACY_PLOT)
  _plot_lengths(report, out_dir / LENGTH_PLOT)
  return [ACCURACY_PLOT, LENGTH_PLOT]
