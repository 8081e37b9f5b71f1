"""Arm `finetune`: control: the same LoRA fine-tuned on GSM8K gold solutions.

Paper defaults (kdjax.config): 405B int8 teacher, 8B student with LoRA, reverse KL, SGD.
  python -m kdjax.main --config=configs/finetune.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.config import get_default_config


def get_config():
  c = get_default_config()
  c.arms = "finetune"
  c.workdir = "runs/paper"
  return c
