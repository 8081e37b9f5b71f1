"""A training run's files and what it did: the rolling and best-validation Orbax checkpoints, the metrics log,
`TrainResult` with its one-line summary, and the adapter the train stage exports.

`kdjax.distill.train` owns the loop; this module owns what it leaves on disk. Both file classes write from process 0
only where a pod has several (Orbax coordinates its own saves), and a resumed run rewrites the metrics log up to
the step it resumes from, so every step appears exactly once. `select_adapter` chooses the adapter to export (the
best-validation LoRA state, or the final one without validation data) and records how far it moved the base
weights, `||scale * B A||_F / ||W||_F` per layer and target, in `<train workdir>/update_norms.json` (read by the
report) and in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kdjax.infra import storage
from kdjax.models import lora as lora_lib

METRICS_FILE = "metrics.jsonl"
UPDATE_NORMS_FILE = "update_norms.json"


class Checkpoints:
  """The rolling checkpoints (full training state) and the best-by-validation LoRA state."""

  def __init__(self, workdir: pathlib.Path, cfg: Any):
    # Each manager its own barrier names: on several processes both may save one step at once, and Orbax's
    # default barrier keys (by step) would then collide.
    barriers = lambda prefix: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)
    self.latest = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=cfg.async_checkpointing, create=True,
        multiprocessing_options=barriers("kdjax-latest")))
    self.best = ocp.CheckpointManager(workdir / "best", options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda metrics: metrics["val_loss"], best_mode="min",
        enable_async_checkpointing=cfg.async_checkpointing, create=True, multiprocessing_options=barriers("kdjax-best")))

  def save(self, step: int, tree: dict, meta: dict) -> None:
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))

  def save_best(self, step: int, lora: nnx.State, val_loss: float) -> None:
    if step in self.best.all_steps():
      return  # a resumed run re-reaching a step the killed run already saved: same values
    self.best.save(step, args=ocp.args.Composite(lora=ocp.args.StandardSave(lora),
                                                 meta=ocp.args.JsonSave({"step": step, "val_loss": val_loss})),
                   metrics={"val_loss": val_loss})

  def restore_latest(self, like: dict) -> tuple[dict, dict] | None:
    step = self.latest.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def close(self) -> None:
    for manager in (self.latest, self.best):
      manager.wait_until_finished()
      manager.close()


def _logged_step(line: str) -> float:
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return math.inf  # unreadable: dropped


class MetricsLog:
  """Per-step metrics to `metrics.jsonl`, TensorBoard and a tqdm bar; device values are fetched in windows."""

  def __init__(self, workdir: pathlib.Path, cfg: Any, start_step: int, total_steps: int):
    self.path = workdir / METRICS_FILE
    primary = jax.process_index() == 0  # one writer on a multi-host pod
    if primary and self.path.exists():
      # A killed run may have logged steps past its last checkpoint (or half a line); the resumed run logs
      # those steps again.
      kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= start_step]
      storage.write_text(self.path, "".join(line + "\n" for line in kept))
    self.file = storage.appender(self.path) if primary else None
    self.writer = None
    if cfg.tensorboard and primary:
      from tensorboardX import SummaryWriter  # imports torch when present: only when asked for
      self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    from tqdm.auto import tqdm
    self.bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not (cfg.progress_bar and primary),
                    dynamic_ncols=True)
    self.pending: list[tuple[int, dict, int, float]] = []
    self.window_start = time.perf_counter()
    self.history: list[dict[str, float]] = []

  def add(self, step: int, metrics: dict, real_tokens: int, lr: float) -> None:
    self.pending.append((step, metrics, real_tokens, lr))
    self.bar.update(1)

  def flush(self) -> None:
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m, _, _ in self.pending])  # waits for the window's steps
    elapsed = max(time.perf_counter() - self.window_start, 1e-9)
    tokens_per_s = sum(t for _, _, t, _ in self.pending) / elapsed
    for (step, _, tokens, lr), values in zip(self.pending, fetched):
      record = {"step": step, **{k: float(v) for k, v in values.items()}, "lr": lr, "tokens": tokens,
                "tokens_per_s": tokens_per_s}
      self._write(record, "train")
      self.history.append(record)
    self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
    self.pending = []
    self.window_start = time.perf_counter()

  def log_eval(self, step: int, values: Mapping[str, float]) -> None:
    self._write({"step": step, **{f"val_{k}": float(v) for k, v in values.items()}}, "val")

  def _write(self, record: dict, prefix: str) -> None:
    if self.file is None:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.writer is not None:
      for name, value in record.items():
        if name != "step":
          self.writer.add_scalar(f"{prefix}/{name.removeprefix('val_')}", value, record["step"])

  def close(self) -> None:
    self.flush()
    self.bar.close()
    if self.file is not None:
      self.file.close()
    if self.writer is not None:
      self.writer.close()


def restore_best_lora(model: nnx.Module, workdir: str | pathlib.Path) -> dict:
  """Loads the best-validation LoRA state of a finished (or running) `train` into `model`; returns its meta."""
  manager = ocp.CheckpointManager(storage.path(workdir, absolute=True) / "best",
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"{workdir}/best holds no checkpoint")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(model, nnx.LoRAParam))
  restored = manager.restore(step, args=ocp.args.Composite(lora=ocp.args.StandardRestore(abstract),
                                                           meta=ocp.args.JsonRestore()))
  nnx.update(model, restored["lora"])
  return restored["meta"]


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
  step = result.step
  if result.best_step is not None:
    step = restore_best_lora(model, result.workdir)["step"]
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
