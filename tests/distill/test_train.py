"""Student training loop: schedule, gradient accumulation, LoRA-only updates, resume after kill -9, 8 devices."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import helpers
from workers import train_worker as worker
from kdjax.experiment import config as config_lib
from kdjax.experiment import settings
from kdjax.distill import batches, losses, run_files
from kdjax.distill import train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = "train_worker"


def _quiet(**overrides) -> train_lib.TrainConfig:
  base = dict(batch_size=4, num_steps=2, pad_multiple=16, chunk_size=64, log_every=1, checkpoint_every=50,
              tensorboard=False, progress_bar=False, async_checkpointing=False)
  base.update(overrides)
  return train_lib.TrainConfig(**base)


@pytest.fixture(scope="module")
def data():
  return (worker.synthetic_examples(16, seed=0, head_scale=10.0),
          worker.synthetic_examples(8, seed=1, head_scale=10.0))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """Environment for subprocesses: one persistent compilation cache, so only the first run compiles."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  return env


def _flat_params(model, which) -> dict[str, np.ndarray]:
  return {".".join(map(str, p)): np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, which))}


# ------------------------------------------------------------------------------------------------ config


def test_schedule_warmup_cosine_floor_no_restart():
  cfg = train_lib.TrainConfig(learning_rate=1e-3, warmup_steps=4, min_lr_ratio=0.1)
  schedule = train_lib.make_schedule(cfg, total_steps=20)
  lr = np.array([float(schedule(s)) for s in range(40)])
  expected = np.empty(40)
  expected[:4] = 1e-3 * np.arange(4) / 4
  progress = np.minimum(np.arange(4, 40) - 4, 16) / 16
  expected[4:] = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + np.cos(np.pi * progress))
  np.testing.assert_allclose(lr, expected, rtol=1e-5, atol=1e-12)
  assert lr[20:].min() == pytest.approx(1e-4)  # stays at the floor after the last step
  constant = train_lib.make_schedule(train_lib.TrainConfig(learning_rate=2e-3, schedule="constant"), 10)
  assert [float(constant(s)) for s in (0, 5, 50)] == pytest.approx([2e-3] * 3)


def test_config_errors():
  with pytest.raises(train_lib.TrainError, match="optimizer"):
    train_lib.TrainConfig(optimizer="lion")
  with pytest.raises(train_lib.TrainError, match="grad_accum_steps"):
    train_lib.TrainConfig(grad_accum_steps=0)
  with pytest.raises(train_lib.TrainError, match="unknown TrainConfig fields"):
    train_lib.TrainConfig.from_dict({"learning_rate": 1e-4, "lr": 1})
  cfg = train_lib.TrainConfig.from_dict({"batch_size": 3, "grad_accum_steps": 2, "num_epochs": 2})
  assert cfg.total_steps(13) == 2 * 3  # ceil(13 / 6) steps per epoch
  assert train_lib.TrainConfig(num_steps=7, num_epochs=3).total_steps(100) == 7


def test_rejects_model_without_lora_and_ce_data_for_kd(data, tmp_path):
  from kdjax.models.llama import config as config_lib, model as model_lib
  plain = model_lib.init_model(config_lib.get_preset("tiny"))
  with pytest.raises(train_lib.TrainError, match="LoRAParam"):
    train_lib.train(plain, data[0], None, _quiet(), losses.LossConfig(), tmp_path / "a")
  ce_only = [batches.ce_example([1, 2, 3], [4, 5], 6)]
  with pytest.raises(train_lib.TrainError, match="teacher"):
    train_lib.train(worker.make_student(), ce_only, None, _quiet(), losses.LossConfig(), tmp_path / "b")


# ------------------------------------------------------------------------------------------------ losses


def _numpy_kd_ce(model, batch) -> tuple[float, float]:
  """float64 forward KL(tail buckets) and CE token means from the full logits: an independent reference."""
  logits = np.asarray(model(batch["input_ids"], attention_mask=batch["attention_mask"]), np.float64)
  logq = logits - logits.max(-1, keepdims=True)
  logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
  kd, ce, n = 0.0, 0.0, 0.0
  for b, s in zip(*np.nonzero(batch["loss_mask"])):
    ce -= logq[b, s, batch["target_ids"][b, s]]
    p = np.append(np.exp(batch["teacher_logprobs"][b, s].astype(np.float64)),
                  np.exp(batch["teacher_log_tail"][b, s].astype(np.float64)))
    q_ids = np.exp(logq[b, s, batch["teacher_ids"][b, s]])
    q = np.append(q_ids, 1.0 - q_ids.sum())
    kd += np.sum(p * np.log(p / q))
    n += 1
  return kd / n, ce / n


def test_evaluate_loss_matches_numpy_reference(data):
  model = worker.make_student()
  eval_batches = batches.eval_batches(data[1], 4, pad_multiple=16)
  got = train_lib.evaluate_loss(model, eval_batches, losses.LossConfig(ce_weight=0.25), chunk_size=32)
  kd_ce = [_numpy_kd_ce(model, b) for b in eval_batches]
  counts = [b["loss_mask"].sum() for b in eval_batches]
  kd_ref = sum(k * c for (k, _), c in zip(kd_ce, counts)) / sum(counts)
  ce_ref = sum(c_ * c for (_, c_), c in zip(kd_ce, counts)) / sum(counts)
  assert got["num_tokens"] == sum(e.num_loss_tokens for e in data[1])
  assert got["kd"] == pytest.approx(kd_ref, rel=1e-4)
  assert got["ce"] == pytest.approx(ce_ref, rel=1e-5)
  assert got["loss"] == pytest.approx(0.75 * kd_ref + 0.25 * ce_ref, rel=1e-4)


# ------------------------------------------------------------------------------------------------ training


def test_grad_accumulation_equals_big_batch_token_mean(data, tmp_path):
  train, _ = data
  loss_cfg = losses.LossConfig(ce_weight=0.5)
  common = dict(optimizer="sgd", learning_rate=0.5, momentum=0.9, clip_norm=None, num_steps=2)
  small = worker.make_student()
  accum = train_lib.train(small, train, None, _quiet(batch_size=2, grad_accum_steps=2, **common), loss_cfg,
                          tmp_path / "accum")
  big = worker.make_student()
  whole = train_lib.train(big, train, None, _quiet(batch_size=4, grad_accum_steps=1, **common), loss_cfg,
                          tmp_path / "whole")
  for a, b in zip(accum.history, whole.history):
    assert a["loss_tokens"] == b["loss_tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
  # The step's loss is the token mean over all its loss tokens (the micro-batches hold different counts).
  first = batches.collate([train[i] for i in batches.BatchIterator(train, 4, seed=0).epoch_plan(0)[0]],
                          pad_multiple=16)
  reference = train_lib.evaluate_loss(worker.make_student(), [first], loss_cfg, chunk_size=64)
  assert accum.history[0]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
  got, want = _flat_params(small, nnx.LoRAParam), _flat_params(big, nnx.LoRAParam)
  for name in want:
    scale = np.abs(want[name]).max()
    assert np.abs(got[name] - want[name]).max() <= 1e-6 * scale, name
  assert any(np.abs(v).max() > 0 for k, v in got.items() if k.endswith("_lora_b"))  # it did move


def test_only_lora_changes_and_validation_loss_decreases(data, tmp_path):
  train = data[0]
  val = train[:8]  # a tiny overfit problem: the random responses can only be memorised
  model = worker.make_student(head_scale=10.0)  # the tiny preset's own head is too small to move the outputs
  frozen_before = _flat_params(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  lora_before = _flat_params(model, nnx.LoRAParam)
  loss_cfg = losses.LossConfig(ce_weight=0.1)
  val_batches = batches.eval_batches(val, 4, pad_multiple=16)
  val_before = train_lib.evaluate_loss(model, val_batches, loss_cfg, chunk_size=64)["loss"]
  cfg = _quiet(optimizer="adamw", learning_rate=2e-2, warmup_steps=2, num_steps=24, eval_every=8,
               checkpoint_every=8, keep_checkpoints=2, tensorboard=True, log_every=5)
  result = train_lib.train(model, train, val, cfg, loss_cfg, tmp_path)

  frozen_after = _flat_params(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  assert frozen_before.keys() == frozen_after.keys() and len(frozen_after) > 5
  for name, value in frozen_before.items():
    assert np.array_equal(value, frozen_after[name]), name
  lora_after = _flat_params(model, nnx.LoRAParam)
  assert all(not np.array_equal(lora_before[k], lora_after[k]) for k in lora_before)

  assert result.step == 24 and len(result.history) == 24
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  val_losses = [val_before] + [r["val_loss"] for r in records if "val_loss" in r]
  assert len(val_losses) == 4 and all(b < a for a, b in zip(val_losses, val_losses[1:])), val_losses
  assert result.final_val["loss"] < 0.9 * val_before
  assert result.best_val_loss == min(val_losses) and result.best_step == 24
  train_records = [r for r in records if "kd" in r]
  assert [r["step"] for r in train_records] == list(range(1, 25))
  assert {"kd", "ce", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train_records[0])
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [16, 24]

  # The best checkpoint holds the LoRA state of the best validation step.
  fresh = worker.make_student(head_scale=10.0)
  meta = run_files.restore_best_lora(fresh, tmp_path)
  assert meta["step"] == result.best_step and meta["val_loss"] == pytest.approx(result.best_val_loss)
  for k, v in _flat_params(fresh, nnx.LoRAParam).items():
    assert np.array_equal(v, lora_after[k])
  selected = run_files.select_adapter(fresh, result)  # what the train stage exports: the best step's state
  assert selected.selected_step == result.best_step and selected.update_norms["max"] > 0

  # A second call on a finished workdir resumes at the end and changes nothing.
  again = train_lib.train(worker.make_student(head_scale=10.0), train, val, cfg, loss_cfg, tmp_path)
  assert again.step == 24 and again.history == []
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(again.lora), jax.tree.leaves(result.lora)))


def test_logged_steps_take_the_kd_and_ce_gradients_apart(data, tmp_path):
  """Logged steps record ||grad|| of (1 - w) KD and of w CE: (1 - w) and w times the gradient norms of a KD-only and
  a CE-only loss on the same first batch, and the update they make is the plain step's (the parts sum to it)."""
  train, _ = data
  common = dict(optimizer="sgd", learning_rate=0.5, momentum=0.9, clip_norm=None, num_steps=2)
  weight = 0.25
  mixed = losses.LossConfig(ce_weight=weight)
  every = train_lib.train(worker.make_student(), train, None, _quiet(log_every=1, **common), mixed, tmp_path / "a")
  assert [r["step"] for r in every.history if "grad_ratio_kd_ce" in r] == [1, 2]
  kd_only = train_lib.train(worker.make_student(), train, None, _quiet(**common), losses.LossConfig(ce_weight=0.0),
                            tmp_path / "kd")
  ce_only = train_lib.train(worker.make_student(), train, None, _quiet(**common),
                            losses.LossConfig(divergence="none", ce_weight=1.0), tmp_path / "ce")
  assert "grad_norm_kd" not in kd_only.history[0] and "grad_norm_kd" not in ce_only.history[0]  # one part only
  first = every.history[0]
  assert first["grad_norm_kd"] == pytest.approx((1 - weight) * kd_only.history[0]["grad_norm"], rel=1e-5)
  assert first["grad_norm_ce"] == pytest.approx(weight * ce_only.history[0]["grad_norm"], rel=1e-5)
  assert first["grad_ratio_kd_ce"] == pytest.approx(first["grad_norm_kd"] / first["grad_norm_ce"], rel=1e-6)
  assert first["grad_norm_kd"] > 0 and first["grad_norm_ce"] > 0
  # log_every=5: step 1 runs the plain step, the last step (2) is logged and measured; the same weights result.
  plain_model = worker.make_student()
  sparse = train_lib.train(plain_model, train, None, _quiet(log_every=5, **common), mixed, tmp_path / "b")
  assert [r["step"] for r in sparse.history if "grad_ratio_kd_ce" in r] == [2]
  for a, b in zip(every.history, sparse.history):
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
  for leaf_a, leaf_b in zip(jax.tree.leaves(every.lora), jax.tree.leaves(sparse.lora)):
    np.testing.assert_allclose(np.asarray(leaf_a), np.asarray(leaf_b), rtol=1e-5, atol=1e-7)
  records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert all({"grad_norm_kd", "grad_norm_ce", "grad_ratio_kd_ce"} <= set(r) for r in records if "kd" in r)


# ------------------------------------------------------------------------------------------------ subprocesses


@pytest.mark.slow  # three training subprocesses: ~30 s of CPU on an idle machine
def test_kill9_and_resume_is_bit_identical(tmp_path, compile_cache):
  helpers.kill_resume_and_compare(WORKER, str(tmp_path / "killed"), "10", compile_cache, tmp_path,
                                  reference=str(tmp_path / "ref"), delay=0.1)


@pytest.mark.slow  # a subprocess compiling the step for one device and for a 2 x 4 mesh
def test_eight_cpu_devices_match_single_device(tmp_path, compile_cache):
  result = helpers.mesh_worker_results(WORKER, compile_cache, tmp_path)
  assert "fsdp" in result["mesh"]["wq_spec"]  # the base really was sharded
  np.testing.assert_allclose(result["mesh"]["loss"], result["single"]["loss"], rtol=1e-5)
  for name, want in result["single"]["lora"].items():
    want, got = np.asarray(want), np.asarray(result["mesh"]["lora"][name])
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name


# ------------------------------------------------------------------------------------------------ paper schedule


def _experiment(name: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["base", "teacher", "gt", "confidence", "gold_hint", "mismatched_hint", "finetune",
                                  "all_arms"])
def test_paper_configs_update_once_per_example_with_one_cosine(name):
  c = _experiment(name)
  cfg = settings.train_config(c)
  assert (cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.examples_per_step) == ("sgd", 5e-6, 0.9, 1)
  total = cfg.total_steps(c.data.num_train_questions)
  assert total == 2 * 2638
  lr = np.asarray(jax.vmap(train_lib.make_schedule(cfg, total))(np.arange(total + 10)))
  # Cosine over all updates, no restarts: the peak at the first update, never rising, the floor at the end.
  assert lr[0] == pytest.approx(5e-6) and np.all(np.diff(lr) <= 1e-18)
  middle = 5e-7 + (5e-6 - 5e-7) * 0.5 * (1 + np.cos(np.pi * 0.5))
  assert lr[total // 2] == pytest.approx(middle, rel=1e-4)
  assert lr[total - 1] > lr[total] == pytest.approx(cfg.min_lr_ratio * 5e-6)
  assert np.allclose(lr[total:], lr[total])
  # The stated rule for a larger batch: lr x examples per update (SGD only).
  c.train.batch_size, c.train.grad_accum_steps = 4, 2
  assert settings.train_config(c).peak_learning_rate == pytest.approx(8 * 5e-6)
  c.train.optimizer = "adamw"
  with pytest.raises(train_lib.TrainError, match="lr_reference_batch=0"):
    settings.train_config(c)


def test_the_hint_control_is_gold_hint_s_config_in_all_arms_and_the_demo(gsm8k_dir):
  from kdjax.experiment import settings
  assert "mismatched_hint" in config_lib.arm_names(_experiment("all_arms"))
  mismatched, gold = _experiment("mismatched_hint"), _experiment("gold_hint")
  assert (mismatched.arms, gold.arms) == ("mismatched_hint", "gold_hint")
  mismatched.arms = gold.arms
  assert mismatched.to_dict() == gold.to_dict()  # primed and trained exactly as gold_hint
  demo = _experiment("demo")
  demo.arms, demo.data.source = "gold_hint,mismatched_hint", str(gsm8k_dir)
  settings.validate(demo)
  demo.data.num_train_questions, demo.data.num_validation = 1, 0  # one question cannot take another's solution
  with pytest.raises(settings.ConfigError, match="needs at least 2 store questions"):
    settings.validate(demo)


def test_recommended_keeps_its_own_schedule():
  cfg = settings.train_config(_experiment("recommended"))
  assert (cfg.optimizer, cfg.batch_size, cfg.lr_reference_batch) == ("adamw", 8, None)
  assert cfg.peak_learning_rate == cfg.learning_rate == 2e-4


@pytest.mark.slow  # two trainings with their compilations: ~25 s on a loaded 2-core machine
def test_linear_lr_rule_matches_batch_one_to_first_order(tmp_path):
  """One SGD step over 4 examples at 4 lr moves LoRA like 4 steps at batch 1 and lr, up to O(lr^2).

  Measured: the relative gap is 0.27 at lr 0.02 and 0.14 at lr 0.01 (it halves with lr: first order), so
  ~0.03 at 0.002; without the rule (batch 4 at lr) the step would be a quarter of the move, a gap of 0.75.
  """
  rng = np.random.default_rng(0)
  # Equal loss-token counts: the token mean then weighs every example equally (the rule's stated condition).
  examples = [batches.ce_example(rng.integers(1, 200, 6), rng.integers(1, 200, 5), None) for _ in range(4)]
  loss_cfg = losses.LossConfig(divergence="none", ce_weight=1.0)
  moves = {}
  for batch in (1, 4):
    model = worker.make_student(head_scale=10.0)
    before = _flat_params(model, nnx.LoRAParam)
    cfg = _quiet(optimizer="sgd", learning_rate=0.002, momentum=0.0, clip_norm=None, schedule="constant",
                 batch_size=batch, num_steps=4 // batch, lr_reference_batch=1)
    train_lib.train(model, examples, None, cfg, loss_cfg, tmp_path / str(batch))
    after = _flat_params(model, nnx.LoRAParam)
    moves[batch] = np.concatenate([(after[k] - before[k]).ravel() for k in sorted(before)]).astype(np.float64)
  assert np.linalg.norm(moves[1]) > 0
  gap = np.linalg.norm(moves[1] - moves[4]) / np.linalg.norm(moves[1])
  assert gap < 0.06, gap


# ------------------------------------------------------------------------------------------------ §5 defects


def test_without_validation_the_final_state_is_selected_and_norms_recorded(data, tmp_path):
  model = worker.make_student(head_scale=10.0)
  cfg = _quiet(optimizer="adamw", learning_rate=1e-2, num_steps=3, eval_every=1)
  result = train_lib.train(model, data[0], None, cfg, losses.LossConfig(ce_weight=0.2), tmp_path)
  assert result.best_step is None and not any(p.name.isdigit() for p in (tmp_path / "best").iterdir())
  final = _flat_params(model, nnx.LoRAParam)
  selected = run_files.select_adapter(model, result)
  assert selected.selected_step == 3
  for name, value in _flat_params(model, nnx.LoRAParam).items():
    assert np.array_equal(value, final[name]), name  # the final state, untouched
  written = json.loads((tmp_path / run_files.UPDATE_NORMS_FILE).read_text())
  per_module = written["per_module"]
  assert set(per_module) == {f"{layer}.{t}" for layer in range(2) for t in ("wq", "wv", "w_up")}
  for key, value in per_module.items():  # float64 from the raw factors and the base weight
    layer, target = key.split(".")
    a = np.asarray(getattr(model.layers, f"{target}_lora_a")[...], np.float64)[int(layer)]
    b = np.asarray(getattr(model.layers, f"{target}_lora_b")[...], np.float64)[int(layer)]
    w = np.asarray(getattr(model.layers, target)[...], np.float64)[int(layer)]
    delta = model.lora_scale * a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
    assert value == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w), rel=1e-5), key
  assert written["mean"] == pytest.approx(np.mean(list(per_module.values())))
  assert written["max"] == max(per_module.values()) > 0
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["update_norm_mean"] for r in logged if "update_norm_mean" in r] == [pytest.approx(written["mean"])]
  line = selected.summary()
  assert "\n" not in line and "3 steps" in line and "no validation data" in line and "tokens/s" in line
  assert repr(selected) == f"TrainResult({line})" and len(repr(selected)) < 400


def test_max_len_that_leaves_no_loss_token_is_refused(tmp_path):
  prompts = [[5] * 7, [6] * 9]  # 7- and 9-token prompts: position 6 predicts the first response token
  examples = [batches.ce_example(p, [1, 2, 3], 4) for p in prompts]
  # By hand: max_len 7 keeps positions 0..6, so the 7-token prompt keeps one loss token, the other none.
  assert batches.count_loss_tokens(examples, 7) == (1, 1)
  assert batches.count_loss_tokens(examples, 6) == (0, 2)
  assert batches.count_loss_tokens(examples) == (8, 0)
  loss_cfg = losses.LossConfig(divergence="none", ce_weight=1.0)
  with pytest.raises(train_lib.TrainError, match=r"train.max_len=6 leaves no loss token in train_data.*at least 7 "):
    train_lib.train(worker.make_student(), examples, None, _quiet(max_length=6), loss_cfg, tmp_path)
  assert not (tmp_path / "checkpoints").exists()  # refused before any work


@pytest.mark.slow  # SmolLM2's tokenizer, a checkpoint, three steps over its 49152-token vocabulary: ~60 s loaded
def test_train_stage_with_num_validation_zero_exports_the_final_adapter(smollm2_gguf, gsm8k_dir, tmp_path,
                                                                       capsys):
  """The CLI's train stage end to end (finetune arm) without a validation split: no best-checkpoint selection."""
  import dataclasses as dc
  from kdjax.models import checkpoint
  from kdjax.experiment import pipeline, provenance
  from kdjax.experiment import config as config_lib
  from kdjax.models.llama import config as llama_config, model as model_lib
  tokenizer = checkpoint.load_tokenizer(smollm2_gguf)
  student = model_lib.init_model(dc.replace(llama_config.get_preset("tiny"), vocab_size=len(tokenizer)))
  checkpoint.save_model(student, tmp_path / "models" / "student", tokenizer=tokenizer)
  c = config_lib.get_default_config()
  c.workdir, c.arms, c.data.source = str(tmp_path), "finetune", str(gsm8k_dir)
  c.data.num_train_questions, c.data.num_validation = 3, 0
  c.student.dtype, c.student.remat = "float32", False
  c.train.max_len, c.train.num_epochs, c.train.log_every = 256, 1, 1
  c.student.source = str(smollm2_gguf)
  wd = pipeline.Workdir(tmp_path)
  records = pipeline.Records(c, wd)
  # The record the convert stage leaves with a converted model (here a tiny random one in its place): train
  # refuses a student folder without it.
  provenance.write(wd.model("student"), records.model("student"))
  pipeline.stage_train(c, wd, records)
  arm = tmp_path / "arms" / "finetune"
  assert (arm / "adapter" / "adapter_config.json").is_file()
  norms = json.loads((arm / "train" / run_files.UPDATE_NORMS_FILE).read_text())
  assert norms["step"] == 3 and norms["max"] > 0 and len(norms["per_module"]) == 2 * 4  # 2 layers x wq wk wv wo
  summary = [line for line in capsys.readouterr().out.splitlines() if "train: finetune: 3 steps" in line]
  assert len(summary) == 1 and "no validation data" in summary[0] and "TrainResult" not in summary[0]
  # The exported adapter is the final state: importing it gives the same relative update norms.
  from kdjax.models import lora
  reloaded = lora.import_peft(model_lib.init_model(dc.replace(llama_config.get_preset("tiny"),
                                                              vocab_size=len(tokenizer))), arm / "adapter")
  got = lora.relative_update_norms(reloaded)
  assert got == pytest.approx(norms["per_module"], rel=1e-6)
