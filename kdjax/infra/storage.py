"""Every file kdjax reads or writes, on local disk or in a `gs://` bucket, with one commit rule.

`path(p)` turns a string into the path object kdjax works with: a local path stays a `pathlib.Path` (the plain,
fast path: no extra copies, no extra layers), a URL such as `gs://bucket/run` becomes an `etils.epath.Path`
(backed by fsspec/gcsfs). Both have `/`, `.name`, `.parent`, `exists()`, `is_file()`, `glob()`, `read_text()`
and `read_bytes()`, so readers use them as they are. Orbax and tensorstore take either kind for arrays.

Writes go through this module, and a reader never sees a half-written result:
  local disk  the content goes to `<name>.tmp` in the same folder, is fsynced, renamed over `<name>`
              (`os.replace`, atomic on POSIX), and the folder is fsynced. A kill leaves at worst a stale
              `<name>.tmp`, which readers never look at and the next write of `<name>` overwrites.
  gs://       object stores have no rename, but one object upload is atomic: the object appears, with its whole
              content, only when the upload completes. So the content is built completely in memory and
              uploaded once under its final name; an exception before that uploads nothing. A folder-sized
              result (a checkpoint, an adapter, a teacher store) is committed the same way on both kinds of
              storage: its marker object (`kdjax_model.json`, `adapter_config.json`, `manifest.json`, Orbax's
              `commit_success.txt`) is written last, and readers treat a folder without it as unfinished.
Appends (`samples.jsonl`, `metrics.jsonl`) are a durable `open("a")` + fsync locally; on gs:// the object is
rewritten whole (read, add, upload), which is atomic too, so a line is either complete or absent.

Emulator: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` is the one variable a user sets (as for Google's own
clients). On import this module derives the rest from it: `TENSORSTORE_GCS_HTTP_URL` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING` for tensorstore (Orbax's arrays), anonymous gcsfs credentials, and gcsfs's plain
HTTP client instead of its experimental one, which first probes a gRPC endpoint and waits for it to time out on
every call against an emulator.

Libraries that only take local file names (transformers tokenizers, GGUF memory maps) get a local copy of a
remote file or folder through `local_copy`, kept in a private scratch folder that is removed at exit
(`KDJAX_SCRATCH` picks its parent; default: the system temp folder); `staged_dir` gives them a local folder whose
files are uploaded when they are done.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Iterator, Union

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
REMOTE_SCHEMES = ("gs://",)

Path = Union[pathlib.Path, Any]  # a pathlib.Path or an etils.epath.Path


def configure_emulator(environ=os.environ) -> bool:
  """Derives tensorstore's and gcsfs's emulator settings from STORAGE_EMULATOR_HOST; True when it is set."""
  host = environ.get(EMULATOR_VARIABLE, "").rstrip("/")
  if not host:
    return False
  if not host.startswith(("http://", "https://")):
    host = f"http://{host}"
  environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
  environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "kdjax-emulator")  # tensorstore: skip real credentials
  environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read by `import gcsfs`: no gRPC probe
  import fsspec
  # Registered by class path, so it holds even if gcsfs was imported before this module.
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)
    fsspec.config.conf.setdefault(protocol, {}).setdefault("token", "anon")
  return True


_listings_configured: list[bool] = []


def _configure_listings() -> None:
  """Before the first gs:// filesystem is made (local runs never import fsspec here)."""
  if _listings_configured:
    return
  # Several processes write one folder: a cached listing would hide the other processes' objects.
  import fsspec
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
  _listings_configured.append(True)


configure_emulator()


# ------------------------------------------------------------------------------------------ paths


def is_remote(p: str | os.PathLike | Any) -> bool:
  """True for a URL kdjax writes through fsspec (gs://), False for a local path."""
  return str(p).startswith(REMOTE_SCHEMES)


def path(p: str | os.PathLike | Any, *, absolute: bool = False) -> Path:
  """`p` as a path object: pathlib.Path for a local path (made absolute if asked), epath.Path for gs://."""
  if is_remote(p):
    _configure_listings()
    from etils import epath
    return p if isinstance(p, epath.Path) else epath.Path(str(p))
  local = pathlib.Path(p)
  return local.absolute() if absolute else local


def _fs_and_key(p) -> tuple[Any, str]:
  _configure_listings()
  import fsspec
  return fsspec.core.url_to_fs(str(p))


_buckets_seen: set[str] = set()


def makedirs(p) -> Path:
  """Creates the folder `p` (and parents) locally; on gs:// folders are name prefixes and need nothing, but the
  bucket must exist (FileNotFoundError with one line otherwise, before any work)."""
  p = path(p)
  if not is_remote(p):
    p.mkdir(parents=True, exist_ok=True)
    return p
  fs, key = _fs_and_key(p)
  bucket = key.split("/", 1)[0]
  if bucket not in _buckets_seen:
    if not fs.exists(bucket):
      raise FileNotFoundError(f"bucket gs://{bucket} not found (or not readable with these credentials)")
    _buckets_seen.add(bucket)
  return p


def size(p) -> int:
  """The size of the file or object `p` in bytes."""
  if is_remote(p):
    fs, key = _fs_and_key(p)
    return int(fs.size(key))
  return os.stat(p).st_size


# An object's metadata that changes whenever its content does (see `stamp`); sizes and checksums ride along.
_OBJECT_STAMP_FIELDS = ("generation", "size", "md5Hash", "crc32c")


def _object_stamp(info: dict) -> dict | None:
  if info.get("generation") is None:  # GCS gives every upload a new generation; without one, trust nothing
    return None
  return {k: (int(info[k]) if k == "size" else str(info[k])) for k in _OBJECT_STAMP_FIELDS if info.get(k) is not None}


# File times advance in clock ticks (a few ms), so a second write within a tick keeps them. A file changed this
# recently has no stamp yet (git's "racily clean" rule); 2 s also covers a network file system's clock skew.
RECENT_CHANGE_NS = 2_000_000_000


def _local_stamp(p) -> dict | None:
  st = os.stat(p)
  if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RECENT_CHANGE_NS:
    return None
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def stamp(p) -> dict | None:
  """Metadata of the file or object `p` that changes whenever its content does, read without reading the content.

  Local: size, mtime_ns, ctime_ns and inode (a write always moves ctime, which no tool sets back, so a rewrite
  that restores the mtime is still seen; a copy is a new inode). gs://: the object's generation (GCS gives every
  upload a new one), size, md5 and crc32c. None, so that nothing is trusted, for an object without a generation
  or a local file changed in the last `RECENT_CHANGE_NS` (its times could still stay the same through a rewrite).
  """
  if not is_remote(p):
    return _local_stamp(p)
  fs, key = _fs_and_key(p)
  return _object_stamp(fs.info(key))


def stamps_under(folder) -> dict[str, dict | None]:
  """`stamp` of every file below `folder`, keyed by `str(path)` as `files_under` gives it (gs://: one listing)."""
  folder = path(folder)
  if not is_remote(folder):
    return {str(p): _local_stamp(p) for p in files_under(folder)}
  fs, key = _fs_and_key(folder)
  scheme = str(folder).split("://", 1)[0] + "://"
  return {str(path(scheme + name)): _object_stamp(info) for name, info in fs.find(key, detail=True).items()}


def sha256(p) -> str:
  """The hex sha256 of the file or object `p`, read in 4 MiB blocks."""
  digest = hashlib.sha256()
  with path(p).open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def remove_tree(p) -> None:
  """Removes the folder `p` and everything under it; nothing if it does not exist."""
  p = path(p)
  if is_remote(p):
    fs, key = _fs_and_key(p)
    if fs.exists(key):
      fs.rm(key, recursive=True)
  elif p.is_symlink() or p.is_file():
    p.unlink()
  elif p.exists():
    shutil.rmtree(p)


def files_under(folder) -> list[Path]:
  """Every file below `folder`, at any depth, sorted (on gs:// one listing, not a glob per folder level)."""
  folder = path(folder)
  if not is_remote(folder):
    return sorted(p for p in folder.glob("**/*") if p.is_file())
  fs, key = _fs_and_key(folder)
  scheme = str(folder).split("://", 1)[0] + "://"
  return sorted(path(scheme + name) for name in fs.find(key))


def readable(p):
  """What `np.load` or `zipfile` should open: the local path itself, or the object's bytes in memory."""
  return io.BytesIO(path(p).read_bytes()) if is_remote(p) else p


# ------------------------------------------------------------------------------------------ writing


def _fsync_dir(folder: pathlib.Path) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return  # some filesystems cannot open folders; the rename itself is still atomic
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_writer(p, mode: str = "wb", *, encoding: str = "utf-8") -> Iterator[io.IOBase]:
  """A file to write `p` through: committed (see the module docstring) only if the block finishes."""
  if mode not in ("wb", "w"):
    raise ValueError(f"atomic_writer mode must be 'wb' or 'w', got {mode!r}")
  p = path(p)
  if is_remote(p):
    buffer = io.BytesIO()
    stream = buffer if mode == "wb" else io.TextIOWrapper(buffer, encoding=encoding, newline="")
    yield stream
    stream.flush()
    _upload(p, buffer.getvalue())
    return
  temp = p.with_name(p.name + ".tmp")  # a fixed name: a kill leaves one stale file the next write replaces
  try:
    with open(temp, mode, **({} if mode == "wb" else {"encoding": encoding})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    temp.unlink(missing_ok=True)
    raise
  os.replace(temp, p)
  _fsync_dir(p.parent)


def publish(local_file, p) -> Path:
  """Commits a file another program wrote (a compiler's output) as `p` on local disk: renamed into place and the
  folder fsynced, so `p` appears whole or not at all. `local_file` must be on the same file system (the same
  folder, or a temporary folder inside it)."""
  p = path(p)
  if is_remote(p):
    raise ValueError(f"publish is for local files: {p}")
  os.replace(local_file, p)
  _fsync_dir(p.parent)
  return p


def _upload(p, data: bytes) -> None:
  fs, key = _fs_and_key(p)
  fs.pipe_file(key, data)  # one request, one object generation: all of `data` or nothing


def write_bytes(p, data: bytes) -> Path:
  """Commits `data` as the whole content of `p`."""
  p = path(p)
  if is_remote(p):
    _upload(p, bytes(data))
  else:
    with atomic_writer(p, "wb") as f:
      f.write(data)
  return p


def write_text(p, text: str, *, encoding: str = "utf-8") -> Path:
  return write_bytes(p, text.encode(encoding))


def write_json(p, value: Any, **dumps_kwargs) -> Path:
  """Commits `json.dumps(value, **dumps_kwargs)` plus a final newline as `p`."""
  return write_text(p, json.dumps(value, **dumps_kwargs) + "\n")


def append_text(p, text: str, *, encoding: str = "utf-8") -> None:
  """Adds `text` at the end of `p` (created if absent), durably: complete lines or nothing on gs://."""
  p = path(p)
  if is_remote(p):
    existing = p.read_bytes() if p.exists() else b""
    _upload(p, existing + text.encode(encoding))
    return
  with open(p, "a", encoding=encoding) as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


class _RemoteAppender:
  """A text log on gs://: `flush()` uploads the whole object (read once, then kept in memory)."""

  def __init__(self, p):
    self.path = path(p)
    self.data = bytearray(self.path.read_bytes() if self.path.exists() else b"")
    self.uploaded = len(self.data)

  def write(self, text: str) -> None:
    self.data += text.encode("utf-8")

  def flush(self) -> None:
    if len(self.data) != self.uploaded:
      _upload(self.path, bytes(self.data))
      self.uploaded = len(self.data)

  def close(self) -> None:
    self.flush()


def appender(p):
  """A text file to add lines to over time (write, flush, close): `open(p, "a")` locally; on gs:// each flush
  replaces the object with everything written so far."""
  return _RemoteAppender(p) if is_remote(p) else open(p, "a", encoding="utf-8")


def truncate(p, length: int) -> None:
  """Cuts `p` to its first `length` bytes (drops a torn last line)."""
  p = path(p)
  if is_remote(p):
    _upload(p, p.read_bytes()[:length])
    return
  with open(p, "r+b") as f:
    f.truncate(length)
    f.flush()
    os.fsync(f.fileno())


def save_figure(figure, p, **savefig_kwargs) -> Path:
  """Renders a matplotlib figure and commits it as `p`."""
  buffer = io.BytesIO()
  figure.savefig(buffer, **savefig_kwargs)
  return write_bytes(p, buffer.getvalue())


def link_dir(link, target) -> None:
  """Makes the folder `link` show the folder `target` (a sibling): a relative symlink locally, a server-side
  copy of every object on gs:// (object stores have no links)."""
  link, target = path(link), path(target)
  if is_remote(link):
    fs, key = _fs_and_key(target)
    _, link_key = _fs_and_key(link)
    depth = key.rstrip("/").count("/") + 1
    # Objects in subfolders first, the folder's own files (its commit markers) last.
    for source in sorted(fs.find(key), key=lambda name: (name.count("/") == depth, name)):
      fs.copy(source, link_key + source[len(key):])
    return
  link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


# ------------------------------------------------------------------------------------------ conditional writes
# A small object that several programs may write (the work folder's lease, kdjax.infra.lease), changed only where it still
# is the version the writer read: compare-and-swap on a version token. gs:// gives it exactly (preconditions on the
# object's generation: `ifGenerationMatch`, 0 for "absent"); on local disk the create and the removal are exact
# (a hard link fails where the name exists; a rename moves one file away, checked before it is deleted) and a
# replace is checked just before its rename.


def _local_version(st: os.stat_result) -> str:
  return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"  # every commit here is a new file (a new inode)


def _private_name(p: pathlib.Path, purpose: str) -> pathlib.Path:
  return p.with_name(f"{p.name}.{os.getpid()}-{os.urandom(4).hex()}.{purpose}")


def _local_staged(p: pathlib.Path, data: bytes) -> pathlib.Path:
  """`data` in a fsynced file of its own beside `p`, for a link or rename into place."""
  staged = _private_name(p, "tmp")
  with open(staged, "xb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return staged


def _object_precondition_upload(p, data: bytes, generation: str) -> str | None:
  """Uploads `data` as `p` only where the object's generation is `generation` ("0": absent); its new generation,
  or None where the precondition failed (HTTP 412)."""
  from urllib.parse import quote
  fs, key = _fs_and_key(p)
  bucket, name = key.split("/", 1)
  try:
    out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o", uploadType="media",
                  name=name, ifGenerationMatch=generation, data=data,
                  headers={"Content-Type": "application/octet-stream"}, json_out=True)
  except FileExistsError:  # gcsfs's answer to 412 Precondition Failed
    return None
  return str(out["generation"])


def read_versioned(p) -> tuple[bytes, str] | None:
  """(content, version token) of the file or object `p`, read together; None where it does not exist."""
  if is_remote(p):
    fs, key = _fs_and_key(p)
    for _ in range(5):  # a write between the two looks at the generation: read again
      try:
        before = fs.info(key).get("generation")
        content = fs.cat_file(key)
        after = fs.info(key).get("generation")
      except FileNotFoundError:
        return None
      if before == after and before is not None:
        return content, str(before)
    raise OSError(f"{p} changes faster than it can be read")
  try:
    with open(p, "rb") as f:
      return f.read(), _local_version(os.fstat(f.fileno()))
  except FileNotFoundError:
    return None


def create_if_absent(p, data: bytes) -> str | None:
  """Commits `data` as `p` only where `p` does not exist (the check and the write are one step); its version token,
  or None where `p` exists."""
  if is_remote(p):
    return _object_precondition_upload(p, bytes(data), "0")
  p = pathlib.Path(p)
  staged = _local_staged(p, bytes(data))
  try:
    os.link(staged, p)  # fails where `p` exists, and `p` never shows part of `data`
    version = _local_version(os.stat(p))
  except FileExistsError:
    return None
  finally:
    staged.unlink(missing_ok=True)
  _fsync_dir(p.parent)
  return version


def replace_if_version(p, data: bytes, version: str) -> str | None:
  """Commits `data` as `p` only where `p` is still at `version`; the new version token, or None where `p` changed or
  is gone. Exact on gs://; locally checked just before the rename (a writer that changes `p` in between, a
  takeover of a lease minutes stale, is seen at the next call)."""
  if is_remote(p):
    return _object_precondition_upload(p, bytes(data), version)
  p = pathlib.Path(p)
  staged = _local_staged(p, bytes(data))
  try:
    current = read_versioned(p)
    if current is None or current[1] != version:
      return None
    os.replace(staged, p)
    new_version = _local_version(os.stat(p))
  finally:
    staged.unlink(missing_ok=True)
  _fsync_dir(p.parent)
  return new_version


def remove_if_version(p, version: str) -> bool:
  """Removes `p` only where it is still at `version`; whether it did."""
  if is_remote(p):
    fs, key = _fs_and_key(p)
    bucket, name = key.split("/", 1)
    try:
      fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=version)
    except (FileExistsError, FileNotFoundError):  # 412: another generation; 404: already gone
      return False
    return True
  p = pathlib.Path(p)
  aside = _private_name(p, "removing")
  try:
    os.rename(p, aside)  # one file moves away whole; then it is checked
  except FileNotFoundError:
    return False
  if _local_version(os.stat(aside)) == version:
    aside.unlink()
    _fsync_dir(p.parent)
    return True
  try:  # moved another writer's file: put it back, unless yet another took the name meanwhile
    os.link(aside, p)
  except FileExistsError:
    pass
  aside.unlink()
  return False


# ------------------------------------------------------------------------------------------ local copies


_scratch: list[pathlib.Path] = []


def scratch_dir() -> pathlib.Path:
  """This process's private local folder for copies of remote files; removed when the process exits."""
  if not _scratch:
    parent = os.environ.get("KDJAX_SCRATCH") or None
    if parent:
      os.makedirs(parent, exist_ok=True)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="kdjax-scratch-", dir=parent))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _scratch.append(folder)
  return _scratch[0]


_copies: dict[str, pathlib.Path] = {}


def local_copy(p) -> pathlib.Path:
  """A local path holding `p` (a file or a folder): `p` itself when local, else a copy downloaded once."""
  if not is_remote(p):
    return pathlib.Path(p)
  url = str(p).rstrip("/")
  if url not in _copies:
    fs, key = _fs_and_key(url)
    target = scratch_dir() / f"copy-{len(_copies)}" / pathlib.PurePosixPath(key).name
    target.parent.mkdir(parents=True)
    if fs.isdir(key):
      for source in fs.find(key):
        destination = target / source[len(key):].lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(source, str(destination))
    else:
      fs.get_file(key, str(target))
    _copies[url] = target
  return _copies[url]


@contextlib.contextmanager
def staged_dir(p) -> Iterator[pathlib.Path]:
  """A local folder for a library that writes files by name (`save_pretrained`); on gs:// its files are uploaded
  to `p` when the block finishes, locally it is `p` itself."""
  if not is_remote(p):
    yield makedirs(p)
    return
  stage = pathlib.Path(tempfile.mkdtemp(prefix="stage-", dir=scratch_dir()))
  try:
    yield stage
    for file in sorted(f for f in stage.rglob("*") if f.is_file()):
      write_bytes(path(p) / file.relative_to(stage).as_posix(), file.read_bytes())
  finally:
    shutil.rmtree(stage, ignore_errors=True)
