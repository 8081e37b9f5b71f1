"""Arm `mismatched_hint`: gold_hint's control, the teacher primed exactly as in gold_hint but shown ANOTHER training
question's reference solution (a fixed derangement of the store's questions from the seed, priming.hint_donors).

Beside gold_hint it tells "the teacher read a worked solution" (both arms) from "the teacher read this question's
solution" (gold_hint only), as OP2SD (arXiv 2608.09228) did for on-policy self-distillation. The student's prompt
holds no hint in either arm. Every other setting is configs/gold_hint.py's (loaded from it, so the two stay equal).
  python -m kdjax.main --config=configs/mismatched_hint.py --config.teacher.source=... --config.student.source=...
On SmolLM2 with the demo's settings: python -m kdjax.main --config=configs/demo.py --config.arms=mismatched_hint
"""

from kdjax.experiment.config import sibling_config


def get_config():
  c = sibling_config(__file__, "gold_hint")
  c.arms = "mismatched_hint"
  return c
