"""On-policy self-distillation with privileged context (OPSD, arXiv 2601.18734), on SmolLM2 on the CPU.

The teacher is the student's own model reading privileged context the student never sees: the gold_hint priming
with the question's reference solution (or `--config.arms=ground_truth`, an instruction alone). Every training step
is on-policy (distill.on_policy_fraction = 1): the student answers its plain prompt, the same model primed with the
solution grades every token of that answer over the whole vocabulary, and the student learns from that grade alone
(no CE on its own samples; kdjax/distill/on_policy.py). kdjax has every piece of this already; this config names the
setting.

  python -m kdjax.main --config=configs/opsd.py
  python -m kdjax.main --config=configs/opsd.py --config.teacher.source=M --config.student.source=M   # another model

configs/demo.py's model, data slice, loss and optimizer (teacher and student both SmolLM2-135M-Instruct in float32,
converted once and linked; 24 train + 8 validation questions) with:
- arm gold_hint, on_policy_fraction 1, samples of at most 64 new tokens at temperature 0.7 (less noise in a small
  model's samples than 1.0), 1 epoch of 3 steps, validation (the store's validation loss, which picks the adapter,
  and the on-policy KD of the student's greedy answers) before the first step and after the last.
- The generate stage still writes the teacher's store: its primed prompts are what the resident teacher reads, and
  its responses to the validation questions give the validation loss. No store response is trained on.
Another model: give teacher and student the same source and the same dtype (teacher.quantization stays "none"), so
that the teacher is the student's own weights.
Where kdjax departs from OPSD: the teacher is the student's starting model, frozen; it is not given the student's
LoRA as training moves it (OPSD's teacher shares the student's current weights, its gradient stopped).
"""

from kdjax.experiment.config import sibling_config


def get_config():
  c = sibling_config(__file__, "demo")
  c.workdir = "runs/opsd"
  c.arms = "gold_hint"               # the privileged context: the reference solution (or ground_truth)
  c.distill.on_policy_fraction = 1.0  # every step: the student samples, its primed self grades
  c.distill.on_policy_temperature = 0.7
  c.teacher.max_new_tokens = 64      # the store's responses and the student's on-policy samples
  c.train.num_epochs = 1             # 3 steps of 8 questions
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  c.eval.batch_size = 8              # the decode slots the student samples with
  return c
