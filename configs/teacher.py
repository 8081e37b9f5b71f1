"""Arm `teacher`: 'explain step by step to a learner' priming.

Paper defaults (kdjax.experiment.config): 405B int8 teacher, 8B student with LoRA, reverse KL, and the authors' schedule:
SGD lr 5e-6 at one example per update (batch 1, 2 x 2638 updates), cosine over all updates without restarts.
For throughput, --config.train.batch_size=B keeps what an example does to the weights by scaling the rate to
5e-6 x B (train.lr_reference_batch=1: SGD's linear rule, first order; its limits are in TrainConfig's docstring).
  python -m kdjax.main --config=configs/teacher.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.experiment.config import get_default_config


def get_config():
  c = get_default_config()
  c.arms = "teacher"
  c.workdir = "runs/paper"
  return c
