"""Checks shared by several test modules."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np

from kdjax import storage


def resume_and_compare(worker: pathlib.Path, workdir: str, steps: str, env: dict, tmp_path: pathlib.Path) -> None:
  """Resumes the killed `train_worker.py train` run in `workdir` to `steps` steps, then checks that its final
  state (`tmp_path/resumed.npz`) equals the uninterrupted reference run's (`tmp_path/ref.npz`) array for array,
  and that metrics.jsonl logged every step once (the steps after the last checkpoint are not logged twice)."""
  resumed = subprocess.run([sys.executable, str(worker), "train", "--workdir", workdir,
                            "--out", str(tmp_path / "resumed.npz"), "--steps", steps],
                           env=env, capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  want, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(want) == sorted(got) and len(want) == 6
  for name in want:
    assert np.array_equal(want[name], got[name]), name
  logged = [json.loads(line)["step"] for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()
            if '"kd"' in line]
  assert logged == list(range(1, int(steps) + 1))
