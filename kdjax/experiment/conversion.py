"""Conversion of an HF safetensors directory or a GGUF file into a kdjax (Orbax) checkpoint, or back to HF: the
convert stage's work and its provenance record (the command line is `python -m kdjax.convert`).

`--adapter`: a PEFT LoRA adapter folder (as the train stage exports it): a fine-tuned teacher (`teacher.adapter`).
Into float32 weights (not quantized) it is merged, `W + (alpha / r) B A` in float32, which keeps the update and the
fast CPU decode (`serving.cpu.packed_weights` packs plain float32 weights only). bfloat16 or int8 weights cannot hold a small
update (3e-4 of a weight mostly rounds away in bfloat16), so there the base is converted as usual and the adapter
is copied into the checkpoint unmerged: loading it attaches the adapter as LoRA on the frozen base
(kdjax/models/checkpoint.py), and the pipeline's teacher then computes in float32 (`pipeline.load_role`). Every merge is
measured (`lora.merge_lora`) and refused in one line below a cosine of 0.99 with the adapter's update; `--export_hf`
with an adapter writes float32 weights with the adapter merged. The adapter is checked against the source's shapes
before any weight is read.
Tensors are read one at a time onto their target sharding; a progress bar counts them. The output folder holds
provenance.json (kdjax/experiment/provenance.py: the source's content identity, quantization and dtype), written before the
conversion starts: converting another source, or the same one otherwise, into a folder made before is refused.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from kdjax.infra import storage

def resolve_source(source: str) -> pathlib.Path:
  if source == "smollm2":
    from kdjax.infra import fetch
    return fetch.smollm2_gguf()
  return storage.path(source)


def adapter_unmerged(dtype: str, quantize: bool) -> bool:
  """Whether a conversion keeps its adapter unmerged (bfloat16 or int8 weights) rather than merging it (float32)."""
  return bool(quantize) or dtype != "float32"


def conversion_record(source: str, *, dtype: str, quantize: bool, output: str | None = None,
                      adapter: str | None = None) -> dict:
  """The provenance record of converting `source` (its bytes, not its path or mtime) with these settings.

  `adapter`: a fine-tuned teacher's PEFT adapter; its files' content hash is the setting "adapter" (absent
  without one, so records of plain conversions are unchanged), and every record embedding this one (a store's, a
  training's) changes with it. Kept unmerged (`adapter_unmerged`), it adds "adapter_unmerged": true, so a teacher
  that an older kdjax merged into bfloat16 or int8 weights (losing most of the update) is not reused.

  `output`: the folder it converts into; the source files whose stamps its record holds unchanged are not read
  again (provenance.source_identity), so deciding that a finished conversion is current costs no source reads."""
  from kdjax.experiment import provenance
  known = None
  if output:
    try:
      known = (provenance.read(output) or {}).get("source")
    except provenance.ProvenanceError:  # an unreadable record: hash everything; claim then says what to do
      known = None
  applied = {"adapter": provenance.folder_content(adapter)} if adapter else {}
  if adapter and adapter_unmerged(dtype, quantize):
    applied["adapter_unmerged"] = True
  return provenance.make_record("convert", settings={"quantize": bool(quantize), "param_dtype": dtype, **applied},
                                source=provenance.source_identity(resolve_source(source), known=known))


def convert(source: str, output: str | None, export_hf: str | None = None, dtype: str = "float32",
            quantize: bool = False, record: dict | None = None, mesh=None, adapter: str | None = None) -> None:
  """Converts `source` into `output` (and/or exports HF safetensors); `record`: its provenance, if already made;
  `adapter`: a PEFT LoRA adapter folder, merged into float32 weights or kept unmerged beside others (module doc).

  `mesh`: where the tensors are read to (default: one local device). On several processes give a mesh of every
  process's devices: Orbax then writes each array shard once, from the one process that holds it."""
  from tqdm import tqdm

  from kdjax.models import checkpoint
  from kdjax.experiment import provenance
  from kdjax.models import lora
  from kdjax.models.llama import weights

  path = resolve_source(source)
  finished = bool(output) and checkpoint.is_kdjax_checkpoint(output)
  merge = bool(adapter) and not finished and not adapter_unmerged(dtype, quantize)
  keep = bool(adapter) and not finished and not merge
  if output and not finished and checkpoint.is_kdjax_checkpoint(path) and checkpoint.read_metadata(path).get("adapter"):
    raise lora.LoraError(f"{path} holds an unmerged adapter: convert its base source with --adapter (in a "
                         f"run: teacher.source and teacher.adapter)")
  if adapter:  # a missing, malformed or misfitting adapter: one line before the output folder is claimed
    lora.read_peft_config(adapter)
    if not finished:
      _check_adapter(path, adapter, merge=merge)
    if export_hf and quantize:
      raise lora.LoraError(f"--export_hf merges the adapter {adapter} into float weights: export without --quantize")
  if output:
    expected = record if record is not None else conversion_record(source, dtype=dtype, quantize=quantize,
                                                                      output=output, adapter=adapter)
    provenance.claim(output, str(output), expected, writer=_is_process_zero())
  if finished:
    print(f"kdjax.convert: {output} is already a finished checkpoint; nothing to do")
    if not export_hf:
      return
    path = storage.path(output)
  start = time.time()
  src_params = None
  if not checkpoint.is_kdjax_checkpoint(path):
    src = weights.open_source(path)
    config = weights.config_from_source(src)
    src_params = weights.model_params(config)
    weights.check_source(src, config, src_params)  # fail with one line before the progress bar starts
  bar = tqdm(total=len(src_params) if src_params else None, desc="convert", unit="tensor")
  model, config = checkpoint.load_model(path, dtype=dtype, quantize=quantize, mesh=mesh,
                                        progress=lambda name: (bar.update(1), bar.set_postfix_str(name)))
  bar.close()
  if merge:  # float32: the update is kept (measured by merge_lora)
    lora.merge_lora(lora.import_peft(model, adapter), inplace=True)
    print(f"kdjax.convert: merged the LoRA adapter {adapter}")
  if output and not finished:
    tokenizer = None
    try:
      tokenizer = checkpoint.load_tokenizer(path)
    except Exception as e:  # a weights-only directory is still convertible; say why the tokenizer is absent
      print(f"kdjax.convert: no tokenizer saved ({e.__class__.__name__}: {e})", file=sys.stderr)
    checkpoint.save_model(model, output, tokenizer=tokenizer, extra={"source": str(storage.path(path, absolute=True))},
                          adapter=adapter if keep else None)
    print(f"kdjax.convert: wrote {output} ({config.num_params / 1e6:.1f}M parameters, "
          f"{time.time() - start:.1f}s){f'; the LoRA adapter {adapter} kept unmerged' if keep else ''}")
  if export_hf:
    if keep:
      lora.import_peft(model, adapter)
    if lora.lora_targets(model):  # an adapter kept unmerged here or in the source checkpoint: merged in float32
      lora.export_merged_hf(model, export_hf)
    else:
      weights.export_hf(model, export_hf)
    print(f"kdjax.convert: exported HF safetensors to {export_hf}")


def _check_adapter(path, adapter: str, *, merge: bool) -> None:
  """Refuses, before any weight is read, an adapter whose shapes do not fit the source, or a merge into an int8
  checkpoint (a merge needs the float weights): lora.LoraError, one line."""
  from kdjax.models import checkpoint
  from kdjax.models import lora
  from kdjax.models.llama import weights
  from kdjax.models.llama.config import LlamaConfig
  if checkpoint.is_kdjax_checkpoint(path):
    meta = checkpoint.read_metadata(path)
    if meta.get("quantized") and merge:
      raise lora.LoraError(f"{path} is an int8 checkpoint: merge the adapter {adapter} into its float source "
                           f"(or keep it unmerged: convert with --quantize)")
    config = LlamaConfig.from_json(json.dumps(meta["config"]))
  else:
    config = weights.config_from_source(weights.open_source(path))
  lora.check_peft(adapter, config)


def _is_process_zero() -> bool:
  import jax
  return jax.process_index() == 0
