"""The stages' settings, built from the config in one place, and the checks that run before any work.

Each stage's settings object (sampling, loss, LoRA, eval) has one builder here, and `validate` builds them all
before the first stage starts, so a bad value is refused in one line by the same code that later uses it.
The GSM8K questions are read here too (once per source and split), because the checks need the train split's sizes.
"""

from __future__ import annotations

import functools

import ml_collections

from kdjax.experiment import config as config_lib
from kdjax.infra import storage


class ConfigError(ValueError):
  """A config that cannot run: a bad value or a missing model or data path."""


@functools.lru_cache(maxsize=4)
def _load_questions(source: str, split: str) -> tuple[dict, ...]:
  from kdjax.gsm8k import data
  return tuple(data.load_gsm8k(source, split))


def questions(c, split: str) -> list[dict]:
  return list(_load_questions(c.data.source, split))


def train_and_validation(c) -> tuple[list[dict], list[dict]]:
  from kdjax.gsm8k import data
  return data.split_train_validation(questions(c, "train"), c.data.num_train_questions, c.data.num_validation,
                                     c.seed)


def convert_settings(c, role: str) -> tuple[bool, str]:
  """(quantize, parameter dtype) of `role`'s conversion."""
  quantize = c.teacher.quantization == "int8" if role == "teacher" else bool(c.student.quantize)
  return quantize, "float32" if c[role].dtype == "float32" else "bfloat16"


def teacher_sampling(c):
  from kdjax.serving import generation
  return generation.SamplingConfig(temperature=c.teacher.temperature, top_p=c.teacher.top_p,
                                   top_k=c.teacher.top_k, max_new_tokens=c.teacher.max_new_tokens, seed=c.seed)


def loss_config(c, mode: str):
  from kdjax.distill import losses
  if mode == "finetune":
    return losses.LossConfig(divergence="none", ce_weight=1.0, topk_mode=c.distill.topk_mode)
  return losses.LossConfig(divergence=c.distill.divergence, beta=c.distill.beta, skew_alpha=c.distill.skew_alpha,
                           temperature=c.distill.temperature, scale_by_t2=c.distill.scale_by_t2,
                           ce_weight=c.distill.ce_weight, topk_mode=c.distill.topk_mode)


def mesh_shape(c) -> dict[str, int]:
  """The one description of the mesh: {"data", "fsdp", "tensor"} sizes (-1: the remaining devices)."""
  return {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}


def train_config(c):
  """The TrainConfig of an experiment config (`kdjax.experiment.config`'s `train` section, its seed); raises train.TrainError
  for a bad value, so it can be called to check a config before any stage runs."""
  t = c.train
  import jax
  from kdjax.distill import train
  return train.TrainConfig(
      optimizer=t.optimizer, learning_rate=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay,
      warmup_steps=t.warmup_steps, schedule=t.schedule, min_lr_ratio=t.min_lr_ratio,
      lr_reference_batch=t.lr_reference_batch or None, clip_norm=t.clip_norm or None, batch_size=t.batch_size,
      grad_accum_steps=t.grad_accum_steps, num_epochs=t.num_epochs, max_length=t.max_len,
      eval_every=t.eval_every, checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
      seed=c.seed, chunk_size=t.chunk_size, log_every=t.log_every, progress_bar=jax.process_index() == 0)


def on_policy_settings(c):
  """The settings of an experiment config; raises OnPolicyError (one line) for a bad value, before any work."""
  from kdjax.distill import on_policy
  found = on_policy.OnPolicySettings(fraction=float(c.distill.on_policy_fraction),
                           temperature=float(c.distill.on_policy_temperature),
                           max_new_tokens=int(c.teacher.max_new_tokens), decode_slots=int(c.eval.batch_size),
                           probe_questions=int(c.distill.on_policy_probe_questions))
  if found.fraction > 0 and not c.teacher.source:
    raise on_policy.OnPolicyError(f"distill.on_policy_fraction={found.fraction} needs the primed teacher resident during "
                        f"training: set --config.teacher.source (or set the fraction to 0)")
  if found.fraction > 0 and c.distill.divergence == "none":
    raise on_policy.OnPolicyError("distill.on_policy_fraction > 0 needs a divergence: on-policy steps are graded by the "
                        "teacher, and distill.divergence='none' has nothing to grade with")
  return found


def plan_student(c, path):
  """The plan stage for `plan.model=student`: plans the train step of config `c` with the train stage's own
  settings (so the plan cannot drift from it), prints the table, writes plan.json, and raises PlanDoesNotFit (one
  line) when it does not fit -- before any weight is loaded."""
  from kdjax.models.llama import config as llama_config
  from kdjax.plan import chips, generate as engine_plan, train_step
  kd = any(config_lib.ARMS[a]["mode"] == "kd" for a in config_lib.arm_names(c))
  lora_cfg, loss_cfg = lora_config(c), loss_config(c, "kd" if kd else "finetune")
  train_cfg = train_config(c)
  on_policy = None
  if float(c.distill.on_policy_fraction) > 0:
    prompt_len = train_cfg.max_length - c.teacher.max_new_tokens
    if prompt_len <= 0:
      raise chips.PlanError(f"on-policy sampling needs train.max_len ({train_cfg.max_length}) above "
                               f"teacher.max_new_tokens ({c.teacher.max_new_tokens}), the sampled response length")
    on_policy = train_step.OnPolicyTeacher(llama_config.get_preset(c.teacher.preset), c.teacher.quantization, c.teacher.dtype,
                                prompt_len, c.teacher.max_new_tokens)
  plan = train_step.make_train_plan(
      c.student.preset, train_cfg=train_cfg, loss_cfg=loss_cfg, lora_cfg=lora_cfg, topology=c.plan.topology or None,
      mesh_shape=mesh_shape(c), dtype=c.student.dtype,
      quantize=bool(c.student.quantize), remat=bool(c.student.remat), teacher_k=c.teacher.k,
      hbm_fraction=c.plan.hbm_fraction, on_policy=on_policy)
  train_step.print_table(plan)
  engine_plan.write_plan_json(plan, path)
  train_step.check_fits(plan)
  return plan


def lora_config(c):
  from kdjax.models import lora
  return lora.LoraConfig(rank=c.student.lora.rank, alpha=c.student.lora.alpha, dropout=c.student.lora.dropout,
                         targets=tuple(t.strip() for t in c.student.lora.targets.split(",") if t.strip()))


def eval_config(c):
  from kdjax.evaluation import loop
  return loop.EvalConfig(split=c.eval.split, num_questions=None if c.eval.num_questions < 0 else c.eval.num_questions,
                         prompt_format=c.eval.prompt_format, max_new_tokens=c.eval.max_new_tokens,
                         batch_size=c.eval.batch_size, primary_rule=c.eval.rule)


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks every config value the requested stages use, before any work; raises ConfigError with one line.

  The stages' own settings objects (loss, LoRA, optimizer, sampling, eval) are built here once, so a value is
  checked by the same code that later uses it.
  """
  try:
    stages = set(config_lib.stage_names(c))
    arms = config_lib.arm_names(c)
    modes = {config_lib.ARMS[a]["mode"] for a in arms}
    _check_values(c, stages, arms, modes)
    _check_data(c, stages, modes)
  except ConfigError:
    raise
  except ValueError as e:  # the settings objects' own errors (LossConfig, TrainConfig, ...), DataError
    raise ConfigError(str(e).splitlines()[0]) from None
  kd = "kd" in modes
  # A stage's record includes its inputs' records back to the model sources, so each source a stage depends on
  # must be there: the teacher's for every stage downstream of the store, the student's for all but generate.
  needs_teacher = kd and bool({"convert", "generate", "train", "eval", "analyze"} & stages)
  needs_student = bool({"convert", "generate", "train", "eval", "analyze"} & stages)
  for role, needed in (("teacher", needs_teacher), ("student", needs_student)):
    source = c[role].source
    if not needed or source == "smollm2":
      continue
    if not source:
      raise ConfigError(f"--config.{role}.source is empty: give an HF directory, a .gguf file or a kdjax checkpoint")
    if not storage.path(source).exists():
      raise ConfigError(f"{role} model not found: {source}")
  if needs_teacher and c.teacher.adapter:  # its bytes are in the teacher's record, which these stages compute
    from kdjax.models import lora
    try:
      lora.read_peft_config(c.teacher.adapter)
    except lora.LoraError as e:
      raise ConfigError(f"teacher.adapter: {e}") from None


def _check_values(c, stages: set[str], arms: list[str], modes: set[str]) -> None:
  from kdjax.models import checkpoint
  from kdjax.gsm8k import data
  from kdjax.teacher import priming, jax_engine as teacher
  from kdjax.gsm8k import extract
  for arm in arms:
    strategy = config_lib.ARMS[arm]["strategy"]
    if strategy and strategy not in priming.STRATEGIES:
      raise ConfigError(f"arm {arm}: unknown priming strategy {strategy!r}")
  if c.teacher.quantization not in ("int8", "none"):
    raise ConfigError(f"teacher.quantization must be 'int8' or 'none', got {c.teacher.quantization!r}")
  for role in ("teacher", "student"):
    checkpoint.dtype_of(c[role].dtype)
  if c.plan.model not in ("teacher", "student"):
    raise ConfigError(f"plan.model must be 'teacher' or 'student', got {c.plan.model!r}")
  if c.eval.split not in data.SPLITS:
    raise ConfigError(f"eval.split must be one of {data.SPLITS}, got {c.eval.split!r}")
  for key in ("eval.rule", "report.rule"):
    section, name = key.split(".")
    if c[section][name] not in extract.RULES:
      raise ConfigError(f"{key} must be one of {', '.join(extract.RULES)}, got {c[section][name]!r}")
  if c.report.bootstrap_resamples < 1:
    raise ConfigError(f"report.bootstrap_resamples must be >= 1, got {c.report.bootstrap_resamples}")
  if c.report.arms not in ("", "all"):
    try:
      config_lib.arm_names(ml_collections.ConfigDict({"arms": c.report.arms}))
    except ValueError as e:
      raise ConfigError(f"report.arms: {e}") from None
  if c.analyze.num_questions < 1 or not 0.0 < c.analyze.threshold < 1.0:
    raise ConfigError(f"need analyze.num_questions >= 1 and 0 < analyze.threshold < 1, got "
                      f"{c.analyze.num_questions}, {c.analyze.threshold}")
  if not 0.0 < c.teacher.max_reference_overlap <= 1.0:
    raise ConfigError(f"teacher.max_reference_overlap must be in (0, 1] (1: keep every response), got "
                      f"{c.teacher.max_reference_overlap}")
  for strategy in sorted({config_lib.ARMS[a]["strategy"] for a in arms if config_lib.ARMS[a]["mode"] == "kd"}):
    if getattr(priming.STRATEGIES[strategy], "other_question", False) and \
        c.data.num_train_questions + c.data.num_validation < 2:
      raise ConfigError(f"strategy {strategy} shows another question's solution: it needs at least 2 store questions "
                        f"(data.num_train_questions + data.num_validation)")
    teacher.TeacherJob(strategy=strategy, teacher_model=c.teacher.model_id, sampling=teacher_sampling(c),
                       k=c.teacher.k, placement=c.teacher.placement, shard_size=c.teacher.shard_size,
                       batch_size=c.teacher.batch_size)
  from kdjax.distill import on_policy
  on_policy_settings(c)  # a fraction > 0 needs a teacher: refused here, before any work
  for mode in modes - {"none"}:
    loss_config(c, mode)
  if modes - {"none"}:
    lora_config(c)
    from kdjax.distill import train
    train_config(c)
  eval_config(c)
  from kdjax.distill import batches
  try:
    tail_temperatures = config_lib.tail_temperatures(c)
    if "generate" in stages and any(config_lib.ARMS[a]["mode"] == "kd" for a in arms):
      batches.require_tail_temperature(float(c.distill.temperature), tail_temperatures, c.distill.topk_mode,
                                       "teacher.tail_temperatures")
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_data(c, stages: set[str], modes: set[str]) -> None:
  """The splits the stages read exist where data.source says, and the train split holds the asked-for sizes."""
  from kdjax.gsm8k import data
  splits = set()
  if {"generate", "train", "eval", "analyze"} & stages and modes - {"none"}:
    splits.add("train")  # a trained arm's records (read by eval too) name its train and validation questions
  if {"eval", "analyze"} & stages:
    splits.add(c.eval.split)
  source = c.data.source
  if not splits or source == data.HUB_NAME:
    return
  path = storage.path(source)
  if not path.exists():
    raise ConfigError(f"GSM8K not found at {source} (give a folder with train.jsonl/test.jsonl or openai/gsm8k)")
  for split in sorted(splits):
    if path.is_file():
      data.check_split_file(path, split)
    elif not (path / f"{split}.jsonl").is_file():
      raise ConfigError(f"GSM8K folder {source} has no {split}.jsonl")
  if "train" in splits:
    train_and_validation(c)  # one clear line now if the sizes do not fit, not after the teacher has run
