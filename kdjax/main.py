"""kdjax's command line: `python -m kdjax.main --config=configs/gt.py --config.some.key=value`.

With no --config it runs the CPU demo (configs/demo.py). See kdjax/pipeline.py for the stages and the work folder.
"""

import os
import pathlib
import re
import sys


def _default_platform() -> None:
  """Without a TPU, keep an installed libtpu from probing for one (slow, noisy); GPUs are left to jax."""
  if "JAX_PLATFORMS" in os.environ:
    return
  has_tpu = any(pathlib.Path("/dev").glob("accel*")) or pathlib.Path("/dev/vfio").exists()
  has_gpu = any(pathlib.Path("/dev").glob("nvidia[0-9]*"))
  if not has_tpu and not has_gpu:
    os.environ["JAX_PLATFORMS"] = "cpu"


def _several_processes() -> bool:
  """Whether this is one of several jax.distributed processes (set by environment or flag)."""
  if int(os.environ.get("KDJAX_NUM_PROCESSES") or 1) > 1:
    return True
  flag = "--config.distributed.num_processes="
  return any(a.startswith(flag) and a[len(flag):].isdigit() and int(a[len(flag):]) > 1 for a in sys.argv)


_default_platform()
# Before jax starts its threads: XLA:CPU then reuses its step buffers. One process only: the kept heap is a
# process's peak, and processes sharing a host (the pod simulation of tests/test_pod.py) would each hold theirs
# (measured there: 11.4 GB peak in train with it, 7.3 GB without, and the step no faster with it).
if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu" and not _several_processes():
  from kdjax.infra import hostmem
  hostmem.keep_freed_memory()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEMO = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py).",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every read and write at INFO
    logging.set_verbosity(logging.WARNING)
  from kdjax.experiment import pipeline
  try:
    pipeline.run(_CONFIG.value)
  except (ValueError, OSError, KeyError) as e:  # config, data, checkpoint and plan errors: one line, exit 2
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"kdjax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl's parser, but a bad override (unknown key, wrong type) is one line and exit 2, before any work."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        print(f"kdjax: error: config file not found: {path}", file=sys.stderr)
        sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"kdjax: error: {str(e).splitlines()[0]}", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the schema does not have
    print(f"kdjax: error: {_unknown_key_message(e, argv[1:])}", file=sys.stderr)
  sys.exit(2)


def _unknown_key_message(error: Exception, args: list[str]) -> str:
  """ml_collections' "'batch_sizee'\nDid you mean "batch_size" instead of ..." as one line with the full key."""
  while error.args and isinstance(error.args[0], Exception):  # an AttributeError wrapping the KeyError
    error = error.args[0]
  raw = str(error.args[0]) if error.args else str(error)
  key = (raw.splitlines() or [""])[0].strip().strip("\"'")
  suggestion = re.search(r'Did you mean "([^"]+)"', raw)
  for arg in args:
    if not arg.startswith("--config."):
      continue
    parts = arg.split("=", 1)[0][len("--config."):].split(".")
    if key in parts:
      dotted = ".".join(parts)
      if suggestion:
        parts[parts.index(key)] = suggestion.group(1)
        return f"unknown config key {dotted!r} (did you mean {'.'.join(parts)!r}?); see kdjax/config.py"
      return f"unknown config key {dotted!r}; see kdjax/config.py"
  return f"unknown config key {key!r}; see kdjax/config.py"


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
