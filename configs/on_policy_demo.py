"""CPU demo of on-policy primed distillation (issue 14): SmolLM2-135M grades its own answers under priming.

  python -m kdjax.main --config=configs/on_policy_demo.py

configs/demo.py's models and loss, the ground_truth arm only, 32 train + 8 validation questions, 8 epochs of
4 steps, and half the steps on-policy: the student answers the step's questions itself (at temperature 0.7, 64
new tokens at most) and the teacher, primed with ground_truth and resident beside it, grades every token over
the whole vocabulary. The eval-every hook records, in arms/ground_truth/train/metrics.jsonl, `val_on_policy_kd`
and `val_on_policy_teacher_logprob` (the teacher-graded KD and log-prob of the student's greedy answers to the
validation questions) and the same on 8 of the train questions (`val_train_probe_*`); each on-policy step
records the teacher's log-prob of the sampled answers (`teacher_logprob`). The curves are in the README.
"""

import importlib.util
import pathlib


def _demo():
  """configs/demo.py, loaded by path: config files are not a package."""
  spec = importlib.util.spec_from_file_location("kdjax_demo_config", pathlib.Path(__file__).with_name("demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _demo().get_config()
  c.workdir = "runs/on_policy_demo"
  c.arms = "ground_truth"
  c.stages = "convert,generate,train"
  c.data.num_train_questions = 32
  c.data.num_validation = 8
  c.teacher.max_new_tokens = 64
  c.distill.on_policy_fraction = 0.5
  c.distill.on_policy_temperature = 0.7   # less noise in the sampled answers (and their teacher log-prob)
  c.distill.on_policy_probe_questions = 8  # the student's greedy answers to 8 of its train questions, graded
  c.train.num_epochs = 8             # 32 steps of 8 questions: each train question seen 8 times
  c.train.learning_rate = 1e-3       # the teacher is the student primed: a small gap, closed in few steps
  c.train.eval_every = 4
  c.train.checkpoint_every = 4
  c.eval.batch_size = 8              # the decode slots the student samples with
  return c
