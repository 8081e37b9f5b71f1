"""kdjax model checkpoints (Orbax) and the one `load_model` that reads every supported source.

A kdjax checkpoint is a folder:
  params/            Orbax checkpoint of the model state (parameters, int8 scales, LoRA factors if any)
  tokenizer/         the tokenizer, saved with `save_pretrained` (when known at conversion time)
  adapter/           a PEFT LoRA adapter kept unmerged (`convert --adapter` on bfloat16 or int8 weights): loading
                     the checkpoint attaches it to the restored weights as LoRA (`lora.import_peft`)
  kdjax_model.json   config and dtypes; written last, so a folder without it is an unfinished conversion
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.infra import parallel, storage
from kdjax.models.llama import model as model_lib
from kdjax.models.llama import weights
from kdjax.models.llama.config import LlamaConfig

METADATA_FILE = "kdjax_model.json"
ADAPTER_DIR = "adapter"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str | Any):
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
  return DTYPES[name]


def is_kdjax_checkpoint(path: str | os.PathLike) -> bool:
  return (storage.path(path) / METADATA_FILE).exists()


def save_model(model: model_lib.Llama, directory: str | os.PathLike, *, tokenizer=None,
               extra: dict | None = None, adapter: str | os.PathLike | None = None) -> pathlib.Path:
  """Saves `model` (sharded arrays are written by each host's shards) as a kdjax checkpoint; `adapter`: a PEFT
  LoRA adapter folder copied into it byte for byte, which `restore_model` attaches unmerged."""
  import orbax.checkpoint as ocp
  directory = storage.path(directory, absolute=True)
  if (directory / METADATA_FILE).exists():
    raise FileExistsError(f"{directory} already holds a kdjax checkpoint")
  if (directory / "params").exists() and jax.process_index() == 0:  # left by an interrupted conversion
    storage.remove_tree(directory / "params")
  parallel.sync("kdjax.models.checkpoint:cleared")  # no process starts writing before the old part is gone
  storage.makedirs(directory)
  state = nnx.state(model)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "params", state)
    checkpointer.wait_until_finished()
  if tokenizer is not None and jax.process_index() == 0:
    with storage.staged_dir(directory / "tokenizer") as folder:
      tokenizer.save_pretrained(str(folder))
  if adapter is not None and jax.process_index() == 0:
    from kdjax.models import lora
    storage.makedirs(directory / ADAPTER_DIR)
    for name in (lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG):  # the config last: it marks a complete adapter
      storage.write_bytes(directory / ADAPTER_DIR / name, (storage.path(adapter) / name).read_bytes())
  if jax.process_index() == 0:
    meta = {"config": json.loads(model.config.to_json()),
            "param_dtype": str(jnp.dtype(model.embed[...].dtype)),
            "quantized": any(name.endswith("_scale") for name in model.layers.arrays()),
            **({"adapter": ADAPTER_DIR} if adapter is not None else {}), **(extra or {})}
    storage.write_text(directory / METADATA_FILE, json.dumps(meta, indent=2))
  return directory


def read_metadata(directory: str | os.PathLike) -> dict:
  path = storage.path(directory) / METADATA_FILE
  if not path.exists():
    raise weights.CheckpointError(f"{directory}: not a finished kdjax checkpoint (no {METADATA_FILE})")
  return json.loads(path.read_text())


def restore_model(directory: str | os.PathLike, *, dtype=jnp.float32, mesh=None,
                  rules=parallel.DEFAULT_RULES, remat: bool = False) -> model_lib.Llama:
  """Restores a kdjax checkpoint straight onto `mesh` (each host reads its own shards), with its unmerged
  adapter, if it holds one, as LoRA factors (float32) on the restored weights."""
  import orbax.checkpoint as ocp
  directory = storage.path(directory, absolute=True)
  meta = read_metadata(directory)
  config = LlamaConfig.from_json(json.dumps(meta["config"]))
  param_dtype = dtype_of(meta["param_dtype"])

  def build():
    model = model_lib.init_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    if meta.get("quantized"):
      from kdjax.models import quantization
      quantization.quantize_model(model)
    return model

  abstract = nnx.eval_shape(build)
  if mesh is None:
    mesh = parallel.make_mesh({"fsdp": 1}, devices=jax.local_devices()[:1])
  graphdef, state = nnx.split(abstract)
  shardings = parallel.state_shardings(state, mesh, rules)
  target = jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_raw_value().shape, v.get_raw_value().dtype,
                                                  sharding=s.get_raw_value())),
      state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory / "params", target)
  model = nnx.merge(graphdef, restored)
  if meta.get("adapter"):
    from kdjax.models import lora
    lora.import_peft(model, directory / meta["adapter"], rules=rules)
  return model


def load_model(source: str | os.PathLike, *, dtype="float32", param_dtype=None, mesh=None,
               rules=parallel.DEFAULT_RULES, quantize: bool = False, remat: bool = False,
               progress: Callable[[str], None] | None = None) -> tuple[model_lib.Llama, LlamaConfig]:
  """Loads a Llama from an HF safetensors directory, a `.gguf` file or a kdjax checkpoint.

  Returns `(model, config)`; `model(input_ids)` gives float32 logits. `dtype` is the compute dtype;
  parameters are stored in `param_dtype` (default: `dtype`).
  """
  dtype = dtype_of(dtype)
  param_dtype = dtype_of(param_dtype) if param_dtype is not None else dtype
  path = storage.path(source)
  if not path.exists():
    raise weights.CheckpointError(f"{source}: no such file or directory")
  if is_kdjax_checkpoint(path):
    model = restore_model(path, dtype=dtype, mesh=mesh, rules=rules, remat=remat)
    return model, model.config
  path = storage.local_copy(path)  # HF folders and GGUF files are read by name (memory maps)
  src = weights.open_source(path)
  config = weights.config_from_source(src, name=path.stem if path.suffix == ".gguf" else path.name)
  kwargs: dict[str, Any] = dict(mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                progress=progress)
  if quantize:
    kwargs["quantize"] = True
  model = weights.load_into_model(src, config, **kwargs)
  return model, config


def load_tokenizer(source: str | os.PathLike):
  """The transformers tokenizer (with its chat template) belonging to `source`."""
  from transformers import AutoTokenizer
  path = storage.path(source)
  if path.suffix == ".gguf":
    path = storage.local_copy(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  if is_kdjax_checkpoint(path):
    meta = read_metadata(path)
    if (path / "tokenizer").exists():
      return AutoTokenizer.from_pretrained(str(storage.local_copy(path / "tokenizer")))
    if meta.get("source"):
      return load_tokenizer(meta["source"])
    raise weights.CheckpointError(f"{path}: checkpoint has no tokenizer and no recorded source")
  if path.is_dir():
    return AutoTokenizer.from_pretrained(str(storage.local_copy(path)))
  raise weights.CheckpointError(f"{source}: no tokenizer found (expected a .gguf, an HF or a kdjax directory)")
