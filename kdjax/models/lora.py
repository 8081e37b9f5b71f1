"""LoRA adapters for the kdjax Llama: adding, selecting, merging, and Hugging Face PEFT import / export.

Each adapted projection `W` ([layers, in dims..., out dims...], see `model.PROJECTIONS`) gets two stacked factors
`{name}_lora_a` [layers, in dims..., r] and `{name}_lora_b` [layers, r, out dims...] as `nnx.LoRAParam`
attributes of `model.layers`; the layer body adds `(alpha / r) * dropout(x) @ A @ B` (see `model.project`).
As in PEFT, A starts kaiming-uniform and B at zero, so a fresh adapter leaves the model unchanged.

PEFT stores each layer's factors of a linear `y = x @ W.T` as `lora_A.weight` [r, in] and `lora_B.weight`
[out, r]; kdjax's factors are the same numbers with the in / out dims flattened row-major (the layout
`weights.WEIGHT_MAP` uses for the base weights) and transposed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from kdjax.infra import parallel, storage
from kdjax.models.llama import model as model_lib
from kdjax.models.llama import weights as weights_lib

# Trainable adapters, and everything else that is a parameter (nnx.Param also matches its subclass LoRAParam).
LORA = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

# kdjax projection -> (HF module name, its parent inside a decoder layer).
HF_MODULES: dict[str, tuple[str, str]] = {
    "wq": ("q_proj", "self_attn"), "wk": ("k_proj", "self_attn"), "wv": ("v_proj", "self_attn"),
    "wo": ("o_proj", "self_attn"), "w_gate": ("gate_proj", "mlp"), "w_up": ("up_proj", "mlp"),
    "w_down": ("down_proj", "mlp"),
}
_FROM_HF = {hf: name for name, (hf, _) in HF_MODULES.items()}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model.model.layers"
# The least cosine between a merged update (`merged - W`) and the adapter's own (`scale * A @ B`) a merge accepts.
MIN_SURVIVAL = 0.99


class LoraError(ValueError):
  """A LoRA configuration, model or adapter file that cannot be used as asked."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters (defaults: the paper's r=4, alpha=8, dropout=0.1 on the attention projections).

  `targets` are kdjax projection names (wq wk wv wo w_gate w_up w_down); HF names (q_proj, ...) are accepted
  and stored as kdjax names.
  """
  rank: int = 4
  alpha: float = 8.0
  dropout: float = 0.1
  targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise LoraError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
    if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
      raise LoraError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
    if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
      raise LoraError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    names = tuple(_FROM_HF.get(t, t) for t in targets)
    unknown = [t for t, n in zip(targets, names) if n not in model_lib.PROJECTIONS]
    if unknown:
      raise LoraError(f"unknown LoRA targets {unknown}; use any of {list(model_lib.PROJECTIONS)}")
    if not names or len(set(names)) != len(names):
      raise LoraError(f"LoraConfig.targets must be non-empty and without repeats, got {targets}")
    object.__setattr__(self, "targets", names)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lora_axes(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Logical axes of `{name}_lora_a` and `{name}_lora_b`."""
  axes = model_lib.projection_axes(name)
  n_in = len(model_lib.PROJECTIONS[name][0])
  return (("layers",) + axes[1:1 + n_in] + ("lora_rank",), ("layers", "lora_rank") + axes[1 + n_in:])


def _split_dims(shape: tuple[int, ...], name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(in dims, out dims) of a projection weight of `shape` (layer axis first)."""
  n_in = len(model_lib.PROJECTIONS[name][0])
  return tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def lora_targets(model: model_lib.Llama) -> tuple[str, ...]:
  """The projections of `model` that carry a LoRA adapter, in `PROJECTIONS` order."""
  return tuple(n for n in model_lib.PROJECTIONS if hasattr(model.layers, f"{n}_lora_a"))


def lora_rank(model: model_lib.Llama) -> int:
  targets = lora_targets(model)
  if not targets:
    raise LoraError("the model has no LoRA adapters")
  return int(getattr(model.layers, f"{targets[0]}_lora_a").shape[-1])


def _place(array: np.ndarray, like: jax.Array, axes: tuple[str, ...], rules) -> jax.Array:
  """A host array as a jax array on the mesh of an existing parameter, sharded by its logical axes.

  Every process holds the same host array (it comes from a seeded generator or a file), so each device's
  shard is cut from it directly; this also works when the mesh spans several hosts.
  """
  sharding = getattr(like, "sharding", None)
  if isinstance(sharding, NamedSharding):
    target = parallel.named_sharding(axes, array.shape, sharding.mesh, rules)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])
  return jnp.asarray(array)


def add_lora(model: model_lib.Llama, cfg: LoraConfig, *, seed: int = 0, param_dtype=jnp.float32,
             rules=parallel.DEFAULT_RULES) -> model_lib.Llama:
  """Adds LoRA factors for `cfg.targets` to `model` (in place; also returned).

  A is uniform in +-1/sqrt(fan_in) (PEFT's kaiming_uniform(a=sqrt(5))), B is zero: the adapted model starts
  equal to the base. Factors are kept in `param_dtype` (float32 by default, whatever the base dtype) and placed
  on the base weights' mesh when those are sharded.
  """
  existing = lora_targets(model)
  if existing:
    raise LoraError(f"the model already has LoRA adapters on {list(existing)}; merge or remove them first")
  for name in cfg.targets:
    base = getattr(model.layers, name)
    ins, outs = _split_dims(tuple(base.shape), name)
    layers = base.shape[0]
    bound = 1.0 / math.sqrt(math.prod(ins))
    # numpy, not jax.random: eager jax.random compiles once per shape, which dominates small models' set-up.
    rng = np.random.default_rng([seed, list(model_lib.PROJECTIONS).index(name)])
    a = rng.uniform(-bound, bound, (layers,) + ins + (cfg.rank,)).astype(param_dtype)
    b = np.zeros((layers, cfg.rank) + outs, param_dtype)
    a_axes, b_axes = lora_axes(name)
    setattr(model.layers, f"{name}_lora_a",
            nnx.LoRAParam(_place(a, base[...], a_axes, rules), logical_axes=a_axes))
    setattr(model.layers, f"{name}_lora_b",
            nnx.LoRAParam(_place(b, base[...], b_axes, rules), logical_axes=b_axes))
  model.lora_scale = cfg.scale
  model.lora_dropout = float(cfg.dropout)
  return model


def remove_lora(model: model_lib.Llama) -> model_lib.Llama:
  """Drops every LoRA factor from `model` (in place), leaving the base model."""
  for name in lora_targets(model):
    delattr(model.layers, f"{name}_lora_a")
    delattr(model.layers, f"{name}_lora_b")
  model.lora_scale = 0.0
  model.lora_dropout = 0.0
  return model


def lora_state(model: nnx.Module) -> nnx.State:
  """The trainable LoRA variables of `model` (what the optimizer holds and what a checkpoint of them saves)."""
  return nnx.state(model, LORA)


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, LoRA state, everything else): `nnx.merge(graphdef, lora, rest)` rebuilds the model.

  Differentiate with respect to the LoRA state only, so no gradient of the frozen base is ever computed.
  """
  return nnx.split(model, LORA, ...)


def lora_delta(model: model_lib.Llama, name: str) -> jax.Array:
  """`scale * A @ B` of projection `name`, shaped like its weight [layers, in dims..., out dims...] (float32)."""
  a = getattr(model.layers, f"{name}_lora_a")[...]
  b = getattr(model.layers, f"{name}_lora_b")[...]
  layers, rank = a.shape[0], a.shape[-1]
  ins, outs = a.shape[1:-1], b.shape[2:]
  delta = jnp.matmul(a.reshape(layers, -1, rank).astype(jnp.float32),
                     b.reshape(layers, rank, -1).astype(jnp.float32))
  return (model.lora_scale * delta).reshape((layers,) + ins + outs)


def relative_update_norms(model: model_lib.Llama) -> dict[str, float]:
  """`||scale * A @ B||_F / ||W||_F` of every adapted projection in every layer, keyed "<layer>.<target>".

  How far the adapter moved each weight, relative to the weight (an int8 base counts dequantised). The
  update's norm comes from the r x r Gram matrices, `||A B||_F^2 = sum((A^T A) * (B B^T))`, so the
  [in, out] product is never formed; every reduction runs on the arrays' devices in float32.
  """
  out = {}
  for name in lora_targets(model):
    a = getattr(model.layers, f"{name}_lora_a")[...]
    b = getattr(model.layers, f"{name}_lora_b")[...]
    w = getattr(model.layers, name)[...]
    w_scale = getattr(model.layers, f"{name}_scale")[...] if hasattr(model.layers, f"{name}_scale") else None
    update, base = _update_and_weight_norms(a, b, w, w_scale, len(model_lib.PROJECTIONS[name][0]))
    ratio = model.lora_scale * _to_host(update) / _to_host(base)
    out.update({f"{layer}.{name}": float(value) for layer, value in enumerate(ratio)})
  return out


def _to_host(x: jax.Array, dtype=np.float64) -> np.ndarray:
  if not x.is_fully_addressable:  # a multi-host mesh: every process gets the whole (small) array
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), dtype)


@functools.partial(jax.jit, static_argnums=4)
def _update_and_weight_norms(a, b, w, w_scale, num_in_dims):
  layers, rank = a.shape[0], a.shape[-1]
  a = a.reshape(layers, -1, rank).astype(jnp.float32)
  b = b.reshape(layers, rank, -1).astype(jnp.float32)
  gram = jnp.einsum("lir,lis->lrs", a, a) * jnp.einsum("lro,lso->lrs", b, b)
  update = jnp.sqrt(jnp.maximum(gram.sum((1, 2)), 0.0))
  w = w.astype(jnp.float32)
  if w_scale is not None:  # [layers, out dims...] per output channel: broadcast over the input dims
    w = w * jnp.expand_dims(w_scale.astype(jnp.float32), tuple(range(1, 1 + num_in_dims)))
  return update, jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(1, w.ndim))))


def merge_lora(model: model_lib.Llama, *, inplace: bool = False, dtype=None,
               instead: str = "merge into float32 weights, or keep the adapter unmerged (LoRA on the frozen base)"
               ) -> model_lib.Llama:
  """The model with `W += (alpha / r) * A @ B` for every adapted projection and the LoRA factors removed.

  With `inplace=False` (default) the input is untouched: the result shares every unmerged array with it (jax
  arrays are immutable), so only the merged projections take new memory. The sum is formed in float32 and cast to
  `dtype` (default: the base weight's). A rounding that keeps too little of the update (`update_survival` below
  `MIN_SURVIVAL`: bfloat16 weights under a small update) raises LoraError, one line ending with `instead`, before
  the model is changed. int8 weight-only bases cannot be merged (the update is not per-channel), which raises
  LoraError: merge into a float copy of the base instead.
  """
  targets = lora_targets(model)
  if not targets:
    raise LoraError("the model has no LoRA adapters to merge")
  quantised = [n for n in targets if hasattr(model.layers, f"{n}_scale")]
  if quantised:
    raise LoraError(f"cannot merge LoRA into int8-quantised weights {quantised}; merge needs a float base")
  merged = _merged_weights(model, dtype)
  survival = _survival(model, merged)
  worst = min(survival, key=survival.get)
  if survival[worst] < MIN_SURVIVAL:
    layer, name = worst.split(".")
    raise LoraError(f"a merge into {jnp.dtype(merged[name].dtype).name} weights keeps too little of the adapter's "
                    f"update (layer {layer} {name}: cosine {survival[worst]:.3f} < {MIN_SURVIVAL} with scale * B @ A)"
                    f": {instead}")
  if not inplace:
    model = nnx.clone(model)  # new Variables over the same (immutable) arrays: no array is copied
  for name in targets:
    var = getattr(model.layers, name)
    value = merged[name]
    if isinstance(getattr(var[...], "sharding", None), NamedSharding):
      value = jax.device_put(value, var[...].sharding)
    var.set_value(value)
  return remove_lora(model)


def update_survival(model: model_lib.Llama, dtype=None) -> dict[str, float]:
  """How much of the adapter's update a merge rounded to `dtype` (default: each weight's own) keeps, keyed
  "<layer>.<target>": the cosine of `merged - W` with `scale * A @ B`, in float64 on the host (1.0 where the
  update is zero). bfloat16 keeps 8 significant bits, so an update of 3e-4 of a weight (a short fine-tune's) mostly
  rounds away: on SmolLM2's wq, 91% of the elements stay unchanged and the cosine is about 0.4."""
  return _survival(model, _merged_weights(model, dtype))


def _merged_weights(model: model_lib.Llama, dtype) -> dict[str, jax.Array]:
  """{target: W + scale * A @ B}, summed in float32 and cast to `dtype` (None: the weight's own dtype)."""
  merged = {}
  for name in lora_targets(model):
    weight = getattr(model.layers, name)[...]
    merged[name] = (weight.astype(jnp.float32) + lora_delta(model, name)).astype(dtype or weight.dtype)
  return merged


def _survival(model: model_lib.Llama, merged: dict[str, jax.Array]) -> dict[str, float]:
  """`update_survival` of the merged weights `merged` ({target: [layers, ...]}), one layer at a time on the host."""
  out = {}
  for name, value in merged.items():
    weight = getattr(model.layers, name)[...]
    a = getattr(model.layers, f"{name}_lora_a")[...]
    b = getattr(model.layers, f"{name}_lora_b")[...]
    rank = a.shape[-1]
    for layer in range(weight.shape[0]):
      intended = model.lora_scale * (_layer_to_host(a, layer).reshape(-1, rank) @
                                     _layer_to_host(b, layer).reshape(rank, -1))
      kept = (_layer_to_host(value, layer) - _layer_to_host(weight, layer)).reshape(intended.shape)
      norms = np.linalg.norm(kept) * np.linalg.norm(intended)
      out[f"{layer}.{name}"] = 1.0 if not intended.any() else float(np.sum(kept * intended) / norms) if norms else 0.0
  return out


def _layer_to_host(x: jax.Array, layer: int) -> np.ndarray:
  """One layer of a stacked array, in float64 on the host (gathered first when it spans several processes)."""
  if not x.is_fully_addressable:
    return _to_host(x)[layer]
  return np.asarray(jax.device_get(x[layer]), np.float64)


# ------------------------------------------------------------------------------------------ PEFT format

def _hf_module_path(name: str, layer: int) -> str:
  module, parent = HF_MODULES[name]
  return f"{_PEFT_PREFIX}.{layer}.{parent}.{module}"


def peft_tensors(model: model_lib.Llama) -> dict[str, np.ndarray]:
  """Every LoRA factor in PEFT's saved layout: `...q_proj.lora_A.weight` [r, in], `...lora_B.weight` [out, r].

  Factors spread over several processes are gathered: a collective, so every process calls it."""
  out = {}
  for name in lora_targets(model):
    a = _to_host(getattr(model.layers, f"{name}_lora_a")[...], np.float32)
    b = _to_host(getattr(model.layers, f"{name}_lora_b")[...], np.float32)
    layers, rank = a.shape[0], a.shape[-1]
    a_hf = a.reshape(layers, -1, rank).transpose(0, 2, 1)  # [L, r, in_flat]
    b_hf = b.reshape(layers, rank, -1).transpose(0, 2, 1)  # [L, out_flat, r]
    for layer in range(layers):
      path = _hf_module_path(name, layer)
      out[f"{path}.lora_A.weight"] = np.ascontiguousarray(a_hf[layer])
      out[f"{path}.lora_B.weight"] = np.ascontiguousarray(b_hf[layer])
  return out


def peft_config(model: model_lib.Llama, *, base_model_name_or_path: str | None = None) -> dict[str, Any]:
  """The `adapter_config.json` dict PEFT writes for an equivalent `LoraConfig` (fields PEFT reads)."""
  targets = lora_targets(model)
  if not targets:
    raise LoraError("the model has no LoRA adapters to export")
  rank = lora_rank(model)
  alpha = round(model.lora_scale * rank, 6)  # the model keeps alpha / r; undo the division's rounding
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": rank,
      "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": model.lora_dropout,
      "target_modules": [HF_MODULES[n][0] for n in targets],
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "use_rslora": False,
      "use_dora": False,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "revision": None,
  }


def export_peft(model: model_lib.Llama, directory: str | os.PathLike, *,
                base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes `model`'s adapters as a PEFT LoRA adapter directory (`PeftModel.from_pretrained` loads it).

  The weights are written before the config, so a directory with an `adapter_config.json` is complete. On several
  processes every one calls it (the factors are gathered) and process 0 alone writes.
  """
  from safetensors.numpy import save
  config = peft_config(model, base_model_name_or_path=base_model_name_or_path)
  tensors = peft_tensors(model)
  directory = storage.path(directory)
  if jax.process_index() != 0:
    return directory
  directory = storage.makedirs(directory)
  storage.write_bytes(directory / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
  storage.write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2))
  return directory


def read_peft_config(directory: str | os.PathLike) -> LoraConfig:
  """The LoraConfig of a PEFT LoRA adapter directory; LoraError (one line) for a missing file or an option kdjax
  does not support. Reads only `adapter_config.json`: a cheap check before any model is loaded."""
  directory = storage.path(directory)
  config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
  if not config_path.exists() or not weights_path.exists():
    raise LoraError(f"{directory}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT LoRA adapter folder)")
  try:
    hf = json.loads(config_path.read_text())
  except ValueError as e:
    raise LoraError(f"{config_path}: not JSON ({e})") from None
  if not isinstance(hf, dict) or hf.get("peft_type") != "LORA":
    raise LoraError(f"{directory}: peft_type {hf.get('peft_type') if isinstance(hf, dict) else None!r} is not LORA")
  unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                             "modules_to_save", "fan_in_fan_out") if hf.get(k)]
  if unsupported or hf.get("bias", "none") != "none":
    raise LoraError(f"{directory}: unsupported PEFT options {unsupported or ['bias']}")
  targets = hf.get("target_modules") or []
  targets = [targets] if isinstance(targets, str) else list(targets)
  if not targets or any(t not in _FROM_HF for t in targets):
    raise LoraError(f"{directory}: target_modules {targets} include modules kdjax does not adapt")
  try:
    return LoraConfig(rank=int(hf["r"]), alpha=float(hf["lora_alpha"]), dropout=float(hf.get("lora_dropout", 0.0)),
                      targets=tuple(t for t in _FROM_HF if t in targets))  # kdjax order
  except (KeyError, TypeError, ValueError) as e:
    raise LoraError(f"{directory}: adapter_config.json has no usable r / lora_alpha ({e})") from None


def read_peft(directory: str | os.PathLike,
              model: model_lib.Llama) -> tuple[LoraConfig, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """(LoraConfig, {projection: (A [layers, in dims..., r], B [layers, r, out dims...])}) of a PEFT adapter,
  every tensor checked against `model`'s projection shapes (an abstract model will do: `check_peft`)."""
  from safetensors.numpy import load
  cfg = read_peft_config(directory)
  directory = storage.path(directory)
  try:
    tensors = load((directory / ADAPTER_WEIGHTS).read_bytes())
  except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
    raise LoraError(f"{directory / ADAPTER_WEIGHTS}: unreadable ({type(e).__name__}: {e})") from None
  # PEFT versions differ in whether the adapter name appears in saved keys; accept ".lora_A.default.weight".
  tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
  factors = {}
  for name in cfg.targets:
    base = getattr(model.layers, name)
    ins, outs = _split_dims(tuple(base.shape), name)
    rank, in_flat, out_flat = cfg.rank, math.prod(ins), math.prod(outs)
    a_layers, b_layers = [], []
    for layer in range(base.shape[0]):
      path = _hf_module_path(name, layer)
      try:
        a_hf, b_hf = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
      except KeyError as e:
        raise LoraError(f"{directory}: tensor {e.args[0]} is missing") from None
      if a_hf.shape != (rank, in_flat) or b_hf.shape != (out_flat, rank):
        raise LoraError(f"{directory}: {path} has lora_A {a_hf.shape} / lora_B {b_hf.shape}, model expects "
                        f"{(rank, in_flat)} / {(out_flat, rank)}")
      a_layers.append(a_hf.T.reshape(ins + (rank,)))
      b_layers.append(b_hf.T.reshape((rank,) + outs))
    factors[name] = (np.stack(a_layers), np.stack(b_layers))
  return cfg, factors


def check_peft(directory: str | os.PathLike, config: "model_lib.LlamaConfig") -> LoraConfig:
  """Checks a PEFT adapter against a model config without loading the model (its shapes only); LoraError."""
  return read_peft(directory, model_lib.abstract_model(config))[0]


def import_peft(model: model_lib.Llama, directory: str | os.PathLike, *,
                rules=parallel.DEFAULT_RULES) -> model_lib.Llama:
  """Loads a PEFT LoRA adapter directory into `model` (in place), replacing any adapters it had.

  Supports plain LoRA on the seven Llama projections with one rank and alpha for all of them.
  """
  cfg, factors = read_peft(directory, model)  # read and check everything before the model is touched
  remove_lora(model)
  add_lora(model, cfg, rules=rules)
  for name, arrays in factors.items():
    for suffix, values in zip(("_lora_a", "_lora_b"), arrays):
      var = getattr(model.layers, name + suffix)
      axes = var.get_metadata()["logical_axes"]
      var.set_value(_place(values.astype(var[...].dtype), getattr(model.layers, name)[...], axes, rules))
  return model


def export_merged_hf(model: model_lib.Llama, directory: str | os.PathLike, *, dtype=np.float32,
                     **export_kwargs) -> pathlib.Path:
  """Merges the adapters into a copy of the weights, in `dtype` (float32: whatever the base's dtype, the update is
  kept), and writes a Hugging Face directory of `dtype` tensors. A `dtype` that loses the update (`merge_lora`)
  is refused in one line before anything is written."""
  merged = merge_lora(model, dtype=dtype, instead="export in float32 (the default), or keep the adapter unmerged "
                                                  "(teacher.adapter loads it as LoRA on the teacher)")
  return weights_lib.export_hf(merged, directory, dtype=dtype, **export_kwargs)
