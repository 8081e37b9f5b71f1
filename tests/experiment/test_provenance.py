"""Provenance (kdjax/provenance.py): no stage reuses or continues an output made under other settings.

Each scenario of issue 11 section 4 runs the real pipeline on a tiny random Llama (SmolLM2's tokenizer, 2 layers
of width 64) with a handful of GSM8K questions: one full run (convert, generate, train, eval) is made once, and
each test changes one thing in a copy of its work folder and runs the stage again. Nothing a scenario is about is
stubbed: the refusals come from the records the stages wrote and the sources and files as they are on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from kdjax.experiment import config as config_lib
from kdjax.gsm8k import data
from kdjax.experiment import pipeline, provenance

REPO = pathlib.Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ the pieces


def test_file_identity_hashes_small_files_whole_and_large_ones_by_their_edges(tmp_path, monkeypatch):
  import hashlib
  monkeypatch.setattr(provenance, "WHOLE_FILE_LIMIT", 4096)
  monkeypatch.setattr(provenance, "EDGE_BYTES", 1024)
  small = tmp_path / "config.json"
  small.write_bytes(b"x" * 4096)
  assert provenance.file_identity(small) == {"bytes": 4096, "sha256": hashlib.sha256(b"x" * 4096).hexdigest(),
                                             "hashed": "whole"}
  content = bytes(range(256)) * 40  # 10240 bytes: first KiB, a middle, last KiB
  big = tmp_path / "model.safetensors"
  big.write_bytes(content)
  expected = hashlib.sha256(content[:1024] + content[-1024:]).hexdigest()
  assert provenance.file_identity(big) == {"bytes": 10240, "sha256": expected, "hashed": "first + last MiB"}
  # A rewrite with the same size and mtime (what size+mtime checks trust) is seen when it touches the edges.
  stat = big.stat()
  big.write_bytes(b"\xff" + content[1:])
  os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert provenance.file_identity(big)["sha256"] != expected
  # The documented limit: a change only in the middle of a large file is not read.
  big.write_bytes(content[:5000] + b"\xff" + content[5001:])
  assert provenance.file_identity(big)["sha256"] == expected


def test_source_identity_is_content_not_path(tmp_path):
  source = tmp_path / "hf"
  source.mkdir()
  (source / "config.json").write_text('{"hidden_size": 64}')
  (source / ".cache").mkdir()
  (source / ".cache" / "download.lock").write_text("changes every download")
  copy = tmp_path / "elsewhere"
  shutil.copytree(source, copy)
  (copy / ".cache" / "download.lock").write_text("another download")
  original, copied = provenance.source_identity(source), provenance.source_identity(copy)
  assert list(original["files"]) == ["config.json"]  # dot-folders are not part of a model
  assert provenance.matches(original, copied) and original["about"]["path"] != copied["about"]["path"]
  (copy / "config.json").write_text('{"hidden_size": 65}')
  assert not provenance.matches(original, provenance.source_identity(copy))


def _counting_file_identity(monkeypatch) -> list[str]:
  """Makes provenance record the name of every file it reads to hash; returns that list."""
  read, real = [], provenance.file_identity
  monkeypatch.setattr(provenance, "file_identity", lambda p: read.append(pathlib.PurePosixPath(str(p)).name) or real(p))
  return read


def test_source_identity_reads_again_only_files_whose_stamp_changed(tmp_path, monkeypatch):
  import time
  from kdjax.infra import storage
  monkeypatch.setattr(storage, "RECENT_CHANGE_NS", 50_000_000)  # the tick rule below, shortened to 50 ms
  source = tmp_path / "hf"
  source.mkdir()
  (source / "config.json").write_text('{"hidden_size": 64}')
  weights = source / "model.safetensors"
  weights.write_bytes(b"a" * 4096)
  assert provenance.source_identity(source)["about"]["stamps"] == {"config.json": None, "model.safetensors": None}
  time.sleep(0.1)
  first = provenance.source_identity(source)
  recorded = json.loads(json.dumps(first))  # as provenance.json reads back
  read = _counting_file_identity(monkeypatch)
  assert provenance.source_identity(source, known=recorded) == first and read == []
  # A rewrite with the same size and mtime (what size + mtime checks trust): its ctime moved, so it is read.
  stat = weights.stat()
  weights.write_bytes(b"b" * 4096)
  os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  time.sleep(0.1)
  changed = provenance.source_identity(source, known=recorded)
  assert read == ["model.safetensors"] and not provenance.matches(recorded, changed)
  assert changed["files"]["config.json"] == first["files"]["config.json"]
  # The same bytes at another path are read (stamps hold for the recorded path) and are the same model.
  copy = tmp_path / "elsewhere"
  shutil.copytree(source, copy)
  time.sleep(0.1)
  read.clear()
  assert provenance.matches(changed, provenance.source_identity(copy, known=json.loads(json.dumps(changed))))
  assert sorted(read) == ["config.json", "model.safetensors"]
  # A one-file source (a GGUF): read once, then trusted.
  read.clear()
  one = provenance.source_identity(source / "config.json")
  assert provenance.source_identity(source / "config.json", known=json.loads(json.dumps(one))) == one
  assert read == ["config.json"]


def test_settings_cover_whole_sections_except_the_keys_without_effect():
  c = config_lib.get_default_config()
  settings = provenance.settings(c, ["train", "student", "seed"])
  assert settings["train.batch_size"] == c.train.batch_size  # changes the adapter
  assert settings["train.eval_every"] == c.train.eval_every  # picks the best-validation step
  assert settings["student.lora.rank"] == 4 and settings["seed"] == 0
  for key in ("train.log_every", "train.checkpoint_every", "train.chunk_size", "student.remat", "student.source"):
    assert key not in settings
  flat = {f"{section}.{key}" for section in ("train", "student") for key in c[section].keys()
          if not isinstance(c[section][key], type(c.student.lora))}
  flat |= {f"student.lora.{key}" for key in c.student.lora.keys()}
  assert set(settings) == (flat - provenance.NO_EFFECT_KEYS) | {"seed"}


def test_a_key_read_by_a_later_stage_is_recorded_only_where_named():
  c = config_lib.get_default_config()
  c.teacher.max_reference_overlap = 0.8
  assert "teacher.max_reference_overlap" not in provenance.settings(c, ["teacher", "data", "seed"])
  assert "teacher.k" in provenance.settings(c, ["teacher"])
  assert provenance.settings(c, ["distill", "teacher.max_reference_overlap"])["teacher.max_reference_overlap"] == 0.8


def test_mismatch_message_names_what_changed_in_one_line():
  old = provenance.make_record("train", settings={"distill.temperature": 5.94, "student.lora.rank": 4})
  new = provenance.make_record("train", settings={"distill.temperature": 1.0, "student.lora.rank": 4})
  assert provenance.mismatch_message("arms/gt/train", old, new) == (
      "arms/gt/train was made with distill.temperature=5.94, this run has 1.0: use a new --config.workdir or "
      "delete arms/gt/train")
  questions = [{"id": i, "question": f"q{i}", "answer": f"#### {i}"} for i in range(3)]
  edited = [dict(q) for q in questions]
  edited[2]["answer"] = "#### 7"
  outer_old = provenance.make_record("eval", inputs={"adapter": ("arms/gt/adapter", old)},
                                     questions={"test": questions})
  outer_new = provenance.make_record("eval", inputs={"adapter": ("arms/gt/adapter", new)},
                                     questions={"test": edited})
  message = provenance.mismatch_message("arms/gt/eval", outer_old, outer_new)
  assert message == ("arms/gt/eval was made with other text under test question id 2; arms/gt/adapter's "
                     "distill.temperature=5.94, this run has 1.0: use a new --config.workdir or delete arms/gt/eval")


# ------------------------------------------------------------------------------------------ the pipeline


def _tiny_checkpoint(folder: pathlib.Path, tokenizer, seed: int) -> pathlib.Path:
  from kdjax.models import checkpoint
  from kdjax.models.llama import config as llama_config
  from kdjax.models.llama import model as model_lib
  config = dataclasses.replace(llama_config.get_preset("tiny"), vocab_size=49152, rope_scaling=None,
                               max_position_embeddings=1024, name="tiny-49152")
  checkpoint.save_model(model_lib.init_model(config, seed=seed), folder, tokenizer=tokenizer)
  return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory, smollm2_gguf, gsm8k_dir):
  from kdjax.models import checkpoint
  root = tmp_path_factory.mktemp("sources")
  tokenizer = checkpoint.load_tokenizer(smollm2_gguf)
  return {"model": _tiny_checkpoint(root / "tiny0", tokenizer, seed=0),
          "other_model": _tiny_checkpoint(root / "tiny1", tokenizer, seed=1), "gsm8k": gsm8k_dir}


def tiny_config(workdir, sources, **overrides):
  c = config_lib.get_default_config()
  c.workdir = str(workdir)
  c.stages = "convert,generate,train,eval"
  c.arms = "ground_truth"
  c.data.source = str(sources["gsm8k"])
  c.data.num_train_questions = 2  # one optimizer step: one compiled train step
  c.data.num_validation = 1
  for role in (c.teacher, c.student):
    role.source = str(sources["model"])
    role.dtype = "float32"
    role.model_id = "tiny-random"
  c.teacher.quantization = "none"
  c.teacher.k = 4
  c.teacher.max_new_tokens = 6
  c.teacher.batch_size = c.teacher.shard_size = 8
  c.student.remat = False
  c.student.lora.rank = 2
  c.distill.divergence = "forward_kl"
  c.distill.temperature = 1.0
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-3
  c.train.batch_size = 2
  c.train.lr_reference_batch = 0  # adamw: the learning rate is set for this batch, no linear rule
  c.train.num_epochs = 1
  c.train.max_len = 256
  c.train.eval_every = 0  # validation once, at the end
  c.train.checkpoint_every = c.train.log_every = 1
  c.train.chunk_size = 64
  c.eval.num_questions = 2
  c.eval.max_new_tokens = 4
  c.eval.batch_size = 2
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, sources):
  workdir = tmp_path_factory.mktemp("base") / "work"
  pipeline.run(tiny_config(workdir, sources))
  return workdir


@pytest.fixture
def work(base_run, tmp_path):
  """A copy of the base run's work folder for one test to change."""
  copy = tmp_path / "work"
  shutil.copytree(base_run, copy, symlinks=True)
  return copy


def test_base_run_wrote_a_record_next_to_every_output(base_run):
  for folder in ("models/student", "models/teacher", "stores/ground_truth", "arms/ground_truth/train",
                 "arms/ground_truth/adapter", "arms/ground_truth/eval"):
    assert (base_run / folder / provenance.RECORD_FILE).is_file(), folder
  store = provenance.read(base_run / "stores/ground_truth")
  assert store["settings"]["data.num_train_questions"] == 2
  assert list(store["questions"]["train"]["ids"]) == ["0", "1"]  # the first GSM8K train questions
  train = provenance.read(base_run / "arms/ground_truth/train")
  assert train["settings"]["distill.temperature"] == 1.0 and train["settings"]["train.batch_size"] == 2
  assert "train.log_every" not in train["settings"] and "student.remat" not in train["settings"]
  # The response filter is the training's setting: a store never depends on it.
  assert train["settings"]["teacher.max_reference_overlap"] == 1.0
  assert "teacher.max_reference_overlap" not in store["settings"] and "teacher.k" in store["settings"]
  assert json.loads((base_run / "arms/ground_truth/train/train_data.json").read_text())["train_examples"] == 2
  assert train["inputs"]["store"]["folder"] == "stores/ground_truth"
  assert json.loads((base_run / "config.json").read_text())["workdir"] == str(base_run)


def _refused(c, *needles) -> str:
  with pytest.raises(provenance.ProvenanceError) as info:
    pipeline.run(c)
  message = str(info.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, message
  return message


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("key, value, shown", [
    ("distill.temperature", 2.0, "distill.temperature=1.0, this run has 2.0"),
    ("distill.divergence", "reverse_kl", 'distill.divergence="forward_kl", this run has "reverse_kl"'),
    ("student.lora.rank", 4, "student.lora.rank=2, this run has 4"),
])
def test_train_refuses_an_adapter_made_with_another_loss_or_lora(work, sources, key, value, shown):
  arm = work / "arms/ground_truth"
  before = _files(arm)
  message = _refused(tiny_config(work, sources, stages="train", **{key: value}), shown)
  assert message == (f"arms/ground_truth/adapter was made with {shown}: use a new --config.workdir or delete "
                     f"arms/ground_truth/adapter")
  assert _files(arm) == before  # nothing was trained, exported or rewritten


def test_train_without_adapter_resumes_only_under_the_same_loss(work, sources):
  arm = work / "arms/ground_truth"
  adapter_before = _files(arm / "adapter")
  shutil.rmtree(arm / "adapter")
  checkpoints = sorted(p.name for p in (arm / "train/checkpoints").iterdir())
  _refused(tiny_config(work, sources, stages="train", **{"distill.temperature": 2.0}),
           "arms/ground_truth/train was made with distill.temperature=1.0, this run has 2.0",
           "delete arms/ground_truth/train")
  assert sorted(p.name for p in (arm / "train/checkpoints").iterdir()) == checkpoints
  # The same settings resume: the finished run's best checkpoint is exported again, byte for byte.
  pipeline.run(tiny_config(work, sources, stages="train"))
  after = _files(arm / "adapter")
  assert after.pop(provenance.RECORD_FILE) != adapter_before.pop(provenance.RECORD_FILE)  # rewritten (its time)
  assert after == adapter_before
  assert provenance.read(arm / "adapter")["settings"]["distill.temperature"] == 1.0


def test_max_reference_overlap_reuses_the_store_and_refuses_the_training(work, sources):
  store = _files(work / "stores/ground_truth")
  pipeline.run(tiny_config(work, sources, stages="convert,generate", **{"teacher.max_reference_overlap": 0.5}))
  assert _files(work / "stores/ground_truth") == store  # reused as it was: no record or shard rewritten
  arm = _files(work / "arms/ground_truth")
  _refused(tiny_config(work, sources, stages="train", **{"teacher.max_reference_overlap": 0.5}),
           "arms/ground_truth/adapter was made with teacher.max_reference_overlap=1.0, this run has 0.5")
  assert _files(work / "arms/ground_truth") == arm
  with pytest.raises(pipeline.ConfigError, match=r"teacher.max_reference_overlap must be in \(0, 1\]"):
    pipeline.run(tiny_config(work, sources, stages="train", **{"teacher.max_reference_overlap": 0.0}))


def test_eval_refuses_samples_of_a_changed_adapter(work, sources):
  from safetensors.numpy import load_file, save_file
  from kdjax.models import lora
  samples = (work / "arms/ground_truth/eval/samples.jsonl").read_bytes()
  # The config asks for another adapter than the one exported: refused before the adapter is read.
  _refused(tiny_config(work, sources, stages="eval", **{"student.lora.rank": 4}),
           "arms/ground_truth/eval was made with arms/ground_truth/adapter's student.lora.rank=2, this run has 4")
  # The adapter's weights changed on disk under the same settings (retrained, copied over): the old samples are
  # not returned as its evaluation.
  weights = work / "arms/ground_truth/adapter" / lora.ADAPTER_WEIGHTS
  tensors = load_file(weights)
  name = next(n for n in tensors if "lora_B" in n)
  tensors[name] = tensors[name] + 0.5
  save_file(tensors, weights, metadata={"format": "pt"})
  _refused(tiny_config(work, sources, stages="eval"),
           "arms/ground_truth/eval was made with arms/ground_truth/adapter's content")
  assert (work / "arms/ground_truth/eval/samples.jsonl").read_bytes() == samples


def test_eval_refuses_a_test_file_whose_questions_changed_under_the_same_ids(work, sources, tmp_path):
  gsm8k = tmp_path / "gsm8k"
  gsm8k.mkdir()
  (gsm8k / "train.jsonl").symlink_to(sources["gsm8k"] / "train.jsonl")
  rows = (sources["gsm8k"] / "test.jsonl").read_text().splitlines()
  changed = json.loads(rows[1])
  changed["question"] = changed["question"].replace("?", "? Give the answer in cents.", 1)
  rows[1] = json.dumps(changed)
  (gsm8k / "test.jsonl").write_text("\n".join(rows) + "\n")
  message = _refused(tiny_config(work, sources, stages="eval", **{"data.source": str(gsm8k)}),
                     "arms/ground_truth/eval was made with other text under test question id 1:")
  assert "data.source" not in message  # the same questions from another folder would be fine: content counts


def test_the_test_split_is_never_read_from_a_train_file(sources, tmp_path):
  train_file = sources["gsm8k"] / "train.jsonl"
  with pytest.raises(data.DataError, match="read only from a GSM8K test set"):
    data.load_gsm8k(train_file, "test")
  assert len(data.load_gsm8k(train_file, "train")) == 7473
  proc = subprocess.run(
      [sys.executable, "-m", "kdjax.main", "--config=configs/demo.py", f"--config.workdir={tmp_path / 'w'}",
       f"--config.data.source={train_file}", "--config.stages=eval"],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert "the test split is read only from a GSM8K test set" in lines[0] and str(train_file) in lines[0]
  assert not (tmp_path / "w").exists()


def test_convert_refuses_a_changed_source_and_accepts_a_copy(work, sources, tmp_path):
  other = str(sources["other_model"])
  _refused(tiny_config(work, sources, stages="convert", **{"student.source": other, "teacher.source": other}),
           f"models/student was made with source {sources['model']}, this run has {other} (other bytes)")
  copy = tmp_path / "copy_of_tiny0"
  shutil.copytree(sources["model"], copy)  # other path and mtimes, same bytes: the same model
  pipeline.run(tiny_config(work, sources, stages="convert", **{"student.source": str(copy),
                                                               "teacher.source": str(copy)}))


@pytest.mark.parametrize("key, value, shown", [
    ("data.num_train_questions", 3, "data.num_train_questions=2, this run has 3"),
    ("seed", 1, "seed=0, this run has 1"),
])
def test_train_refuses_a_store_made_for_other_questions(work, sources, key, value, shown):
  # With the arm's outputs there, they are refused first (they were made from that store)...
  _refused(tiny_config(work, sources, stages="train", **{key: value}),
           f"arms/ground_truth/adapter was made with {shown};")
  # ...and a fresh arm refuses to train on the store: its validation questions could be training data now.
  shutil.rmtree(work / "arms")
  message = _refused(tiny_config(work, sources, stages="train", **{key: value}),
                     f"stores/ground_truth was made with {shown}")
  assert message.endswith("use a new --config.workdir or delete stores/ground_truth")
  assert not (work / "arms/ground_truth/train").exists()


def test_a_failed_run_keeps_the_config_record_of_the_good_one(work, sources):
  good = (work / "config.json").read_bytes()
  records_before = set((work / "run_records").iterdir())
  _refused(tiny_config(work, sources, stages="train", **{"distill.temperature": 2.0}), "distill.temperature")
  assert (work / "config.json").read_bytes() == good
  new = [json.loads(p.read_text()) for p in set((work / "run_records").iterdir()) - records_before]
  assert len(new) == 1 and new[0]["status"].startswith("failed: ProvenanceError: arms/ground_truth/adapter was made")
  assert new[0]["config"]["distill"]["temperature"] == 2.0
  # A config that fails its check leaves no record at all.
  with pytest.raises(pipeline.ConfigError, match="temperature"):
    pipeline.run(tiny_config(work, sources, stages="train", **{"distill.temperature": -1.0}))
  assert len(set((work / "run_records").iterdir())) == len(records_before) + 1
  # The same run again succeeds, reuses every output and then records its config.
  samples = (work / "arms/ground_truth/eval/samples.jsonl").read_bytes()
  pipeline.run(tiny_config(work, sources, **{"train.log_every": 5, "eval.batch_size": 1}))  # no-effect keys
  assert (work / "arms/ground_truth/eval/samples.jsonl").read_bytes() == samples
  assert json.loads((work / "config.json").read_text())["train"]["log_every"] == 5


def test_outputs_without_a_record_are_not_reused(work, sources):
  (work / "arms/ground_truth/eval" / provenance.RECORD_FILE).unlink()
  _refused(tiny_config(work, sources, stages="eval"),
           "arms/ground_truth/eval holds outputs with no provenance record")
  # Checkpoints of unknown origin are not resumed, and the refused run leaves no adapter record behind.
  shutil.rmtree(work / "arms/ground_truth/adapter")
  (work / "arms/ground_truth/train" / provenance.RECORD_FILE).unlink()
  _refused(tiny_config(work, sources, stages="train"),
           "arms/ground_truth/train holds outputs with no provenance record")
  assert not (work / "arms/ground_truth/adapter").exists()


@pytest.mark.slow
def test_eval_refuses_after_a_real_retrain_under_another_rank(work, sources):
  """The whole story: the user changes the LoRA rank, deletes the arm's training outputs as told, trains again
  (a real run) and asks for eval: the old samples belong to the old adapter and are refused, never returned."""
  shutil.rmtree(work / "arms/ground_truth/train")
  shutil.rmtree(work / "arms/ground_truth/adapter")
  samples = (work / "arms/ground_truth/eval/samples.jsonl").read_bytes()
  with pytest.raises(provenance.ProvenanceError, match="arms/ground_truth/eval was made with "
                     "arms/ground_truth/adapter's student.lora.rank=2, this run has 4"):
    pipeline.run(tiny_config(work, sources, stages="train,eval", **{"student.lora.rank": 4}))
  assert json.loads((work / "arms/ground_truth/adapter/adapter_config.json").read_text())["r"] == 4
  assert (work / "arms/ground_truth/eval/samples.jsonl").read_bytes() == samples


def test_the_command_line_refuses_with_one_line_and_exit_code_2(work, sources):
  other = sources["other_model"]
  proc = subprocess.run(
      [sys.executable, "-m", "kdjax.main", "--config=configs/demo.py", f"--config.workdir={work}",
       f"--config.data.source={sources['gsm8k']}", "--config.stages=convert",
       f"--config.student.source={other}", f"--config.teacher.source={other}"],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0] == (f"kdjax: error: models/student was made with source {sources['model']}, this run has {other} "
                      f"(other bytes): use a new --config.workdir or delete models/student")


def test_a_teacher_adapter_is_part_of_the_teacher_and_of_every_store_made_by_it(sources, tmp_path):
  """`teacher.adapter` (a fine-tuned teacher): its bytes enter models/teacher's record and, through it, the store's;
  another adapter, or none, is another teacher, refused as a changed teacher.source is."""
  from safetensors.numpy import load_file, save_file
  from kdjax.models import checkpoint
  from kdjax.models import lora
  adapter = tmp_path / "adapter"
  model, _ = checkpoint.load_model(sources["model"])
  lora.add_lora(model, lora.LoraConfig(rank=2, targets=("wq", "w_up")), seed=1)
  lora.export_peft(model, adapter)  # B = 0: the merge is exact; only its bytes matter here
  work = tmp_path / "work"
  pipeline.run(tiny_config(work, sources, stages="convert,generate", **{"teacher.adapter": str(adapter)}))
  teacher = provenance.read(work / "models/teacher")
  assert not (work / "models/teacher").is_symlink()  # not the student's conversion: another model
  assert teacher["settings"]["adapter"] == provenance.folder_content(adapter)
  store_record = provenance.read(work / "stores/ground_truth")
  assert store_record["inputs"]["teacher"]["settings"]["adapter"] == teacher["settings"]["adapter"]
  store = _files(work / "stores/ground_truth")
  # The adapter is retrained (its bytes change): the store and the teacher are refused, nothing is rewritten.
  weights = adapter / lora.ADAPTER_WEIGHTS
  tensors = load_file(weights)
  tensors = {name: value + 0.5 if "lora_B" in name else value for name, value in tensors.items()}
  save_file(tensors, weights, metadata={"format": "pt"})
  old, new = teacher["settings"]["adapter"], provenance.folder_content(adapter)
  message = _refused(tiny_config(work, sources, stages="generate", **{"teacher.adapter": str(adapter)}),
                     f"stores/ground_truth was made with models/teacher's adapter=\"{old}\", this run has \"{new}\"")
  assert message.endswith("delete stores/ground_truth")
  _refused(tiny_config(work, sources, stages="convert", **{"teacher.adapter": str(adapter)}),
           f"models/teacher was made with adapter=\"{old}\", this run has \"{new}\"")
  _refused(tiny_config(work, sources, stages="generate"), "models/teacher's adapter=\"", "this run has (unset)")
  assert _files(work / "stores/ground_truth") == store
  # A missing adapter: one line before any stage.
  with pytest.raises(pipeline.ConfigError, match="^teacher.adapter: .*needs adapter_config.json"):
    pipeline.run(tiny_config(work, sources, stages="generate", **{"teacher.adapter": str(tmp_path / "none")}))
