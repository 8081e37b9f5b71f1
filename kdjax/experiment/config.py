"""The one config schema of kdjax. Defaults follow the paper; `configs/*.py` override only what differs.

Every key is listed here, so a misspelt override (`--config.no_such_key=1`) is an error. Paper defaults:
Llama 3.1 405B Instruct int8 teacher, Llama 3.1 8B Instruct student, LoRA r 4 / alpha 8 / dropout 0.1 on
q, k, v, o, SGD lr 5e-6 momentum 0.9 at one example per update, cosine over all updates, 2 epochs, the first
2638 GSM8K train questions, and the authors' loss (their distill.ipynb, every arm):

  loss = alpha * CE + (1 - alpha) * T**2 * KL(p_student || p_teacher),  T = 5.942267335064758,
  alpha = 0.6093348343631224  (distill.ce_weight, distill.temperature, distill.scale_by_t2 = True)

One departure on purpose: kdjax aligns the teacher's response with the student's token by token (the student is
trained on the teacher's own tokens under the student's prompt); the authors' was not aligned.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

# An arm is what differs between the runs of one experiment: the teacher's priming and how the student learns.
#   kd        distil from the teacher store written under `strategy`
#   finetune  cross-entropy on GSM8K gold solutions (control)
#   none      no training: evaluate the student as it is (control)
ARMS: dict[str, dict[str, str]] = {
    "base": {"strategy": "base", "mode": "kd"},
    "teacher": {"strategy": "teacher", "mode": "kd"},
    "ground_truth": {"strategy": "ground_truth", "mode": "kd"},
    "confidence": {"strategy": "confidence", "mode": "kd"},
    "gold_hint": {"strategy": "gold_hint", "mode": "kd"},
    # gold_hint's control: the same priming around ANOTHER training question's reference solution (priming.hint_donors)
    "mismatched_hint": {"strategy": "mismatched_hint", "mode": "kd"},
    "finetune": {"strategy": "", "mode": "finetune"},
    "nodistill": {"strategy": "", "mode": "none"},
}

STAGES = ("plan", "convert", "generate", "train", "eval", "report", "analyze")  # run in this order
DEFAULT_STAGES = "convert,generate,train,eval,report"


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
  """`get_config()` of `configs/<name>.py` beside `config_file` (a config file's `__file__`): config files are not a
  package, so one that builds on another loads it by path."""
  path = pathlib.Path(config_file).with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"kdjax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/kdjax"
  c.stages = DEFAULT_STAGES         # comma-separated subset of STAGES, run in STAGES order
  c.arms = "ground_truth"           # comma-separated names from ARMS, or "all"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "openai/gsm8k"    # hub name, a folder with train.jsonl/test.jsonl, or a file named train.jsonl
  c.data.num_train_questions = 2638  # the first N of GSM8K train, in file order (the paper's 2638)
  c.data.num_validation = 200       # held out from the rest of GSM8K *train* (seeded); test is never tuned on

  c.mesh = ml_collections.ConfigDict()  # -1: the remaining devices
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.distributed = ml_collections.ConfigDict()  # multi-host start-up; TPU pods need none of these
  c.distributed.coordinator = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  c.teacher = ml_collections.ConfigDict()
  c.teacher.source = ""             # HF dir, .gguf, kdjax checkpoint or "smollm2"; empty: use the preset for `plan`
  # A PEFT LoRA adapter folder (e.g. a finetune arm's arms/finetune/adapter): a fine-tuned teacher. Merged into
  # float32 weights at conversion; on bfloat16 or int8 weights (which would round a small update away) kept unmerged
  # as LoRA, the teacher then computing in float32. Its files' hash enters the teacher's record (stores, on-policy).
  c.teacher.adapter = ""
  c.teacher.preset = "llama3.1-405b"
  c.teacher.model_id = "meta-llama/Llama-3.1-405B-Instruct"
  c.teacher.quantization = "int8"   # "int8" or "none"
  c.teacher.dtype = "bfloat16"
  c.teacher.placement = "system"    # where the priming text goes: "system" or "user_prefix"
  c.teacher.k = 50                  # top-k log-probabilities stored per response token
  # Train only on store responses whose ROUGE-L F1 with their question's reference solution (kdjax.gsm8k.reference_overlap)
  # is at most this, in (0, 1]: drops a hinted teacher's copies. 1.0 (an overlap is at most 1) drops none. Read by the
  # train stage, so it is in the training's record, not the store's: changing it never regenerates a store.
  c.teacher.max_reference_overlap = 1.0
  # Temperatures at which the store keeps each token's exact tempered tail mass (comma-separated, e.g. "1,5.94");
  # training in tail mode needs distill.temperature among them. Empty: 1 and distill.temperature (resolved
  # by `tail_temperatures`, so an override of distill.temperature alone moves the default with it).
  c.teacher.tail_temperatures = ""
  c.teacher.temperature = 0.0       # 0: greedy
  c.teacher.top_p = 1.0
  c.teacher.top_k = 0
  c.teacher.max_new_tokens = 512
  c.teacher.batch_size = 64          # decode slots
  # Questions per store shard: one generate call each, so 4 x the slots lets finished slots refill (a shard of
  # batch_size questions would be one static batch again); see kdjax.teacher.jax_engine.
  c.teacher.shard_size = 256
  # generate: False, a complete teacher per process on the mesh.* shape of its own devices, the processes splitting
  # the store's shards; True, one teacher on the mesh.* shape of every process's devices (a teacher larger than a
  # host's memory, e.g. 405B on v5p:4x4x4), every process running every shard and process 0 writing (kdjax.teacher.jax_engine).
  c.teacher.spans_processes = False

  c.student = ml_collections.ConfigDict()
  c.student.source = ""
  c.student.preset = "llama3.1-8b"
  c.student.model_id = "meta-llama/Llama-3.1-8B-Instruct"
  c.student.dtype = "bfloat16"
  c.student.quantize = False        # int8 frozen base (QLoRA)
  c.student.remat = True
  c.student.lora = ml_collections.ConfigDict()
  c.student.lora.rank = 4
  c.student.lora.alpha = 8.0
  c.student.lora.dropout = 0.1
  c.student.lora.targets = "wq,wk,wv,wo"

  c.distill = ml_collections.ConfigDict()
  c.distill.divergence = "reverse_kl"  # forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tv, none
  # The authors' values to the digit (module docstring): their loss is alpha * CE + (1 - alpha) * T**2 * KL.
  c.distill.temperature = 5.942267335064758
  c.distill.scale_by_t2 = True      # the KD term times T**2, as the authors' (Hinton's) loss
  c.distill.ce_weight = 0.6093348343631224
  c.distill.beta = 0.5              # generalized JSD (GKD/TRL meaning: 0 forward KL, 1 reverse KL)
  c.distill.skew_alpha = 0.1
  c.distill.topk_mode = "tail"      # "tail" (k + 1 buckets) or "renormalize"
  c.distill.correct_only = False    # train only on teacher responses whose answer is right
  # On-policy primed distillation (GKD's lambda; kdjax/distill/on_policy.py): the share of steps on which the
  # student answers the step's questions itself and the primed teacher, resident beside it, grades every token
  # (dense KD, no CE); 0 is plain off-policy training. Samples are up to teacher.max_new_tokens long.
  c.distill.on_policy_fraction = 0.0
  c.distill.on_policy_temperature = 1.0  # the student's sampling temperature on on-policy steps (0: greedy)
  # At each evaluation, also grade the student's greedy answers to the first N TRAIN questions (the questions it
  # trains on, so what it learns from the primed teacher there shows): val_train_probe_* in metrics.jsonl.
  c.distill.on_policy_probe_questions = 0

  c.train = ml_collections.ConfigDict()
  c.train.optimizer = "sgd"         # "sgd" (with momentum) or "adamw"
  c.train.learning_rate = 5e-6
  c.train.momentum = 0.9
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 0
  c.train.schedule = "cosine"       # decays to min_lr_ratio * lr and stays there: no restarts
  c.train.min_lr_ratio = 0.1        # the cosine's floor (x peak lr), reached at the last update
  # learning_rate is the rate of an update over this many examples; a larger batch B x grad_accum scales it by
  # B x grad_accum / lr_reference_batch (SGD's linear rule, see TrainConfig in distill/train.py); 0: as given
  c.train.lr_reference_batch = 1
  c.train.clip_norm = 1.0
  c.train.batch_size = 1            # the paper: one example per update, 2 x 2638 updates
  c.train.grad_accum_steps = 1
  c.train.num_epochs = 2
  c.train.max_len = 1024
  c.train.eval_every = 500          # at batch 1: ~10 validation passes over the 2 x 2638 updates
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.train.chunk_size = 256
  c.train.log_every = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.num_questions = -1         # -1: all 1319
  c.eval.prompt_format = "zero_shot_cot"  # or "eight_shot_cot"
  c.eval.max_new_tokens = 512
  c.eval.batch_size = 32
  c.eval.rule = "final"             # primary extraction rule (evaluation.extract.RULES); every rule is stored

  c.report = ml_collections.ConfigDict()
  c.report.rule = "final"           # primary rule; the report also shows strict, flexible and paper
  c.report.arms = ""                # "": this run's arms; else a comma list of evaluated arms, or "all" of them
  c.report.bootstrap_resamples = 2000  # paired bootstrap of the reference-NLL differences (seeded by `seed`)

  c.plan = ml_collections.ConfigDict()
  # "teacher": the generation engine writing its store, plan.batch_size decode slots at plan.max_len tokens
  # (prompt + teacher.max_new_tokens), predicted tokens/s; "student": its LoRA train step at train.batch_size x
  # train.max_len (student.quantize, student.remat, student.lora, train.*, mesh.*; with
  # distill.on_policy_fraction > 0 also the resident teacher, the sampling KV cache and the teacher's scoring)
  c.plan.model = "teacher"
  c.plan.topology = ""              # e.g. "v5p:4x4x4"; empty: the live devices
  c.plan.batch_size = 64
  c.plan.max_len = 2048
  c.plan.hbm_fraction = 0.8

  c.analyze = ml_collections.ConfigDict()
  c.analyze.num_questions = 16
  c.analyze.threshold = 0.1
  return c


def recommended(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """kdjax's recommended variant: forward KL on the top-k with the tail bucket, AdamW with warmup.

  Forward KL against the teacher's top-k is well defined with sparse teacher data (reverse KL needs the
  student's mass on tokens the teacher never ranked), and AdamW with warmup is far less sensitive to the
  learning rate than SGD at 5e-6.
  """
  c.distill.divergence = "forward_kl"
  c.distill.temperature = 1.0
  c.distill.ce_weight = 0.1
  c.train.optimizer = "adamw"
  c.train.learning_rate = 2e-4
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 20
  c.train.batch_size = 8            # its own schedule: batch 8 at this rate, no rescaling
  c.train.lr_reference_batch = 0
  c.train.eval_every = 100
  return c


def tail_temperatures(c: ml_collections.ConfigDict) -> tuple[float, ...]:
  """The temperatures the teacher store keeps tempered tails at: `teacher.tail_temperatures`, sorted, distinct.

  The empty default means 1 and `distill.temperature`; it is resolved here, at use time, because a default
  written into the schema would be computed before command-line overrides of distill.temperature apply.
  """
  text = str(c.teacher.tail_temperatures).strip()
  if not text:
    return tuple(sorted({1.0, float(c.distill.temperature)}))
  values = []
  for part in text.split(","):
    try:
      value = float(part)
    except ValueError:
      value = float("nan")
    if not 0.0 < value < float("inf"):
      raise ValueError(f"teacher.tail_temperatures must be positive numbers separated by commas, "
                       f"got {c.teacher.tail_temperatures!r}")
    values.append(value)
  return tuple(sorted(set(values)))


def arm_names(c: ml_collections.ConfigDict) -> list[str]:
  names = list(ARMS) if c.arms == "all" else [a.strip() for a in c.arms.split(",") if a.strip()]
  unknown = [a for a in names if a not in ARMS]
  if unknown:
    raise ValueError(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
  return names


def stage_names(c: ml_collections.ConfigDict) -> list[str]:
  names = [s.strip() for s in c.stages.split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
  return [s for s in STAGES if s in names]
