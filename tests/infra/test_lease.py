"""One run at a time in a work folder (kdjax.infra.lease): the lease API on local disk and on gs://, stale leases taken
over, release on SIGTERM and after kill -9, and kdjax.main refusing a second run, locally, in a bucket and beside a
2-process job. The runs are the plan stage of the demo (a few seconds); the first run is paused (SIGSTOP) while
it holds the folder, so the second always meets it there, then resumed to show it ends as if alone."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from kdjax.infra import lease, storage

REPO = pathlib.Path(__file__).resolve().parents[2]
HOST = socket.gethostname()
PLAN = ["--config=configs/demo.py", "--config.stages=plan", "--config.plan.model=teacher"]


# ------------------------------------------------------------------------------------------ the API


def _read(path) -> dict:
  return json.loads(storage.read_versioned(path)[0])


def _check_busy_then_free(workdir) -> None:
  held = lease.acquire(workdir, "job-a")
  try:
    path = lease.lease_path(workdir)
    content = _read(path)
    assert (content["job"], content["host"], content["pid"], content["processes"]) == ("job-a", HOST, os.getpid(), 1)
    with pytest.raises(lease.WorkdirBusyError) as refused:
      lease.acquire(workdir, "job-b")
    line = str(refused.value)
    assert "\n" not in line and f"host {HOST}, pid {os.getpid()}, started {content['started']}" in line
    assert "wait for it to end" in line and f"remove {path} now" in line and "5 min after its last renewal" in line
    assert _read(path)["job"] == "job-a"  # the refused run changed nothing
  finally:
    held.release()
  assert storage.read_versioned(lease.lease_path(workdir)) is None
  lease.acquire(workdir, "job-b").release()


def _check_stale_lease_is_taken_over(workdir) -> None:
  path = lease.lease_path(workdir)
  old = time.time() - 600
  storage.write_json(path, {"job": "gone", "host": "another-host", "pid": 4242, "started": "long ago",
                            "renewed_unix": old})
  held = lease.acquire(workdir, "job-new")
  assert held.taken_over is not None and "host another-host, pid 4242, started long ago" in held.taken_over
  assert "not renewed for 6" in held.taken_over and _read(path)["job"] == "job-new"
  held.release()
  # Renewed 10 s ago on another host: live, refused (it may be a run on a machine this one cannot see).
  storage.write_json(path, {"job": "live", "host": "another-host", "pid": 4242, "renewed_unix": time.time() - 10})
  with pytest.raises(lease.WorkdirBusyError, match="renewed 10 s ago"):
    lease.acquire(workdir, "job-new")
  # With a shorter staleness the same lease is stale.
  held = lease.acquire(workdir, "job-new", stale_after_s=5.0)
  assert "stale after 5 s" in held.taken_over
  held.release()


def test_lease_refuses_a_second_run_and_is_free_after_release(tmp_path):
  _check_busy_then_free(tmp_path)
  assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_stale_lease_is_taken_over(tmp_path):
  _check_stale_lease_is_taken_over(tmp_path)


def test_heartbeat_renews_and_a_taken_over_lease_is_noticed(tmp_path):
  held = lease.acquire(tmp_path, "job-a", heartbeat_s=0.05)
  path = lease.lease_path(tmp_path)
  first = _read(path)["renewed_unix"]
  deadline = time.time() + 30
  while _read(path)["renewed_unix"] == first and time.time() < deadline:
    time.sleep(0.05)
  assert _read(path)["renewed_unix"] > first and held.lost is None
  held.check()
  # Another run takes the folder over (as after this one stalled past the staleness): the holder notices, stops
  # renewing, and leaves the other run's lease alone.
  # One conditional replace (a remove and a create would let the heartbeat see the lease gone in between), tried
  # again where a renewal came first.
  other = json.dumps({"job": "job-b", "host": "elsewhere", "pid": 7, "started": "now"}).encode()
  while storage.replace_if_version(path, other, storage.read_versioned(path)[1]) is None:
    assert time.time() < deadline
  deadline = time.time() + 30
  while held.lost is None and time.time() < deadline:
    time.sleep(0.05)
  with pytest.raises(lease.LeaseLostError, match="taken over by another run \\(host elsewhere, pid 7, started now\\)"):
    held.check()
  held.release()
  assert _read(path)["job"] == "job-b"


def test_lease_in_a_bucket(gcs_emulator):
  bucket = gcs_emulator.create_bucket("kdjax-lease")
  _check_busy_then_free(f"gs://{bucket}/run")
  _check_stale_lease_is_taken_over(f"gs://{bucket}/stale")


_HOLDER = ("import sys, time; from kdjax.infra import lease; lease.acquire(sys.argv[1], 'holder'); "
           "print('held', flush=True); time.sleep(120)")


def _holder(workdir) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_sigterm_releases_and_a_killed_holder_is_taken_over_at_once(tmp_path):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == -signal.SIGTERM  # ends as SIGTERM ends it, lease removed on the way
  assert not lease.lease_path(tmp_path).exists()
  proc = _holder(tmp_path)
  proc.kill()  # -9: no chance to remove the lease
  proc.wait(timeout=60)
  assert _read(lease.lease_path(tmp_path))["pid"] == proc.pid
  held = lease.acquire(tmp_path, "next")  # this host, its process gone: no need to wait for staleness
  assert f"process {proc.pid} no longer runs on this host" in held.taken_over
  held.release()
  # The same host name and pid seen from other pids (another container, or after a reboot) prove nothing.
  storage.write_json(lease.lease_path(tmp_path), {"host": HOST, "pid": proc.pid, "process_space": "other/pid:[1]",
                                                  "renewed_unix": time.time()})
  with pytest.raises(lease.WorkdirBusyError, match=f"pid {proc.pid}"):
    lease.acquire(tmp_path, "next")


# ------------------------------------------------------------------------------------------ kdjax.main


def _main(workdir, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "kdjax.main", *PLAN, f"--config.workdir={workdir}"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _pause_once_it_holds(procs: list[subprocess.Popen], workdir) -> dict:
  """Waits until the lease of `workdir` exists, stops `procs` (SIGSTOP) and returns the lease."""
  deadline = time.time() + 300
  while time.time() < deadline:
    current = storage.read_versioned(lease.lease_path(workdir))
    if current is not None:
      for proc in procs:
        proc.send_signal(signal.SIGSTOP)
      return json.loads(current[0])
    assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
    time.sleep(0.02)
  raise AssertionError("no lease appeared")


def _assert_refused_in_one_line(workdir, holder_pid: int, env: dict | None = None) -> None:
  second = _main(workdir, env)
  out, err = second.communicate(timeout=300)
  lines = [line for line in err.splitlines() if line.strip()]
  assert second.returncode == 2 and len(lines) == 1, err
  assert lines[0].startswith(f"kdjax: error: work folder {workdir} is in use by another kdjax run (host {HOST}, "
                             f"pid {holder_pid}, started "), lines[0]
  assert "wait for it to end" in lines[0] and "stage plan" not in out


def _assert_first_ends_as_if_alone(procs: list[subprocess.Popen], workdir) -> None:
  for proc in procs:
    proc.send_signal(signal.SIGCONT)
  outs = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    outs.append(out)
  assert "stage plan: done" in outs[0]  # process 0 prints the log
  root = storage.path(workdir)
  assert json.loads((root / "plan.json").read_text())["model"] == "smollm2-135m"
  records = [json.loads(p.read_text()) for p in (root / "run_records").iterdir()]
  assert [r["status"] for r in records] == ["ok"]  # the refused run left no record
  assert storage.read_versioned(lease.lease_path(workdir)) is None  # released at the end


def test_second_run_in_one_folder_is_refused_and_the_first_is_unaffected(tmp_path):
  """Issue 24: two runs at once in one local work folder."""
  workdir = tmp_path / "run"
  first = _main(workdir)
  held = _pause_once_it_holds([first], workdir)
  assert held["pid"] == first.pid
  _assert_refused_in_one_line(workdir, first.pid)
  _assert_first_ends_as_if_alone([first], workdir)


def test_second_run_in_one_bucket_folder_is_refused_and_the_first_is_unaffected(gcs_emulator):
  """Issue 24: the same with the work folder in a bucket (the emulator enforces GCS's preconditions)."""
  workdir = f"gs://{gcs_emulator.create_bucket('kdjax-two-runs')}/run"
  env = gcs_emulator.env()
  first = _main(workdir, env)
  held = _pause_once_it_holds([first], workdir)
  assert held["pid"] == first.pid
  _assert_refused_in_one_line(workdir, first.pid, env)
  _assert_first_ends_as_if_alone([first], workdir)


def test_a_two_process_job_shares_the_lease_and_a_second_run_is_refused(tmp_path):
  """Issue 24: the processes of one jax.distributed job run under process 0's lease; another run is refused."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  job = [_main(workdir, {"KDJAX_COORDINATOR": f"127.0.0.1:{port}", "KDJAX_NUM_PROCESSES": "2",
                         "KDJAX_PROCESS_ID": str(process)}) for process in (0, 1)]
  held = _pause_once_it_holds(job, workdir)
  assert (held["pid"], held["processes"]) == (job[0].pid, 2)
  _assert_refused_in_one_line(workdir, job[0].pid)
  _assert_first_ends_as_if_alone(job, workdir)
  run = json.loads(next((workdir / "run_records").iterdir()).read_text())
  assert run["started"] and held["job"] == next((workdir / "run_records").iterdir()).stem
  assert sorted(p.name for p in (workdir / "logs").iterdir()) == [f"{held['job']}.log", f"{held['job']}.process1.log"]
