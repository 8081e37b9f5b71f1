"""The conversion command line: HF safetensors or GGUF to a kdjax (Orbax) checkpoint, or back to HF.

  python -m kdjax.convert --source=path/to/hf_dir_or.gguf --output=ckpt/ [--dtype=bfloat16] [--quantize]
  python -m kdjax.convert --source=ckpt/ --export_hf=hf_out/
  python -m kdjax.convert --source=smollm2            # fetches SmolLM2-135M-Instruct first
  python -m kdjax.convert --source=smollm2 --adapter=runs/x/arms/finetune/adapter --output=ckpt/

What a conversion does, and its record, are `kdjax.experiment.conversion`'s; this module reads the flags.
"""

from __future__ import annotations

import sys

from absl import app, flags

from kdjax.experiment.conversion import conversion_record, convert  # noqa: F401 (the library's API, here too)

_SOURCE = flags.DEFINE_string("source", None, "HF directory, .gguf file, kdjax checkpoint, or 'smollm2'.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the kdjax checkpoint.")
_EXPORT_HF = flags.DEFINE_string("export_hf", None, "Also write an HF safetensors directory here.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_QUANTIZE = flags.DEFINE_bool("quantize", False, "int8 weight-only quantization while loading.")
_ADAPTER = flags.DEFINE_string("adapter", None, "PEFT LoRA adapter folder: merged into float32 weights, kept "
                                "unmerged beside bfloat16 or int8 ones.")


def main(argv):
  del argv
  if not _SOURCE.value:
    raise app.UsageError("--source is required")
  if not _OUTPUT.value and not _EXPORT_HF.value:
    raise app.UsageError("give --output and/or --export_hf")
  try:
    convert(_SOURCE.value, _OUTPUT.value, _EXPORT_HF.value, _DTYPE.value, _QUANTIZE.value, adapter=_ADAPTER.value)
  except (ValueError, OSError) as e:  # CheckpointError, UnsupportedArchitecture, GGUF errors, missing files
    print(f"kdjax.convert: error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
