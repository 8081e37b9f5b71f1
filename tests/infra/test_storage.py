"""kdjax.infra.storage: local commit semantics, gs:// against a real GCS API on localhost, and no write outside it."""

import ast
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import helpers
from kdjax.infra import storage

REPO = pathlib.Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------ acceptance 3

_WRITE_METHODS = {"write_text", "write_bytes", "mkdir", "symlink_to", "hardlink_to", "touch", "unlink", "rmdir",
                  "savefig", "tofile"}
_MODULE_WRITES = {"os": {"replace", "rename", "renames", "remove", "unlink", "makedirs", "mkdir", "rmdir",
                         "symlink", "link", "truncate", "fdopen"},
                  "shutil": {"copy", "copy2", "copyfile", "copytree", "move", "rmtree", "copyfileobj"},
                  "np": {"save", "savez", "savez_compressed", "savetxt"},
                  "numpy": {"save", "savez", "savez_compressed", "savetxt"}}


def _write_mode(node: ast.Call, mode_position: int) -> bool:
  mode = node.args[mode_position] if len(node.args) > mode_position else None
  for keyword in node.keywords:
    if keyword.arg == "mode":
      mode = keyword.value
  if mode is None:
    return False
  if not isinstance(mode, ast.Constant) or not isinstance(mode.value, str):
    return True  # a computed mode may write
  return any(c in mode.value for c in "wax+")


def bare_writes(source: str) -> list[tuple[int, str]]:
  """(line, call) of every file write in `source` that bypasses kdjax.infra.storage."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    if node.args and ast.unparse(node.args[0]) == "os.devnull":
      continue  # discarding output is no file
    if isinstance(func, ast.Name) and func.id == "open" and _write_mode(node, 1):
      found.append((node.lineno, "open(..., write mode)"))
    elif isinstance(func, ast.Attribute):
      owner = func.value.id if isinstance(func.value, ast.Name) else None
      if owner in _MODULE_WRITES and func.attr in _MODULE_WRITES[owner]:
        found.append((node.lineno, f"{owner}.{func.attr}"))
      elif owner not in ("storage", "zipfile", "archive", "zf") and func.attr == "open" and _write_mode(node, 0):
        found.append((node.lineno, ".open(write mode)"))
      elif func.attr in _WRITE_METHODS and owner != "storage":
        found.append((node.lineno, f".{func.attr}()"))
  return found


def test_write_checker_catches_each_kind_of_bare_write():
  snippets = ['open(p, "w")', 'open(p, mode="ab")', "open(p, m)", 'p.open("w")', "os.replace(a, b)",
              "shutil.rmtree(p)", "shutil.copyfile(a, b)", "p.write_text('x')", "p.write_bytes(b'')",
              "p.mkdir(parents=True)", "os.makedirs(p)", "fig.savefig(p)", "np.savez(p, a=a)"]
  for snippet in snippets:
    assert bare_writes(snippet), snippet
  reads = ["open(p)", 'open(p, "rb")', 'p.open("r")', "p.read_text()", "storage.write_text(p, 'x')",
           "storage.makedirs(p)", "s.replace('a', 'b')", 'zf.open(member)', 'archive.open(info, "w")',
           'open(os.devnull, "w")']
  for snippet in reads:
    assert not bare_writes(snippet), snippet


def test_no_file_in_kdjax_writes_outside_the_storage_layer():
  """Issue 12 acceptance 3: every write goes through kdjax/infra/storage.py."""
  offenders = []
  for file in sorted((REPO / "kdjax").rglob("*.py")):
    if file == REPO / "kdjax" / "infra" / "storage.py":
      continue
    offenders += [f"{file.relative_to(REPO)}:{line}: {call}" for line, call in bare_writes(file.read_text())]
  assert not offenders, "writes outside kdjax.infra.storage:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------------------ local disk


def test_local_paths_take_the_plain_path(tmp_path):
  """Acceptance 4: a local workdir stays a pathlib.Path, written in place with tmp + fsync + os.replace."""
  target = storage.path(tmp_path / "a.json")
  assert type(target) is type(pathlib.Path()) and not storage.is_remote(target)
  assert storage.local_copy(target) == target  # no copy of local files
  assert storage.readable(target) == target
  storage.write_json(target, {"x": [1, 2]}, indent=1)
  assert json.loads(target.read_text()) == {"x": [1, 2]}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_publish_renames_another_programs_file_into_place(tmp_path):
  """A compiler's output (kdjax.serving.cpu.kernels) becomes the target whole, replacing an older one; no remote targets."""
  (tmp_path / "lib.so").write_bytes(b"old")
  with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
    built = pathlib.Path(scratch) / "out.so"
    built.write_bytes(b"new library")
    assert storage.publish(built, tmp_path / "lib.so") == tmp_path / "lib.so"
    assert not built.exists()
  assert (tmp_path / "lib.so").read_bytes() == b"new library"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]
  with pytest.raises(ValueError, match="local"):
    storage.publish(tmp_path / "lib.so", "gs://bucket/lib.so")


def test_local_runs_never_load_the_cloud_libraries(tmp_path):
  """A local workdir costs nothing extra: writing, reading and listing never import fsspec, gcsfs or epath."""
  code = ("import sys; from kdjax.infra import storage; p = storage.makedirs(sys.argv[1]) / 'x.json';"
          "storage.write_json(p, [1]); storage.append_text(p.with_name('y.txt'), 'a'); list(p.parent.glob('*'));"
          "print(sorted(m for m in ('fsspec', 'gcsfs', 'etils.epath') if m in sys.modules))")
  env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env={**env, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]" and json.loads((tmp_path / "run" / "x.json").read_text()) == [1]


def test_local_failed_write_keeps_the_old_content(tmp_path):
  target = tmp_path / "result.txt"
  storage.write_text(target, "old")
  with pytest.raises(RuntimeError):
    with storage.atomic_writer(target, "w") as f:
      f.write("half of the new")
      raise RuntimeError("killed")
  assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_local_append_and_truncate(tmp_path):
  target = tmp_path / "samples.jsonl"
  storage.append_text(target, "a\n")
  storage.append_text(target, "b\nhalf")
  storage.truncate(target, 4)
  assert target.read_bytes() == b"a\nb\n"


def _check_conditional_writes(p, remove_behind_its_back) -> None:
  """Compare-and-swap on one file or object: create only where absent, replace and remove only at the version read."""
  assert storage.read_versioned(p) is None
  first = storage.create_if_absent(p, b"one")
  assert first is not None and storage.read_versioned(p) == (b"one", first)
  assert storage.create_if_absent(p, b"two") is None  # exists: untouched
  assert storage.read_versioned(p) == (b"one", first)
  second = storage.replace_if_version(p, b"three", first)
  assert second not in (None, first) and storage.read_versioned(p) == (b"three", second)
  assert storage.replace_if_version(p, b"stale writer", first) is None  # read an older version: refused
  assert not storage.remove_if_version(p, first)
  assert storage.read_versioned(p) == (b"three", second)
  assert storage.remove_if_version(p, second) and storage.read_versioned(p) is None
  assert storage.replace_if_version(p, b"gone", second) is None and not storage.remove_if_version(p, second)
  third = storage.create_if_absent(p, b"four")
  remove_behind_its_back()
  assert storage.replace_if_version(p, b"five", third) is None and storage.read_versioned(p) is None


def test_local_conditional_writes(tmp_path):
  _check_conditional_writes(tmp_path / "lease.json", (tmp_path / "lease.json").unlink)
  assert list(tmp_path.iterdir()) == []  # no temporary file left behind


# ------------------------------------------------------------------------------------------ gs:// (emulator)


def _object_bytes(emulator, bucket: str, name: str) -> bytes | None:
  """The object's content as the GCS JSON API serves it (independent of kdjax, gcsfs and fsspec)."""
  import urllib.error
  import urllib.parse
  import urllib.request
  url = f"{emulator.url}/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
  try:
    with urllib.request.urlopen(url, timeout=30) as response:
      return response.read()
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return None
    raise


def test_gs_writes_commit_whole_objects(gcs_emulator):
  bucket = gcs_emulator.create_bucket("kdjax-unit")
  root = storage.path(f"gs://{bucket}/run")
  assert storage.is_remote(root) and storage.makedirs(root) == root
  with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket not found"):
    storage.makedirs("gs://no-such-bucket/run")
  storage.write_json(root / "config.json", {"a": 1}, indent=2)
  assert _object_bytes(gcs_emulator, bucket, "run/config.json") == b'{\n  "a": 1\n}\n'
  assert storage.size(root / "config.json") == 13 and (root / "config.json").is_file()
  # A write interrupted before it completes leaves no object (and no temp object) behind.
  with pytest.raises(RuntimeError):
    with storage.atomic_writer(root / "shard.npz") as f:
      f.write(b"half a shard")
      raise RuntimeError("killed")
  assert _object_bytes(gcs_emulator, bucket, "run/shard.npz") is None
  storage.append_text(root / "samples.jsonl", '{"id": 1}\n')
  storage.append_text(root / "samples.jsonl", '{"id": 2}\nto')
  storage.truncate(root / "samples.jsonl", 20)
  assert _object_bytes(gcs_emulator, bucket, "run/samples.jsonl") == b'{"id": 1}\n{"id": 2}\n'
  log = storage.appender(root / "metrics.jsonl")
  log.write("1\n")
  log.flush()
  log.write("2\n")
  log.close()
  assert _object_bytes(gcs_emulator, bucket, "run/metrics.jsonl") == b"1\n2\n"
  with storage.staged_dir(root / "tokenizer") as folder:
    (folder / "sub").mkdir()
    (folder / "sub" / "vocab.txt").write_text("a b")
  assert _object_bytes(gcs_emulator, bucket, "run/tokenizer/sub/vocab.txt") == b"a b"
  copy = storage.local_copy(root / "tokenizer")
  assert (copy / "sub" / "vocab.txt").read_text() == "a b"
  storage.link_dir(root / "teacher", root / "tokenizer")
  assert _object_bytes(gcs_emulator, bucket, "run/teacher/sub/vocab.txt") == b"a b"
  storage.remove_tree(root / "tokenizer")
  assert not (root / "tokenizer").exists() and (root / "teacher").is_dir()
  assert sorted(p.name for p in root.glob("*.json*")) == ["config.json", "metrics.jsonl", "samples.jsonl"]


def test_gs_conditional_writes_use_generation_preconditions(gcs_emulator):
  """The same compare-and-swap on an object, through GCS's ifGenerationMatch (the emulator enforces it as GCS does:
  tests/gcs_emulator.py)."""
  bucket = gcs_emulator.create_bucket("kdjax-cas")
  url = f"gs://{bucket}/run/lease.json"
  _check_conditional_writes(storage.path(url), lambda: storage.remove_tree(url))
  assert _object_bytes(gcs_emulator, bucket, "run/lease.json") is None


def test_teacher_store_on_gs_is_byte_identical_to_local(gcs_emulator, tmp_path):
  """The store's writer and reader run unchanged on gs://: the same shard bytes as on local disk."""
  from kdjax.teacher import store
  from teacher.test_store import _fill, _spec  # pylint: disable=import-outside-toplevel
  bucket = gcs_emulator.create_bucket("kdjax-store")
  _fill(tmp_path / "local", _spec(), num_examples=7, shard_size=3).finalize()
  _fill(f"gs://{bucket}/store", _spec(), num_examples=7, shard_size=3).finalize()
  local = sorted(p.name for p in (tmp_path / "local").iterdir())
  assert local == sorted(p.name for p in storage.path(f"gs://{bucket}/store").iterdir())
  for name in local:
    assert _object_bytes(gcs_emulator, bucket, f"store/{name}") == (tmp_path / "local" / name).read_bytes(), name
  remote, reference = store.StoreReader(f"gs://{bucket}/store"), store.StoreReader(tmp_path / "local")
  assert len(remote) == len(reference) == 7 and remote.total_bytes == reference.total_bytes
  for a, b in zip(remote, reference):
    np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
    np.testing.assert_array_equal(a.response_ids, b.response_ids)


def test_checkpoint_round_trip_on_gs(gcs_emulator):
  """Orbax (tensorstore) arrays and the kdjax metadata on gs://, restored exactly."""
  import jax
  from kdjax.models import checkpoint
  from kdjax.models.llama import config as config_lib
  from kdjax.models.llama import model as model_lib
  bucket = gcs_emulator.create_bucket("kdjax-ckpt")
  model = model_lib.init_model(config_lib.PRESETS["tiny"], seed=3)
  target = f"gs://{bucket}/models/student"
  checkpoint.save_model(model, target)
  assert checkpoint.is_kdjax_checkpoint(target)
  assert _object_bytes(gcs_emulator, bucket, "models/student/kdjax_model.json") is not None
  restored, config = checkpoint.load_model(target)
  assert config == model.config and len(model.layers.arrays()) > 0
  for name, array in model.layers.arrays().items():
    np.testing.assert_array_equal(np.asarray(restored.layers.arrays()[name]), np.asarray(array), err_msg=name)
  ids = jax.numpy.arange(24, dtype=jax.numpy.int32).reshape(2, 12)
  np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(model(ids)))


@pytest.mark.slow
def test_demo_runs_with_its_workdir_in_a_bucket(gcs_emulator, gsm8k_dir, smollm2_gguf, tmp_path):
  """Issue 12 acceptance 1: the demo, started outside the checkout with only STORAGE_EMULATOR_HOST set, writes
  its report and plots into the bucket and leaves no local run folder (~3 min on 2 cores)."""
  bucket = gcs_emulator.create_bucket("kdjax-demo")
  elsewhere, scratch = tmp_path / "elsewhere", tmp_path / "scratch"
  elsewhere.mkdir()
  overrides = ["--config.data.num_train_questions=8", "--config.data.num_validation=2",
               "--config.teacher.max_new_tokens=16", "--config.eval.num_questions=4",
               "--config.eval.max_new_tokens=16", "--config.train.max_len=256"]
  env = {**gcs_emulator.env(), "PYTHONPATH": str(REPO), "KDJAX_SCRATCH": str(scratch)}
  proc = subprocess.run([sys.executable, "-m", "kdjax.main", f"--config={REPO / 'configs' / 'demo.py'}",
                         f"--config.workdir=gs://{bucket}/demo", f"--config.data.source={gsm8k_dir}", *overrides],
                        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = _object_bytes(gcs_emulator, bucket, "demo/report/report.md")
  assert report is not None and b"| ground_truth |" in report and b"| nodistill |" in report
  for plot in ("accuracy.png", "output_length.png"):
    assert _object_bytes(gcs_emulator, bucket, f"demo/report/{plot}").startswith(b"\x89PNG"), plot
  for name in ("config.json", "report/report.json", "stores/ground_truth/manifest.json",
               "arms/ground_truth/adapter/adapter_config.json", "arms/nodistill/eval/samples.jsonl",
               "models/student/kdjax_model.json", "models/teacher/kdjax_model.json"):
    assert _object_bytes(gcs_emulator, bucket, f"demo/{name}") is not None, name
  assert list(elsewhere.iterdir()) == []  # no local run folder
  assert not scratch.exists() or list(scratch.iterdir()) == []  # private copies removed at exit


def test_gsm8k_folder_in_a_bucket_reads_like_a_local_one(gcs_emulator, tmp_path):
  from kdjax.gsm8k import data
  bucket = gcs_emulator.create_bucket("kdjax-data")
  rows = [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}, {"question": "2*3?", "answer": "#### 6"}]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  (tmp_path / "test.jsonl").write_text(text)
  storage.write_text(f"gs://{bucket}/gsm8k/test.jsonl", text)
  assert data.load_gsm8k(f"gs://{bucket}/gsm8k", "test") == data.load_gsm8k(tmp_path, "test")
  assert [q["gold"] for q in data.load_gsm8k(f"gs://{bucket}/gsm8k", "test")] == [2, 6]


def test_two_processes_write_one_store_in_a_bucket(gcs_emulator, tmp_path):
  """Two writer processes with no shared local folder fill one gs:// store (each its own shards and manifest);
  process 0 then sees the other's objects and finalizes: the same bytes as a one-process store on local disk."""
  from kdjax.teacher import store
  from teacher.test_store import _fill, _spawn, _spec  # pylint: disable=import-outside-toplevel
  bucket = gcs_emulator.create_bucket("kdjax-two-writers")
  url = f"gs://{bucket}/stores/gt"
  children = [_spawn(url, p, 2, 10, 3) for p in (0, 1)]
  for child in children:
    child.wait(timeout=120)
    assert child.returncode == 0, child.stderr.read()
  manifest = store.StoreWriter(url, _spec(), num_examples=10, shard_size=3, process_index=0,
                               process_count=2).finalize()
  assert [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3]
  _fill(tmp_path / "one", _spec(), num_examples=10, shard_size=3).finalize()
  for name in [store.shard_name(i) for i in range(4)] + [store.MANIFEST]:
    assert _object_bytes(gcs_emulator, bucket, f"stores/gt/{name}") == (tmp_path / "one" / name).read_bytes(), name
  assert json.loads(_object_bytes(gcs_emulator, bucket, "stores/gt/manifest-1.json"))["process_index"] == 1
  assert len(store.StoreReader(url)) == 10


@pytest.mark.slow  # three training subprocesses: ~1 min of CPU on an idle machine
def test_preempted_training_in_a_bucket_resumes_bit_identical(gcs_emulator, tmp_path):
  """A trainer writing to gs:// is killed (-9) after a checkpoint; the restarted one ends with the same LoRA
  weights as an uninterrupted run, and logs each step once."""
  bucket = gcs_emulator.create_bucket("kdjax-preempt")
  env = {**gcs_emulator.env(), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  env.pop("XLA_FLAGS", None)
  helpers.kill_resume_and_compare("train_worker", f"gs://{bucket}/killed", "10", env, tmp_path,
                                  reference=f"gs://{bucket}/ref", delay=0.3)


def test_a_folder_in_a_bucket_has_the_content_digest_of_its_local_twin(gcs_emulator, tmp_path):
  """Provenance digests an adapter folder by every file at any depth: on gs:// one listing (epath's glob refuses
  `**`), giving the same digest as the same files on local disk."""
  from kdjax.experiment import provenance
  bucket = gcs_emulator.create_bucket("kdjax-digest")
  for name in ["a.json", "sub/b.bin", "sub/deeper/c.txt", provenance.RECORD_FILE]:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(name)
    storage.write_text(f"gs://{bucket}/f/{name}", name)
  assert [str(p) for p in storage.files_under(f"gs://{bucket}/f")] == [
      f"gs://{bucket}/f/{name}" for name in ["a.json", provenance.RECORD_FILE, "sub/b.bin", "sub/deeper/c.txt"]]
  assert provenance.folder_content(f"gs://{bucket}/f") == provenance.folder_content(tmp_path)


def test_conversion_record_reads_a_gs_source_again_only_when_an_object_changed(gcs_emulator, monkeypatch):
  """A restart decides that models/<role> is current from the source objects' generations in its record, without
  reading them; an object uploaded again (even with the same size) is read again, and other bytes are refused."""
  from kdjax import convert
  from kdjax.experiment import provenance
  bucket = gcs_emulator.create_bucket("kdjax-stamps")
  source, output = f"gs://{bucket}/hf", f"gs://{bucket}/run/models/student"
  storage.write_text(f"{source}/config.json", '{"hidden_size": 64}')
  storage.write_bytes(f"{source}/model.safetensors", b"a" * 4096)
  first = convert.conversion_record(source, dtype="float32", quantize=False, output=output)
  assert set(first["source"]["about"]["stamps"]) == {"config.json", "model.safetensors"}
  assert all(s and s["generation"] for s in first["source"]["about"]["stamps"].values())
  provenance.write(output, first)
  read, real = [], provenance.file_identity
  monkeypatch.setattr(provenance, "file_identity", lambda p: read.append(str(p).rsplit("/", 1)[1]) or real(p))
  again = convert.conversion_record(source, dtype="float32", quantize=False, output=output)
  assert read == [] and again == first
  storage.write_bytes(f"{source}/model.safetensors", b"b" * 4096)  # same size, new generation
  changed = convert.conversion_record(source, dtype="float32", quantize=False, output=output)
  assert read == ["model.safetensors"] and not provenance.matches(first, changed)
  with pytest.raises(provenance.ProvenanceError, match="other bytes"):
    provenance.claim(output, "models/student", changed)
  # A one-object source (a GGUF) the same way: trusted while its generation holds, read once it is uploaded again.
  gguf = f"gs://{bucket}/model.gguf"
  storage.write_bytes(gguf, b"GGUF" + b"\0" * 60)
  one = provenance.source_identity(gguf)
  read.clear()
  assert provenance.source_identity(gguf, known=json.loads(json.dumps(one))) == one and read == []
  storage.write_bytes(gguf, b"GGUF" + b"\0" * 60)
  assert provenance.matches(one, provenance.source_identity(gguf, known=one)) and read == ["model.gguf"]
