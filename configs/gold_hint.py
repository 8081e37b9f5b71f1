"""Arm `gold_hint`: the reference answer shown to the teacher, who explains how to reach it (kdjax's addition).

Paper defaults (kdjax.config): 405B int8 teacher, 8B student with LoRA, reverse KL, SGD.
  python -m kdjax.main --config=configs/gold_hint.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.config import get_default_config


def get_config():
  c = get_default_config()
  c.arms = "gold_hint"
  c.workdir = "runs/paper"
  return c
