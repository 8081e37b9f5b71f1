"""Arm `nodistill`: control: the student evaluated as it is.

Paper defaults (kdjax.experiment.config): 8B student as it is; no training, so no schedule.
  python -m kdjax.main --config=configs/nodistill.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.experiment.config import get_default_config


def get_config():
  c = get_default_config()
  c.arms = "nodistill"
  c.workdir = "runs/paper"
  return c
