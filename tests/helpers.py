"""Checks shared by several test modules."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from kdjax.infra import storage

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def worker_env(env: dict | None = None) -> dict:
  """A copy of `env` (default: os.environ) for a child Python process: its PYTHONPATH starts with the repository
  and tests/, so the child imports this checkout's kdjax, `workers.<name>` and test modules (`teacher.test_store`)
  as the tests do under pytest, with no import-path edit in any file."""
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def worker_command(name: str, *args: str) -> list[str]:
  """The command line that runs tests/workers/<name>.py with `args`; start it with an environment from
  worker_env."""
  return [sys.executable, "-m", f"workers.{name}", *args]


def communicate_all(procs: list[subprocess.Popen], timeout_s: float) -> list[tuple[str, str]]:
  """Each worker's (stdout, stderr) once it exits; any still running when one fails or times out is killed, so a
  failed test leaves no worker waiting at a jax.distributed barrier."""
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout_s))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return outputs


def finished_checkpoints(workdir: str | pathlib.Path) -> list[int]:
  """The steps of the Orbax checkpoints finished under `workdir` (a local folder or a gs:// URL)."""
  folder = storage.path(workdir) / "checkpoints"
  if not folder.exists():
    return []
  remote = str(workdir).startswith("gs://")  # on object stores Orbax marks a finished step with commit_success.txt
  return sorted(int(p.name) for p in folder.iterdir()
                if p.name.isdigit() and (not remote or (p / "commit_success.txt").exists()))


def _train(worker: str, workdir: str, steps: str, env: dict, out: pathlib.Path) -> None:
  done = subprocess.run(worker_command(worker, "train", "--workdir", workdir, "--out", str(out), "--steps", steps),
                        env=worker_env(env), capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]


def kill_resume_and_compare(worker: str, workdir: str, steps: str, env: dict, tmp_path: pathlib.Path, *,
                            reference: str, delay: float) -> list[dict]:
  """The preemption check: `worker train` (`worker`: the name of a tests/workers module) runs uninterrupted in
  `reference`; a second run in `workdir` (each step slowed by `delay` s) is killed (-9) once it has finished a
  checkpoint, then restarted to `steps` steps. Its final state must equal the reference's array for array, and
  metrics.jsonl must log every step once (the steps after the last checkpoint are not logged twice). Returns the
  resumed run's logged step records."""
  _train(worker, reference, steps, env, tmp_path / "ref.npz")
  proc = subprocess.Popen(worker_command(worker, "train", "--workdir", workdir, "--steps", steps,
                                         "--delay", str(delay)),
                          env=worker_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not finished_checkpoints(workdir) and time.time() < deadline and proc.poll() is None:
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert finished_checkpoints(workdir), "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL and finished_checkpoints(workdir)[-1] < int(steps)

  _train(worker, workdir, steps, env, tmp_path / "resumed.npz")
  want, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(want) == sorted(got) and len(want) == 6
  for name in want:
    assert np.array_equal(want[name], got[name]), name
  logged = [json.loads(line) for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()
            if '"kd"' in line]
  assert [r["step"] for r in logged] == list(range(1, int(steps) + 1))
  return logged


def mesh_worker_results(worker: str, env: dict, tmp_path: pathlib.Path) -> dict:
  """Runs `worker mesh` (`worker`: the name of a tests/workers module) with 8 CPU devices (a fresh process: the
  device count is fixed at JAX's start-up) and returns the JSON it wrote: the same training on one device and on a
  mesh of the eight."""
  out = tmp_path / "mesh.json"
  run = subprocess.run(worker_command(worker, "mesh", "--out", str(out)),
                       env=worker_env(dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")),
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["num_devices"] == 8
  return result


def tiny_peaked_model():
  """The "tiny" preset with random weights (seed 0), its head scaled up so distributions are peaked, not flat:
  greedy decoding then has clear winners, so float32 rounding does not decide a token."""
  from kdjax.models.llama import config as config_lib
  from kdjax.models.llama import model as model_lib
  model = model_lib.init_model(config_lib.get_preset("tiny"), seed=0)
  model.lm_head[...] = model.lm_head[...] * 20.0
  return model
