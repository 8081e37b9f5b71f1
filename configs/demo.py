"""CPU demo: SmolLM2-135M-Instruct as teacher and student, a small GSM8K slice, two arms, end to end.

  python -m kdjax.main --config=configs/demo.py
"""

from kdjax.experiment.config import get_default_config, recommended


def get_config():
  c = recommended(get_default_config())  # its loss and optimizer, with a demo's schedule below
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
  c.train.learning_rate = 5e-4  # a few steps on a small model: faster than recommended()'s 2e-4
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
