"""Every arm of the experiment (five primings + two controls) in one work folder and one report.

  python -m kdjax.main --config=configs/all_arms.py --config.teacher.source=... --config.student.source=...
"""

from kdjax.config import get_default_config


def get_config():
  c = get_default_config()
  c.arms = "all"
  c.workdir = "runs/paper"
  return c
