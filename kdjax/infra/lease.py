"""One run at a time in a work folder: a lease, `<workdir>/.kdjax-lock.json`, held while a run works.

Two runs writing one work folder (two terminals, or a pod restarted while a hung worker of the old job still runs)
would interleave their writes; a second run could also stop on the first's half-written outputs with a misleading
line. So a run takes the lease before any work and a second run is refused, in one line naming the holder (host,
process id, start time) and what to do.

The lease is one small JSON file or object: the holder's host, pid, job id (the run's id), process count, start and
last renewal time. It is created only where absent (an atomic create-if-absent: a hard link locally, a write with
GCS's `ifGenerationMatch=0` on gs://; kdjax.infra.storage's conditional writes), renewed every `HEARTBEAT_S` by a thread
of the holder, and removed when the run ends: normally, on an exception, at interpreter exit, or on SIGTERM. A run
that dies without removing it (kill -9, a lost machine) leaves a lease that stops being renewed: older than
`STALE_AFTER_S`, or held by a process on this host that no longer exists, it is taken over by the next run, with
a line in its log. Every change is conditional on the version the writer read, so two runs taking over one stale
lease cannot both win, and a holder whose lease was taken over (it stalled for longer than `STALE_AFTER_S`) finds
out at its next renewal and stops before its next stage (`Lease.check`).

One run is all the processes of one job: on several processes (jax.distributed) process 0 takes the lease and tells
the others (kdjax.experiment.pipeline), which share it; another job's process 0 is refused and so are its processes.

The lease is about who may write now, not about what the folder holds: no provenance record mentions it.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import signal
import socket
import threading
import time
from typing import Any

from kdjax.infra import storage

LEASE_FILE = ".kdjax-lock.json"
HEARTBEAT_S = 30.0  # the holder renews its lease this often
STALE_AFTER_S = 300.0  # a lease not renewed for this long belongs to a run that is gone (or hung) and is taken over
_ACQUIRE_TRIES = 5  # creating, finding a stale lease, removing it and creating again can race with another run


class WorkdirBusyError(OSError):
  """Another run holds the work folder's lease (one line: the holder and what to do)."""


class LeaseLostError(OSError):
  """This run's lease was taken over by another run while it worked."""


def lease_path(workdir) -> Any:
  return storage.path(workdir) / LEASE_FILE


def _now() -> float:
  return time.time()


def _describe(holder: dict) -> str:
  """"host H, pid P, started T" of a lease's content."""
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _process_space() -> str | None:
  """This machine's boot and process-id namespace (Linux): pids are comparable only between processes that share
  them (containers may share a host name but not their pids)."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      boot = f.read().strip()
    return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return None


def _process_gone(holder: dict) -> bool:
  """True where the holder ran on this host, among these pids, and its process no longer exists (a crash leaves no
  doubt then)."""
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  if _process_space() is None or holder.get("process_space") != _process_space():
    return False
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return True
  except OSError:  # exists, owned by someone else
    return False
  return False


def stale_reason(holder: dict, stale_after_s: float, now: float | None = None) -> str | None:
  """Why a lease may be taken over (its holder's process is gone, or it was not renewed for `stale_after_s`), or
  None while it is live."""
  now = _now() if now is None else now
  if _process_gone(holder):
    return f"process {holder['pid']} no longer runs on this host"
  renewed = holder.get("renewed_unix")
  if not isinstance(renewed, (int, float)):
    return None
  if now - renewed > stale_after_s:
    return f"not renewed for {now - renewed:.0f} s (stale after {stale_after_s:.0f} s)"
  return None


def _busy_line(path, holder: dict, stale_after_s: float, now: float) -> str:
  renewed = holder.get("renewed_unix")
  age = f", renewed {now - renewed:.0f} s ago" if isinstance(renewed, (int, float)) else ""
  return (f"work folder {storage.path(path).parent} is in use by another kdjax run ({_describe(holder)}{age}): "
          f"wait for it to end; if that process is gone, its lease {LEASE_FILE} is taken over "
          f"{stale_after_s / 60:g} min after its last renewal (or remove {path} now)")


@dataclasses.dataclass(eq=False)
class Lease:
  """A held lease: renewed by a daemon thread until `release`."""

  path: Any
  content: dict
  version: str
  heartbeat_s: float
  taken_over: str | None = None  # the line to log when this run took over a stale lease
  lost: str | None = None  # set by the heartbeat when another run holds the lease now

  def __post_init__(self):
    self._lock = threading.RLock()  # release may run again inside itself, from the SIGTERM handler
    self._stop = threading.Event()
    self._released = False
    self._thread = threading.Thread(target=self._beat, name="kdjax-lease", daemon=True)
    self._thread.start()
    atexit.register(self.release)
    self._previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
      previous = signal.getsignal(signal.SIGTERM)
      if previous is not signal.SIG_IGN:
        self._previous_sigterm = previous
        signal.signal(signal.SIGTERM, self._on_sigterm)

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with self._lock:
        if self._released:
          return
        content = {**self.content, "renewed_unix": _now()}
        try:
          version = storage.replace_if_version(self.path, json.dumps(content).encode(), self.version)
        except Exception:  # pylint: disable=broad-except  # a passing I/O error: the next beat tries again
          continue
        if version is None:
          current = storage.read_versioned(self.path)
          holder = _parse(current[0]) if current else None
          self.lost = (f"the lease on {self.path} was taken over by another run "
                       f"({_describe(holder) if holder else 'it is gone'}) while this run worked")
          return
        self.content, self.version = content, version

  def check(self) -> None:
    """Raises LeaseLostError (one line) where another run holds the work folder now."""
    if self.lost:
      raise LeaseLostError(f"{self.lost}: stopping before the next stage")

  def release(self) -> None:
    """Removes the lease (only where it is still this run's); idempotent."""
    self._stop.set()
    with self._lock:
      if self._released:
        return
      self._released = True
      if not self.lost:
        try:
          storage.remove_if_version(self.path, self.version)
        except Exception:  # pylint: disable=broad-except  # at exit: a lease left behind goes stale in time
          pass
    if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._previous_sigterm)
      self._previous_sigterm = None

  def _on_sigterm(self, signum, frame) -> None:
    previous = self._previous_sigterm
    self.release()
    if callable(previous):
      previous(signum, frame)
    else:  # the default action: end the process, as without the lease
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)


def _parse(raw: bytes) -> dict | None:
  try:
    content = json.loads(raw)
  except (ValueError, UnicodeDecodeError):
    return None
  return content if isinstance(content, dict) else None


def acquire(workdir, job: str, *, processes: int = 1, heartbeat_s: float = HEARTBEAT_S,
            stale_after_s: float = STALE_AFTER_S) -> Lease:
  """Takes the lease of `workdir` for the run `job`, or raises WorkdirBusyError (one line) while another run holds
  it. A stale lease (`stale_reason`) is taken over; the returned Lease's `taken_over` says whose."""
  path = lease_path(workdir)
  started = _now()
  content = {"kdjax_lease": 1, "job": job, "host": socket.gethostname(), "pid": os.getpid(),
             "process_space": _process_space(), "processes": processes,
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), "started_unix": started,
             "renewed_unix": started, "heartbeat_s": heartbeat_s, "stale_after_s": stale_after_s}
  taken_over = None
  for _ in range(_ACQUIRE_TRIES):
    version = storage.create_if_absent(path, json.dumps(content).encode())
    if version is not None:
      return Lease(path, content, version, heartbeat_s, taken_over=taken_over)
    current = storage.read_versioned(path)
    if current is None:  # released between the two looks
      continue
    raw, current_version = current
    holder = _parse(raw)
    if holder is None:
      raise WorkdirBusyError(f"{path} is not a kdjax lease: if no kdjax run uses {storage.path(workdir)}, remove it")
    reason = stale_reason(holder, stale_after_s)
    if reason is None:
      raise WorkdirBusyError(_busy_line(path, holder, stale_after_s, _now()))
    if storage.remove_if_version(path, current_version):
      taken_over = f"took over the work folder's lease from a run that is gone ({_describe(holder)}): {reason}"
  raise WorkdirBusyError(f"work folder {storage.path(workdir)}: another run keeps taking its lease {LEASE_FILE}; "
                         "start one run at a time")
