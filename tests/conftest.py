"""Shared fixtures: the real SmolLM2 GGUF, the local GSM8K copy, CPU-only jax."""

import os
import pathlib

# Tests run on the CPU; libtpu (installed for ahead-of-time TPU plans) must not grab the backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GSM8K_DIR = pathlib.Path(os.environ.get("KDJAX_GSM8K", REPO.parent / "shared" / "data" / "gsm8k"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  from kdjax.infra import fetch
  return fetch.smollm2_gguf()


@pytest.fixture(scope="session")
def gsm8k_dir() -> pathlib.Path:
  if not (GSM8K_DIR / "train.jsonl").exists():
    pytest.skip(f"GSM8K not found at {GSM8K_DIR}")
  return GSM8K_DIR


class GcsEmulator:
  """A real GCS JSON API on localhost (`gcp-storage-emulator`, in memory), started and stopped by the tests."""

  def __init__(self, url: str):
    self.url = url

  def create_bucket(self, name: str) -> str:
    import json
    import urllib.request
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=kdjax-test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    return name

  def env(self) -> dict:
    """The environment a child process needs: STORAGE_EMULATOR_HOST only (kdjax derives the rest)."""
    return {**{k: v for k, v in os.environ.items() if k not in _DERIVED_EMULATOR_VARIABLES},
            "STORAGE_EMULATOR_HOST": self.url}


_DERIVED_EMULATOR_VARIABLES = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """Starts the emulator on a free port, waits until it answers, points this process at it, stops it at the end."""
  import socket
  import subprocess
  import sys
  import time
  import urllib.request
  pytest.importorskip("gcp_storage_emulator")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  # Its log goes to a file: a pipe nobody reads fills up and stalls the server mid-request.
  log_path = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
  log = open(log_path, "wb")
  launcher = pathlib.Path(__file__).with_name("gcs_emulator.py")  # the emulator, with generation headers
  proc = subprocess.Popen([sys.executable, str(launcher), "start", "--host", "127.0.0.1",
                           "--port", str(port), "--in-memory", "--quiet"],
                          stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        log.close()
        raise RuntimeError(f"gcp-storage-emulator did not start: {log_path.read_text()[-500:]}")
      time.sleep(0.2)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST",) + _DERIVED_EMULATOR_VARIABLES}
  os.environ["STORAGE_EMULATOR_HOST"] = url
  for key in _DERIVED_EMULATOR_VARIABLES:
    os.environ.pop(key, None)
  from kdjax.infra import storage
  storage.configure_emulator()
  try:
    yield GcsEmulator(url)
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
