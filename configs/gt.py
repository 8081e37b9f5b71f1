"""Arm `ground_truth`: 'a detailed answer a smaller model can learn from' priming (the paper's best arm).

Paper defaults (kdjax.config): 405B int8 teacher, 8B student with LoRA, reverse KL, SGD.
  python -m kdjax.main --config=configs/gt.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.config import get_default_config


def get_config():
  c = get_default_config()
  c.arms = "ground_truth"
  c.workdir = "runs/paper"
  return c
