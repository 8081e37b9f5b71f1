"""One generation program across processes (issue 13, "many hosts"): the engine and the teacher stage with a model
whose mesh spans two jax.distributed processes (4 CPU devices each, gloo collectives between them).

References: the same worker on 1 process x 8 devices (the same mesh, in one process) and on one device; for the
store, a run of the tiny teacher on one device in this process. Greedy and sampled tokens must be identical
everywhere. Log-probs: measured on this tiny Llama (2 layers, head scaled x8), the spanning run equals the 8-device
run bit for bit and differs from one device by at most 1.7e-6 (top-k log-probs; tails 1.8e-7): the sharded
contractions (embed over fsdp, heads and vocabulary over tensor) sum their partial products in another order than
one device does, a few float32 ulps per layer. The bounds below are 1e-6 against the 8-device run (a reordering
across hosts that XLA might pick elsewhere) and 1e-5 against one device (6x the measured gap, still far below the
store's 1e-4 tolerance against a fresh forward in tests/teacher/test_teacher.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import helpers
from kdjax.infra import parallel
from kdjax.teacher import store
from teacher.test_teacher import (free_port, smollm2_tokenizer, tokenizer_dir, train_questions,  # noqa: F401 (fixtures)
                                  worker_command, worker_summary)
from workers import teacher_worker

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 900
MESH = "data=2,fsdp=2,tensor=2"  # slots over data x fsdp (across the two processes), heads and vocabulary over tensor


def _env(devices: int) -> dict:
  return helpers.worker_env({**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                             "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
  """Waits for every worker; returns each one's JSON line (the last of its stdout)."""
  outputs = helpers.communicate_all(procs, TIMEOUT_S)
  return [worker_summary(proc, *out) for proc, out in zip(procs, outputs)]


def _spanning(command, port: int) -> list[subprocess.Popen]:
  """`command(process_id)` started as the two processes of one jax.distributed run with 4 devices each."""
  return [subprocess.Popen(command(i) + ["--num-processes", "2", "--process-id", str(i), "--port", str(port)],
                           env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def test_spans_processes_on_one_process():
  assert not parallel.spans_processes(None)
  assert not parallel.spans_processes(parallel.make_mesh({"fsdp": -1}))
  assert parallel.broadcast_json("kdjax.test:one-process", {"work": [[0, 0, 3]]}) == {"work": [[0, 0, 3]]}


class _Device:
  def __init__(self, process_index: int):
    self.process_index = process_index


class _TwoProcessMesh:
  """What `teacher` reads of a mesh: the devices of processes 0 and 1."""
  devices = np.array([_Device(0), _Device(1)])


def test_teacher_refuses_what_a_spanning_run_cannot_do(monkeypatch, gsm8k_dir, tmp_path):
  """A teacher over processes 0 and 1 of 3 cannot run (process 2 holds none of it), nor can a spanning teacher take
  another process index or count than jax's: one line each, before the store folder exists."""
  import jax

  from kdjax.gsm8k import data
  from kdjax.serving import engine
  from kdjax.teacher import jax_engine as teacher
  from kdjax.serving.generation import SamplingConfig
  from kdjax.models.llama import config as config_lib
  from kdjax.models.llama import model as model_lib
  model = model_lib.init_model(config_lib.get_preset("tiny"))
  questions = data.load_gsm8k(gsm8k_dir, "train")[:2]
  monkeypatch.setattr(engine, "model_mesh", lambda m: _TwoProcessMesh())
  run = lambda **kw: teacher.generate_store(model, None, questions, "base", tmp_path / "store", teacher_model_id="t",
                                            sampling=SamplingConfig(max_new_tokens=2), progress=False, **kw)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(teacher.TeacherError, match=r"mesh spans processes \[0, 1\] of 3; use a mesh over every"):
    run()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(teacher.TeacherError, match="runs as process 0 of 2, not 1 of 3"):
    run(process_index=1, process_count=3)
  assert not (tmp_path / "store").exists()


def test_plan_says_when_its_teacher_spans_hosts():
  """The plan counts the hosts of its devices and, past one, tells how the generate stage runs such a teacher."""
  import dataclasses

  from kdjax.plan import generate as plan_lib
  assert plan_lib.host_count([_Device(0), _Device(1), _Device(1)]) == 2
  live = plan_lib.make_plan("tiny", slots=2, max_len=32)  # this one process's devices
  assert live.hosts == 1 and "hosts:" not in plan_lib.format_table(live)
  table = plan_lib.format_table(dataclasses.replace(live, hosts=16))
  assert "this mesh spans 16 hosts" in table and "--config.teacher.spans_processes=true" in table
  if plan_lib.libtpu_available():  # v5p:4x4x4 is 64 chips on 16 hosts of 4
    assert plan_lib.host_count(plan_lib.topology_devices("v5p:4x4x4")) == 16


TOPK_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kdjax.serving import generation, sampling
    from kdjax.infra import parallel
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    logits = np.random.RandomState(0).randn(4, 256).astype(np.float32) * 3
    opts = sampling.DecodeOptions(max_new_tokens=4, greedy=False, top_k=5, use_top_p=True, topk_logprobs=8,
                                     pad_id=0, tail_temperatures=())
    keys = jax.vmap(lambda e: jax.random.fold_in(jax.random.PRNGKey(0), e))(jnp.arange(4))
    for spec in (P(), P(("data", "fsdp"), "tensor")):
      x = jax.device_put(logits, NamedSharding(mesh, spec))
      chosen = jax.jit(lambda x: sampling.choose_tokens(x, keys, jnp.float32(1.0), jnp.float32(0.9), opts))(x)
      ids, logprobs, _, _ = jax.jit(lambda x: generation.topk_logprobs(x, 8))(x)
      wide = logits.astype(np.float64)
      log_softmax = wide - wide.max(1, keepdims=True)
      log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
      want = np.argsort(-wide, axis=1)
      assert np.array_equal(np.asarray(ids), want[:, :8]), (np.asarray(ids), want[:, :8])
      np.testing.assert_allclose(np.asarray(logprobs), np.take_along_axis(log_softmax, want[:, :8], 1), atol=1e-5)
      assert all(c in want[row, :5] for row, c in enumerate(np.asarray(chosen).tolist())), chosen
    print("OK")
""")


def test_top_k_programs_compile_on_a_multi_device_mesh():
  """Sampling with top-k and the stored top-k log-probs, jitted on 8 devices (replicated and sharded logits): a
  barrier over the whole TopK used to abort XLA:CPU's compiler there. Checked against float64 numpy."""
  proc = subprocess.run([sys.executable, "-c", TOPK_SCRIPT], env=_env(8), capture_output=True, text=True,
                        timeout=TIMEOUT_S, cwd=REPO)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow  # four processes compiling on 2 cores: ~2 min
def test_generation_across_two_processes_equals_one(tmp_path):
  """2 processes x 4 devices, one mesh over all 8: every process reads every row, equal to 1 x 8 and to 1 x 1."""
  port = free_port()
  command = lambda name, mesh: helpers.worker_command("multihost_worker", "--out", str(tmp_path / f"{name}.npz"),
                                                      "--mesh", mesh)
  procs = _spanning(lambda i: command(f"span{i}", MESH), port)
  procs.append(subprocess.Popen(command("eight", MESH), env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True))
  procs.append(subprocess.Popen(command("one", "none"), env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True))
  summaries = _finish(procs)
  assert [(s["process_count"], s["devices"], s["spans_processes"]) for s in summaries] == [
      (2, 8, True), (2, 8, True), (1, 8, False), (1, 1, False)]
  span = [np.load(tmp_path / f"span{i}.npz") for i in range(2)]
  eight, one = np.load(tmp_path / "eight.npz"), np.load(tmp_path / "one.npz")
  # The prompts are ragged and the rows stop at different steps, some by a stop token and one by the length limit.
  assert len(set(one["greedy_lengths"].tolist())) >= 5 and set(one["greedy_stopped"].tolist()) == {True, False}
  assert set(one["sampled_stopped"].tolist()) == {True, False}
  for name in one:
    for got in span:  # both processes hold every result
      if name.endswith(("_topk_logprobs", "_tail_mass", "_tail_log_mass")):
        np.testing.assert_allclose(got[name], eight[name], atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_allclose(got[name], one[name], atol=1e-5, rtol=0, err_msg=name)
        print(f"measured: {name} 2x4 vs 1x8 {np.abs(got[name] - eight[name]).max():.2e}, "
              f"vs 1x1 {np.abs(got[name] - one[name]).max():.2e}")
      else:  # tokens, lengths, finish reasons and top-k ids
        np.testing.assert_array_equal(got[name], eight[name], err_msg=name)
        np.testing.assert_array_equal(got[name], one[name], err_msg=name)


def _assert_store_close(got: pathlib.Path, want: pathlib.Path) -> None:
  """Same records: every token and id exactly, log-probs and tails within the module docstring's 1e-5."""
  a, b = store.StoreReader(got), store.StoreReader(want)
  assert a.spec == b.spec and len(a) == len(b) and a.positions == b.positions
  for x, y in zip(a, b):
    for field in ("student_prompt_ids", "teacher_prompt_ids", "response_ids", "topk_ids"):
      np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)
    for field in ("topk_logprobs", "tail_mass", "tail_log_mass"):
      np.testing.assert_allclose(getattr(x, field), getattr(y, field), atol=1e-5, rtol=0, err_msg=field)
    for field in ("question_id", "response_text", "finish_reason", "extracted_answer", "correct"):
      assert getattr(x, field) == getattr(y, field), field


@pytest.mark.slow  # two runs of two processes: ~3 min on 2 cores
def test_teacher_spanning_two_processes_writes_one_store(tokenizer_dir, gsm8k_dir, train_questions, tmp_path):
  """The teacher stage with one teacher over both processes' devices: process 0 writes every shard and the
  manifest, process 1 none, and the store equals a 1-device run. Resumed after losing a shard, process 0 tells
  process 1 which shard is left and only that one is generated again."""
  from transformers import AutoTokenizer
  reference = tmp_path / "reference"
  summary = teacher_worker.run_store(reference, train_questions[:8], AutoTokenizer.from_pretrained(str(tokenizer_dir)))
  assert summary["finalized"] and summary["shards_written"] == [0, 1, 2]
  path = tmp_path / "store"
  command = lambda i: worker_command(path, tokenizer_dir, gsm8k_dir, "--mesh", MESH)
  summaries = _finish(_spanning(command, free_port()))
  assert [(s["spanning"], s["shards_written"], s["finalized"]) for s in summaries] == [
      (True, [0, 1, 2], True), (True, [], True)]
  assert summaries[0]["tokens_generated"] == summaries[1]["tokens_generated"] > 0  # both ran every shard
  assert sorted(p.name for p in path.glob("manifest*.json")) == ["manifest-0.json", "manifest.json"]
  _assert_store_close(path, reference)

  lost = path / store.shard_name(1)
  lost.unlink()
  (path / store.MANIFEST).unlink()
  summaries = _finish(_spanning(command, free_port()))
  assert [(s["shards_written"], s["finalized"]) for s in summaries] == [([1], True), ([], True)]
  _assert_store_close(path, reference)
