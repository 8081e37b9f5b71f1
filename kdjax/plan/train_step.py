"""The plan of the student's LoRA training step: memory per device, predicted step time and MFU, before any weight.

`make_train_plan` builds the student abstractly (shapes only; bf16, or an int8 frozen base with `quantize`), adds
LoRA at the configured rank and targets, places the frozen weights, the LoRA factors and the optimizer state with
`kdjax.infra.parallel`'s rules (as `distill.train.train` does), and compiles `distill.train.make_train_step` -- the
very function the training loop jits -- on ShapeDtypeStructs: a batch [grad_accum_steps, batch_size, max_len]
with the teacher's top-k arrays, layers rematerialised as configured, the chunked loss over the vocabulary.

Memory: XLA's memory analysis of the per-device program (as in `kdjax.plan.generate`). Arguments are the frozen weights,
LoRA, optimizer state and the batch; temporaries are the activations kept for the backward pass, the loss
chunks and the gradients.

Prediction. XLA's cost analysis counts a while loop's body once, whatever its trip count (the layer scan, the
loss's chunk scan and the gradient-accumulation scan are while loops), so `loop_aware_cost` analyses each loop
body of the compiled HLO again and multiplies it by its trip count (`kdjax.plan.cost`). The step time is a per-device roofline,
max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth) (`plan_cost.roofline`, the chips of `plan.CHIP_BY_KIND`);
it ignores collectives and imperfect overlap, so it is a lower bound on the real step time. MFU is the model
FLOPs of the step over (step time x peak FLOP/s x devices). Model FLOPs per token of a LoRA step (`model_flops`):
4 N + 12 L H Q S + 6 N_lora, N the projection and LM-head parameters (forward 2 N; backward through the
activations 2 N; frozen weights get no weight-gradient GEMMs, the 2 N that full fine-tuning adds), attention
over all S keys 4 L H Q S forward and twice that backward, LoRA factors forward, input and weight gradients.
Rematerialisation and the loss's recomputed logits are hardware FLOPs, not model FLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any, Mapping, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kdjax.serving import generation, sampling
from kdjax.infra import parallel
from kdjax.models import quantization
from kdjax.plan import generate as plan_lib
from kdjax.plan.cost import loop_aware_cost, roofline
from kdjax.distill import batches as batches_lib
from kdjax.models import lora as lora_lib
from kdjax.distill import losses
from kdjax.distill import train as train_lib
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib
from kdjax.models.llama.config import LlamaConfig

GiB = plan_lib.GiB
MAX_SUGGEST_COMPILES = 5  # bound on the bisection for the largest batch that fits

@dataclasses.dataclass
class TrainPlan:
  model: str
  quantization: str            # the frozen base: "int8" or "none"
  dtype: str
  remat: bool
  lora_rank: int
  lora_targets: list[str]
  optimizer: str
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict[str, int]
  batch_size: int              # sequences per micro-batch, over all devices
  grad_accum_steps: int
  max_len: int
  chunk_size: int
  teacher_k: int               # 0: cross-entropy only
  train: dict[str, Any]        # per-device bytes (see `_memory`) and the verdict
  predicted: dict[str, Any] | None  # None when the step does not compile or the chip's peak is unknown
  suggested_batch_size: int | None  # the largest batch that fits, when this one does not (0: none does)
  layout_notes: list[str]
  compile_seconds: float
  on_policy_teacher: dict[str, Any] | None = None  # the resident teacher and sampling shape, when on-policy

  @property
  def fits(self) -> bool:
    return bool(self.train["fits"])

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.grad_accum_steps * self.max_len

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------------------------ FLOPs


def model_flops(config: LlamaConfig, lora: lora_lib.LoraConfig, seq_len: int) -> dict[str, float]:
  """Model FLOPs per token of a LoRA training step (see the module docstring), with its parts."""
  c = config
  projections = {name: math.prod(model_lib.projection_shape(c, name)[1:]) for name in model_lib.PROJECTIONS}
  n = c.num_layers * sum(projections.values()) + c.hidden_size * c.vocab_size  # LM head (tied or not)
  n_lora = 0
  for name in lora.targets:
    shape = model_lib.projection_shape(c, name)
    n_in = len(model_lib.PROJECTIONS[name][0])
    n_lora += c.num_layers * lora.rank * (math.prod(shape[1:1 + n_in]) + math.prod(shape[1 + n_in:]))
  attention = 12 * c.num_layers * c.num_heads * c.head_dim * seq_len
  return {"params": n, "lora_params": n_lora, "per_token": 4 * n + attention + 6 * n_lora,
          "dense": 4 * n, "attention": attention, "lora": 6 * n_lora}


# ------------------------------------------------------------------------------------------------ abstract step


def abstract_student(config: LlamaConfig, *, dtype, quantize: bool, remat: bool,
                     lora: lora_lib.LoraConfig) -> model_lib.Llama:
  """The student as `train` gets it, shapes only: weights in bf16 (float32 when computing in float32) or an
  int8 base, LoRA factors in float32."""
  param_dtype = jnp.float32 if jnp.dtype(dtype) == jnp.float32 else jnp.bfloat16

  def build():
    model = model_lib.init_model(config, dtype=jnp.dtype(dtype), param_dtype=param_dtype, remat=remat)
    if quantize:
      quantization.quantize_model(model)
    return lora_lib.add_lora(model, lora)
  return nnx.eval_shape(build)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(batch_size: int, grad_accum_steps: int, max_len: int, teacher_k: int, mesh,
                   rules=parallel.DEFAULT_RULES) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's batch as the loop builds it (`batches.collate`, reshaped to [accum, batch, ...]), sharded like
  the loop's `_place_batch`: the batch axis over data and fsdp."""
  tokens = np.zeros(max_len, np.int32)
  if teacher_k:
    example = batches_lib.distill_example(tokens[:1], tokens, np.zeros((max_len, teacher_k), np.int32),
                                          np.zeros((max_len, teacher_k), np.float32), np.full(max_len, -1.0, np.float32))
  else:
    example = batches_lib.TrainExample(input_ids=tokens, target_ids=tokens, loss_mask=np.ones(max_len, np.float32))
  batch = batches_lib.collate([example], batch_size=batch_size * grad_accum_steps, max_length=max_len)
  out = {}
  for key, value in batch.items():
    shape = (grad_accum_steps, batch_size) + value.shape[1:]
    axes = (None, "batch") + (None,) * (len(shape) - 2)
    out[key] = jax.ShapeDtypeStruct(shape, value.dtype, sharding=parallel.named_sharding(axes, shape, mesh, rules))
  return out


def _shard_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class _Step:
  """One compiled (or refused) train step and what its arguments take per device."""
  batch_size: int
  compiled: Any
  lowered: Any
  memory: plan_lib.StepMemory | None
  error: str | None
  argument_parts: dict[str, int]
  per_device_bytes: int


def _compile_step(config, *, batch_size, train_cfg, loss_cfg, lora_cfg, dtype, quantize, remat, teacher_k, mesh,
                  rules, optimization_level) -> _Step:
  model = abstract_student(config, dtype=dtype, quantize=quantize, remat=remat, lora=lora_cfg)
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  rest = _with_shardings(rest, parallel.state_shardings(rest, mesh, rules))
  lora = _with_shardings(lora, train_lib._mesh_shardings(lora, mesh))
  tx = train_lib.make_optimizer(train_cfg, total_steps=1)  # the schedule's length does not change the program
  opt_state = jax.eval_shape(tx.init, lora)
  opt_state = _with_shardings(opt_state, train_lib._mesh_shardings(opt_state, mesh))
  batch = abstract_batch(batch_size, train_cfg.grad_accum_steps, train_cfg.max_length, teacher_k, mesh, rules)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=NamedSharding(mesh, PartitionSpec()))
  parts = {"frozen weights": _shard_bytes(rest), "LoRA": _shard_bytes(lora),
           "optimizer state": _shard_bytes(opt_state), "batch": _shard_bytes(batch)}
  step = train_lib.make_train_step(graphdef, tx, loss_cfg, train_cfg.chunk_size, lora_cfg.dropout > 0.0, lora,
                                   opt_state)
  try:
    with plan_lib._optimization_level(optimization_level):
      lowered = step.lower(lora, opt_state, rest, batch, key)
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as err:
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    error = next((line for line in str(err).splitlines() if "memory" in line.lower()), str(err).splitlines()[0])
    return _Step(batch_size, None, None, None, error.strip(), parts,
                 max(plan_lib._oom_bytes(error) or 0, sum(parts.values())))
  memory = plan_lib._step_memory(compiled)
  return _Step(batch_size, compiled, lowered, memory, None, parts, memory.total_bytes)


def _memory(step: _Step, hbm: int, hbm_fraction: float, on_policy: Mapping[str, int] | None = None
            ) -> dict[str, Any]:
  """Per-device bytes of the step and the verdict; `on_policy` parts (`on_policy_parts`) add to the total."""
  m = step.memory
  budget = int(hbm_fraction * hbm)
  on_policy = dict(on_policy or {})
  total = step.per_device_bytes + sum(on_policy.values())
  out = {"argument_bytes": m.argument_bytes if m else sum(step.argument_parts.values()),
         "output_bytes": m.output_bytes if m else None, "alias_bytes": m.alias_bytes if m else None,
         "temp_bytes": m.temp_bytes if m else max(step.per_device_bytes - sum(step.argument_parts.values()), 0),
         "code_bytes": m.code_bytes if m else None, "step_bytes": step.per_device_bytes, "total_bytes": total,
         "arguments": dict(step.argument_parts), "on_policy": on_policy, "device_hbm_bytes": int(hbm),
         "hbm_fraction": hbm_fraction, "budget_bytes": budget, "fits": step.error is None and total <= budget,
         "compiler_error": step.error}
  return out


# ------------------------------------------------------------------------------------------------ on-policy


@dataclasses.dataclass(frozen=True)
class OnPolicyTeacher:
  """What on-policy batches (distill.on_policy_fraction > 0) keep beside the student: the frozen primed teacher,
  resident on the same mesh, and the student's sampling of `prompt_len` + `max_new_tokens` tokens per row."""
  model: LlamaConfig
  quantization: str            # "int8" or "none"
  dtype: str
  prompt_len: int
  max_new_tokens: int

  @property
  def sample_len(self) -> int:
    return self.prompt_len + self.max_new_tokens


def on_policy_parts(teacher: OnPolicyTeacher, student: model_lib.Llama, rows: int, mesh, rules,
                    optimization_level: str | None, *, micro_rows: int | None = None,
                    chunk_size: int = train_lib.TrainConfig.chunk_size) -> dict[str, int]:
  """Per-device bytes that on-policy steps add to the train step, for `rows` sampled responses per step.

  - teacher weights: the serving model (int8 projections when so quantized), placed by the same rules as the
    student's frozen base;
  - sampling KV cache: the engine's decode state (`plan.abstract_slots`) of the student, one slot per row at
    `sample_len` tokens;
  - teacher scoring: the temporaries and output of the teacher's forward over [rows, sample_len]: its final
    hidden states, which the on-policy step receives (`kdjax.distill.on_policy`), not logits;
  - teacher logits in the loss: the on-policy loss projects those states onto the whole vocabulary chunk by
    chunk (`losses.dense_teacher_logit_bytes` for one micro-batch of `micro_rows`, default `rows`, at
    `chunk_size`: every chunk's float32 logits when kept for the backward pass, one chunk's when recomputed;
    unsharded, an upper bound), beside the student's, which the compiled step already counts.
  All are counted as live during the update: the weights are, and the cache and the scored states are what the
  update is made of; sampling and scoring run before it, so the sum is an upper bound.
  """
  serving = plan_lib.abstract_serving_model(teacher.model, teacher.quantization, jnp.dtype(teacher.dtype))
  graphdef, state = nnx.split(serving)
  state = _with_shardings(state, parallel.state_shardings(state, mesh, rules))
  opts = sampling.DecodeOptions(max_new_tokens=teacher.max_new_tokens, greedy=False, top_k=0, use_top_p=False,
                                   topk_logprobs=0, pad_id=0)
  slots = plan_lib.abstract_slots(student, rows, teacher.sample_len, opts, mesh, rules)

  def score(state, input_ids, attention_mask):
    return nnx.merge(graphdef, state).forward(input_ids, attention_mask=attention_mask, return_logits=False).hidden

  ids = plan_lib._abstract((rows, teacher.sample_len), jnp.int32, ("batch", "seq"), mesh, rules)
  mask = plan_lib._abstract((rows, teacher.sample_len), jnp.bool_, ("batch", "seq"), mesh, rules)
  out = parallel.named_sharding(("batch", "seq", "embed"), (rows, teacher.sample_len, teacher.model.hidden_size),
                                mesh, rules)
  with plan_lib._optimization_level(optimization_level):
    scoring = plan_lib._step_memory(jax.jit(score, out_shardings=out).lower(state, ids, mask).compile())
  logits = losses.dense_teacher_logit_bytes((micro_rows or rows) * teacher.sample_len, chunk_size,
                                            teacher.model.vocab_size)
  return {"teacher weights": _shard_bytes(state), "sampling KV cache": _shard_bytes(slots),
          "teacher scoring": scoring.temp_bytes + scoring.output_bytes, "teacher logits in the loss": logits}


def _predict(step: _Step, device, num_devices: int, tokens_per_step: int, flops_per_token: dict) -> dict | None:
  if step.compiled is None:
    return None
  cost = loop_aware_cost(step.compiled, step.lowered)
  out = {"flops_per_step": cost["flops"], "bytes_accessed_per_step": cost["bytes_accessed"],
         "xla_raw_flops_per_step": cost["raw_flops"], "xla_raw_bytes_accessed_per_step": cost["raw_bytes_accessed"],
         "cost_method": cost["method"], "loops": cost["loops"], "unknown_loops": cost["unknown_loops"],
         "model_flops_per_token": flops_per_token["per_token"],
         "model_flops_per_step": flops_per_token["per_token"] * tokens_per_step}
  times = roofline(cost["flops"], cost["bytes_accessed"], device)
  if times is None:  # CPUs, GPUs: no published peak in the table
    return out | {"peak_flops_per_s": None, "train_step_s": None, "train_tokens_per_s": None, "mfu": None,
                  "hbm_bandwidth_utilisation": None}
  step_s, peak = times["step_s"], times["peak_flops_per_s"]
  return out | {"peak_flops_per_s": peak, "hbm_bytes_per_s": times["hbm_bytes_per_s"],
                "compute_s": times["compute_s"], "memory_s": times["memory_s"], "train_step_s": step_s,
                "train_tokens_per_s": tokens_per_step / step_s,
                "mfu": out["model_flops_per_step"] / (step_s * peak * num_devices),
                "hbm_bandwidth_utilisation": times["hbm_bandwidth_utilisation"]}


def make_train_plan(model: str | LlamaConfig, *, train_cfg: train_lib.TrainConfig, loss_cfg: losses.LossConfig,
                    lora_cfg: lora_lib.LoraConfig, topology: str | None = None,
                    mesh_shape: Mapping[str, int] | None = None, dtype: str = "bfloat16", quantize: bool = False,
                    remat: bool = True, teacher_k: int = 50, hbm_fraction: float = 0.8,
                    optimization_level: str | None = "O0", suggest_batch: bool = True,
                    on_policy: OnPolicyTeacher | None = None, rules=parallel.DEFAULT_RULES) -> TrainPlan:
  """Compiles the student's train step ahead of time and predicts its memory, step time and MFU.

  train_cfg gives the optimizer, batch_size, grad_accum_steps, max_length (required) and chunk_size;
  teacher_k is the top-k of the teacher store (ignored when `loss_cfg` needs no teacher). A step that does not
  fit gets the largest batch that does in `suggested_batch_size` (a bisection of at most MAX_SUGGEST_COMPILES
  compiles) when `suggest_batch`. `on_policy`: the step also holds that teacher, the student's sampling cache
  and the teacher's scoring (`on_policy_parts`, for batch_size x grad_accum_steps sampled rows).
  """
  config = config_lib.get_preset(model) if isinstance(model, str) else model
  if not train_cfg.max_length:
    raise plan_lib.PlanError("the train plan needs train max_length (the padded sequence length)")
  if not 0 < hbm_fraction <= 1:
    raise plan_lib.PlanError(f"hbm_fraction must be in (0, 1], got {hbm_fraction}")
  teacher_k = teacher_k if loss_cfg.uses_teacher else 0
  devices = plan_lib.topology_devices(topology) if topology else jax.devices()
  topology_name = plan_lib.resolve_topology(topology) if topology else f"live:{devices[0].platform}"
  mesh = plan_lib.build_mesh(mesh_shape or plan_lib.default_mesh_shape(len(devices), config), devices)
  hbm = plan_lib.device_hbm_bytes(devices[0])
  settings = dict(train_cfg=train_cfg, loss_cfg=loss_cfg, lora_cfg=lora_cfg, dtype=dtype, quantize=quantize,
                  remat=remat, teacher_k=teacher_k, mesh=mesh, rules=rules, optimization_level=optimization_level)

  start = time.perf_counter()
  student = abstract_student(config, dtype=dtype, quantize=quantize, remat=remat, lora=lora_cfg)

  def on_policy_bytes(batch_size: int) -> dict[str, int]:
    if on_policy is None:
      return {}
    return on_policy_parts(on_policy, student, batch_size * train_cfg.grad_accum_steps, mesh, rules,
                           optimization_level, micro_rows=batch_size, chunk_size=train_cfg.chunk_size)

  step = _compile_step(config, batch_size=train_cfg.batch_size, **settings)
  memory = _memory(step, hbm, hbm_fraction, on_policy_bytes(train_cfg.batch_size))
  suggested = None
  if not memory["fits"] and suggest_batch:
    suggested = _largest_fitting_batch(config, train_cfg.batch_size, hbm, hbm_fraction, settings, on_policy_bytes)
  compile_seconds = time.perf_counter() - start

  tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum_steps * train_cfg.max_length
  flops = model_flops(config, lora_cfg, train_cfg.max_length)
  axes = {".".join(map(str, path)): (var.get_metadata().get("logical_axes"), tuple(var.shape))
          for path, var in nnx.to_flat_state(nnx.state(student))}
  return TrainPlan(
      model=config.name, quantization="int8" if quantize else "none", dtype=jnp.dtype(dtype).name, remat=remat,
      lora_rank=lora_cfg.rank, lora_targets=list(lora_cfg.targets), optimizer=train_cfg.optimizer,
      topology=topology_name, device_kind=devices[0].device_kind, num_devices=len(devices), mesh=dict(mesh.shape),
      batch_size=train_cfg.batch_size, grad_accum_steps=train_cfg.grad_accum_steps, max_len=train_cfg.max_length,
      chunk_size=train_cfg.chunk_size, teacher_k=teacher_k, train=memory,
      predicted=_predict(step, devices[0], len(devices), tokens_per_step, flops), suggested_batch_size=suggested,
      on_policy_teacher=None if on_policy is None else {
          "model": on_policy.model.name, "quantization": on_policy.quantization, "dtype": on_policy.dtype,
          "rows": train_cfg.batch_size * train_cfg.grad_accum_steps, "sample_len": on_policy.sample_len},
      layout_notes=plan_lib.layout_notes(axes, mesh, rules), compile_seconds=round(compile_seconds, 2))


def _largest_fitting_batch(config, batch_size: int, hbm: int, hbm_fraction: float, settings: dict,
                           on_policy_bytes) -> int:
  """Bisection over compiles in [1, batch_size): the largest batch that fits (0 if batch 1 does not), bounded."""
  fits, too_big = 0, batch_size
  for _ in range(MAX_SUGGEST_COMPILES):
    if too_big - fits <= 1:
      break
    candidate = (fits + too_big) // 2
    cfg = dataclasses.replace(settings["train_cfg"], batch_size=candidate)
    step = _compile_step(config, batch_size=candidate, **(settings | {"train_cfg": cfg}))
    if _memory(step, hbm, hbm_fraction, on_policy_bytes(candidate))["fits"]:
      fits = candidate
    else:
      too_big = candidate
  return fits


# ------------------------------------------------------------------------------------------------ verdict, table


def largest_consumer(plan: TrainPlan) -> tuple[str, int]:
  """What takes most of a device's memory: one of the arguments, or the step's activations and temporaries."""
  parts = dict(plan.train["arguments"]) | dict(plan.train.get("on_policy") or {})
  parts["activations and temporaries"] = plan.train["temp_bytes"] or 0
  name = max(parts, key=parts.get)
  return name, parts[name]


def _remedies(plan: TrainPlan, consumer: str) -> list[str]:
  if consumer == "activations and temporaries":
    remedies = [f"a smaller train.batch_size (largest that fits: {plan.suggested_batch_size})"
                if plan.suggested_batch_size else "a smaller train.batch_size or train.max_len"]
    if not plan.remat:
      remedies.append("student.remat=True")
    if plan.batch_size > 1:
      remedies.append("train.grad_accum_steps for the same tokens per step")
  elif consumer == "teacher logits in the loss":
    remedies = ["a smaller train.chunk_size", "a smaller train.batch_size"]
  elif consumer in ("teacher weights", "teacher scoring"):
    remedies = ([] if plan.on_policy_teacher["quantization"] == "int8" else ["teacher.quantization=int8"]) + \
        ["a smaller train.batch_size", "distill.on_policy_fraction=0 (off-policy, no resident teacher)"]
  elif consumer == "sampling KV cache":
    remedies = ["a smaller train.batch_size or teacher.max_new_tokens"]
  else:
    remedies = [] if plan.quantization == "int8" else ["student.quantize=True (int8 base)"]
    if plan.suggested_batch_size:
      remedies.append(f"train.batch_size={plan.suggested_batch_size}")
  return remedies + ["more chips"]


def check_fits(plan: TrainPlan) -> None:
  """Raises PlanDoesNotFit with one line: the need, the largest consumer and what to change."""
  if plan.fits:
    return
  consumer, size = largest_consumer(plan)
  t = plan.train
  raise plan_lib.PlanDoesNotFit(
      f"{plan.model} ({plan.quantization} base, remat {'on' if plan.remat else 'off'}) train step with batch "
      f"{plan.batch_size} x {plan.max_len} needs {plan_lib._size(t['total_bytes'])} per device on {plan.topology} "
      f"({plan.device_kind}), over {t['hbm_fraction']:.0%} of its {plan_lib._size(t['device_hbm_bytes'])}; "
      f"largest: {consumer} {plan_lib._size(size)}; try {', '.join(_remedies(plan, consumer))}")


def format_table(plan: TrainPlan) -> str:
  """The train plan as a short human-readable table."""
  t, p = plan.train, plan.predicted
  size = lambda n: "-" if n is None else plan_lib._size(n)  # noqa: E731
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  lines = [
      f"train plan: {plan.model} {plan.quantization} base ({plan.dtype}), LoRA r {plan.lora_rank} on "
      f"{','.join(plan.lora_targets)}, remat {'on' if plan.remat else 'off'}, {plan.optimizer}, on {plan.topology}: "
      f"{plan.num_devices} x {plan.device_kind}, mesh {mesh}",
      f"      batch {plan.batch_size} x {plan.max_len} tokens, grad accumulation {plan.grad_accum_steps}, loss "
      f"chunks of {plan.chunk_size}, teacher top-{plan.teacher_k}; compiled in {plan.compile_seconds:.1f} s",
      "per device: " + ", ".join(f"{name} {size(n)}" for name, n in t["arguments"].items())
      + f"; arguments {size(t['argument_bytes'])}, temporaries {size(t['temp_bytes'])}, total {size(t['total_bytes'])}",
  ]
  if plan.on_policy_teacher:
    o = plan.on_policy_teacher
    lines.append(f"on-policy: teacher {o['model']} {o['quantization']} resident, {o['rows']} sampled rows x "
                 f"{o['sample_len']} tokens; " + ", ".join(f"{name} {size(n)}" for name, n in t["on_policy"].items())
                 + f"; train step {size(t['step_bytes'])}")
  if t["compiler_error"]:
    lines.append(f"compiler: {t['compiler_error']}")
  verdict = "fits" if t["fits"] else "DOES NOT FIT"
  lines.append(f"per device {size(t['total_bytes'])} of {size(t['device_hbm_bytes'])} "
               f"({t['total_bytes'] / t['device_hbm_bytes']:.1%}; limit {t['hbm_fraction']:.0%}): {verdict}")
  if plan.suggested_batch_size is not None:
    lines.append(f"largest batch that fits: {plan.suggested_batch_size}")
  if p:
    lines.append(f"per step and device: {p['flops_per_step'] / 1e12:.2f} TFLOP (XLA, loops counted), "
                 f"{size(p['bytes_accessed_per_step'])} accessed; model FLOPs "
                 f"{p['model_flops_per_token'] / 1e9:.1f} GFLOP per token")
    if p["train_step_s"] is not None:
      lines.append(f"predicted: {p['train_step_s']:.3f} s per step, {p['train_tokens_per_s']:,.0f} tokens/s, "
                   f"MFU {p['mfu']:.1%}, HBM bandwidth {p['hbm_bandwidth_utilisation']:.0%} "
                   f"(roofline at {p['peak_flops_per_s'] / 1e12:.0f} TFLOP/s, "
                   f"{p['hbm_bytes_per_s'] / 1e9:.0f} GB/s per device; no collectives)")
  lines += [f"layout: {note}" for note in plan.layout_notes]
  return "\n".join(lines)


def print_table(plan: TrainPlan, file: TextIO | None = None) -> None:
  print(format_table(plan), file=file or sys.stdout)
