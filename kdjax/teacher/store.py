"""The teacher top-k store: what the teacher said and how sure it was, per response token.

Layout of a store folder::

  shard-00000.npz     examples at positions [0, S) of the question list (S = shard size)
  shard-00001.npz     positions [S, 2S), ...
  manifest-<p>.json   progress of writer process p (rewritten after each of its shards)
  manifest.json       written by `finalize()`: spec, all shards, token and byte totals

Every manifest lists, per shard, the sha256 of the bytes its writer wrote. Resuming writers,
`finalize()` and `StoreReader` check each shard against it, so a damaged shard is reported by
name (delete it; the generate stage rewrites it) instead of failing deep inside training.

Work is split in fixed units: shard i always holds positions [i*S, (i+1)*S), so a shard is
either complete or absent, reruns write byte-identical shards, and process p of n writes
the shards with i % n == p. Every file is committed through `kdjax.infra.storage` (locally: written to
`<name>.tmp`, fsynced and renamed over `<name>`; on gs://: one upload), so a kill leaves at worst a
stale `.tmp`, which readers never look at and the next writer overwrites.

A shard is one uncompressed `.npz` (written with fixed zip timestamps, hence reproducible):

  response_ids, student_prompt_ids, teacher_prompt_ids   flat token ids of all its examples
  *_offsets (int64, E+1)                                 example e owns [off[e], off[e+1])
  topk_ids (T*k ids), topk_logprobs (T, k) float32       top-k at temperature 1, per token
  tail_mass (T,) float32                                 probability outside the top-k
  tail_log_mass (T, n) float32                           log of the mass outside the top-k at each of the
                                                         spec's n tail_temperatures (absent in older stores)
  metadata (uint8)                                       per-example fields as column JSON

Ids are stored as uint16 when vocab_size <= 65536; larger vocabularies are bit-packed with ceil(log2(vocab_size))
bits per id instead of uint32 (Llama 3's 128256 ids: 17 bits, 312 instead of 408 bytes per token at k=50).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO, Callable

import numpy as np

from kdjax.infra import storage
from kdjax.gsm8k import extract

FORMAT_NAME = "kdjax-teacher-store"
FORMAT_VERSION = 1
FINISH_REASONS = ("stop", "length")
MANIFEST = "manifest.json"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps make reruns byte-identical
# The rule by which kdjax counts a response correct where it decides something (`distill.correct_only`, the
# teacher's correct count): eval's primary rule, the last answer a response states. A store records the rule its
# `correct` flags were written under (`teacher_job.json`); stores made before this rule was the default used the
# first `#### N` (strict), so readers that decide re-read the answer from the stored text (`StoreReader.filter`).
CORRECT_RULE = "final"
_META_FIELDS = ("question_id", "question_hash", "strategy", "teacher_model", "sampling",
                "response_text", "finish_reason", "extracted_answer", "gold_answer", "correct")


# ---------------------------------------------------------------------------------------------- token ids

def id_format_for(vocab_size: int) -> str:
  """The id format of a vocabulary: uint16, or packed<bits> with the fewest bits that hold its largest id."""
  if vocab_size <= 1 << 16:
    return "uint16"
  return f"packed{(vocab_size - 1).bit_length()}"


def encode_ids(ids: np.ndarray, id_format: str) -> np.ndarray:
  """`ids` (any shape) flattened into the stored array of `id_format`."""
  flat = np.asarray(ids).reshape(-1)
  if id_format == "uint16":
    return flat.astype(np.uint16)
  bits = int(id_format.removeprefix("packed"))
  # Little-endian bit order: the low `bits` bits of each id, packed back to back.
  as_bytes = flat.astype("<u4").view(np.uint8).reshape(-1, 4)
  id_bits = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
  return np.packbits(id_bits.reshape(-1), bitorder="little")


def decode_ids(stored: np.ndarray, count: int, id_format: str) -> np.ndarray:
  """The first `count` ids of a stored array, as int32."""
  if id_format == "uint16":
    return stored.astype(np.int32)
  bits = int(id_format.removeprefix("packed"))
  id_bits = np.zeros((count, 32), np.uint8)
  id_bits[:, :bits] = np.unpackbits(stored, count=count * bits, bitorder="little").reshape(count, bits)
  return np.packbits(id_bits, axis=1, bitorder="little").view("<u4").reshape(count).astype(np.int32)


class StoreError(ValueError):
  """A store or a record is invalid."""


class StoreSpecMismatchError(StoreError):
  """A writer was opened on a store written with a different spec."""


class StoreIncompleteError(StoreError):
  """Some shards of the store are missing."""


def _json_normalized(value: Any) -> Any:
  # Manifests compare specs as JSON; normalizing up front (tuples -> lists) makes a spec equal to
  # itself after a round trip through the manifest.
  try:
    return json.loads(json.dumps(value, sort_keys=True))
  except TypeError as err:
    raise StoreError(f"not JSON-serializable: {err}") from None


@dataclasses.dataclass(frozen=True)
class StoreSpec:
  """What a store holds; a writer refuses to resume into a store with a different spec."""

  teacher_model: str
  strategy: str
  vocab_size: int
  k: int = 50
  sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  placement: str = "system"
  questions: str = ""  # which question list, e.g. "gsm8k:train seed=0 n=7000"
  # Temperatures T at which each token's tail (mass of softmax(logits / T) outside the top-k) is stored;
  # empty in stores written before the field existed.
  tail_temperatures: tuple[float, ...] = ()

  def __post_init__(self):
    if self.vocab_size < 2 or not 1 <= self.k <= self.vocab_size:
      raise StoreError(f"need 1 <= k <= vocab_size, got k={self.k}, vocab_size={self.vocab_size}")
    temperatures = tuple(float(t) for t in self.tail_temperatures)
    if any(not 0.0 < t < math.inf for t in temperatures) or len(set(temperatures)) != len(temperatures):
      raise StoreError(f"tail_temperatures must be distinct positive numbers, got {self.tail_temperatures!r}")
    object.__setattr__(self, "tail_temperatures", temperatures)
    object.__setattr__(self, "sampling", _json_normalized(dict(self.sampling)))

  @property
  def id_format(self) -> str:
    return id_format_for(self.vocab_size)

  def to_json(self) -> dict:
    return _json_normalized(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> "StoreSpec":
    return cls(**value)


@dataclasses.dataclass(eq=False)
class TeacherRecord:
  """One teacher response to one question, with its per-token top-k distribution."""

  question_id: int
  question_hash: str
  strategy: str
  teacher_model: str
  sampling: dict
  student_prompt_ids: np.ndarray  # (P_s,) the chat the student is trained on
  teacher_prompt_ids: np.ndarray  # (P_t,) the primed chat the teacher answered
  response_text: str
  response_ids: np.ndarray  # (T,) sampled tokens
  topk_ids: np.ndarray  # (T, k)
  topk_logprobs: np.ndarray  # (T, k) log-probs at temperature 1
  tail_mass: np.ndarray  # (T,) probability mass outside the top-k
  finish_reason: str  # "stop" or "length"
  extracted_answer: float | None
  gold_answer: float
  correct: bool
  # (T, n) log of the mass outside the top-k at each of `tail_temperatures` (the store spec's); None or
  # (T, 0) when the store keeps no tempered tails.
  tail_log_mass: np.ndarray | None = None
  tail_temperatures: tuple[float, ...] = ()

  @property
  def num_tokens(self) -> int:
    return int(len(self.response_ids))


def _record_metadata(record: TeacherRecord) -> dict:
  """The JSON fields of a record; numpy scalars (np.int64, np.bool_) become plain Python."""
  extracted = record.extracted_answer
  return {
      "question_id": int(record.question_id), "question_hash": str(record.question_hash),
      "strategy": record.strategy, "teacher_model": record.teacher_model,
      "sampling": _json_normalized(dict(record.sampling)), "response_text": str(record.response_text),
      "finish_reason": record.finish_reason,
      "extracted_answer": None if extracted is None else float(extracted),
      "gold_answer": float(record.gold_answer), "correct": bool(record.correct)}


# ----------------------------------------------------------------------------- files


def _atomic_write(path: pathlib.Path, write: Callable[[BinaryIO], None]) -> None:
  with storage.atomic_writer(path, "wb") as f:
    write(f)


def _write_json(path: pathlib.Path, value: Any) -> None:
  data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
  storage.write_bytes(path, data)


def _write_npz(f: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
  # np.savez stamps members with the current time; writing the zip here keeps shards reproducible.
  with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
    for name, array in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
      with archive.open(info, "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise StoreError(f"cannot read {path}: {err}") from None


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.npz"


def _corrupt_message(path: pathlib.Path, detail: str) -> str:
  return (f"store shard {path} is corrupt ({detail}): delete it and re-run the generate stage, which rewrites "
          f"exactly that shard")


def verify_shard(path: pathlib.Path, expected_sha256: str | None) -> str:
  """The sha256 of shard `path`; raises StoreError naming the shard when it differs from the recorded one."""
  digest = storage.sha256(path)
  if expected_sha256 is not None and digest != expected_sha256:
    raise StoreError(_corrupt_message(path, f"sha256 {digest[:16]}... differs from the {expected_sha256[:16]}... "
                                            f"its manifest recorded when it was written"))
  return digest


def _shard_stats(path: pathlib.Path, expected_sha256: str | None = None) -> dict:
  """A shard's manifest entry, read back from disk; its checksum is checked when one was recorded."""
  digest = verify_shard(path, expected_sha256)
  try:
    with np.load(storage.readable(path), allow_pickle=False) as shard:
      offsets = shard["response_offsets"]
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
    raise StoreError(_corrupt_message(path, str(err))) from None
  return {"file": path.name, "examples": int(len(offsets) - 1), "tokens": int(offsets[-1]),
          "bytes": storage.size(path), "sha256": digest}


def recorded_checksums(folder: pathlib.Path) -> dict[int, str]:
  """Shard index -> the sha256 its writer recorded (manifest.json and every process manifest).

  Stores written before checksums were recorded have none; their shards are read unchecked.
  """
  recorded: dict[int, str] = {}
  for manifest in _existing_manifests(folder):
    for shard in _read_json(manifest).get("shards", []):
      if shard.get("sha256"):
        recorded.setdefault(int(shard["index"]), shard["sha256"])
  return recorded


def _header(spec: StoreSpec, num_examples: int, shard_size: int) -> dict:
  return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": spec.to_json(),
          "num_examples": num_examples, "shard_size": shard_size,
          "num_shards": math.ceil(num_examples / shard_size), "id_format": spec.id_format}


_IDENTITY_KEYS = ("format", "version", "spec", "num_examples", "shard_size")


def _header_differences(expected: dict, found: dict) -> list[str]:
  differences = []
  for key in _IDENTITY_KEYS:
    want, have = expected.get(key), found.get(key)
    if key == "spec" and isinstance(have, dict):
      differences += [f"{name}: store has {have.get(name)!r}, given {value!r}"
                      for name, value in want.items() if have.get(name) != value]
      differences += [f"{name}: store has it, given spec does not" for name in have if name not in want]
    elif want != have:
      differences.append(f"{key}: store has {have!r}, given {want!r}")
  return differences


def _existing_manifests(folder: pathlib.Path) -> list[pathlib.Path]:
  finalized = [folder / MANIFEST] if (folder / MANIFEST).is_file() else []
  return finalized + sorted(folder.glob("manifest-*.json"))


# ----------------------------------------------------------------------------- writing


class StoreWriter:
  """Writes this process's share of a store's shards; process 0 finalizes the store."""

  def __init__(self, path: str | os.PathLike, spec: StoreSpec, *, num_examples: int,
               shard_size: int, process_index: int = 0, process_count: int = 1):
    if num_examples < 0 or shard_size < 1:
      raise StoreError(f"need num_examples >= 0 and shard_size >= 1, got {num_examples}, {shard_size}")
    if not 0 <= process_index < process_count:
      raise StoreError(f"process_index {process_index} not in [0, {process_count})")
    self.path = storage.path(path)
    self.spec = spec
    self.num_examples = num_examples
    self.shard_size = shard_size
    self.process_index = process_index
    self.process_count = process_count
    self.num_shards = math.ceil(num_examples / shard_size)
    self._header = _header(spec, num_examples, shard_size)
    storage.makedirs(self.path)
    self._check_existing_manifests()
    recorded = recorded_checksums(self.path)
    self._written = {i: _shard_stats(self._shard_path(i), recorded.get(i)) for i in self.own_shards()
                     if self._shard_path(i).is_file()}
    self._write_process_manifest()

  def _check_existing_manifests(self) -> None:
    manifests = _existing_manifests(self.path)
    if not manifests and any(self.path.glob("shard-*.npz")):
      raise StoreError(f"{self.path} holds shard files but no manifest; refusing to mix them in")
    for manifest in manifests:
      differences = _header_differences(self._header, _read_json(manifest))
      if differences:
        raise StoreSpecMismatchError(
            f"store {self.path} was written with a different spec ({manifest.name}: "
            f"{'; '.join(differences)}); use a new folder")

  def _shard_path(self, index: int) -> pathlib.Path:
    return self.path / shard_name(index)

  def _write_process_manifest(self) -> None:
    shards = [{"index": i, **stats} for i, stats in sorted(self._written.items())]
    _write_json(self.path / f"manifest-{self.process_index}.json", {
        **self._header, "process_index": self.process_index, "process_count": self.process_count,
        "shards": shards})

  def own_shards(self) -> list[int]:
    """The shards this process writes: i % process_count == process_index."""
    return list(range(self.process_index, self.num_shards, self.process_count))

  def pending_shards(self) -> list[int]:
    """This process's shards that are not on disk yet."""
    return [i for i in self.own_shards() if not self._shard_path(i).is_file()]

  def shard_range(self, index: int) -> tuple[int, int]:
    """Positions [start, stop) of the question list that shard `index` holds."""
    if not 0 <= index < self.num_shards:
      raise StoreError(f"shard {index} not in [0, {self.num_shards})")
    return index * self.shard_size, min((index + 1) * self.shard_size, self.num_examples)

  def _check_record(self, position: int, record: TeacherRecord) -> None:
    where = f"record for position {position}"
    if record.strategy != self.spec.strategy or record.teacher_model != self.spec.teacher_model:
      raise StoreError(f"{where}: strategy/teacher {record.strategy!r}/{record.teacher_model!r} "
                       f"!= store's {self.spec.strategy!r}/{self.spec.teacher_model!r}")
    if record.finish_reason not in FINISH_REASONS:
      raise StoreError(f"{where}: finish_reason {record.finish_reason!r} not in {FINISH_REASONS}")
    num_tokens = len(record.response_ids)
    k = self.spec.k
    temperatures = self.spec.tail_temperatures
    if tuple(float(t) for t in record.tail_temperatures) != temperatures:
      raise StoreError(f"{where}: tail_temperatures {tuple(record.tail_temperatures)} != store's {temperatures}")
    shapes = {"response_ids": (num_tokens,), "topk_ids": (num_tokens, k),
              "topk_logprobs": (num_tokens, k), "tail_mass": (num_tokens,),
              "tail_log_mass": (num_tokens, len(temperatures))}
    for name, shape in shapes.items():
      if name == "tail_log_mass" and record.tail_log_mass is None and not temperatures:
        continue
      if np.shape(getattr(record, name)) != shape:
        raise StoreError(f"{where}: {name} has shape {np.shape(getattr(record, name))}, expected {shape}")
    for name in ("student_prompt_ids", "teacher_prompt_ids"):
      if np.ndim(getattr(record, name)) != 1:
        raise StoreError(f"{where}: {name} must be 1-D, got shape {np.shape(getattr(record, name))}")
    for name in ("response_ids", "topk_ids", "student_prompt_ids", "teacher_prompt_ids"):
      ids = np.asarray(getattr(record, name))
      if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0
                       or ids.max() >= self.spec.vocab_size):
        raise StoreError(f"{where}: {name} must be integers in [0, {self.spec.vocab_size})")

  def _shard_arrays(self, records: Sequence[TeacherRecord]) -> dict[str, np.ndarray]:
    id_format = self.spec.id_format

    def offsets(name):
      return np.cumsum([0] + [len(getattr(r, name)) for r in records], dtype=np.int64)

    def concat(name, dtype):
      parts = [np.asarray(getattr(r, name)) for r in records]
      return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    k = self.spec.k
    topk_ids = concat("topk_ids", np.int64) if records else np.zeros((0, k), np.int64)
    logprobs = concat("topk_logprobs", np.float32) if records else np.zeros((0, k), np.float32)
    metadata = {name: [] for name in _META_FIELDS}
    for record in records:
      for name, value in _record_metadata(record).items():
        metadata[name].append(value)
    return {
        "response_offsets": offsets("response_ids"),
        "student_prompt_offsets": offsets("student_prompt_ids"),
        "teacher_prompt_offsets": offsets("teacher_prompt_ids"),
        "response_ids": encode_ids(concat("response_ids", np.int64), id_format),
        "student_prompt_ids": encode_ids(concat("student_prompt_ids", np.int64), id_format),
        "teacher_prompt_ids": encode_ids(concat("teacher_prompt_ids", np.int64), id_format),
        "topk_ids": encode_ids(topk_ids, id_format),
        "topk_logprobs": logprobs.reshape(-1, k),
        "tail_mass": concat("tail_mass", np.float32),
        "tail_log_mass": np.concatenate(
            [np.zeros((0, len(self.spec.tail_temperatures)), np.float32)]
            + [np.asarray(r.tail_log_mass, np.float32).reshape(r.num_tokens, len(self.spec.tail_temperatures))
               for r in records
               if r.tail_log_mass is not None]).astype(np.float32),
        "metadata": np.frombuffer(json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode(),
                                  np.uint8),
    }

  def write_shard(self, index: int, records: Sequence[TeacherRecord]) -> None:
    """Atomically writes shard `index` (records in position order) and this process's manifest."""
    if index % self.process_count != self.process_index:
      raise StoreError(f"shard {index} belongs to process {index % self.process_count}, "
                       f"not {self.process_index}")
    start, stop = self.shard_range(index)
    if len(records) != stop - start:
      raise StoreError(f"shard {index} holds positions [{start}, {stop}): expected {stop - start} "
                       f"records, got {len(records)}")
    for position, record in enumerate(records, start=start):
      self._check_record(position, record)
    arrays = self._shard_arrays(records)
    _atomic_write(self._shard_path(index), lambda f: _write_npz(f, arrays))
    # The checksum is taken once, right after the write; later damage to the file no longer matches it.
    self._written[index] = _shard_stats(self._shard_path(index))
    self._write_process_manifest()

  def finalize(self) -> dict:
    """Process 0 only: checks every shard is on disk and writes manifest.json; returns it."""
    if self.process_index != 0:
      raise StoreError(f"finalize() is process 0's job, not process {self.process_index}'s")
    missing = [i for i in range(self.num_shards) if not self._shard_path(i).is_file()]
    if missing:
      raise StoreIncompleteError(_missing_message(self.path, missing, self.num_shards))
    recorded = {**recorded_checksums(self.path), **{i: st["sha256"] for i, st in self._written.items()}}
    shards = [{"index": i, **_shard_stats(self._shard_path(i), recorded.get(i))} for i in range(self.num_shards)]
    total_tokens = sum(s["tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    manifest = {**self._header, "shards": shards, "total_tokens": total_tokens,
                "total_bytes": total_bytes,
                "bytes_per_token": total_bytes / total_tokens if total_tokens else None}
    _write_json(self.path / MANIFEST, manifest)
    return manifest


def _missing_message(path: pathlib.Path, missing: list[int], num_shards: int) -> str:
  shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
  return (f"store {path} is incomplete: {len(missing)} of {num_shards} shards missing "
          f"({shown})")


# ----------------------------------------------------------------------------- reading


class StoreView(Sequence):
  """A read-only selection of a store's examples (e.g. the correct ones)."""

  def __init__(self, reader: "StoreReader", indices: Sequence[int]):
    self._reader = reader
    self.indices = list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, item):
    if isinstance(item, slice):
      return [self._reader[i] for i in self.indices[item]]
    return self._reader[self.indices[item]]

  @property
  def positions(self) -> list[int]:
    """Positions in the question list of the selected examples."""
    return [self._reader.positions[i] for i in self.indices]


class StoreReader(Sequence):
  """Reads a store in example order; `store[i]` is a TeacherRecord.

  With allow_partial=True the reader exposes only the shards present; `positions[i]` tells
  which question-list position `store[i]` came from.
  """

  def __init__(self, path: str | os.PathLike, *, allow_partial: bool = False, cached_shards: int = 4):
    self.path = storage.path(path)
    manifests = _existing_manifests(self.path) if self.path.is_dir() else []
    if not manifests:
      raise StoreError(f"{self.path} is not a teacher store (no manifest)")
    header = _read_json(manifests[0])
    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
      raise StoreError(f"{manifests[0]}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    self.spec = StoreSpec.from_json(header["spec"])
    self.num_examples = int(header["num_examples"])
    self.shard_size = int(header["shard_size"])
    self.num_shards = int(header["num_shards"])
    self.finalized = manifests[0].name == MANIFEST
    present = [i for i in range(self.num_shards) if (self.path / shard_name(i)).is_file()]
    missing = sorted(set(range(self.num_shards)) - set(present))
    if missing and not allow_partial:
      raise StoreIncompleteError(_missing_message(self.path, missing, self.num_shards)
                                 + ": re-run the generate stage to write them")
    self.complete = not missing
    self._cache: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self._cached_shards = max(1, cached_shards)
    self._shard_bytes = {}
    self._shard_tokens = {}
    self._metadata: list[dict] = []
    self.positions: list[int] = []
    recorded = recorded_checksums(self.path)
    for i in present:
      path_i = self.path / shard_name(i)
      verify_shard(path_i, recorded.get(i))  # before training on it: a damaged shard is one line, not a traceback
      try:
        with np.load(storage.readable(path_i), allow_pickle=False) as shard:
          num_tokens = int(shard["response_offsets"][-1])
          columns = json.loads(shard["metadata"].tobytes().decode())
      except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise StoreError(_corrupt_message(path_i, str(err))) from None
      self._shard_bytes[i], self._shard_tokens[i] = storage.size(path_i), num_tokens
      start = i * self.shard_size
      for e in range(len(columns["question_id"])):
        self._metadata.append({name: columns[name][e] for name in _META_FIELDS})
        self.positions.append(start + e)

  def __len__(self) -> int:
    return len(self.positions)

  @property
  def total_tokens(self) -> int:
    return sum(self._shard_tokens.values())

  @property
  def total_bytes(self) -> int:
    return sum(self._shard_bytes.values())

  @property
  def bytes_per_token(self) -> float:
    """Shard bytes per response token (what the top-k store costs per generated token)."""
    return self.total_bytes / self.total_tokens if self.total_tokens else float("nan")

  def metadata(self, index: int) -> dict:
    """The per-example fields of `store[index]` without loading its arrays."""
    return dict(self._metadata[index])

  def _load_shard(self, shard_index: int) -> dict:
    if shard_index in self._cache:
      self._cache.move_to_end(shard_index)
      return self._cache[shard_index]
    id_format = self.spec.id_format
    path = self.path / shard_name(shard_index)
    try:
      with np.load(storage.readable(path), allow_pickle=False) as shard:
        arrays = {name: shard[name] for name in shard.files if name != "metadata"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # damaged after it was opened
      raise StoreError(_corrupt_message(path, str(err))) from None
    decoded = {}
    for name in ("response", "student_prompt", "teacher_prompt"):
      offsets = arrays[f"{name}_offsets"]
      decoded[f"{name}_offsets"] = offsets
      decoded[f"{name}_ids"] = decode_ids(arrays[f"{name}_ids"], int(offsets[-1]), id_format)
    num_tokens = int(decoded["response_offsets"][-1])
    decoded["topk_ids"] = decode_ids(
        arrays["topk_ids"], num_tokens * self.spec.k, id_format).reshape(num_tokens, self.spec.k)
    decoded["topk_logprobs"] = arrays["topk_logprobs"]
    decoded["tail_mass"] = arrays["tail_mass"]
    decoded["tail_log_mass"] = arrays.get(
        "tail_log_mass", np.zeros((num_tokens, len(self.spec.tail_temperatures)), np.float32))
    for array in decoded.values():
      array.flags.writeable = False  # records are views into this cache
    self._cache[shard_index] = decoded
    if len(self._cache) > self._cached_shards:
      self._cache.popitem(last=False)
    return decoded

  def __getitem__(self, item):
    if isinstance(item, slice):
      return [self[i] for i in range(*item.indices(len(self)))]
    index = item + len(self) if item < 0 else item
    if not 0 <= index < len(self):
      raise IndexError(f"store index {item} out of range for {len(self)} examples")
    position = self.positions[index]
    shard_index, local = divmod(position, self.shard_size)
    shard = self._load_shard(shard_index)

    def span(name):
      offsets = shard[f"{name}_offsets"]
      return slice(int(offsets[local]), int(offsets[local + 1]))

    response = span("response")
    meta = self._metadata[index]
    return TeacherRecord(
        question_id=meta["question_id"], question_hash=meta["question_hash"],
        strategy=meta["strategy"], teacher_model=meta["teacher_model"], sampling=meta["sampling"],
        student_prompt_ids=shard["student_prompt_ids"][span("student_prompt")],
        teacher_prompt_ids=shard["teacher_prompt_ids"][span("teacher_prompt")],
        response_text=meta["response_text"], response_ids=shard["response_ids"][response],
        topk_ids=shard["topk_ids"][response], topk_logprobs=shard["topk_logprobs"][response],
        tail_mass=shard["tail_mass"][response], finish_reason=meta["finish_reason"],
        extracted_answer=meta["extracted_answer"], gold_answer=meta["gold_answer"],
        correct=meta["correct"], tail_log_mass=shard["tail_log_mass"][response],
        tail_temperatures=self.spec.tail_temperatures)

  def __iter__(self) -> Iterator[TeacherRecord]:
    for index in range(len(self)):
      yield self[index]

  def is_correct(self, index: int, rule: str | None = None) -> bool:
    """Whether `store[index]` answers its question: its stored `correct` flag, or with `rule` its stored response
    text read again under that extraction rule (`kdjax.gsm8k.extract`)."""
    meta = self._metadata[index]
    if rule is None:
      return bool(meta["correct"])
    return extract.is_correct(extract.extract_answer(meta["response_text"] or "", rule), float(meta["gold_answer"]))

  def filter(self, correct_only: bool = True, rule: str | None = None) -> StoreView:
    """The examples to train on: the correct ones (`is_correct`: the stored flags, or read again under `rule`)
    or all of them."""
    return StoreView(self, [i for i in range(len(self._metadata)) if not correct_only or self.is_correct(i, rule)])
