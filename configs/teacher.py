"""Arm `teacher`: 'explain step by step to a learner' priming.

Paper defaults (kdjax.config): 405B int8 teacher, 8B student with LoRA, reverse KL, SGD.
  python -m kdjax.main --config=configs/teacher.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.config import get_default_config


def get_config():
  c = get_default_config()
  c.arms = "teacher"
  c.workdir = "runs/paper"
  return c
