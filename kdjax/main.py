"""kdjax's command line: `python -m kdjax.main --config=configs/gt.py --config.some.key=value`.

With no --config it runs the CPU demo (configs/demo.py). See kdjax/pipeline.py for the stages and the work folder.
"""

import os
import pathlib
import sys


def _default_platform() -> None:
  """Without a TPU, keep an installed libtpu from probing for one (slow, noisy); GPUs are left to jax."""
  if "JAX_PLATFORMS" in os.environ:
    return
  has_tpu = any(pathlib.Path("/dev").glob("accel*")) or pathlib.Path("/dev/vfio").exists()
  has_gpu = any(pathlib.Path("/dev").glob("nvidia[0-9]*"))
  if not has_tpu and not has_gpu:
    os.environ["JAX_PLATFORMS"] = "cpu"


_default_platform()
if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
  from kdjax import hostmem  # before jax starts its threads: XLA:CPU then reuses its step buffers
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
  from kdjax import pipeline
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
    key = str(e).strip("\"'")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"kdjax: error: unknown config key {key!r} (in {' '.join(overrides)}); see kdjax/config.py",
          file=sys.stderr)
  sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
