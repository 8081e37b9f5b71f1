"""A training run's files: the rolling and best-validation Orbax checkpoints, and the metrics log.

`kdjax.distill.train` owns the loop; this module owns what it leaves on disk. Both classes write from process 0
only where a pod has several (Orbax coordinates its own saves), and a resumed run rewrites the metrics log up to
the step it resumes from, so every step appears exactly once.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import TYPE_CHECKING, Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx

from kdjax import storage
from kdjax.distill.results import METRICS_FILE

if TYPE_CHECKING:
  from kdjax.distill import train


class Checkpoints:
  """The rolling checkpoints (full training state) and the best-by-validation LoRA state."""

  def __init__(self, workdir: pathlib.Path, cfg: "train.TrainConfig"):
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

  def __init__(self, workdir: pathlib.Path, cfg: "train.TrainConfig", start_step: int, total_steps: int):
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
