"""On-policy primed distillation (issue 14): the step choice, the dense loss, alignment on SmolLM2, fraction 0,
kill -9 and resume, 8 devices, and the config's refusals."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import kdjax
import helpers
from workers import on_policy_worker as worker
from workers import train_worker
from kdjax.experiment import config as config_lib, pipeline
from kdjax.gsm8k import data
from kdjax.teacher import priming, jax_engine as teacher
from kdjax.distill import batches, losses, on_policy
from kdjax.models import lora
from kdjax.distill import train as train_lib
from test_losses import np_divergence, np_log_softmax

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = "on_policy_worker"
PAPER_TEMPERATURE = 5.94


def _quiet(**overrides) -> train_lib.TrainConfig:
  base = dict(batch_size=4, num_steps=4, pad_multiple=16, chunk_size=64, log_every=1, checkpoint_every=50,
              tensorboard=False, progress_bar=False, async_checkpointing=False)
  base.update(overrides)
  return train_lib.TrainConfig(**base)


# ------------------------------------------------------------------------------------------------ the choice


def test_step_choice_is_a_function_of_seed_and_step():
  assert not any(on_policy.is_on_policy_step(0, s, 0.0) for s in range(50))
  assert all(on_policy.is_on_policy_step(0, s, 1.0) for s in range(50))
  half = [on_policy.is_on_policy_step(3, s, 0.5) for s in range(400)]
  assert half == [on_policy.is_on_policy_step(3, s, 0.5) for s in range(400)]  # reproducible (resume)
  assert 150 < sum(half) < 250  # a binomial(400, 0.5) draw: 200 +- 5 sigma
  assert half != [on_policy.is_on_policy_step(4, s, 0.5) for s in range(400)]  # the seed matters
  # Sampling seeds differ per step and per stream, and never depend on anything but (seed, salt, step).
  seeds = {on_policy.sampling_seed(0, on_policy.SAMPLE, s) for s in range(100)}
  assert len(seeds) == 100 and on_policy.sampling_seed(0, on_policy.VALIDATE, 0) not in seeds


def test_settings_refuse_bad_values():
  with pytest.raises(on_policy.OnPolicyError, match="on_policy_fraction must be in"):
    on_policy.OnPolicySettings(fraction=1.5)
  with pytest.raises(on_policy.OnPolicyError, match="on_policy_temperature"):
    on_policy.OnPolicySettings(fraction=0.5, temperature=-1.0)
  assert on_policy.dense_loss_config(losses.LossConfig(ce_weight=0.61)).ce_weight == 0.0


# ------------------------------------------------------------------------------------------------ the dense loss


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_dense_distill_loss_matches_numpy(divergence):
  """distill_loss with full teacher logits: chunked KD sums over masked tokens against float64 numpy."""
  rng = np.random.default_rng(0)
  b, s, d, v = 2, 7, 5, 11
  hidden = rng.normal(size=(b, s, d)).astype(np.float32)
  head = rng.normal(size=(d, v)).astype(np.float32)
  teacher_logits = (rng.normal(size=(b, s, v)) * 3).astype(np.float32)
  mask = (rng.random((b, s)) < 0.6).astype(np.float32)
  teacher_logits[mask == 0] = np.nan  # masked positions may hold anything
  batch = {"target_ids": rng.integers(0, v, (b, s)).astype(np.int32), "loss_mask": mask,
           "teacher_logits": teacher_logits}
  cfg = losses.LossConfig(divergence=divergence, temperature=2.0, scale_by_t2=True, ce_weight=0.0)
  sums, _ = losses.distill_loss(jax.numpy.asarray(hidden), jax.numpy.asarray(head), batch, cfg, chunk_size=4)
  student = np.einsum("bsd,dv->bsv", hidden.astype(np.float64), head.astype(np.float64))
  p = np.exp(np_log_softmax(np.nan_to_num(teacher_logits.astype(np.float64)) / 2.0))
  q = np.exp(np_log_softmax(student / 2.0))
  want = (np_divergence(p, q, divergence) * 4.0 * mask).sum()
  np.testing.assert_allclose(float(sums.kd_sum), want, rtol=2e-5)
  assert float(sums.num_tokens) == mask.sum()


def _teacher_hidden_case(seed=1):
  """A student [B, S, D] / [D, V] and a teacher of another width [B, S, Dt] / [Dt, V], some tokens masked."""
  rng = np.random.default_rng(seed)
  b, s, d, dt, v = 2, 9, 5, 6, 13
  batch = {"target_ids": rng.integers(0, v, (b, s)).astype(np.int32),
           "loss_mask": (rng.random((b, s)) < 0.7).astype(np.float32),
           "teacher_hidden": rng.normal(size=(b, s, dt)).astype(np.float32)}
  return (rng.normal(size=(b, s, d)).astype(np.float32), rng.normal(size=(d, v)).astype(np.float32), batch,
          (rng.normal(size=(dt, v)) * 2).astype(np.float32))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_teacher_hidden_loss_matches_numpy_and_the_full_logits_path(divergence):
  """Issue 14: the teacher's final hidden states and its head, projected chunk by chunk inside the loss, give
  the KD, the teacher's log-prob of the targets and the gradient of the full-logits path, and float64 numpy."""
  hidden, head, batch, teacher_head = _teacher_hidden_case()
  mask = batch["loss_mask"]
  cfg = losses.LossConfig(divergence=divergence, temperature=2.0, scale_by_t2=True, ce_weight=0.0)
  full = {k: v for k, v in batch.items() if k != "teacher_hidden"}
  full["teacher_logits"] = np.einsum("bsd,dv->bsv", batch["teacher_hidden"], teacher_head).astype(np.float32)

  def kd(student_hidden, loss_batch, **kwargs):
    sums, extra = losses.distill_loss(student_hidden, jax.numpy.asarray(head), loss_batch, cfg, chunk_size=4,
                                      **kwargs)
    return sums.kd_sum, (sums, extra)

  (_, (sums, extra)), grad = jax.value_and_grad(kd, has_aux=True)(
      jax.numpy.asarray(hidden), batch, teacher_head=jax.numpy.asarray(teacher_head))
  (_, (full_sums, full_extra)), full_grad = jax.value_and_grad(kd, has_aux=True)(jax.numpy.asarray(hidden), full)
  # float64 reference from first principles.
  teacher_logits = np.einsum("bsd,dv->bsv", batch["teacher_hidden"].astype(np.float64), teacher_head.astype(np.float64))
  student = np.einsum("bsd,dv->bsv", hidden.astype(np.float64), head.astype(np.float64))
  p, q = np.exp(np_log_softmax(teacher_logits / 2.0)), np.exp(np_log_softmax(student / 2.0))
  np.testing.assert_allclose(float(sums.kd_sum), (np_divergence(p, q, divergence) * 4.0 * mask).sum(), rtol=1e-5)
  teacher_lp = np.take_along_axis(np_log_softmax(teacher_logits), batch["target_ids"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(extra["teacher_logprob_sum"]), (teacher_lp * mask).sum(), rtol=1e-5)
  # The full-logits path (before issue 14's change) agrees on every output.
  np.testing.assert_allclose(float(sums.kd_sum), float(full_sums.kd_sum), rtol=1e-5)
  for name in full_extra:
    np.testing.assert_allclose(float(extra[name]), float(full_extra[name]), rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(full_grad), rtol=1e-5, atol=1e-6)
  assert float(np.abs(grad).max()) > 0


def test_teacher_hidden_needs_a_head_of_the_vocabulary():
  hidden, head, batch, teacher_head = _teacher_hidden_case()
  cfg = losses.LossConfig(ce_weight=0.0)
  with pytest.raises(ValueError, match="needs teacher_head"):
    losses.distill_loss(jax.numpy.asarray(hidden), jax.numpy.asarray(head), batch, cfg)
  with pytest.raises(ValueError, match="needs teacher_head"):
    losses.distill_loss(jax.numpy.asarray(hidden), jax.numpy.asarray(head), batch, cfg,
                        teacher_head=jax.numpy.asarray(teacher_head[:, :-1]))


def test_on_policy_training_from_teacher_hidden_equals_full_teacher_logits(tmp_path):
  """The train loop with scored batches of hidden states equals the one with [B, S, V] teacher logits."""
  data = train_worker.synthetic_examples(8, seed=0)
  cfg = _quiet(num_steps=3, learning_rate=0.5)
  runs = {}
  for scoring in ("logits", "hidden"):
    student = train_worker.make_student()
    result = train_lib.train(student, data, None, cfg, losses.LossConfig(divergence="reverse_kl", temperature=2.0),
                             tmp_path / scoring,
                             on_policy=worker.make_on_policy(worker.make_teacher(), data, 1.0, teacher_scoring=scoring))
    runs[scoring] = (result.history, train_worker.lora_arrays(student))
  (want_history, want_lora), (got_history, got_lora) = runs["logits"], runs["hidden"]
  for key in ("kd", "teacher_logprob", "sampled_len"):
    np.testing.assert_allclose([h[key] for h in got_history], [h[key] for h in want_history], rtol=1e-5, err_msg=key)
  for name, want in want_lora.items():
    np.testing.assert_allclose(got_lora[name], want, rtol=1e-5, atol=1e-7, err_msg=name)
  assert any(np.abs(v).max() > 0 for name, v in got_lora.items() if "lora_b" in name)  # the steps trained


# ------------------------------------------------------------------------------------------------ SmolLM2


def _smollm2_on_policy(smollm2_gguf, gsm8k_dir, strategy, tmp_path, *, fraction=1.0, num_questions=2):
  student, _ = kdjax.load_model(smollm2_gguf)
  resident, _ = kdjax.load_model(smollm2_gguf)
  tokenizer = kdjax.load_tokenizer(smollm2_gguf)
  questions = data.load_gsm8k(str(gsm8k_dir), "train")[:num_questions]
  # The student's examples carry only its bare prompt (the response is the student's own on on-policy steps).
  examples = [batches.ce_example(teacher.student_prompt_ids(tokenizer, q), [0], None, question_id=q["id"])
              for q in questions]
  prompts = {q["id"]: teacher.teacher_prompt_ids(tokenizer, q, strategy, "system") for q in questions}
  scorer = on_policy.OnPolicy(resident, prompts, on_policy.OnPolicySettings(fraction=fraction, max_new_tokens=16),
                              stop_ids=priming.stop_token_ids(tokenizer), pad_id=priming.pad_token_id(tokenizer))
  lora.add_lora(student, lora.LoraConfig(rank=4, alpha=8, dropout=0.1), seed=0)  # fresh: B = 0
  cfg = _quiet(batch_size=num_questions, num_steps=1, pad_multiple=32, chunk_size=128)
  loss_cfg = losses.LossConfig(divergence="reverse_kl", temperature=PAPER_TEMPERATURE, ce_weight=0.61)
  return train_lib.train(student, examples, None, cfg, loss_cfg, tmp_path / strategy, on_policy=scorer)


@pytest.mark.slow  # ~95 s on 2 shared cores: two SmolLM2 runs compile sampling, scoring and the step
def test_on_policy_alignment_smollm2_self_distillation(smollm2_gguf, gsm8k_dir, tmp_path):
  """Acceptance 1: the student is its own teacher under base priming; fraction 1: KD at step 1 <= 1e-4.

  A misaligned teacher position, another question's prompt or a loss over prompt positions would make it
  large, and so does real priming (the control: ground_truth changes the teacher's context)."""
  first = _smollm2_on_policy(smollm2_gguf, gsm8k_dir, "base", tmp_path).history[0]
  print("on-policy step 1, base priming:", {k: first[k] for k in ("kd", "sampled_len", "teacher_logprob")})
  assert first["on_policy"] == 1.0 and first["sampled_len"] >= 2 and first["loss_tokens"] >= 4
  assert abs(first["kd"]) <= 1e-4 and first["loss"] == first["kd"]  # no CE on self-samples
  assert -20.0 < first["teacher_logprob"] < 0.0
  primed = _smollm2_on_policy(smollm2_gguf, gsm8k_dir, "ground_truth", tmp_path).history[0]
  print("on-policy step 1, ground_truth priming:", primed["kd"])
  assert primed["kd"] > 100 * 1e-4


# ------------------------------------------------------------------------------------------------ fraction 0


def test_fraction_zero_is_bit_identical_and_never_samples(tmp_path, monkeypatch):
  """Acceptance 2: with fraction 0 the loop trains exactly as without on-policy, and never samples or scores."""
  data = train_worker.synthetic_examples(12, seed=0)
  cfg = _quiet(optimizer="adamw", learning_rate=1e-2, num_steps=4)
  plain = train_worker.make_student(dropout=0.1)
  train_lib.train(plain, data, None, cfg, losses.LossConfig(ce_weight=0.2), tmp_path / "plain")

  def refuse(*args, **kwargs):
    raise AssertionError("fraction 0 touched the sampler or the teacher")
  monkeypatch.setattr(on_policy.generation, "generate", refuse)
  monkeypatch.setattr(on_policy, "_teacher_hidden", refuse)
  scored = train_worker.make_student(dropout=0.1)
  result = train_lib.train(scored, data, None, cfg, losses.LossConfig(ce_weight=0.2), tmp_path / "zero",
                           on_policy=worker.make_on_policy(worker.make_teacher(), data, 0.0))
  assert [h["on_policy"] for h in result.history] == [0.0] * 4
  want, got = train_worker.lora_arrays(plain), train_worker.lora_arrays(scored)
  assert sorted(want) == sorted(got)
  for name in want:
    assert np.array_equal(want[name], got[name]), name


def test_on_policy_steps_mix_with_store_steps_and_validate(tmp_path):
  """Fraction 0.5: the chosen steps sample (metrics say so), the others read the store, and the eval hook
  reports the teacher-graded KD of the student's validation answers, once before the first step as well."""
  data = train_worker.synthetic_examples(16, seed=0)
  val = [dataclasses.replace(e, question_id=100 + i)
         for i, e in enumerate(train_worker.synthetic_examples(4, seed=1))]
  cfg = _quiet(num_steps=6, eval_every=3, learning_rate=0.5)
  scorer = worker.make_on_policy(worker.make_teacher(), data + val, 0.5)
  result = train_lib.train(train_worker.make_student(), data, val, cfg, losses.LossConfig(ce_weight=0.2),
                           tmp_path, on_policy=scorer)
  chosen = [float(on_policy.is_on_policy_step(cfg.seed, s, 0.5)) for s in range(6)]
  assert [h["on_policy"] for h in result.history] == chosen and 0 < sum(chosen) < 6
  for h in result.history:
    assert h["update_s"] > 0
    if h["on_policy"]:
      assert 1 <= h["sampled_len"] <= 6 and h["teacher_logprob"] < 0 and h["sample_s"] > 0 and h["score_s"] > 0
      assert h["loss"] == h["kd"] and "teacher_topk_mass" not in h  # dense KD, no CE
  evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_" in line]
  assert [e["step"] for e in evals] == [0, 3, 6]
  assert evals[0]["val_on_policy_kd"] != evals[-1]["val_on_policy_kd"]  # the student moved
  assert all(e["val_on_policy_kd"] > 0 and e["val_on_policy_teacher_logprob"] < 0 for e in evals)


def test_a_question_without_teacher_prompt_is_refused_before_training(tmp_path):
  data = train_worker.synthetic_examples(4, seed=0)
  scorer = worker.make_on_policy(worker.make_teacher(), data[:2], 0.5)
  with pytest.raises(on_policy.OnPolicyError, match="2 questions have no primed teacher prompt"):
    train_lib.train(train_worker.make_student(), data, None, _quiet(), losses.LossConfig(), tmp_path,
                    on_policy=scorer)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------ config


def test_config_refuses_on_policy_without_a_teacher(gsm8k_dir):
  c = config_lib.get_default_config()
  assert c.distill.on_policy_fraction == 0.0 and c.distill.on_policy_temperature == 1.0
  c.update_from_flattened_dict({"arms": "ground_truth", "stages": "train", "student.source": "smollm2",
                                "teacher.source": "", "data.source": str(gsm8k_dir),
                                "distill.on_policy_fraction": 0.5})
  with pytest.raises(pipeline.ConfigError) as error:
    pipeline.validate(c)
  assert "\n" not in str(error.value) and "needs the primed teacher resident" in str(error.value)
  assert "--config.teacher.source" in str(error.value)
  c.distill.on_policy_fraction = 2.0
  c.teacher.source = "smollm2"
  with pytest.raises(pipeline.ConfigError, match=r"on_policy_fraction must be in \[0, 1\]"):
    pipeline.validate(c)


def test_cli_refusal_is_one_line_and_exit_2(gsm8k_dir, tmp_path):
  run = subprocess.run([sys.executable, "-m", "kdjax.main", "--config=configs/gt.py",
                        f"--config.workdir={tmp_path}", f"--config.data.source={gsm8k_dir}",
                        "--config.student.source=smollm2", "--config.teacher.source=", "--config.stages=train",
                        "--config.distill.on_policy_fraction=0.5"],
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2, run.stderr[-2000:]
  lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and "needs the primed teacher resident" in lines[0], run.stderr[-2000:]
  assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ subprocesses


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.slow  # three on-policy training subprocesses
def test_kill9_during_on_policy_run_and_resume_is_bit_identical(tmp_path, compile_cache):
  """Acceptance 3: the sampling keys are functions of (seed, step), so the checkpoint needs nothing more."""
  logged = helpers.kill_resume_and_compare(WORKER, str(tmp_path / "killed"), "8", compile_cache, tmp_path,
                                           reference=str(tmp_path / "ref"), delay=0.2)
  assert 0 < sum(r["on_policy"] for r in logged) < 8  # both kinds of step happened


@pytest.mark.slow  # a subprocess compiling sampling, scoring and the step for one device and a 2 x 4 mesh
def test_eight_cpu_devices_match_single_device_on_policy(tmp_path, compile_cache):
  result = helpers.mesh_worker_results(WORKER, compile_cache, tmp_path)
  assert "fsdp" in result["mesh"]["teacher_spec"]
  single, mesh = result["single"]["history"], result["mesh"]["history"]
  assert [h["on_policy"] for h in mesh] == [1.0] * 3
  assert [h["sampled_len"] for h in mesh] == [h["sampled_len"] for h in single]
  for key in ("kd", "teacher_logprob"):
    np.testing.assert_allclose([h[key] for h in mesh], [h[key] for h in single], rtol=1e-4)
  for name, want in result["single"]["lora"].items():
    want, got = np.asarray(want), np.asarray(result["mesh"]["lora"][name])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name


@pytest.mark.slow  # kdjax.main on SmolLM2 (convert, a store, 2 on-policy steps, eval, report): minutes
def test_opsd_config_runs_on_smollm2(gsm8k_dir, tmp_path):
  """configs/opsd.py end to end, shrunk: the student is its own teacher, primed with the reference solution, and
  every step is on-policy; the adapter, the evaluation and the report are written."""
  work = tmp_path / "opsd"
  run = subprocess.run(
      [sys.executable, "-m", "kdjax.main", f"--config={REPO / 'configs' / 'opsd.py'}", f"--config.workdir={work}",
       f"--config.data.source={gsm8k_dir}", "--config.data.num_train_questions=4", "--config.data.num_validation=2",
       "--config.teacher.max_new_tokens=16", "--config.train.batch_size=2", "--config.train.eval_every=2",
       "--config.eval.num_questions=2", "--config.eval.max_new_tokens=16"],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=1200)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "convert: teacher is the student's checkpoint" in run.stdout  # self-distillation: one model
  steps = [json.loads(line) for line in (work / "arms/gold_hint/train/metrics.jsonl").read_text().splitlines()]
  steps = [s for s in steps if "loss" in s and "on_policy" in s]
  assert [s["step"] for s in steps] == [1, 2] and all(s["on_policy"] == 1.0 for s in steps)
  assert all(s["sampled_len"] >= 1 and s["loss"] == s["kd"] for s in steps)  # KD on its own samples, no CE
  assert any(s["kd"] > 1e-4 for s in steps)  # the privileged context changes the grade (self-KD would be ~0)
  # The teacher's prompts hold each question's reference solution; the student's never do.
  from kdjax.teacher import store as store_lib
  from kdjax.models import checkpoint
  tokenizer = checkpoint.load_tokenizer(work / "models/student")
  questions = {q["id"]: q for q in sum(data.split_train_validation(data.load_gsm8k(gsm8k_dir, "train"), 4, 2, 0), [])}
  reader = store_lib.StoreReader(work / "stores/gold_hint")
  assert sorted(r.question_id for r in reader) == sorted(questions)
  for record in reader:
    solution = data.strip_calculator_annotations(questions[record.question_id]["answer"]).strip()
    assert solution in tokenizer.decode(record.teacher_prompt_ids.tolist())
    assert solution not in tokenizer.decode(record.student_prompt_ids.tolist())
  assert (work / "arms/gold_hint/adapter/adapter_config.json").is_file()
  assert (work / "arms/gold_hint/eval/samples.jsonl").is_file() and (work / "report/report.md").is_file()


def test_demo_config_parses_in_both_parts_and_the_run_reads_the_teacher_part_s_adapter(gsm8k_dir, tmp_path):
  """configs/on_policy_demo.py as the command line reads it: `:teacher` (the finetune arm that makes the teacher)
  and the on-policy run, whose teacher.adapter is where the first part's train stage exports its adapter."""
  from absl import flags
  from ml_collections import config_flags
  from kdjax.experiment import settings

  def parse(arg):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(["kdjax", f"--config={REPO / 'configs' / 'on_policy_demo.py'}{arg}"])
    values.config.data.source = str(gsm8k_dir)  # the demo's relative path, from the test's folder
    return values.config

  first, second = parse(":teacher"), parse("")
  assert (first.arms, first.stages, first.data.num_train_questions) == ("finetune", "convert,train", 128)
  assert (second.arms, second.distill.on_policy_fraction, second.teacher.adapter) == (
      "ground_truth", 0.5, str(pathlib.Path(first.workdir) / "arms" / "finetune" / "adapter"))
  assert second.data.num_train_questions >= 32 and second.distill.on_policy_probe_questions > 0
  settings.validate(first)
  second.teacher.adapter = str(tmp_path / "absent")  # the teacher part has not run there
  with pytest.raises(settings.ConfigError, match="^teacher.adapter: .*needs adapter_config.json"):
    settings.validate(second)
  adapter = tmp_path / "adapter"  # what validate reads of an adapter: its config, and that its weights exist
  adapter.mkdir()
  (adapter / lora.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                         "target_modules": ["q_proj", "down_proj"]}))
  (adapter / lora.ADAPTER_WEIGHTS).write_bytes(b"")
  second.teacher.adapter = str(adapter)
  settings.validate(second)
  with pytest.raises(flags.Error, match="unknown part 'student'"):
    parse(":student")
