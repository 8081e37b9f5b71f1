"""Issue acceptance (student): the alignment proof.

The student is the teacher itself and the store was written with `base` priming, so the student's prompt is the
teacher's prompt and every stored top-k distribution must be reproduced exactly at the position the data pipeline
aligns it with: the KD loss at step 0 is ~0. A shift by one token, pairing logits with another question, or a loss
over prompt positions would all make it large (checked below by breaking the alignment on purpose).
"""

import dataclasses

import numpy as np
import pytest

import kdjax
from kdjax import data, store, teacher
from kdjax.distill import batches, losses, lora, train
from kdjax.generation import SamplingConfig


@pytest.fixture(scope="module")
def smollm2_store(smollm2_gguf, gsm8k_dir, tmp_path_factory):
  model, _ = kdjax.load_model(smollm2_gguf)
  tokenizer = kdjax.load_tokenizer(smollm2_gguf)
  questions = data.load_gsm8k(str(gsm8k_dir), "train")[:6]
  path = tmp_path_factory.mktemp("store") / "base"
  teacher.generate_store(model, tokenizer, questions, "base", path, teacher_model_id="smollm2",
                         sampling=SamplingConfig(temperature=0.0, max_new_tokens=40), k=50, shard_size=6,
                         batch_size=6, progress=False)
  return model, store.StoreReader(path)


def test_base_priming_gives_the_student_prompt(smollm2_store):
  _, reader = smollm2_store
  for record in reader:
    assert list(record.teacher_prompt_ids) == list(record.student_prompt_ids)


def test_kd_loss_is_zero_when_the_student_is_the_teacher(smollm2_store):
  model, reader = smollm2_store
  lora.add_lora(model, lora.LoraConfig(rank=4, alpha=8, dropout=0.1), seed=0)  # fresh LoRA: B = 0, same function
  examples = batches.examples_from_records(reader)
  cfg = losses.LossConfig(divergence="forward_kl", topk_mode="tail", temperature=1.0, ce_weight=0.0)
  result = train.evaluate_loss(model, batches.eval_batches(examples, 3), cfg)
  assert result["num_tokens"] == sum(len(r.response_ids) for r in reader)  # every response token, end included
  assert abs(result["kd"]) < 1e-4, result

  # The same check fails loudly when the teacher arrays are shifted by one position.
  shifted = [dataclasses.replace(e, teacher_ids=np.roll(e.teacher_ids, 1, axis=0),
                                 teacher_logprobs=np.roll(e.teacher_logprobs, 1, axis=0),
                                 teacher_tail=np.roll(e.teacher_tail, 1, axis=0)) for e in examples]
  assert train.evaluate_loss(model, batches.eval_batches(shifted, 3), cfg)["kd"] > 0.1
  lora.remove_lora(model)
