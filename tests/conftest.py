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
  from kdjax import fetch
  return fetch.smollm2_gguf()


@pytest.fixture(scope="session")
def gsm8k_dir() -> pathlib.Path:
  if not (GSM8K_DIR / "train.jsonl").exists():
    pytest.skip(f"GSM8K not found at {GSM8K_DIR}")
  return GSM8K_DIR
