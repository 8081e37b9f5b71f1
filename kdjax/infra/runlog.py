"""A run's log file: what libraries say while kdjax works, and the whole story of a failure, off the console.

The console of a run shows kdjax's own lines, its progress bars and, when it fails, one line (kdjax.main). Library
messages go to `<workdir>/logs/<run>.log` instead (`<run>.process<k>.log` for the other processes of a pod):
  - Python logging records of other libraries (Orbax and absl log their writer threads' errors with tracebacks,
    jax its notices); kdjax's own loggers still reach the console as well;
  - what threads other than the main one write to `sys.stderr` (tensorstore's callbacks print their tracebacks
    there when Orbax's event loops are gone, e.g. after a failed write);
  - the traceback of the exception that ended the run.
A full disk, like every expected failure, is then one line: `out_of_space_line` names the path, the bytes wanted
(where the writer said) and the bytes free.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
from typing import Any, Iterator

from kdjax.infra import storage

LOG_FOLDER = "logs"
_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"


class OutOfSpaceError(OSError):
  """A write found its disk full (the message is `out_of_space_line`'s)."""


def log_path(workdir, run_id: str, process_index: int = 0) -> Any:
  suffix = f".process{process_index}" if process_index else ""
  return storage.path(workdir) / LOG_FOLDER / f"{run_id}{suffix}.log"


class _LogFile:
  """The log's text stream: never raises (a full disk must not turn logging into a second failure)."""

  def __init__(self, path):
    self.path, self._lock, self._file = path, threading.RLock(), None
    try:
      storage.makedirs(storage.path(path).parent)
      self._file = storage.appender(path)
    except Exception:  # pylint: disable=broad-except  # no log is better than no run
      self._file = None

  def write(self, text: str) -> None:
    with self._lock:
      if self._file is None:
        return
      try:
        self._file.write(text)
        if not storage.is_remote(self.path):  # gs://: each flush uploads the whole log, so only at the end
          self._file.flush()
      except Exception:  # pylint: disable=broad-except
        pass

  def close(self) -> None:
    with self._lock:
      if self._file is not None:
        try:
          self._file.close()
        except Exception:  # pylint: disable=broad-except
          pass
        self._file = None


class _LogHandler(logging.Handler):
  def __init__(self, log: _LogFile):
    super().__init__()
    self.log = log
    self.setFormatter(logging.Formatter(_FORMAT))

  def emit(self, record: logging.LogRecord) -> None:
    try:
      self.log.write(self.format(record) + "\n")
    except Exception:  # pylint: disable=broad-except
      pass


def _kdjax_only(record: logging.LogRecord) -> bool:
  return record.name == "kdjax" or record.name.startswith("kdjax.")


class _ThreadSplitStderr:
  """sys.stderr while a run works: the main thread's writes (progress bars, warnings) to the console, other
  threads' (library callbacks' tracebacks) to the log."""

  def __init__(self, console, log: _LogFile):
    self._console, self._log = console, log

  def write(self, text: str) -> int:
    if threading.current_thread() is threading.main_thread():
      return self._console.write(text)
    self._log.write(text)
    return len(text)

  def flush(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._console.flush()

  def __getattr__(self, name):  # isatty, fileno, encoding, ...: the console's
    return getattr(self._console, name)


def _console_handlers() -> list[logging.Handler]:
  """The root logger's handlers that print to the terminal (absl's, or a plain stream handler on stderr/stdout)."""
  out = []
  for handler in logging.root.handlers:
    if type(handler).__name__ == "ABSLHandler" or (
        type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout, sys.__stderr__)):
      out.append(handler)
  return out


@contextlib.contextmanager
def capture(path) -> Iterator[_LogFile]:
  """Routes library output to the log file at `path` while the block runs (module docstring); on an exception the
  traceback goes there too. Everything is put back afterwards."""
  log = _LogFile(path)
  log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} kdjax run log, pid {os.getpid()}\n")
  handler = _LogHandler(log)
  consoles = _console_handlers()
  for console in consoles:
    console.addFilter(_kdjax_only)
  logging.root.addHandler(handler)
  saved_stderr = sys.stderr
  sys.stderr = _ThreadSplitStderr(saved_stderr, log)
  try:
    yield log
  except BaseException:
    log.write("".join(traceback.format_exc()))
    raise
  finally:
    sys.stderr = saved_stderr
    logging.root.removeHandler(handler)
    for console in consoles:
      console.removeFilter(_kdjax_only)
    log.close()


# ------------------------------------------------------------------------------------------ out of space

_NO_SPACE = ("No space left on device", "os_error_code='28'", "[Errno 28]")
# tensorstore's text: the file it failed to write, else the database folder it wrote into.
_FAILED_PATHS = (re.compile(r'Failed writing: "([^"]+)"'), re.compile(r'at local file "([^"]+)"'))
_WANTED_BYTES = re.compile(r"Failed to write (\d+) bytes")


def _chain(error: BaseException) -> Iterator[BaseException]:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _existing_folder(path: str) -> str | None:
  folder = os.path.abspath(path)
  while folder and not os.path.isdir(folder):
    parent = os.path.dirname(folder)
    if parent == folder:
      return None
    folder = parent
  return folder


def _bytes(n: int) -> str:
  return f"{n} bytes ({n / 2**20:.1f} MiB)"


def out_of_space_line(error: BaseException, workdir) -> str | None:
  """One line for a write that found its disk full (an OSError with ENOSPC, or tensorstore's text of one, anywhere
  in the exception's chain): the path, the bytes wanted where the writer said, the bytes free; None for any other
  error."""
  found = None
  for e in _chain(error):
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(marker in str(e) for marker in _NO_SPACE):
      found = e
      break
  if found is None:
    return None
  text = str(found)
  path = getattr(found, "filename", None)
  for pattern in _FAILED_PATHS:
    match = pattern.search(text)
    if not path and match:
      path = match.group(1)
  path = str(path or workdir)
  wanted = _WANTED_BYTES.search(text)
  wanted_text = f"{_bytes(int(wanted.group(1)))} wanted, " if wanted else ""
  free_text = ""
  folder = None if storage.is_remote(path) else _existing_folder(path)
  if folder:
    free_text = f"{_bytes(shutil.disk_usage(folder).free)} free there"
  return (f"out of space writing {path}: {wanted_text}{free_text or 'free space unknown'}; free some space (or use "
          "another --config.workdir) and run again: finished work is kept and the stage resumes")
