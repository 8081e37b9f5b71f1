"""The train plan: the student's LoRA step compiled ahead of time, its memory, loop-aware FLOPs and verdict."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.plan import generate as plan_lib
from kdjax.plan import train_step as plan_train
from kdjax.experiment import settings
from kdjax.distill import batches, losses
from kdjax.models import lora as lora_lib
from kdjax.distill import train as train_lib
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(not plan_lib.libtpu_available(), reason="libtpu is not installed")


def test_model_flops_of_a_lora_step_by_hand():
  # tiny: L 2, D 64, F 128, H 4, KV 2, head_dim 16, V 256, untied. Projections per layer: q 64*64, k and v
  # 64*32 each, o 64*64, gate/up/down 64*128 each = 36864; LM head 64*256.
  n = 2 * 36864 + 64 * 256
  lora_params = 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))  # r 4 on q, k, v, o: r (in + out)
  flops = plan_train.model_flops(config_lib.get_preset("tiny"), lora_lib.LoraConfig(rank=4), seq_len=128)
  assert flops["params"] == n and flops["lora_params"] == lora_params
  assert flops["per_token"] == 4 * n + 12 * 2 * 4 * 16 * 128 + 6 * lora_params
  # Llama 3.1 8B: N = 7.50e9 (its 8.03e9 parameters less the 0.53e9 of the input embedding).
  flops = plan_train.model_flops(config_lib.get_preset("llama3.1-8b"), lora_lib.LoraConfig(), seq_len=1024)
  assert 7.49e9 < flops["params"] < 7.51e9


def _nested_scan(x, w):
  def layer(h, w_layer):
    def repeat(h2, _):
      return jnp.tanh(h2 @ w_layer), None
    return jax.lax.scan(repeat, h, None, length=3)[0], None
  return jax.lax.scan(layer, x, w)[0].sum()


def test_loop_aware_cost_counts_every_iteration_of_nested_loops():
  x = jax.ShapeDtypeStruct((128, 256), jnp.float32)
  w = jax.ShapeDtypeStruct((10, 256, 256), jnp.float32)
  compiled = jax.jit(jax.grad(_nested_scan, argnums=1)).lower(x, w).compile()
  cost = plan_train.loop_aware_cost(compiled)
  # 30 products of 128x256 @ 256x256, each forward once and backward twice (input and weight gradients).
  matmuls = 3 * 30 * 2 * 128 * 256 * 256
  assert matmuls <= cost["flops"] <= 1.01 * matmuls
  assert cost["raw_flops"] == compiled.cost_analysis()["flops"] < matmuls / 20  # XLA: each body once
  assert sorted(loop["trips"] for loop in cost["loops"]) == [3, 3, 10, 10] and not cost["unknown_loops"]


def _examples(n, length, k, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    response = length - 1  # prompt 2 + response, shifted: `length` tokens
    out.append(batches.distill_example(
        rng.integers(0, 256, 2), rng.integers(0, 256, response), rng.integers(0, 256, (response, k)),
        np.log(np.full((response, k), 0.5 / k, np.float32)), np.full(response, 0.5, np.float32)))
  return out


def test_train_plan_compiles_the_training_loops_own_step(tmp_path, monkeypatch):
  """Acceptance 2: the plan's FLOPs per step equal XLA's cost analysis of the step the loop compiles."""
  # Two steps, the second logged: the loop runs the plain step first (the plan's), then the measuring one.
  cfg = train_lib.TrainConfig(batch_size=2, grad_accum_steps=2, max_length=64, chunk_size=32, num_steps=2,
                              log_every=10, checkpoint_every=1, async_checkpointing=False, tensorboard=False,
                              progress_bar=False)
  loss_cfg, lora_cfg = losses.LossConfig(divergence="forward_kl", ce_weight=0.5), lora_lib.LoraConfig(rank=4)
  plan = plan_train.make_train_plan("tiny", train_cfg=cfg, loss_cfg=loss_cfg, lora_cfg=lora_cfg, dtype="float32",
                                    teacher_k=8)

  captured = {}
  build = train_lib.make_train_step

  def recording_build(*args, **kwargs):
    step = build(*args, **kwargs)
    if kwargs.get("measure_parts"):  # the logged steps' variant, which the plan does not describe
      return step

    def run(*step_args):  # the loop's step, compiled once from the arguments the loop passes, then run
      if "compiled" not in captured:
        captured["compiled"] = step.lower(*step_args).compile()
      return captured["compiled"](*step_args)
    return run
  monkeypatch.setattr(train_lib, "make_train_step", recording_build)
  model = model_lib.init_model(config_lib.get_preset("tiny"), remat=True)
  lora_lib.add_lora(model, lora_cfg)
  train_lib.train(model, _examples(4, 64, 8), None, cfg, loss_cfg, tmp_path)

  loop = captured["compiled"]
  loop_cost = plan_train.loop_aware_cost(loop)
  assert plan.predicted["xla_raw_flops_per_step"] == loop.cost_analysis()["flops"]
  assert plan.predicted["flops_per_step"] == loop_cost["flops"]
  assert plan.predicted["bytes_accessed_per_step"] == loop_cost["bytes_accessed"]
  assert plan.train["total_bytes"] == plan_lib._step_memory(loop).total_bytes
  # Counting the loops matters: 2 layers, 2 micro-batches, 2 loss chunks per micro-batch.
  assert plan.predicted["flops_per_step"] > 3 * plan.predicted["xla_raw_flops_per_step"]
  # And it covers the model FLOPs of the step (remat and elementwise work come on top).
  assert plan.predicted["flops_per_step"] >= plan.predicted["model_flops_per_step"]
  assert plan.fits and plan.suggested_batch_size is None and plan.tokens_per_step == 2 * 2 * 64
  assert plan.predicted["mfu"] is None  # no published peak for a CPU


def _run_kdjax(args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", "kdjax.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=900)


def _plan_then_train_args(tmp_path, gsm8k_dir):
  """Stages plan, convert, train, with model paths that exist but would fail if anything read them (the data is
  real: validation reads the question files before any stage)."""
  bogus = tmp_path / "not_a_model.gguf"
  bogus.write_text("the plan must refuse before anything reads this")
  return ["--config=configs/gt.py", "--config.stages=plan,convert,train", "--config.plan.model=student",
          "--config.student.preset=tiny", f"--config.student.source={bogus}", f"--config.teacher.source={bogus}",
          f"--config.data.source={gsm8k_dir}", f"--config.workdir={tmp_path / 'run'}",
          "--config.teacher.k=8"]


def _check_refusal(result, workdir, expected_start):
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("kdjax: error")]
  assert len(errors) == 1 and errors[0].startswith(f"kdjax: error: {expected_start}"), result.stderr[-2000:]
  assert not (workdir / "models").exists()  # convert never ran: no weight was read
  plan = json.loads((workdir / "plan.json").read_text())
  consumer = max({**plan["train"]["arguments"], "activations and temporaries": plan["train"]["temp_bytes"]}.items(),
                 key=lambda item: item[1])[0]
  assert f"largest: {consumer}" in errors[0] and errors[0].endswith("more chips")
  assert plan["train"]["fits"] is False and "DOES NOT FIT" in result.stdout
  return errors[0], plan


def test_cli_refuses_a_train_step_over_its_budget_before_loading_weights(tmp_path, gsm8k_dir):
  """Acceptance 4 on the live CPU: an HBM share no step fits in; one line, exit 2, nothing converted or loaded."""
  args = _plan_then_train_args(tmp_path, gsm8k_dir) + ["--config.train.batch_size=1", "--config.train.max_len=64",
                                            "--config.train.chunk_size=32", "--config.plan.hbm_fraction=1e-7"]
  error, plan = _check_refusal(_run_kdjax(args, REPO), tmp_path / "run",
                               "tiny (none base, remat on) train step with batch 1 x 64 needs")
  assert plan["topology"] == "live:cpu" and plan["suggested_batch_size"] == 0  # no smaller batch to try
  assert plan["predicted"]["flops_per_step"] > 0  # it compiled: only the budget refuses it


@pytest.mark.slow
@pytest.mark.tpu_compile
@needs_libtpu
def test_cli_refuses_a_train_step_that_cannot_fit_on_a_v5e_chip(tmp_path, gsm8k_dir):
  """Acceptance 4 with the compiler's own verdict: activations that cannot fit one v5e chip at any HBM share."""
  # tiny at 32 x 8192 tokens: the attention scores alone are 4 GiB per layer (bf16) on one 16 GiB v5e chip.
  args = _plan_then_train_args(tmp_path, gsm8k_dir) + ["--config.plan.topology=v5e:1x1", "--config.train.batch_size=32",
                                            "--config.train.max_len=8192"]
  error, plan = _check_refusal(_run_kdjax(args, REPO), tmp_path / "run",
                               "tiny (none base, remat on) train step with batch 32 x 8192 needs")
  assert "largest: activations and temporaries" in error and "train.batch_size" in error
  assert plan["topology"] == "v5e:1x1" and 0 < plan["suggested_batch_size"] < 32
  # libtpu refuses to compile it: the plan carries the compiler's figure, and no prediction.
  assert plan["train"]["compiler_error"] and plan["predicted"] is None
  assert plan["train"]["total_bytes"] > plan["train"]["device_hbm_bytes"]


@pytest.mark.slow
def test_planned_step_memory_matches_the_measured_peak_on_cpu():
  """Acceptance 2: SmolLM2's planned step memory within 20% of the RSS the step really takes (see the script)."""
  result = subprocess.run([sys.executable, "-m", "benchmarks.measure_train_memory"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert 0.8 <= figures["measured_step_bytes"] / figures["plan_total_bytes"] <= 1.2, figures
  # The arguments alone (weights, LoRA, optimizer state, batch) are what the plan says, to 10%.
  assert 0.9 <= figures["measured_argument_bytes"] / figures["plan_argument_bytes"] <= 1.1, figures


def test_on_policy_plan_adds_the_resident_teacher_its_scoring_and_the_sampling_cache():
  """Issue 14: an on-policy step holds the frozen teacher, the student's sampling slots and the teacher's dense
  scoring besides the train step; here a bf16 tiny teacher beside a tiny student, on one live device."""
  # The cheapest step to compile (cross-entropy, one micro-batch): the on-policy parts do not depend on the loss.
  cfg = train_lib.TrainConfig(batch_size=4, grad_accum_steps=1, max_length=64, chunk_size=64, num_steps=1)
  loss_cfg, lora_cfg = losses.LossConfig(divergence="none", ce_weight=1.0), lora_lib.LoraConfig(rank=4)
  settings = dict(train_cfg=cfg, loss_cfg=loss_cfg, lora_cfg=lora_cfg, dtype="bfloat16")
  off = plan_train.make_train_plan("tiny", **settings)
  assert off.fits and off.train["on_policy"] == {}
  student, teacher = config_lib.get_preset("tiny"), config_lib.get_preset("tiny")
  on_policy = plan_train.OnPolicyTeacher(teacher, "none", "bfloat16", prompt_len=40, max_new_tokens=24)
  # A budget just above the off-policy step: the on-policy step, which needs more, is refused.
  fraction = off.train["total_bytes"] * 1.0001 / off.train["device_hbm_bytes"]
  on = plan_train.make_train_plan("tiny", **settings, on_policy=on_policy, hbm_fraction=fraction, suggest_batch=False)
  parts, rows, length, new = on.train["on_policy"], 4, 64, 24  # every example of the step is sampled
  # By hand: bf16 teacher weights; the student's keys and values (bf16) for 4 slots x 64 tokens, plus each slot's
  # lengths, last token and step count (int32), done and stopped flags (bool), key (2 x uint32), 24 token ids.
  assert parts["teacher weights"] == 2 * teacher.num_params
  kv = 2 * student.num_layers * rows * student.num_kv_heads * length * student.head_dim * 2
  assert parts["sampling KV cache"] == kv + rows * (3 * 4 + 2 * 1 + 2 * 4 + new * 4)
  # The scoring returns the teacher's final hidden states (bf16); a larger vocabulary only makes the loss's
  # chunks of teacher logits larger (the scoring of logits would grow by rows x length x 768 x 4 bytes at least).
  assert parts["teacher scoring"] >= rows * length * teacher.hidden_size * 2
  # The loss forms float32 teacher logits chunk by chunk: 256 tokens of 64-token chunks, each chunk's kept for
  # the backward pass (2 x 256 x V x 4 bytes is under the 256 MiB residual budget).
  assert parts["teacher logits in the loss"] == rows * length * teacher.vocab_size * 4
  assert losses.dense_teacher_logit_bytes(4096, 512, 128_256) == 512 * 128_256 * 4  # over budget: one chunk
  assert on.train["step_bytes"] == off.train["total_bytes"]
  assert on.train["total_bytes"] == off.train["total_bytes"] + sum(parts.values())
  assert on.on_policy_teacher == {"model": "tiny", "quantization": "none", "dtype": "bfloat16", "rows": 4,
                                  "sample_len": 64}
  assert "on-policy: teacher tiny none resident" in plan_train.format_table(on)
  # An int8 teacher takes less.
  mesh = plan_lib.build_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  abstract = plan_train.abstract_student(student, dtype="bfloat16", quantize=False, remat=True, lora=lora_cfg)
  int8 = plan_train.on_policy_parts(dataclasses.replace(on_policy, quantization="int8"), abstract, rows, mesh,
                                    plan_lib.parallel.DEFAULT_RULES, "O0")
  assert int8["teacher weights"] < parts["teacher weights"] and int8["sampling KV cache"] == kv + rows * (22 + 4 * new)
  wide = plan_train.on_policy_parts(dataclasses.replace(on_policy, model=dataclasses.replace(teacher, vocab_size=1024)),
                                    abstract, rows, mesh, plan_lib.parallel.DEFAULT_RULES, "O0", chunk_size=64)
  assert wide["teacher scoring"] < parts["teacher scoring"] + rows * length * (1024 - 256) * 4
  assert wide["teacher logits in the loss"] == 4 * parts["teacher logits in the loss"]
  assert not on.fits
  with pytest.raises(plan_lib.PlanDoesNotFit) as err:
    plan_train.check_fits(on)
  assert "\n" not in str(err.value) and str(err.value).endswith("more chips")


def test_on_policy_plan_stage_refuses_responses_longer_than_the_train_sequence(tmp_path):
  # distill.on_policy_fraction > 0: the sampled response (teacher.max_new_tokens) must leave room for the prompt in
  # train.max_len. Refused before any compile, in one line.
  from kdjax.experiment import config as config_lib_
  c = config_lib_.get_default_config()
  c.student.preset = c.teacher.preset = "tiny"
  c.train.max_len, c.teacher.max_new_tokens = 64, 64
  c.distill.on_policy_fraction = 0.5
  with pytest.raises(plan_lib.PlanError) as err:
    settings.plan_student(c, tmp_path / "plan.json")
  assert "\n" not in str(err.value) and "teacher.max_new_tokens (64)" in str(err.value)
  assert not (tmp_path / "plan.json").exists()
