"""The `plan` stage: will the generation engine fit on that TPU slice, and how fast can it go? Answered before
loading a weight.

`make_plan` builds the model abstractly (shapes only), quantizes it abstractly, places the parameters and the
engine's decode state (`engine.Slots`: S slots, each a bf16 KV window of W = prompt + new tokens, with its per-slot
state and, for a teacher store, its recorded top-k) with `kdjax.infra.parallel`'s rules, and compiles ahead of time the
engine's own three jitted programs (the scanned-layer layout of accelerators): `engine.prefill` of a chunk of C
prompts of P tokens, `engine.insert` of that chunk into the slots, and `engine.decode_block`, the decode loop over
all S slots. With `topology` (e.g. "v5p:4x4x4", "v5e:1x1", "v2-8"), compilation targets libtpu's compile-only
devices for that slice, which works on a CPU-only host (JAX_PLATFORMS=cpu included); without, the live devices.

Memory. Per-device bytes of a program = arguments + outputs - aliased + temporaries + generated code, from XLA's
`memory_analysis()` of the per-device (SPMD) program; the slots are donated to insert and decode, so their
outputs alias their arguments. What stays resident beside a program is added (`phase_bytes`): the slots beside
prefill, the weights beside insert; decode has both as arguments. The plan's `per_device_bytes` is the largest
phase. A program the compiler refuses for lack of HBM makes a plan that does not fit, with the compiler's figure.

Prediction (`predict`, in plan.json's `predicted`). Each program's FLOPs and bytes accessed per device come from
XLA's cost analysis of the compiled program with loop bodies counted as often as they run (`plan_cost`); one
decode step is one iteration of the decode loop. Its time is a roofline, max(FLOPs / peak bf16 FLOP/s, bytes /
HBM bandwidth) per device, with `CHIP_BY_KIND`'s published figures; decode_tokens_per_s = S / decode_step_s,
prefill_tokens_per_s = C P / prefill_step_s, and generate_tokens_per_s adds one prefill per slot per N new
tokens. It is an upper bound: collectives, host time, inserts, idle slots and imperfect overlap are not in it,
the window is the full W whatever the live lengths, and XLA's bytes count what the program really moves (the
all-gathers of a layout that splits head_dim, float32 attention scores), not an ideal kernel's.

What a measured serving rate (JetStream's, say) loses against this bound is what a roofline leaves out: the
all-reduces per layer over ICI on the tensor axis, the host's scheduling, detokenization and inserts between
steps, slots that idle while their next prompt is prefilled, and HBM bandwidth below peak; attention over the
real lengths (not always W) would raise the bound, not lower it. Planned figures: docs/guides/plans.md.

The student's training step is planned by `kdjax.plan.train_step` with this module's topologies, meshes and chip table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, Mapping, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kdjax.serving import engine, generation, sampling
from kdjax.infra import parallel, storage
from kdjax.plan import cost as plan_cost
from kdjax.plan.chips import (CHIP_BY_KIND, GiB, PlanError, chip_share, device_hbm_bytes, host_count,
                              libtpu_available, resolve_topology, topology_devices)
from kdjax.models import quantization
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib
from kdjax.models.llama.config import LlamaConfig



QUANTIZATIONS = ("int8", "none")
ENGINE_PREFILL_CHUNK = engine.PREFILL_CHUNK
KV_CACHE_AXES = model_lib.KV_CACHE_AXES

_OOM_FIGURES = re.compile(r"\(([\d.]+)([KMGT])\)")


class PlanDoesNotFit(PlanError):
  """The model, batch and cache need more memory per device than the plan allows."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's per-device memory analysis of one compiled step, in bytes."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int


@dataclasses.dataclass
class Plan:
  model: str
  quantization: str
  dtype: str
  topology: str                 # the libtpu topology name, or "live:<platform>" for the live devices
  device_kind: str
  num_devices: int
  mesh: dict[str, int]
  slots: int                    # decode slots S (the teacher's / eval's batch size)
  max_len: int                  # the planned context: each slot's cache window W = prompt + new tokens
  prompt_len: int               # the planned prompt length P (prefill chunks are C x P)
  prefill_chunk: int            # prompts prefilled together, C
  topk_logprobs: int            # top-k recorded per token (the teacher store's k; 0 for eval)
  param_bytes: int              # all parameters, all devices
  per_device_param_bytes: int
  per_device_cache_bytes: int   # the slots: keys and values of S x W tokens, and their per-slot state
  steps: dict[str, StepMemory]  # "prefill", "insert", "decode" (absent when the compiler ran out of HBM)
  phase_bytes: dict[str, int]   # per step: its program's bytes + what stays resident beside it (see module doc)
  per_device_bytes: int
  device_hbm_bytes: int
  hbm_fraction: float           # the share of HBM a plan may use
  fits: bool
  layout: dict[str, str]        # array -> PartitionSpec
  layout_notes: list[str]
  compile_seconds: float
  predicted: dict[str, Any] | None = None  # roofline throughput (see `predict`); None when nothing compiled
  compiler_error: str | None = None
  hosts: int = 1                # processes holding the mesh's devices; > 1: generate needs teacher.spans_processes

  @property
  def budget_bytes(self) -> int:
    return int(self.hbm_fraction * self.device_hbm_bytes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"budget_bytes": self.budget_bytes}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)


def default_mesh_shape(num_devices: int, config: LlamaConfig) -> dict[str, int]:
  """fsdp x tensor: tensor is the largest power of two <= 16 dividing both the device and head counts."""
  tensor = 1
  while tensor < 16 and num_devices % (2 * tensor) == 0 and config.num_heads % (2 * tensor) == 0:
    tensor *= 2
  return {"data": 1, "fsdp": num_devices // tensor, "tensor": tensor}


def build_mesh(shape: Mapping[str, int], devices: list[Any]) -> Mesh:
  """`parallel.make_mesh`, splitting physical torus axes when the mesh does not follow them (e.g. 8x8 on 4x4x4)."""
  try:
    return parallel.make_mesh(shape, devices=devices)
  except ValueError as err:
    raise PlanError(f"mesh {dict(shape)}: {err}") from None
  except NotImplementedError:  # jax's torus-aware placement wants each mesh axis to be whole physical axes
    from jax.experimental import mesh_utils
    sizes = [int(shape.get(a, 1)) for a in parallel.MESH_AXES]
    if -1 in sizes:
      sizes[sizes.index(-1)] = len(devices) // -math.prod(sizes)
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, parallel.MESH_AXES, axis_types=(AxisType.Auto,) * len(parallel.MESH_AXES))


def abstract_serving_model(config: LlamaConfig, quantization_mode: str, dtype) -> model_lib.Llama:
  """The model as the teacher serves it, shapes only: int8 projections or all weights in `dtype`."""
  model = model_lib.abstract_model(config, dtype=dtype, param_dtype=dtype)
  if quantization_mode == "int8":
    quantization.quantize_model(model)
  return model


def _abstract(shape, dtype, axes, mesh: Mesh, rules) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.named_sharding(axes, shape, mesh, rules))


def abstract_cache(config: LlamaConfig, batch: int, max_len: int, dtype, mesh: Mesh, rules) -> model_lib.KVCache:
  kv_shape = model_lib.KVCache.kv_shape(config, batch, max_len)
  return model_lib.KVCache(
      _abstract(kv_shape, dtype, KV_CACHE_AXES, mesh, rules), _abstract(kv_shape, dtype, KV_CACHE_AXES, mesh, rules),
      _abstract((batch, max_len), jnp.bool_, ("batch", "seq"), mesh, rules),
      _abstract((), jnp.int32, (), mesh, rules), _abstract((batch,), jnp.int32, ("batch",), mesh, rules))


def _bytes(x: jax.ShapeDtypeStruct) -> int:
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
  return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def _mesh_axes(entry) -> tuple[str, ...]:
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def layout_notes(arrays: Mapping[str, tuple[tuple[str, ...], tuple[int, ...]]], mesh: Mesh,
                 rules=parallel.DEFAULT_RULES) -> list[str]:
  """One line per logical axis that could not take its first-choice mesh axes, saying what took them instead.

  arrays: name -> (logical axes, shape). E.g. with 8 KV heads on a 16-way tensor axis:
  "kv_heads=8 cannot be split 16-way on tensor: head_dim takes it (layers.wk, layers.wv, kv_cache.k, ...)".
  """
  rules = list(rules)
  active = lambda axes: tuple(a for a in axes if mesh.shape.get(a, 1) > 1)  # noqa: E731
  groups: dict[tuple, list[str]] = {}
  for name, (axes, shape) in arrays.items():
    spec = tuple(parallel.logical_to_spec(axes, shape, mesh, rules))
    for logical, size, chosen in zip(axes, shape, spec):
      first_choice = next((active(_mesh_axes(m)) for l, m in rules if l == logical and active(_mesh_axes(m))), ())
      ways = math.prod(mesh.shape[a] for a in first_choice)
      # Only sizes the mesh axis does not divide: a fallback axis (head_dim) losing to its primary is by design.
      if not first_choice or _mesh_axes(chosen) == first_choice or size % ways == 0:
        continue
      takers = tuple(a for a, s in zip(axes, spec) if set(_mesh_axes(s)) & set(first_choice))
      groups.setdefault((logical, size, first_choice, _mesh_axes(chosen), takers), []).append(name)
  lines = []
  for (logical, size, first_choice, chosen, takers), names in groups.items():
    ways = math.prod(mesh.shape[a] for a in first_choice)
    instead = f"{', '.join(takers)} takes it" if takers else "it stays unused"
    fallback = f"; {logical} is sharded on {'x'.join(chosen)}" if chosen else ""
    lines.append(f"{logical}={size} cannot be split {ways}-way on {'x'.join(first_choice)}: {instead}{fallback} "
                 f"({', '.join(names)})")
  return lines


@contextlib.contextmanager
def _optimization_level(level: str | None):
  """Compiles under XLA effort level `level` ("O0".."O3"; None keeps jax's default)."""
  if level is None:
    yield
    return
  previous = jax.config.jax_optimization_level
  jax.config.update("jax_optimization_level", level)
  try:
    yield
  finally:
    jax.config.update("jax_optimization_level", previous)


def _step_memory(compiled) -> StepMemory:
  analysis = compiled.memory_analysis()
  args, out = int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes)
  alias, temp = int(analysis.alias_size_in_bytes), int(analysis.temp_size_in_bytes)
  code = int(analysis.generated_code_size_in_bytes)
  return StepMemory(args, out, alias, temp, code, args + out - alias + temp + code)


def _oom_bytes(message: str) -> int | None:
  """The required bytes in XLA's "Ran out of memory ... required (72.77G) exceeds available HBM (15.75G)"."""
  figures = _OOM_FIGURES.findall(message)
  if not figures:
    return None
  value, unit = figures[0]
  return int(float(value) * {"K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40}[unit])


def abstract_slots(model: model_lib.Llama, num_slots: int, window: int, opts: sampling.DecodeOptions, mesh: Mesh,
                   rules) -> engine.Slots:
  """The engine's decode state (`engine.empty_slots`, scanned layout) as sharded shapes: keys and values
  [L, S, kv_heads, W, head_dim] placed like the KV cache, every per-slot array split on its slot axis."""
  shapes = jax.eval_shape(lambda: engine.empty_slots(model, num_slots, window, opts, engine.CacheLayout.STACKED))
  return engine.Slots(*(
      jax.tree.map(lambda x: _abstract(x.shape, x.dtype, KV_CACHE_AXES if name in ("k", "v")
                                       else ("batch",) + (None,) * (x.ndim - 1), mesh, rules), field)
      for name, field in zip(engine.Slots._fields, shapes)))


def _replicated(shape, dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _lower_engine_programs(graphdef, state, slots: engine.Slots, config: LlamaConfig, *, chunk: int,
                           prompt_len: int, opts: sampling.DecodeOptions, dtype, mesh: Mesh, rules):
  """Lowers the engine's own jitted programs on sharded shapes; yields (name, lowered).

  prefill: `engine.prefill` of C prompts of P tokens into a fresh [C, P] cache; insert: `engine.insert` of that
  chunk into the slots; decode: `engine.decode_block`, the loop of decode steps over all S slots at window W.
  """
  sampling = engine._Sampling(seed=_replicated((), jnp.uint32, mesh), temperature=_replicated((), jnp.float32, mesh),
                              top_p=_replicated((), jnp.float32, mesh), stop_ids=_replicated((8,), jnp.int32, mesh))
  chunk_vector = _abstract((chunk,), jnp.int32, ("batch",), mesh, rules)
  ids = _abstract((chunk, prompt_len), jnp.int32, ("batch", "seq"), mesh, rules)
  empty = abstract_cache(config, chunk, prompt_len, dtype, mesh, rules)
  yield "prefill", engine.prefill.lower(graphdef, state, None, ids, chunk_vector, empty)
  kv = _abstract(model_lib.KVCache.kv_shape(config, chunk, prompt_len), dtype, KV_CACHE_AXES, mesh, rules)
  logits = _abstract((chunk, config.vocab_size), jnp.float32, ("batch", "vocab"), mesh, rules)
  yield "insert", engine.insert.lower(slots, _replicated((chunk,), jnp.int32, mesh), (kv,), (kv,), logits,
                                      chunk_vector, chunk_vector, sampling, opts=opts,
                                      layout=engine.CacheLayout.STACKED)
  yield "decode", engine.decode_block.lower(graphdef, state, None, slots, _replicated((), jnp.int32, mesh),
                                            sampling, opts=opts)


def predict(costs: Mapping[str, Mapping[str, Any]], device, *, slots: int, chunk: int, prompt_len: int,
            new_tokens: int) -> dict[str, Any]:
  """Throughput from the loop-aware costs (FLOPs, bytes accessed per device) of the decode and prefill programs.

  Each program's time is its roofline, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per device
  (`plan_cost.roofline`). decode_tokens_per_s = S / decode_step_s (one token per slot per step; the decode
  program's loop is counted as one step); prefill_tokens_per_s = C P / prefill_step_s. generate_tokens_per_s
  is the steady state of the engine: every slot is refilled once per `new_tokens` decode steps, so S x N
  tokens take N decode steps and S / C prefills (inserts, host time and finished slots' idle steps ignored).
  """
  out: dict[str, Any] = {"programs": {}}
  for name in ("decode", "prefill"):
    cost = costs[name]
    flops, bytes_accessed, method = cost["flops"], cost["bytes_accessed"], cost["method"]
    if name == "decode" and len(cost["unknown_loop_iteration"]) == 1:
      # One step is one iteration of the decode loop: what runs once per call around it (layout copies of the
      # weights or the cache, say) is not paid per token.
      (step,) = cost["unknown_loop_iteration"].values()
      flops, bytes_accessed, method = step["flops"], step["bytes_accessed"], method + ", one decode loop iteration"
    entry = {"flops": flops, "bytes_accessed": bytes_accessed, "cost_method": method,
             "unknown_loops": cost["unknown_loops"]}
    out["programs"][name] = entry | (plan_cost.roofline(flops, bytes_accessed, device) or {})
  decode, prefill = out["programs"]["decode"], out["programs"]["prefill"]
  if "step_s" not in decode:  # no published peak for this device kind
    return out | {"decode_step_s": None, "decode_tokens_per_s": None, "prefill_tokens_per_s": None,
                  "generate_tokens_per_s": None}
  cycle_s = new_tokens * decode["step_s"] + slots / chunk * prefill["step_s"]
  return out | {
      "decode_step_s": decode["step_s"], "decode_tokens_per_s": slots / decode["step_s"],
      "decode_hbm_bandwidth_utilisation": decode["hbm_bandwidth_utilisation"],
      "decode_flop_utilisation": decode["flop_utilisation"],
      "prefill_step_s": prefill["step_s"], "prefill_tokens_per_s": chunk * prompt_len / prefill["step_s"],
      "prefill_hbm_bandwidth_utilisation": prefill["hbm_bandwidth_utilisation"],
      "prefill_flop_utilisation": prefill["flop_utilisation"],
      "generate_tokens_per_s": slots * new_tokens / cycle_s}


def make_plan(model: str | LlamaConfig, *, quantization: str = "int8", topology: str | None = None,
              mesh_shape: Mapping[str, int] | None = None, slots: int = 8, max_len: int = 2048,
              prompt_len: int | None = None, prefill_chunk: int = ENGINE_PREFILL_CHUNK, topk_logprobs: int = 0,
              tail_temperatures: tuple[float, ...] = (), dtype: str = "bfloat16", hbm_fraction: float = 0.8,
              optimization_level: str | None = "O0", rules=parallel.DEFAULT_RULES) -> Plan:
  """Compiles the generation engine's prefill, insert and decode programs for `model` ahead of time and
  measures their memory and cost.

  model: a preset name or a LlamaConfig. topology: a TPU slice ("v5p:4x4x4", "v5e:1x1", "v2-8") or None for
  the live devices. mesh_shape: {"data", "fsdp", "tensor"} sizes (default `default_mesh_shape`). slots: decode
  slots S. max_len: prompt + new tokens (each slot's cache window); prompt_len: the prefill length (default
  max_len // 2). prefill_chunk: prompts per prefill (the engine's default). topk_logprobs and
  tail_temperatures: what each step records (the teacher store's k and tail temperatures; 0 and () for eval).
  optimization_level: XLA effort for the plan's compiles. "O0" compiles the 405B prefill about 2.5x faster than
  jax's default, and the per-device totals stayed within 0.6% of the default's (either way) on the required
  plans; None compiles at jax's default.
  """
  config = config_lib.get_preset(model) if isinstance(model, str) else model
  if quantization not in QUANTIZATIONS:
    raise PlanError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
  prompt_len = max_len // 2 if prompt_len is None else prompt_len
  if slots < 1 or prefill_chunk < 1 or not 0 < prompt_len < max_len:
    raise PlanError(f"need slots >= 1, prefill_chunk >= 1 and 0 < prompt_len < max_len, got {slots}, "
                    f"{prefill_chunk}, {prompt_len}, {max_len}")
  if not 0 < hbm_fraction <= 1:
    raise PlanError(f"hbm_fraction must be in (0, 1], got {hbm_fraction}")
  chunk = min(prefill_chunk, slots)
  compute_dtype = jnp.dtype(dtype)
  devices = topology_devices(topology) if topology else jax.devices()
  topology_name = resolve_topology(topology) if topology else f"live:{devices[0].platform}"
  mesh = build_mesh(mesh_shape or default_mesh_shape(len(devices), config), devices)

  abstract = abstract_serving_model(config, quantization, compute_dtype)
  graphdef, state = nnx.split(abstract)
  shardings = parallel.state_shardings(state, mesh, rules)
  state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
  new_tokens = max_len - prompt_len
  opts = sampling.DecodeOptions(max_new_tokens=new_tokens, greedy=True, top_k=0, use_top_p=False,
                                   topk_logprobs=topk_logprobs, pad_id=0, tail_temperatures=tuple(tail_temperatures))
  slot_state = abstract_slots(abstract, slots, max_len, opts, mesh, rules)

  flat_params = {".".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(state)}
  param_axes = {".".join(map(str, path)): (var.get_metadata().get("logical_axes"), tuple(var.shape))
                for path, var in nnx.to_flat_state(nnx.state(abstract))}
  cache_axes = {"kv_cache.k": (KV_CACHE_AXES, slot_state.k[0].shape), "kv_cache.v": (KV_CACHE_AXES, slot_state.v[0].shape)}
  layout = {name: str(x.sharding.spec) for name, x in flat_params.items()}
  layout |= {"kv_cache.k": str(slot_state.k[0].sharding.spec), "kv_cache.v": str(slot_state.v[0].sharding.spec)}
  param_shard_bytes = sum(_shard_bytes(x) for x in flat_params.values())
  cache_shard_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(slot_state))
  # What each program leaves resident beside its own arguments: prefill runs beside the slots, insert beside the
  # weights; decode has both as arguments.
  resident = {"prefill": cache_shard_bytes, "insert": param_shard_bytes, "decode": 0}

  hbm = device_hbm_bytes(devices[0])
  steps: dict[str, StepMemory] = {}
  costs: dict[str, dict[str, Any]] = {}
  error = None
  start = time.perf_counter()
  try:
    with _optimization_level(optimization_level):
      for name, lowered in _lower_engine_programs(graphdef, state, slot_state, config, chunk=chunk,
                                                  prompt_len=prompt_len, opts=opts, dtype=compute_dtype, mesh=mesh,
                                                  rules=rules):
        compiled = lowered.compile()
        steps[name] = _step_memory(compiled)
        if name != "insert":
          costs[name] = plan_cost.loop_aware_cost(compiled, lowered)
  except jax.errors.JaxRuntimeError as err:
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    error = next((line for line in str(err).splitlines() if "memory" in line.lower()), str(err).splitlines()[0])
  compile_seconds = time.perf_counter() - start

  phase_bytes = {name: s.total_bytes + resident[name] for name, s in steps.items()}
  if error is None:
    per_device = max(phase_bytes.values())
  else:  # the compiler's own figure, or at least what weights and slots take
    per_device = max(_oom_bytes(error) or 0, param_shard_bytes + cache_shard_bytes)
  predicted = None
  if error is None:
    predicted = predict(costs, devices[0], slots=slots, chunk=chunk, prompt_len=prompt_len, new_tokens=new_tokens)
  return Plan(
      model=config.name, quantization=quantization, dtype=compute_dtype.name, topology=topology_name,
      device_kind=devices[0].device_kind, num_devices=len(devices), mesh=dict(mesh.shape),
      slots=slots, max_len=max_len, prompt_len=prompt_len, prefill_chunk=chunk, topk_logprobs=topk_logprobs,
      param_bytes=sum(_bytes(x) for x in flat_params.values()), per_device_param_bytes=param_shard_bytes,
      per_device_cache_bytes=cache_shard_bytes, steps=steps, phase_bytes=phase_bytes,
      per_device_bytes=int(per_device), device_hbm_bytes=int(hbm), hbm_fraction=hbm_fraction,
      fits=error is None and per_device <= hbm_fraction * hbm,
      layout=layout, layout_notes=layout_notes(param_axes | cache_axes, mesh, rules),
      compile_seconds=round(compile_seconds, 2), predicted=predicted, compiler_error=error,
      hosts=host_count(devices))


def check_fits(plan: Plan) -> None:
  """Raises PlanDoesNotFit (one line) unless the plan fits in its share of HBM."""
  if plan.fits:
    return
  raise PlanDoesNotFit(
      f"{plan.model} ({plan.quantization}) with {plan.slots} slots x {plan.max_len} tokens needs "
      f"{plan.per_device_bytes / GiB:.1f} GiB per device on {plan.topology} ({plan.device_kind}), over "
      f"{plan.hbm_fraction:.0%} of its {plan.device_hbm_bytes / GiB:.1f} GiB HBM; use more chips, fewer slots "
      f"or fewer tokens")


def _size(n: int) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.2f} MiB"


def format_table(plan: Plan) -> str:
  """The plan as a short human-readable table."""
  mib = lambda n: f"{n / (1 << 20):10.1f}"  # noqa: E731
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  lines = [
      f"plan: {plan.model} {plan.quantization} ({plan.dtype} activations and KV cache) on {plan.topology}: "
      f"{plan.num_devices} x {plan.device_kind}, mesh {mesh}",
      f"      engine: {plan.slots} slots x {plan.max_len} tokens, prefill chunks of {plan.prefill_chunk} x "
      f"{plan.prompt_len}, top-{plan.topk_logprobs} recorded; compiled in {plan.compile_seconds:.1f} s",
      f"{'MiB per device':<15}{'arguments':>10}{'outputs':>10}{'aliased':>10}{'temp':>10}{'total':>10}"
      f"{'+resident':>10}",
  ]
  for name, s in plan.steps.items():
    lines.append(f"{name:<15}{mib(s.argument_bytes)}{mib(s.output_bytes)}{mib(s.alias_bytes)}"
                 f"{mib(s.temp_bytes)}{mib(s.total_bytes)}{mib(plan.phase_bytes[name])}")
  if plan.compiler_error:
    lines.append(f"compiler: {plan.compiler_error}")
  lines.append(f"weights {_size(plan.per_device_param_bytes)} + slots (KV cache) {_size(plan.per_device_cache_bytes)} "
               f"per device (all weights {_size(plan.param_bytes)})")
  verdict = "fits" if plan.fits else "DOES NOT FIT"
  lines.append(f"per device {_size(plan.per_device_bytes)} of {_size(plan.device_hbm_bytes)} HBM "
               f"({plan.per_device_bytes / plan.device_hbm_bytes:.1%}; limit {plan.hbm_fraction:.0%}): {verdict}")
  p = plan.predicted
  if p:
    for name, c in p["programs"].items():
      line = (f"{name} per device: {c['flops'] / 1e9:,.1f} GFLOP, {_size(c['bytes_accessed'])} accessed "
              f"(XLA, loops counted)")
      if "step_s" in c:
        line += (f": {c['step_s'] * 1e3:.2f} ms at {c['flop_utilisation']:.0%} of peak FLOP/s and "
                 f"{c['hbm_bandwidth_utilisation']:.0%} of HBM bandwidth")
      lines.append(line)
    if p["decode_step_s"] is not None:
      chip = p["programs"]["decode"]
      lines.append(f"predicted: decode {p['decode_tokens_per_s']:,.0f} tokens/s ({p['decode_step_s'] * 1e3:.2f} ms "
                   f"per step), prefill {p['prefill_tokens_per_s']:,.0f} tokens/s, generation with refills "
                   f"{p['generate_tokens_per_s']:,.0f} tokens/s (roofline max(FLOPs / "
                   f"{chip['peak_flops_per_s'] / 1e12:.0f} TFLOP/s, bytes / {chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s) "
                   f"per device and program: an upper bound, no collectives or host time)")
  lines += [f"layout: {note}" for note in plan.layout_notes]
  if plan.hosts > 1:
    lines.append(f"hosts: this mesh spans {plan.hosts} hosts; the generate stage runs one teacher over all of them with "
                 f"--config.teacher.spans_processes=true (every host runs every shard, host 0 writes the store)")
  return "\n".join(lines)


def print_table(plan: Plan, file: TextIO | None = None) -> None:
  print(format_table(plan), file=file or sys.stdout)


def write_plan_json(plan: Plan, path: str | os.PathLike) -> pathlib.Path:
  """Writes the plan as JSON atomically (a temporary file in the same folder, then a rename); on a pod only
  process 0 writes (every process plans the same)."""
  path = storage.path(path)
  if jax.process_index() != 0:
    return path
  storage.makedirs(path.parent)
  return storage.write_text(path, plan.to_json())
