"""kdjax's recommended variant of the ground-truth arm: forward KL on the top-k, AdamW with warmup.

  python -m kdjax.main --config=configs/recommended.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.experiment.config import get_default_config, recommended


def get_config():
  c = recommended(get_default_config())
  c.arms = "ground_truth"
  c.workdir = "runs/recommended"
  return c
