"""CPU demo of on-policy primed distillation (issue 14): a fine-tuned SmolLM2 teacher grades the student's answers.

Two commands, the first writing the teacher the second distils from:

  python -m kdjax.main --config=configs/on_policy_demo.py:teacher   # 1. the teacher's LoRA (finetune arm)
  python -m kdjax.main --config=configs/on_policy_demo.py           # 2. on-policy ground_truth, fraction 0.5

1. `:teacher` (runs/on_policy_teacher): kdjax's `finetune` control arm on the GSM8K gold solutions of the first
   128 train questions (1 epoch of 16 steps, LoRA r 16 on every projection), so that the teacher writes in
   GSM8K's terse style with its "#### 72" answer line, which plain SmolLM2 does not: a teacher clearly stronger
   than the student, as GKD's (Agarwal et al. 2024 fine-tuned each teacher before distilling it).
2. (runs/on_policy_demo): the teacher is SmolLM2 with that adapter merged into its weights at conversion
   (`teacher.adapter`; its bytes enter the teacher's record, so stores and training made under another teacher
   are never reused); the student is plain SmolLM2 with a fresh LoRA. configs/demo.py's loss, the ground_truth
   arm only, 32 train + 8 validation questions, 4 epochs of 4 steps, and half the steps on-policy: the student
   answers the step's questions itself (at temperature 0.7, 64 new tokens at most) and the teacher, primed with
   ground_truth and resident beside it, grades every token over the whole vocabulary. The eval-every hook
   records, in arms/ground_truth/train/metrics.jsonl, `val_on_policy_kd` and `val_on_policy_teacher_logprob`
   (the teacher-graded KD and log-prob of the student's greedy answers to the validation questions) and the same
   on 8 of the train questions (`val_train_probe_*`); each on-policy step records the teacher's log-prob of the
   sampled answers (`teacher_logprob`). The curves are in the README.
"""

from kdjax.experiment.config import sibling_config

TEACHER_WORKDIR = "runs/on_policy_teacher"


def _teacher_config():
  """Step 1: the finetune arm, whose adapter (arms/finetune/adapter) becomes the teacher's."""
  c = sibling_config(__file__, "demo")
  c.workdir = TEACHER_WORKDIR
  c.arms = "finetune"
  c.stages = "convert,train"
  c.data.num_train_questions = 128
  c.data.num_validation = 16
  c.student.remat = True             # holds the host's memory to ~3 GB (without: 20 GB at batch 8 x 320 tokens)
  c.student.lora.rank = 16           # the teacher's capacity for GSM8K's style: every projection, r 16
  c.student.lora.alpha = 32.0
  c.student.lora.targets = "wq,wk,wv,wo,w_gate,w_up,w_down"
  c.train.num_epochs = 1             # 16 steps of 8 gold solutions: enough for the style, not for the arithmetic
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 2
  c.train.max_len = 320              # chat template + question + gold solution: about 225 tokens on average
  c.train.eval_every = 8
  c.train.checkpoint_every = 8
  return c


def get_config(part: str = ""):
  if part == "teacher":
    return _teacher_config()
  if part:
    raise ValueError(f"configs/on_policy_demo.py: unknown part {part!r}; use ':teacher' or nothing")
  c = sibling_config(__file__, "demo")
  c.workdir = "runs/on_policy_demo"
  c.arms = "ground_truth"
  c.stages = "convert,generate,train"
  c.teacher.adapter = f"{TEACHER_WORKDIR}/arms/finetune/adapter"
  c.data.num_train_questions = 32
  c.data.num_validation = 8
  c.teacher.max_new_tokens = 64
  c.distill.on_policy_fraction = 0.5
  c.distill.on_policy_temperature = 0.7   # less noise in the sampled answers (and their teacher log-prob)
  c.distill.on_policy_probe_questions = 8  # the student's greedy answers to 8 of its train questions, graded
  c.train.num_epochs = 4             # 16 steps of 8 questions: each train question seen 4 times
  c.train.learning_rate = 2e-3       # a few steps to cross a clear gap (the teacher's GSM8K style)
  c.train.eval_every = 4
  c.train.checkpoint_every = 4
  c.eval.batch_size = 8              # the decode slots the student samples with
  c.student.remat = True             # the train step's activations recomputed: the host's memory stays small
  return c
