"""Arm `base`: no priming.

Paper defaults (kdjax.config): 405B int8 teacher, 8B student with LoRA, reverse KL, SGD.
  python -m kdjax.main --config=configs/base.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.config import get_default_config


def get_config():
  c = get_default_config()
  c.arms = "base"
  c.workdir = "runs/paper"
  return c
