"""CPU demo: SmolLM2-135M-Instruct as teacher and student, a small GSM8K slice, two arms, end to end.

  python -m kdjax.main --config=configs/demo.py
"""

from kdjax.config import get_default_config


def get_config():
  c = get_default_config()
  c.workdir = "runs/demo"
  c.arms = "ground_truth,nodistill"
  c.data.source = "../shared/data/gsm8k"
  c.data.num_train_questions = 24
  c.data.num_validation = 8
  for role in (c.teacher, c.student):
    role.source = "smollm2"
    role.preset = "smollm2-135m"
    role.dtype = "float32"
  c.teacher.model_id = c.student.model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
  c.teacher.quantization = "none"
  c.teacher.max_new_tokens = 128
  c.teacher.batch_size = 16
  c.teacher.shard_size = 16
  c.student.remat = False
  c.distill.divergence = "forward_kl"  # the recommended loss: see kdjax.config.recommended
  c.distill.temperature = 1.0
  c.distill.ce_weight = 0.1
  c.train.optimizer = "adamw"
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 2
  c.train.batch_size = 8
  c.train.num_epochs = 1
  c.train.max_len = 512
  c.train.eval_every = 1
  c.train.checkpoint_every = 1
  c.train.log_every = 1
  c.eval.num_questions = 24
  c.eval.max_new_tokens = 128
  c.eval.batch_size = 24
  c.plan.model = "student"
  c.plan.batch_size = 16
  c.plan.max_len = 512
  return c
