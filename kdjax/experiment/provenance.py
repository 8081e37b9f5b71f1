"""Provenance: every stage output records what produced it, and no run reuses an output made otherwise.

The record
  Each stage output folder (models/<role>, stores/<strategy>, arms/<arm>/train, arms/<arm>/adapter,
  arms/<arm>/eval, report/, analysis/) holds `provenance.json`, a record of what produced it:
    stage      the stage's name
    settings   every config value that changes the output, as flat dotted keys ("distill.temperature"): the whole
               config sections the stage reads, minus `NO_EFFECT_KEYS` (keys that change speed, logging or where a
               file is read from, never a result) and minus `READ_BY_A_LATER_STAGE` (recorded by the stage that
               reads them). A new config key is therefore covered by default.
    source     models only: the source's content identity (see below)
    questions  per question list the stage reads: each question id with a hash of its question and reference
               solution (`data.example_hash`), and a digest of the whole list
    inputs     the records of the stage outputs it reads (their question lists reduced to the digest); an input
               whose bytes are consumed directly (an adapter, for eval) adds "content", a hash of its files
    about      where and when (the source's resolved path, the time written); shown in messages, never compared

The decision
  The pipeline computes, from the config and the sources alone, the record every output of this run should have.
  Before the first stage it checks every output folder the run will write (a refusal costs no work). Before
  reading an input folder a stage `require`s its record to equal the expected one; before writing its own folder
  it `claim`s it: an absent or empty folder gets the record written *before* the work starts (so a partial output
  is protected too), a folder with an equal record is reused when finished and resumed when partial, and any other
  folder (another record, or contents with no record) is refused with one line that names what changed and what
  to do; `kdjax.main` exits with code 2. An output is never reused, or continued, under other settings. The report
  and analysis folders are rebuilt by every run; their records say what they were built from.

Source identity
  A model source is identified by content, not by size and mtime (a copy changes mtime; a rewrite may keep it).
  Files up to `WHOLE_FILE_LIMIT` (configs, tokenizers, index files, small models) are hashed whole. A larger file
  (a weight shard) is hashed by its size plus its first and last MiB: the first MiB of a safetensors file holds its
  header (every tensor's name, dtype, shape and offset) and the first tensor's bytes, the last MiB the last
  tensor's, and reading every byte of a 405B checkpoint (~800 GB) would take longer than many runs. A large GGUF
  file is hashed by its first 32 MiB, which hold its whole header (metadata, tokenizer, tensor table), plus its
  last MiB. Names starting with "." (download caches, editor files) are skipped. The resolved path is recorded but
  not compared: the same bytes elsewhere are the same model.
  Each file's stamp (`storage.stamp`: locally size, mtime, ctime and inode; on gs:// the object's generation, size
  and checksums) is recorded beside its hash, also not compared. A later run reads a file again only when its
  stamp or the source's path differs from the record's, so a restart does not re-read a remote source (a 405B
  checkpoint is ~190 shards); any write changes the stamp, so a changed source is still hashed and refused.

Not covered: a change only in the middle of a large weight file (see above); kdjax's own code (an upgrade that
changes results is not detected); the bytes of a teacher store, which the store's own manifest checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from kdjax.gsm8k import data
from kdjax.infra import storage

FORMAT = 1
RECORD_FILE = "provenance.json"
WHOLE_FILE_LIMIT = 64 << 20
EDGE_BYTES = 1 << 20
# A GGUF file starts with its header: metadata, the tokenizer (a Llama 3 vocabulary of 128k tokens with its merges
# takes about 10 MB) and the tensor table. Hashing this many leading bytes covers the header of any Llama GGUF and
# the first tensors; parsing the header for its exact end takes seconds (the gguf reader maps every tensor).
GGUF_HEAD_BYTES = 32 << 20

# Config keys that never change a stage's output, so they may differ between a run and the one it resumes.
# Everything else in the sections a stage reads is part of its record. (train.batch_size is NOT here: it sets
# the number and size of the optimizer's updates.)
NO_EFFECT_KEYS = frozenset({
    "student.remat",           # recomputes activations in the backward pass instead of keeping them: same values
    "teacher.batch_size",      # rows of a batch are independent (padding is masked, sampling keys are per question)
    "teacher.shard_size",      # how store records are grouped into files; the store's own spec pins it too
    "teacher.spans_processes",  # which devices hold the teacher: the same tokens (a mesh.* change, not recorded)
    "eval.batch_size",         # as teacher.batch_size
    "eval.num_questions",      # how many of the recorded test questions to answer; written answers stay valid
    "train.log_every",         # logging only
    "train.checkpoint_every",  # restart points only: a killed-and-resumed run ends where an unbroken one does
    "train.keep_checkpoints",  # how many restart points are kept
    "train.chunk_size",        # the loss is summed over sequence chunks of this length: the same sum
    "data.source",             # where questions are read from: their ids and content hashes are recorded instead
    "teacher.source", "student.source",  # recorded as the content identity of models/<role>
    "teacher.adapter",         # recorded as the content hash of models/teacher's adapter
    "teacher.preset", "student.preset",  # read only by the plan stage
})

# Keys of a section one stage records that a later stage reads instead: they are left out when their section is
# recorded whole and enter the record of the stage that names them (kdjax.experiment.pipeline.Records). A store does not depend
# on teacher.max_reference_overlap, the training that filters the store's responses by it does.
READ_BY_A_LATER_STAGE = frozenset({"teacher.max_reference_overlap"})

_IGNORED = "about"  # the part of a record that is never compared


class ProvenanceError(ValueError):
  """An output folder was made by something else than this run would make it with."""


# ------------------------------------------------------------------------------------------ content identity

def _hash_range(f, digest, start: int, length: int) -> None:
  f.seek(start)
  remaining = length
  while remaining > 0:
    block = f.read(min(remaining, 1 << 20))
    if not block:
      break
    digest.update(block)
    remaining -= len(block)


def file_identity(path: str | os.PathLike) -> dict:
  """{"bytes", "sha256", "hashed"}: a whole-file hash up to WHOLE_FILE_LIMIT, else header or edges (module doc)."""
  path = storage.path(path)
  size = storage.size(path)
  digest = hashlib.sha256()
  with path.open("rb") as f:
    if size <= WHOLE_FILE_LIMIT:
      _hash_range(f, digest, 0, size)
      how = "whole"
    else:
      head = min(GGUF_HEAD_BYTES if path.suffix == ".gguf" else EDGE_BYTES, size)
      _hash_range(f, digest, 0, head)
      _hash_range(f, digest, max(head, size - EDGE_BYTES), size)
      how = "first 32 MiB (header) + last MiB" if path.suffix == ".gguf" else "first + last MiB"
  return {"bytes": size, "sha256": digest.hexdigest(), "hashed": how}


def _files(folder: pathlib.Path, skip: Iterable[str] = ()) -> list[pathlib.Path]:
  skip = set(skip)
  return [p for p in storage.files_under(folder) if p.name not in skip
          and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def source_identity(path: str | os.PathLike, known: Mapping | None = None) -> dict:
  """The content identity of a model source (a file or a folder), with its resolved path and its files' stamps
  under "about" (module doc). `known`: the identity recorded before (a "source" entry); a file whose path and
  stamp are unchanged keeps its recorded hash instead of being read again."""
  path = storage.path(path)
  resolved = path if storage.is_remote(path) else path.resolve()
  # Stamps are taken before any hashing: content written after its stamp shows as a new stamp next time.
  if resolved.is_file():
    paths, stamps = {"file": resolved}, {"file": storage.stamp(resolved)}
  else:
    paths = {p.relative_to(resolved).as_posix(): p for p in _files(resolved)}
    by_path = storage.stamps_under(resolved)
    stamps = {name: by_path.get(str(p)) for name, p in paths.items()}
  known = known if isinstance(known, Mapping) else {}
  same_place = known.get(_IGNORED, {}).get("path") == str(resolved)
  known_files, known_stamps = known.get("files", {}), known.get(_IGNORED, {}).get("stamps", {})
  files = {}
  for name, p in paths.items():
    unchanged = same_place and stamps[name] is not None and known_stamps.get(name) == stamps[name]
    files[name] = known_files[name] if unchanged and name in known_files else file_identity(p)
  return {"files": files, _IGNORED: {"path": str(resolved), "stamps": stamps}}


def folder_content(folder: str | os.PathLike) -> str:
  """A digest of every file in a stage folder but its provenance record (for inputs read byte for byte)."""
  folder = storage.path(folder)
  files = {p.relative_to(folder).as_posix(): file_identity(p) for p in _files(folder, skip=[RECORD_FILE])}
  return _digest(files)


def question_list(examples: Sequence[Mapping]) -> dict:
  """{"n", "digest", "ids": {id: hash of question and solution}} of a question list, in order."""
  ids = {str(example["id"]): data.example_hash(example) for example in examples}
  return {"n": len(examples), "digest": _digest(list(ids.items())), "ids": ids}


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ records

def settings(c: ml_collections.ConfigDict, names: Iterable[str]) -> dict:
  """The flat {dotted key: value} of the named config sections or keys, minus NO_EFFECT_KEYS, and minus the keys
  READ_BY_A_LATER_STAGE unless named themselves."""
  flat: dict[str, Any] = {}

  def add(name: str, value: Any, named: bool) -> None:
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      for key in sorted(value.keys()):
        add(f"{name}.{key}", value[key], False)
    elif name not in NO_EFFECT_KEYS and (named or name not in READ_BY_A_LATER_STAGE):
      flat[name] = value

  for name in names:
    value = c
    for part in name.split("."):
      value = value[part]
    add(name, value, True)
  return flat


def make_record(stage: str, *, settings: Mapping[str, Any] | None = None, source: dict | None = None,
                questions: Mapping[str, Sequence[Mapping]] | None = None,
                inputs: Mapping[str, tuple[str, dict]] | None = None) -> dict:
  """A record (module doc); `inputs` maps a name to (folder relative to the work folder, that folder's record)."""
  record: dict[str, Any] = {"format": FORMAT, "stage": stage, "settings": dict(settings or {})}
  if source is not None:
    record["source"] = source
  if questions:
    record["questions"] = {label: question_list(examples) for label, examples in questions.items()}
  if inputs:
    record["inputs"] = {name: {**_compact(input_record), "folder": folder}
                        for name, (folder, input_record) in inputs.items()}
  return json.loads(json.dumps(record))  # as it reads back from disk: tuples -> lists, keys -> strings


def with_content(record: dict, name: str, folder: str | os.PathLike) -> dict:
  """`record` with input `name`'s "content" set to a hash of `folder`'s files."""
  record = json.loads(json.dumps(record))
  record["inputs"][name]["content"] = folder_content(folder)
  return record


def _compact(record: Mapping) -> dict:
  """A record to embed as an input: question lists keep their count and digest, not every id."""
  compact = {key: value for key, value in record.items() if key != "questions"}
  if "questions" in record:
    compact["questions"] = {label: {"n": q["n"], "digest": q["digest"]} for label, q in record["questions"].items()}
  return compact


def _comparable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {key: _comparable(item) for key, item in value.items() if key != _IGNORED}
  if isinstance(value, list):
    return [_comparable(item) for item in value]
  return value


# ------------------------------------------------------------------------------------------ differences

def _show(value: Any) -> str:
  return "(unset)" if value is _MISSING else json.dumps(value)


_MISSING = object()


def _question_differences(label: str, old: Mapping, new: Mapping, prefix: str) -> list[str]:
  if old is _MISSING or new is _MISSING:
    return [f"{prefix}{'no' if old is _MISSING else 'a'} {label} question list, this run has "
            f"{'one' if old is _MISSING else 'none'}"]
  if "ids" not in old or "ids" not in new:
    return [f"{prefix}{old['n']} {label} questions (digest {old['digest']}), this run has {new['n']} "
            f"(digest {new['digest']})"]
  old_ids, new_ids = old["ids"], new["ids"]
  if set(old_ids) != set(new_ids):
    return [f"{prefix}{old['n']} {label} questions (ids {_id_span(old_ids)}), this run has {new['n']} "
            f"(ids {_id_span(new_ids)})"]
  changed = sorted((i for i in old_ids if old_ids[i] != new_ids[i]), key=_id_order)
  if not changed:
    return [f"{prefix}the same {label} questions in another order"]
  shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
  return [f"other text under {prefix}{label} question id{'s' if len(changed) > 1 else ''} {shown}"]


def _id_order(key: str) -> tuple:
  return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)


def _id_span(ids: Mapping[str, str]) -> str:
  keys = sorted(ids, key=_id_order)
  return "none" if not keys else (keys[0] if len(keys) == 1 else f"{keys[0]}..{keys[-1]}")


def differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
  """What differs between two records, one phrase each ("distill.temperature=5.94, this run has 1.0")."""
  found: list[str] = []
  for key in ("format", "stage", "settings", "source", "questions", "inputs", "content"):
    before, after = old.get(key, _MISSING), new.get(key, _MISSING)
    if _comparable(before) == _comparable(after):
      continue
    if key == "settings" and isinstance(before, Mapping) and isinstance(after, Mapping):
      for name in sorted(set(before) | set(after)):
        b, a = before.get(name, _MISSING), after.get(name, _MISSING)
        if b != a:
          found.append(f"{prefix}{name}={_show(b)}, this run has {_show(a)}")
    elif key == "questions" and isinstance(before, Mapping) and isinstance(after, Mapping):
      for label in sorted(set(before) | set(after)):
        if before.get(label, _MISSING) != after.get(label, _MISSING):
          found += _question_differences(label, before.get(label, _MISSING), after.get(label, _MISSING), prefix)
    elif key == "inputs" and isinstance(before, Mapping) and isinstance(after, Mapping):
      for name in sorted(set(before) | set(after)):
        b, a = before.get(name, _MISSING), after.get(name, _MISSING)
        if b is _MISSING or a is _MISSING:
          found.append(f"{prefix}{'no' if b is _MISSING else 'an'} input {name}, this run has "
                       f"{'one' if b is _MISSING else 'none'}")
        elif _comparable(b) != _comparable(a):
          # A setting that changed both here and in the input (the seed, the data sizes) is named once.
          plain, named = differences(b, a, prefix), differences(b, a, f"{prefix}{a.get('folder', name)}'s ")
          found += [phrase for same, phrase in zip(plain, named) if same not in found]
    elif key == "source":
      path = lambda record: (record.get(_IGNORED, {}).get("path", "?") if isinstance(record, Mapping) else "none")
      found.append(f"{prefix}source {path(before)}, this run has {path(after)} (other bytes)")
    elif key == "content":
      found.append(f"{prefix}content {_show(before)}, this run has {_show(after)}")
    else:
      found.append(f"{prefix}{key}={_show(before)}, this run has {_show(after)}")
  return found


def mismatch_message(folder: str, old: Mapping, new: Mapping) -> str:
  """One line: what `folder` was made with, what this run has, and what to do."""
  found = differences(old, new) or ["another record"]
  shown = "; ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")
  return f"{folder} was made with {shown}: use a new --config.workdir or delete {folder}"


# ------------------------------------------------------------------------------------------ folders

def read(folder: str | os.PathLike) -> dict | None:
  path = storage.path(folder) / RECORD_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise ProvenanceError(f"cannot read {path} ({e}): delete {path.parent}") from None


def write_json(path: str | os.PathLike, content: Mapping) -> None:
  """Writes a JSON record atomically (a reader sees the old file or the new one, never half of one)."""
  path = storage.path(path)
  storage.makedirs(path.parent)
  storage.write_json(path, content, indent=1, sort_keys=True, default=str)


def write(folder: str | os.PathLike, record: Mapping) -> None:
  """Writes `record` (with the time under "about") as the folder's provenance.json."""
  write_json(storage.path(folder) / RECORD_FILE,
             {**record, _IGNORED: {**record.get(_IGNORED, {}), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})


def matches(recorded: Mapping, expected: Mapping) -> bool:
  return _comparable(recorded) == _comparable(expected)


def check(folder: pathlib.Path, name: str, expected: Mapping) -> dict | None:
  """The folder's record when it equals `expected`; None when there is none; else ProvenanceError."""
  recorded = read(folder)
  if recorded is not None and not matches(recorded, expected):
    raise ProvenanceError(mismatch_message(name, recorded, expected))
  return recorded


def check_claimable(folder: str | os.PathLike, name: str, expected: Mapping) -> bool:
  """What `claim` decides, without writing: True to reuse or resume, False for a new folder, else refused."""
  folder = storage.path(folder)
  if check(folder, name, expected) is not None:
    return True
  if folder.is_dir() and any(p.name != RECORD_FILE + ".tmp" for p in folder.iterdir()):
    raise ProvenanceError(f"{name} holds outputs with no provenance record (made by an older kdjax or by hand): "
                          f"use a new --config.workdir or delete {name}")
  return False


def claim(folder: str | os.PathLike, name: str, expected: Mapping, *, writer: bool = True) -> bool:
  """Takes `folder` for output made as `expected` says; True when it was already so (reuse or resume).

  `name` is the folder as messages show it (relative to the work folder). Only the `writer` (process 0) writes.
  On several processes every one calls it: all decide on the folder as it was before anyone wrote, and return
  after the record is written.
  """
  from kdjax.infra import parallel
  reusable = check_claimable(folder, name, expected)
  parallel.sync(f"kdjax.experiment.provenance:{name}:checked")
  if not reusable and writer:
    write(folder, expected)
  parallel.sync(f"kdjax.experiment.provenance:{name}:claimed")
  return reusable


def require(folder: str | os.PathLike, name: str, expected: Mapping, stage: str) -> None:
  """Refuses to read `folder` unless its record equals `expected` (it was made as this run would make it)."""
  if check(storage.path(folder), name, expected) is None:
    raise ProvenanceError(f"{name} has no provenance record: run the {stage} stage first "
                          f"(delete {name} if an older kdjax made it)")
