"""What a training run did: `TrainResult`, its one-line summary, and the adapter the train stage exports.

`select_adapter` chooses that adapter (the best-validation LoRA state, or the final one without validation data)
and records how far it moved the base weights, `||scale * B A||_F / ||W||_F` per layer and target, in
`<train workdir>/update_norms.json` (read by the report) and in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
from flax import nnx

from kdjax import storage

METRICS_FILE = "metrics.jsonl"
UPDATE_NORMS_FILE = "update_norms.json"


@dataclasses.dataclass(repr=False)
class TrainResult:
  """What `train` did. `summary()` is its one log line; the repr is deliberately short (the state is large)."""

  step: int                           # optimizer steps done (== total steps when training finished)
  lora: nnx.State                     # final LoRA state (also written into the model)
  best_val_loss: float | None
  best_step: int | None
  final_val: dict[str, float] | None  # validation metrics at the last step
  history: list[dict[str, float]]     # per-step training metrics of this process (a resumed run: the rest)
  workdir: pathlib.Path
  seconds: float = 0.0                # wall time of this call's steps (a resumed run: the rest)
  tokens: int = 0                     # real (unpadded) tokens of this call's steps
  peak_learning_rate: float = 0.0
  selected_step: int | None = None    # set by `select_adapter`: the step whose LoRA state the model holds
  update_norms: dict | None = None    # set by `select_adapter`: see `lora.relative_update_norms`

  def __repr__(self) -> str:
    return f"TrainResult({self.summary()})"

  def summary(self) -> str:
    """One line: steps, final train / validation loss, best step, time, tokens/s, and the update norms."""
    last_train = self.history[-1]["loss"] if self.history else None
    val = self.final_val["loss"] if self.final_val else None
    parts = [f"{self.step} steps (peak lr {self.peak_learning_rate:.3g})",
             f"final train loss {_fmt(last_train)}", f"val loss {_fmt(val)}"]
    if self.best_step is not None:
      parts.append(f"best val {_fmt(self.best_val_loss)} at step {self.best_step}")
    else:
      parts.append("no validation data: the final step is kept")
    rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
    parts.append(f"{self.seconds:.1f} s, {rate:.0f} tokens/s" if self.tokens else "nothing left to train")
    if self.update_norms:
      parts.append(f"|scale BA|/|W| mean {self.update_norms['mean']:.3g} max {self.update_norms['max']:.3g} "
                   f"(step {self.selected_step})")
    return ", ".join(parts)


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"


def select_adapter(model: nnx.Module, result: TrainResult) -> TrainResult:
  """Puts the adapter to export into `model` and records how far it moved the base weights.

  With validation data that is the best-validation LoRA state (`workdir/best`); without it (e.g.
  `data.num_validation=0`) the final state `train` left in the model. Writes `workdir/update_norms.json`
  ({"per_module": {"<layer>.<target>": ||scale * A B||_F / ||W||_F}, "mean", "max", "step"}), appends the
  mean and max to metrics.jsonl, and returns `result` with `selected_step` and `update_norms` set.
  """
  from kdjax.distill import lora as lora_lib
  from kdjax.distill import train as train_lib  # it imports this module: a call-time import
  step = result.step
  if result.best_step is not None:
    step = train_lib.restore_best_lora(model, result.workdir)["step"]
  per_module = lora_lib.relative_update_norms(model)
  values = list(per_module.values())
  norms = {"per_module": per_module, "mean": float(np.mean(values)), "max": float(np.max(values)), "step": step}
  if jax.process_index() == 0:
    storage.write_json(result.workdir / UPDATE_NORMS_FILE, norms, indent=1)
    metrics = result.workdir / METRICS_FILE
    # One such line per workdir: a re-run (e.g. after a failed export) replaces it.
    kept = [line for line in (metrics.read_text().splitlines() if metrics.exists() else [])
            if '"update_norm_mean"' not in line]
    kept.append(json.dumps({"step": step, "update_norm_mean": norms["mean"], "update_norm_max": norms["max"]}))
    storage.write_text(metrics, "".join(line + "\n" for line in kept))
  return dataclasses.replace(result, selected_step=step, update_norms=norms)
