"""The stages of a kdjax experiment, each a function from (config, work folder) to files in that folder.

Work folder layout (`--config.workdir`):
  plan.json                       the plan stage's memory plan
  models/teacher, models/student  converted kdjax checkpoints (Orbax)
  stores/<strategy>/              teacher top-k stores, shared by every arm primed the same way
  arms/<arm>/train/               student checkpoints (Orbax), metrics.jsonl, TensorBoard events
  arms/<arm>/adapter/             the LoRA adapter in HF PEFT format
  arms/<arm>/eval/                samples.jsonl + summary.json on GSM8K test
  report/                         report.md, report.json, accuracy.png
  analysis/                       attention metrics and plots

Stages talk to each other only through these files. Each skips finished work and resumes unfinished work.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Callable

import jax
import ml_collections

from kdjax import config as config_lib
from kdjax import parallel, storage


class ConfigError(ValueError):
  """A config that cannot run: a bad value or a missing model or data path."""


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: pathlib.Path

  def model(self, role: str) -> pathlib.Path:
    return self.root / "models" / role

  def store(self, strategy: str) -> pathlib.Path:
    return self.root / "stores" / strategy

  def arm(self, arm: str) -> pathlib.Path:
    return self.root / "arms" / arm


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[kdjax {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ validation

def validate(c: ml_collections.ConfigDict) -> None:
  """Checks everything that can be checked before heavy work; raises ConfigError with one line."""
  try:
    stages = config_lib.stage_names(c)
    arms = config_lib.arm_names(c)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  from kdjax import priming
  for arm in arms:
    strategy = config_lib.ARMS[arm]["strategy"]
    if strategy and strategy not in priming.STRATEGIES:
      raise ConfigError(f"arm {arm}: unknown priming strategy {strategy!r}")
  needs_teacher = {"convert", "generate"} & set(stages) and any(config_lib.ARMS[a]["mode"] == "kd" for a in arms)
  needs_student = {"convert", "train", "eval", "analyze"} & set(stages)
  for role, needed in (("teacher", needs_teacher), ("student", needs_student)):
    source = c[role].source
    if not needed or source == "smollm2":
      continue
    if not source:
      raise ConfigError(f"--config.{role}.source is empty: give an HF directory, a .gguf file or a kdjax checkpoint")
    if not storage.path(source).exists():
      raise ConfigError(f"{role} model not found: {source}")
  if {"generate", "train", "eval", "analyze"} & set(stages):
    data = c.data.source
    if data != "openai/gsm8k" and not storage.path(data).exists():
      raise ConfigError(f"GSM8K not found at {data} (give a folder with train.jsonl/test.jsonl or openai/gsm8k)")
  if c.teacher.quantization not in ("int8", "none"):
    raise ConfigError(f"teacher.quantization must be 'int8' or 'none', got {c.teacher.quantization!r}")


# ------------------------------------------------------------------------------------------ shared loading

def make_mesh(c: ml_collections.ConfigDict):
  try:
    return parallel.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None


def load_role(c, wd: Workdir, role: str, mesh):
  """The converted model of `role` (teacher or student) and its tokenizer."""
  from kdjax import checkpoint
  path = wd.model(role)
  if not checkpoint.is_kdjax_checkpoint(path):
    raise ConfigError(f"{path} is not converted yet: run the convert stage first")
  model, _ = checkpoint.load_model(path, dtype=c[role].dtype, mesh=mesh,
                                   remat=bool(c.student.remat) if role == "student" else False)
  return model, checkpoint.load_tokenizer(path)


def questions(c, split: str) -> list[dict]:
  from kdjax import data
  return data.load_gsm8k(c.data.source, split)


def train_and_validation(c) -> tuple[list[dict], list[dict]]:
  from kdjax import data
  return data.split_train_validation(questions(c, "train"), c.data.num_train_questions, c.data.num_validation,
                                     c.seed)


# ------------------------------------------------------------------------------------------ stages

def stage_plan(c, wd: Workdir) -> None:
  from kdjax import plan as plan_lib
  role = c.plan.model
  if role not in ("teacher", "student"):
    raise ConfigError(f"plan.model must be 'teacher' or 'student', got {role!r}")
  quantization = c.teacher.quantization if role == "teacher" else ("int8" if c.student.quantize else "none")
  mesh_shape = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}
  result = plan_lib.make_plan(c[role].preset, quantization=quantization, topology=c.plan.topology or None,
                              mesh_shape=mesh_shape, batch_size=c.plan.batch_size, max_len=c.plan.max_len,
                              dtype=c[role].dtype, hbm_fraction=c.plan.hbm_fraction)
  plan_lib.print_table(result)
  plan_lib.write_plan_json(result, wd.root / "plan.json")
  plan_lib.check_fits(result)


def stage_convert(c, wd: Workdir) -> None:
  from kdjax import checkpoint, convert
  arms = config_lib.arm_names(c)
  roles = ["student"] + (["teacher"] if any(config_lib.ARMS[a]["mode"] == "kd" for a in arms) else [])
  settings = {}
  for role in roles:
    target = wd.model(role)
    quantize = role == "teacher" and c.teacher.quantization == "int8"
    quantize = quantize or (role == "student" and bool(c.student.quantize))
    param_dtype = "float32" if c[role].dtype == "float32" else "bfloat16"
    settings[role] = (c[role].source, quantize, param_dtype)
    if checkpoint.is_kdjax_checkpoint(target):
      log(f"convert: {target} already converted")
      continue
    if role == "teacher" and settings["teacher"] == settings["student"]:  # self-distillation: one conversion
      storage.link_dir(target, wd.model("student"))
      log(f"convert: teacher is the student's checkpoint ({target} -> {wd.model('student').name})")
      continue
    log(f"convert: {role} {c[role].source} -> {target}{' (int8)' if quantize else ''}")
    convert.convert(c[role].source, str(target), dtype=param_dtype, quantize=quantize)


def stage_generate(c, wd: Workdir) -> None:
  from kdjax import checkpoint, generation, teacher
  strategies = sorted({config_lib.ARMS[a]["strategy"] for a in config_lib.arm_names(c)
                       if config_lib.ARMS[a]["mode"] == "kd"})
  if not strategies:
    return
  train_q, val_q = train_and_validation(c)
  mesh = make_mesh(c)
  model, tokenizer = load_role(c, wd, "teacher", mesh)
  student_tokenizer = checkpoint.load_tokenizer(wd.model("student"))
  sampling = generation.SamplingConfig(temperature=c.teacher.temperature, top_p=c.teacher.top_p,
                                       top_k=c.teacher.top_k, max_new_tokens=c.teacher.max_new_tokens,
                                       seed=c.seed)
  for strategy in strategies:
    log(f"generate: teacher store for {strategy!r} ({len(train_q)} train + {len(val_q)} validation questions)")
    summary = teacher.generate_store(
        model, tokenizer, train_q + val_q, strategy, wd.store(strategy), teacher_model_id=c.teacher.model_id,
        sampling=sampling, student_tokenizer=student_tokenizer, k=c.teacher.k, placement=c.teacher.placement,
        shard_size=c.teacher.shard_size, batch_size=c.teacher.batch_size,
        questions_name=f"gsm8k-train-{c.data.num_train_questions}+{c.data.num_validation}-seed{c.seed}")
    log(f"generate: {strategy}: {json.dumps(summary, default=str)[:300]}")


def _loss_config(c, mode: str):
  from kdjax.distill import losses
  if mode == "finetune":
    return losses.LossConfig(divergence="none", ce_weight=1.0, topk_mode=c.distill.topk_mode)
  return losses.LossConfig(divergence=c.distill.divergence, beta=c.distill.beta, skew_alpha=c.distill.skew_alpha,
                           temperature=c.distill.temperature, scale_by_t2=c.distill.scale_by_t2,
                           ce_weight=c.distill.ce_weight, topk_mode=c.distill.topk_mode)


def _lora_config(c):
  from kdjax.distill import lora
  return lora.LoraConfig(rank=c.student.lora.rank, alpha=c.student.lora.alpha, dropout=c.student.lora.dropout,
                         targets=tuple(t.strip() for t in c.student.lora.targets.split(",") if t.strip()))


def _train_examples(c, wd: Workdir, arm: str, tokenizer):
  from kdjax import store
  from kdjax.distill import batches
  spec = config_lib.ARMS[arm]
  train_q, val_q = train_and_validation(c)
  if spec["mode"] == "finetune":
    return batches.gold_examples(train_q, tokenizer), batches.gold_examples(val_q, tokenizer)
  reader = store.StoreReader(wd.store(spec["strategy"]))
  records = reader.filter(correct_only=True) if c.distill.correct_only else reader
  val_ids = {q["id"] for q in val_q}
  train_records = [r for r in records if r.question_id not in val_ids]
  val_records = [r for r in records if r.question_id in val_ids]
  return batches.examples_from_records(train_records), batches.examples_from_records(val_records)


def stage_train(c, wd: Workdir) -> None:
  from kdjax.distill import lora, train
  mesh = make_mesh(c)
  for arm in config_lib.arm_names(c):
    mode = config_lib.ARMS[arm]["mode"]
    adapter = wd.arm(arm) / "adapter"
    if mode == "none":
      continue
    if (adapter / "adapter_config.json").exists():
      log(f"train: {arm}: adapter already exported")
      continue
    model, tokenizer = load_role(c, wd, "student", mesh)
    lora.add_lora(model, _lora_config(c), seed=c.seed)
    train_data, val_data = _train_examples(c, wd, arm, tokenizer)
    log(f"train: {arm}: {len(train_data)} train / {len(val_data)} validation sequences ({mode})")
    cfg = train.TrainConfig(
        optimizer=c.train.optimizer, learning_rate=c.train.learning_rate, momentum=c.train.momentum,
        weight_decay=c.train.weight_decay, warmup_steps=c.train.warmup_steps, schedule=c.train.schedule,
        min_lr_ratio=c.train.min_lr_ratio, clip_norm=c.train.clip_norm or None, batch_size=c.train.batch_size,
        grad_accum_steps=c.train.grad_accum_steps, num_epochs=c.train.num_epochs, max_length=c.train.max_len,
        eval_every=c.train.eval_every, checkpoint_every=c.train.checkpoint_every,
        keep_checkpoints=c.train.keep_checkpoints, seed=c.seed, chunk_size=c.train.chunk_size,
        log_every=c.train.log_every, progress_bar=jax.process_index() == 0)
    result = train.train(model, train_data, val_data or None, cfg, _loss_config(c, mode), wd.arm(arm) / "train",
                         mesh=mesh)
    train.restore_best_lora(model, wd.arm(arm) / "train")
    lora.export_peft(model, adapter, base_model_name_or_path=c.student.model_id)
    log(f"train: {arm}: done ({result}); adapter -> {adapter}")


def load_student_for_arm(c, wd: Workdir, arm: str, mesh):
  from kdjax.distill import lora
  model, tokenizer = load_role(c, wd, "student", mesh)
  if config_lib.ARMS[arm]["mode"] != "none":
    adapter = wd.arm(arm) / "adapter"
    if not (adapter / "adapter_config.json").exists():
      raise ConfigError(f"arm {arm}: no adapter at {adapter}: run the train stage first")
    lora.import_peft(model, adapter)
  return model, tokenizer


def stage_eval(c, wd: Workdir) -> None:
  from kdjax.evaluation import loop
  mesh = make_mesh(c)
  test_q = questions(c, c.eval.split)
  cfg = loop.EvalConfig(split=c.eval.split, num_questions=None if c.eval.num_questions < 0 else c.eval.num_questions,
                        prompt_format=c.eval.prompt_format, max_new_tokens=c.eval.max_new_tokens,
                        batch_size=c.eval.batch_size, primary_rule=c.eval.rule)
  for arm in config_lib.arm_names(c):
    model, tokenizer = load_student_for_arm(c, wd, arm, mesh)
    summary = loop.evaluate(model, tokenizer, test_q, cfg, wd.arm(arm) / "eval", arm=arm,
                            progress=jax.process_index() == 0)
    log(f"eval: {arm}: {json.dumps(summary, default=str)[:300]}")


def stage_report(c, wd: Workdir) -> None:
  from kdjax.evaluation import paper_numbers, report
  arms = {p.parent.name: p for p in sorted((wd.root / "arms").glob("*/eval"))
          if (p / "samples.jsonl").exists()}
  if not arms:
    raise ConfigError(f"no evaluated arms under {wd.root / 'arms'}: run the eval stage first")
  report.build_report(arms, wd.root / "report", rule=c.report.rule,
                      paper_numbers=paper_numbers.PAPER_GSM8K_ACCURACY)
  log(f"report: {wd.root / 'report' / 'report.md'}")
  if jax.process_index() == 0:
    print((wd.root / "report" / "report.md").read_text())


def stage_analyze(c, wd: Workdir) -> None:
  from kdjax import analysis
  mesh = make_mesh(c)
  models, tokenizer = {}, None
  for arm in config_lib.arm_names(c):
    models[arm], tokenizer = load_student_for_arm(c, wd, arm, mesh)
  result = analysis.analyze(models, tokenizer, questions(c, c.eval.split), wd.root / "analysis",
                            num_questions=c.analyze.num_questions, threshold=c.analyze.threshold)
  log(f"analyze: {wd.root / 'analysis'} ({len(result)} entries)")


STAGE_FUNCTIONS: dict[str, Callable] = {
    "plan": stage_plan, "convert": stage_convert, "generate": stage_generate, "train": stage_train,
    "eval": stage_eval, "report": stage_report, "analyze": stage_analyze,
}


def run(c: ml_collections.ConfigDict) -> None:
  validate(c)
  parallel.initialize_distributed(c.distributed.coordinator or None, c.distributed.num_processes or None,
                                  None if c.distributed.process_id < 0 else c.distributed.process_id)
  wd = Workdir(storage.makedirs(storage.path(c.workdir, absolute=True)))  # orbax needs absolute paths
  if jax.process_index() == 0:
    storage.write_text(wd.root / "config.json", c.to_json_best_effort(indent=2))
  for stage in config_lib.stage_names(c):
    start = time.time()
    log(f"stage {stage}: start")
    STAGE_FUNCTIONS[stage](c, wd)
    log(f"stage {stage}: done in {time.time() - start:.1f}s")
