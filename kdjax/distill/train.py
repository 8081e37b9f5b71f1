"""The student training loop: LoRA-only optimisation of the KD / CE loss, resumable Orbax checkpoints, metrics.

`train(model, train_data, val_data, cfg, loss_cfg, workdir)` takes a model that already carries LoRA adapters
(`kdjax.models.lora.add_lora`) and lists of `batches.TrainExample`. Only the `nnx.LoRAParam` variables are
differentiated and reach the optimizer; the frozen base is an input of the compiled step, never an output.

Gradient accumulation sums loss SUMS and loss-token counts over micro-batches and divides once by the total
token count, so a step minimises the mean over every loss token of the step (not a mean of micro-batch means),
and `accum=2, batch=B` equals `accum=1, batch=2B`.

Checkpoints (`workdir/checkpoints/<step>`, asynchronous, every `checkpoint_every` steps, the last
`keep_checkpoints` kept) hold the LoRA state, optimizer state and RNG key (Orbax pytree) and a JSON item with the
step, the data iterator's position and the best validation loss so far. `workdir/best/<step>` keeps the LoRA state
with the lowest validation loss. `run_files.select_adapter` then puts the adapter to export into the model (that best state,
or the final one when there is no validation data) and writes `workdir/update_norms.json`, how far it moved each
adapted weight. A restarted `train` resumes from the latest checkpoint; every random choice
(data order, dropout, the on-policy choice and
sampling) is a function of (seed, step), so on CPU a killed-and-resumed run ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.infra import parallel, storage
from kdjax.distill import batches as batches_lib
from kdjax.distill import losses
from kdjax.distill import on_policy as on_policy_lib
from kdjax.distill import run_files

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
_MODEL_INPUTS = ("input_ids", "attention_mask")

logger = logging.getLogger(__name__)


class TrainError(ValueError):
  """A training configuration, model or data set that cannot be trained as asked."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, data and bookkeeping settings. Defaults follow the paper (SGD, lr 5e-6, momentum 0.9).

  `batch_size` is the number of sequences per micro-batch (over all devices); a step sees
  `batch_size * grad_accum_steps` sequences. `num_steps`, when set, overrides `num_epochs`. `eval_every=0`
  evaluates only at the end; `clip_norm=None` disables clipping.

  Learning-rate scaling (`lr_reference_batch`, SGD only). With `lr_reference_batch = R`, `learning_rate` is the
  rate of an update over R examples and a step over B = `examples_per_step` examples uses
  `peak_learning_rate = learning_rate * B / R`. The rule: with a mean-reduced loss, one SGD step at batch B and
  rate lr * B moves the weights by lr * (sum of the B per-example gradients), which is what B steps at batch 1
  and rate lr do to first order in lr (the gradients are taken at one point instead of B successive ones).
  Its limits: the loss is a mean over loss *tokens*, so an example weighs in proportion to its token count
  rather than equally; clipping applies to the step's mean gradient, which clips less often than B separate
  per-example clips (so the large batch moves more where the paper's updates were clipped); momentum's memory
  spans 1 / (1 - momentum) steps, i.e. B times more examples; and the cosine has B times fewer, larger steps.
  `None` (or 0) uses `learning_rate` as given. AdamW normalises the gradient's scale away, so the rule does not
  hold for it and a batch other than R is refused.
  """

  optimizer: str = "sgd"
  learning_rate: float = 5e-6
  momentum: float = 0.9
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  warmup_steps: int = 0
  schedule: str = "cosine"
  # The cosine decays from the peak (after warmup) to min_lr_ratio * peak, reached at the last update of the
  # run (steps counted over all epochs); it never restarts. 0 is the usual "cosine to zero".
  min_lr_ratio: float = 0.1
  lr_reference_batch: int | None = None  # see "Learning-rate scaling" above
  clip_norm: float | None = 1.0
  grad_accum_steps: int = 1
  batch_size: int = 8
  num_epochs: int = 1
  num_steps: int | None = None
  eval_every: int = 0
  eval_batch_size: int | None = None
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  seed: int = 0
  chunk_size: int = 512
  log_every: int = 10
  pad_multiple: int = 64
  max_length: int | None = None
  sort_window: int = 1
  async_checkpointing: bool = True
  tensorboard: bool = True
  progress_bar: bool = True

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise TrainError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.schedule not in SCHEDULES:
      raise TrainError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
      raise TrainError(f"TrainConfig.learning_rate must be finite and >= 0, got {self.learning_rate}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise TrainError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
    if self.clip_norm is not None and not self.clip_norm > 0:
      raise TrainError(f"TrainConfig.clip_norm must be > 0 or None, got {self.clip_norm}")
    positive = ("grad_accum_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "chunk_size",
                "log_every", "pad_multiple", "sort_window")
    for name in positive:
      if getattr(self, name) < 1:
        raise TrainError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("num_steps", "eval_batch_size", "max_length"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise TrainError(f"TrainConfig.{name} must be >= 1 or None, got {getattr(self, name)}")
    if self.num_steps is None and self.num_epochs < 1:
      raise TrainError(f"TrainConfig needs num_steps or num_epochs >= 1, got num_epochs={self.num_epochs}")
    if self.warmup_steps < 0 or self.eval_every < 0:
      raise TrainError("TrainConfig.warmup_steps and eval_every must be >= 0")
    if self.lr_reference_batch is not None and self.lr_reference_batch < 0:
      raise TrainError(f"TrainConfig.lr_reference_batch must be >= 0 or None, got {self.lr_reference_batch}")
    if (self.lr_reference_batch and self.optimizer != "sgd"
        and self.examples_per_step != self.lr_reference_batch):
      raise TrainError(f"the linear learning-rate rule (train.lr_reference_batch={self.lr_reference_batch}) holds "
                       f"for SGD, not {self.optimizer}: set train.lr_reference_batch=0 and choose the learning "
                       f"rate for batch {self.examples_per_step} yourself")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
    """From a mapping of field names to values (a config section as a dict); unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise TrainError(f"unknown TrainConfig fields {unknown}")
    return cls(**dict(values))

  @property
  def examples_per_step(self) -> int:
    return self.batch_size * self.grad_accum_steps

  @property
  def peak_learning_rate(self) -> float:
    """The schedule's peak: `learning_rate`, scaled by `examples_per_step / lr_reference_batch` when that is set."""
    if not self.lr_reference_batch:
      return self.learning_rate
    return self.learning_rate * self.examples_per_step / self.lr_reference_batch

  def total_steps(self, num_examples: int) -> int:
    if self.num_steps is not None:
      return self.num_steps
    return self.num_epochs * -(-num_examples // self.examples_per_step)


# ------------------------------------------------------------------------------------------------ optimizer


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to `min_lr_ratio * lr` at `total_steps` (and flat after), or flat.

  `lr` is `cfg.peak_learning_rate`. The cosine spans every update of the run from the end of warmup to
  `total_steps` in one half period: no restarts, and the floor is reached only after the last update.
  """
  lr, warmup = cfg.peak_learning_rate, cfg.warmup_steps
  if cfg.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, max(total_steps, warmup + 1),
                                            end_value=lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(cfg, total_steps)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm is not None else []
  if cfg.optimizer == "sgd":
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
  else:
    parts.append(optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


# ------------------------------------------------------------------------------------------------ loss / step


def _loss_sums(graphdef: nnx.GraphDef, states: Sequence[nnx.State], batch: Mapping[str, jax.Array],
               loss_cfg: losses.LossConfig, chunk_size: int, dropout_key: jax.Array | None,
               teacher_head: Mapping[str, jax.Array] | None = None):
  """Loss sums of one batch: hidden states only, the vocabulary projection chunked inside `distill_loss`
  (the resident teacher's too, with `teacher_head` (`on_policy.head_arrays`) and a batch of `teacher_hidden`)."""
  model = nnx.merge(graphdef, *states)
  out = model.forward(batch["input_ids"], attention_mask=batch["attention_mask"], return_logits=False,
                      dropout_key=dropout_key)
  loss_batch = {k: v for k, v in batch.items() if k not in _MODEL_INPUTS}
  teacher_head = None if teacher_head is None else on_policy_lib.output_projection(teacher_head)
  return losses.distill_loss(out.hidden, model.lm_head_weight(), loss_batch, loss_cfg, chunk_size=chunk_size,
                             teacher_head=teacher_head)


def _objective_sum(sums: losses.LossSums, loss_cfg: losses.LossConfig) -> jax.Array:
  """The numerator of `losses.total_loss`; its gradient divided by the token count is the loss gradient."""
  return (1.0 - loss_cfg.ce_weight) * sums.kd_sum + loss_cfg.ce_weight * sums.ce_sum


def _means(sums: losses.LossSums, extra: Mapping[str, jax.Array], loss_cfg: losses.LossConfig) -> dict:
  denom = jnp.maximum(sums.num_tokens, 1.0)
  out = {"loss": losses.total_loss(sums, loss_cfg), "kd": sums.kd_sum / denom, "ce": sums.ce_sum / denom,
         "loss_tokens": sums.num_tokens}
  out.update({name.removesuffix("_sum"): value / denom for name, value in extra.items()})
  return out


def measures_loss_parts(loss_cfg: losses.LossConfig) -> bool:
  """Whether a step's loss has two weighted parts whose gradients can be told apart: KD and CE both present."""
  return loss_cfg.uses_teacher and 0.0 < loss_cfg.ce_weight < 1.0


def _train_step(graphdef, tx, loss_cfg, chunk_size, use_dropout, measure_parts, lora, opt_state, rest, batch, key,
                teacher_head=None):
  """One optimizer step over `batch` arrays shaped [accum, micro_batch, ...].

  `measure_parts`: the gradient of the KD part and of the CE part, each as weighted in the loss, are taken apart
  (one forward, a backward pass per part; their sum is the step's gradient) and their norms are returned as
  `grad_norm_kd`, `grad_norm_ce` and `grad_ratio_kd_ce`: what the KD term does next to CE.
  """
  accum = batch["input_ids"].shape[0]
  keys = jax.random.split(key, accum)

  def micro_grads(micro, micro_key):
    def parts(lora_state):
      sums, extra = _loss_sums(graphdef, (lora_state, rest), micro, loss_cfg, chunk_size,
                               micro_key if use_dropout else None, teacher_head)
      weighted = ((1.0 - loss_cfg.ce_weight) * sums.kd_sum, loss_cfg.ce_weight * sums.ce_sum)
      return (weighted if measure_parts else sum(weighted)), (sums, extra)
    if not measure_parts:
      return jax.grad(parts, has_aux=True)(lora)
    (kd, ce), backward, aux = jax.vjp(parts, lora, has_aux=True)
    kd_grads, = backward((jnp.ones_like(kd), jnp.zeros_like(ce)))
    ce_grads, = backward((jnp.zeros_like(kd), jnp.ones_like(ce)))
    return (kd_grads, ce_grads), aux

  if accum == 1:
    grads, (sums, extra) = micro_grads(jax.tree.map(lambda x: x[0], batch), keys[0])
  else:
    def body(carry, xs):
      return jax.tree.map(jnp.add, carry, micro_grads(*xs)), None
    shapes = jax.eval_shape(micro_grads, jax.tree.map(lambda x: x[0], batch), keys[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, (sums, extra)), _ = jax.lax.scan(body, zeros, (batch, keys))
  # One division by the step's total loss-token count: a token mean over all micro-batches.
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums.num_tokens, 1.0).astype(g.dtype), grads)
  parts_metrics = {}
  if measure_parts:
    kd_grads, ce_grads = grads
    grads = jax.tree.map(jnp.add, kd_grads, ce_grads)
    kd_norm, ce_norm = optax.global_norm(kd_grads), optax.global_norm(ce_grads)
    parts_metrics = {"grad_norm_kd": kd_norm, "grad_norm_ce": ce_norm,
                     "grad_ratio_kd_ce": kd_norm / jnp.maximum(ce_norm, jnp.finfo(ce_norm.dtype).tiny)}
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, opt_state, lora)
  lora = optax.apply_updates(lora, updates)
  metrics = _means(sums, extra, loss_cfg)
  metrics["grad_norm"] = grad_norm
  metrics.update(parts_metrics)
  return lora, opt_state, metrics


def make_train_step(graphdef, tx, loss_cfg: losses.LossConfig, chunk_size: int, use_dropout: bool, lora,
                    opt_state, *, measure_parts: bool = False):
  """The jitted step `(lora, opt_state, rest, batch, key) -> (lora, opt_state, metrics)` that `train` runs
  (on-policy steps pass `teacher_head=` too: `losses.distill_loss`); with `measure_parts` (logged steps of a loss
  with KD and CE, `measures_loss_parts`) it also returns the two parts' gradient norms (`_train_step`).

  The plan stage (`kdjax.plan.train_step`) compiles the step built here too, on abstract arguments, so the plan and
  the loop cannot drift apart. `lora` and `opt_state` (arrays, or ShapeDtypeStructs with shardings) give the
  outputs' shardings.
  """
  # No buffer donation: LoRA and its optimizer state are small, and asynchronous checkpoints may still be
  # reading the previous step's arrays.
  shardings = jax.tree.map(lambda x: x.sharding, (lora, opt_state))
  return jax.jit(functools.partial(_train_step, graphdef, tx, loss_cfg, chunk_size, use_dropout, measure_parts),
                 out_shardings=(*shardings, None))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _eval_sums(graphdef, state, batch, loss_cfg, chunk_size, teacher_head=None):
  return _loss_sums(graphdef, (state,), batch, loss_cfg, chunk_size, None, teacher_head)


def _place_batch(batch: Mapping[str, np.ndarray], mesh: Mesh | None, leading: int = 0) -> dict[str, jax.Array]:
  """Device arrays; with a mesh the batch dimension (after `leading` axes) is sharded over data/fsdp."""
  if mesh is None:
    return jax.device_put(dict(batch), jax.devices()[0])
  out = {}
  for k, v in batch.items():
    axes = (None,) * leading + ("batch",) + (None,) * (v.ndim - leading - 1)
    out[k] = jax.device_put(v, NamedSharding(mesh, parallel.logical_to_spec(axes, v.shape, mesh)))
  return out


def evaluate_loss(model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]], loss_cfg: losses.LossConfig, *,
                  chunk_size: int = 512, mesh: Mesh | None = None,
                  teacher_head: Mapping[str, jax.Array] | None = None) -> dict[str, float]:
  """Token means over every loss token of `batches`: "kd", "ce", "loss" (cfg's total), accuracies, and counts.

  `batches` are `batches.collate` dicts; no dropout. Sums are accumulated in float64 on the host. A model
  sharded over a mesh gets its batches sharded over the same mesh unless `mesh` says otherwise.
  """
  graphdef, state = nnx.split(model)
  if mesh is None:
    sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
  totals: dict[str, float] = {}
  for batch in batches:
    sums, extra = _eval_sums(graphdef, state, _place_batch(batch, mesh), loss_cfg, chunk_size, teacher_head)
    values = {"kd_sum": sums.kd_sum, "ce_sum": sums.ce_sum, "num_tokens": sums.num_tokens, **extra}
    for name, value in jax.device_get(values).items():
      totals[name] = totals.get(name, 0.0) + float(value)
  n = totals.get("num_tokens", 0.0)
  means = {name.removesuffix("_sum"): (value / n if n else 0.0) for name, value in totals.items()
           if name != "num_tokens"}
  means["loss"] = (1.0 - loss_cfg.ce_weight) * means.get("kd", 0.0) + loss_cfg.ce_weight * means.get("ce", 0.0)
  means["num_tokens"] = n
  return means


# ------------------------------------------------------------------------------------------------ checkpoints


# ------------------------------------------------------------------------------------------------ train


def _shard_model(model: nnx.Module, mesh: Mesh) -> None:
  """Places every variable of `model` on `mesh` by its logical axes (in place; no-op for placed arrays)."""
  state = nnx.state(model)
  # Array leaves against NamedSharding leaves: both trees share the State / Variable structure.
  nnx.update(model, jax.tree.map(jax.device_put, state, parallel.state_shardings(state, mesh)))


def _mesh_shardings(tree: Any, mesh: Mesh) -> Any:
  """Shardings for LoRA / optimizer state: variables by their logical axes (optimizer moments keep their
  parameter's metadata), plain arrays (step counts) replicated."""
  def one(x):
    if isinstance(x, nnx.Variable):
      return x.replace(parallel.named_sharding(x.get_metadata().get("logical_axes"), x.get_raw_value().shape, mesh))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _check_data(name: str, data: Sequence[batches_lib.TrainExample], loss_cfg: losses.LossConfig) -> None:
  if loss_cfg.uses_teacher and not all(e.has_teacher for e in data):
    raise TrainError(f"{name} has examples without teacher top-k arrays but divergence="
                     f"{loss_cfg.divergence!r} needs them (gold solutions alone train with divergence 'none' and CE weight 1: the finetune arm)")


def _check_loss_tokens(name: str, data: Sequence[batches_lib.TrainExample], max_length: int | None) -> None:
  """Refuses data whose responses `max_length` truncates away entirely: the steps would have nothing to learn."""
  total, empty = batches_lib.count_loss_tokens(data, max_length)
  if total == 0:
    shortest = min(len(e) - e.num_loss_tokens for e in data)  # the shortest prompt's length
    raise TrainError(f"train.max_len={max_length} leaves no loss token in {name}: every response is cut off "
                     f"(the shortest prompt has {shortest} tokens); train.max_len must be at least {shortest} to "
                     f"keep even one response token, and well above it to train on whole responses")
  if empty:
    logger.warning("%s: train.max_len=%s cuts off the whole response of %d of %d examples", name, max_length,
                   empty, len(data))


def train(model: nnx.Module, train_data: Sequence[batches_lib.TrainExample],
          val_data: Sequence[batches_lib.TrainExample] | None, cfg: TrainConfig, loss_cfg: losses.LossConfig,
          workdir: str | pathlib.Path, *, mesh: Mesh | None = None,
          on_policy: on_policy_lib.OnPolicy | None = None) -> run_files.TrainResult:
  """Trains the LoRA adapters of `model` (in place) and returns the final state; resumes from `workdir`.

  `val_data` should be a held-out slice of GSM8K *train* (never test); its loss picks the best checkpoint.
  With `mesh`, parameters are sharded by their logical axes and the batch over ("data", "fsdp"). With
  `on_policy` (a resident primed teacher), some steps train on the student's own samples graded by it
  (`kdjax.distill.on_policy`); None runs exactly the off-policy loop.
  """
  workdir = storage.makedirs(storage.path(workdir, absolute=True))  # orbax refuses relative paths
  if not train_data:
    raise TrainError("train_data is empty")
  if on_policy is None or on_policy.settings.fraction < 1.0:  # fraction 1 never reads the store's top-k
    _check_data("train_data", train_data, loss_cfg)
  _check_loss_tokens("train_data", train_data, cfg.max_length)
  if val_data:
    _check_data("val_data", val_data, loss_cfg)
    _check_loss_tokens("val_data", val_data, cfg.max_length)
  if mesh is not None:
    _shard_model(model, mesh)
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  if not jax.tree.leaves(lora):
    raise TrainError("the model has no nnx.LoRAParam variables; call kdjax.models.lora.add_lora first")

  total_steps = cfg.total_steps(len(train_data))
  # Host copies of every step's learning rate, for the logs (no per-step device round trip).
  learning_rates = np.asarray(jax.vmap(make_schedule(cfg, total_steps))(jnp.arange(total_steps)))
  tx = make_optimizer(cfg, total_steps)
  key = jax.random.key(cfg.seed)

  def place(tree):
    if mesh is None:
      # Committed arrays from the first step on: the step's outputs are committed, and a change of
      # committedness between calls would compile the step twice.
      return jax.device_put(tree, jax.devices()[0])
    return jax.tree.map(jax.device_put, tree, _mesh_shardings(tree, mesh))

  lora = place(lora)
  opt_state = place(jax.jit(tx.init)(lora))
  rest = place(rest) if mesh is None else rest  # on a mesh: already placed by `_shard_model`
  iterator = batches_lib.BatchIterator(train_data, cfg.examples_per_step, seed=cfg.seed,
                                       pad_multiple=cfg.pad_multiple, max_length=cfg.max_length,
                                       sort_window=cfg.sort_window)
  val_batches = (batches_lib.eval_batches(val_data, cfg.eval_batch_size or cfg.batch_size,
                                          pad_multiple=cfg.pad_multiple, max_length=cfg.max_length)
                 if val_data else None)

  checkpoints = run_files.Checkpoints(workdir, cfg)
  step, best_val, best_step, final_val = 0, None, None, None
  # The key's data is placed like the rest: on several processes Orbax saves only arrays of the global mesh.
  key_data = lambda: place(jax.random.key_data(key))
  restored = checkpoints.restore_latest({"lora": lora, "opt_state": opt_state, "rng": key_data()})
  if restored is not None:
    state, meta = restored
    lora, opt_state = state["lora"], state["opt_state"]
    key = jax.random.wrap_key_data(state["rng"])
    step, best_val, best_step, final_val = meta["step"], meta["best_val_loss"], meta["best_step"], meta["val"]
    iterator.restore(meta["data"])
    if meta.get("config") != dataclasses.asdict(cfg):
      logger.warning("resuming %s with a TrainConfig that differs from the checkpoint's", workdir)
    lora, opt_state = place(lora), place(opt_state)
    logger.info("resumed from step %d of %d", step, total_steps)

  use_dropout = getattr(model, "lora_dropout", 0.0) > 0.0
  step_fn = make_train_step(graphdef, tx, loss_cfg, cfg.chunk_size, use_dropout, lora, opt_state)
  # Logged steps take the KD and CE gradients apart (metrics.jsonl: grad_norm_kd, grad_norm_ce, grad_ratio_kd_ce);
  # the others run the plain step, which the plan stage compiles.
  measured_step_fn = (make_train_step(graphdef, tx, loss_cfg, cfg.chunk_size, use_dropout, lora, opt_state,
                                      measure_parts=True) if measures_loss_parts(loss_cfg) else step_fn)
  if on_policy is not None:
    on_policy.check(model, train_data, val_data or [])
    dense_cfg = on_policy_lib.dense_loss_config(loss_cfg)
    on_policy_step_fn = functools.partial(
        make_train_step(graphdef, tx, dense_cfg, cfg.chunk_size, use_dropout, lora, opt_state),
        teacher_head=on_policy.teacher_head)
  def validate(lora) -> dict:
    values = evaluate_loss(nnx.merge(graphdef, lora, rest), val_batches, loss_cfg, chunk_size=cfg.chunk_size, mesh=mesh)
    if on_policy is not None:  # the student's own answers to the validation questions, teacher-graded
      dense_eval = lambda student, scored: evaluate_loss(student, scored, dense_cfg, chunk_size=cfg.chunk_size,
                                                         mesh=mesh, teacher_head=on_policy.teacher_head)
      values = {**values, **on_policy.validation_metrics(nnx.merge(graphdef, lora, rest), val_data, train_data,
                                                         cfg, dense_eval)}
    return values

  log = run_files.MetricsLog(workdir, cfg, step, total_steps)
  if on_policy is not None and val_batches and step == 0:
    log.log_eval(0, validate(lora))  # the on-policy curves' starting point; not a candidate for the best adapter
  start_time, tokens_trained = time.perf_counter(), 0
  try:
    while step < total_steps:
      sampled = on_policy is not None and on_policy.is_on_policy(cfg.seed, step)
      batch, extra = (on_policy.step_batch(nnx.merge(graphdef, lora, rest), iterator, train_data, step, cfg)
                      if sampled else (next(iterator), {}))
      real_tokens = int(batch["attention_mask"].sum())
      tokens_trained += real_tokens
      micro = {k: v.reshape((cfg.grad_accum_steps, cfg.batch_size) + v.shape[1:]) for k, v in batch.items()}
      update_start = time.perf_counter()
      logged = (step + 1) % cfg.log_every == 0 or step + 1 == total_steps
      lora, opt_state, metrics = (on_policy_step_fn if sampled else measured_step_fn if logged else step_fn)(
          lora, opt_state, rest, _place_batch(micro, mesh, leading=1), jax.random.fold_in(key, step))
      if on_policy is not None:
        metrics = on_policy.timed_update(metrics, extra, lora, update_start)
      log.add(step + 1, metrics, real_tokens, float(learning_rates[step]))
      step += 1
      last = step == total_steps
      if step % cfg.log_every == 0 or last:
        log.flush()
      if val_batches and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
        final_val = validate(lora)
        log.log_eval(step, final_val)
        if best_val is None or final_val["loss"] < best_val:
          best_val, best_step = final_val["loss"], step
          checkpoints.save_best(step, lora, best_val)
      if step % cfg.checkpoint_every == 0 or last:
        log.flush()  # the log is complete up to every checkpoint a restart may resume from
        meta = {"step": step, "data": iterator.state(), "best_val_loss": best_val, "best_step": best_step,
                "val": final_val, "config": dataclasses.asdict(cfg), "loss_config": dataclasses.asdict(loss_cfg)}
        checkpoints.save(step, {"lora": lora, "opt_state": opt_state, "rng": key_data()}, meta)
  finally:
    log.close()
    checkpoints.close()
  nnx.update(model, lora)
  return run_files.TrainResult(step=step, lora=lora, best_val_loss=best_val, best_step=best_step, final_val=final_val,
                     history=log.history, workdir=workdir, seconds=time.perf_counter() - start_time,
                     tokens=tokens_trained, peak_learning_rate=cfg.peak_learning_rate)
