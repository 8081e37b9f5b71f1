"""Teacher-forced continuations scored in the generation engine's prefill (the eval's reference NLL).

The reference is `reference_nll.reference_nll`, the separate full-forward pass (itself checked against
transformers in test_eval_loop.py); the generated tokens are checked against generation without continuations.
"""

from __future__ import annotations

import numpy as np
import pytest

from kdjax.serving import engine
from kdjax.distill import batches
from kdjax.evaluation import reference_nll
from kdjax.serving.generation import GenerationError, SamplingConfig, generate
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib

PAD, END, NEW = 0, 3, 6
# Ragged prompts and ragged solutions (one of a single token); six prompts for up to four slots: refills.
PROMPTS = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [100, 101, 102, 103, 104, 105, 106], [42],
           [7, 7, 7, 7], [250, 3]]
SOLUTIONS = [[60, 61, 62, 63, 64], [70], [80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91], [1, 2, 3],
             [200, 201], [9, 9, 9, 9, 9, 9, 9]]


@pytest.fixture(scope="module")
def tiny() -> model_lib.Llama:
  """The "tiny" preset with random weights; the head scaled up so the NLLs differ clearly between tokens."""
  model = model_lib.init_model(config_lib.get_preset("tiny"), seed=0)
  model.lm_head[...] = model.lm_head[...] * 20.0
  return model


@pytest.fixture(scope="module")
def expected_nll(tiny) -> dict[int, tuple[float, int]]:
  examples = [batches.ce_example(p, s, END, question_id=i) for i, (p, s) in enumerate(zip(PROMPTS, SOLUTIONS))]
  assert [reference_nll.continuation(e) for e in examples] == [s + [END] for s in SOLUTIONS]
  return reference_nll.reference_nll(tiny, examples, batch_size=4,
                                     length=reference_nll.padded_length(examples))


# unrolled is the CPU layout, scanned the accelerators' (slow to compile on CPU); few_programs with every prompt
# in a slot is the eval's one-wave path (one window, every prefill at the longest prompt + continuation).
@pytest.mark.parametrize("unrolled, slots, few_programs", [
    (True, 4, False), (True, 8, True), pytest.param(False, 3, False, marks=pytest.mark.slow)],
    ids=["unrolled-refills", "unrolled-one-wave", "scanned-refills"])
def test_prefill_scores_continuations_and_leaves_generation_unchanged(tiny, expected_nll, unrolled, slots,
                                                                      few_programs, monkeypatch):
  windows = []  # the cache window of every decode block: the prompts' alone, continuations or not
  real_decode = engine.decode_block
  monkeypatch.setattr(engine, "decode_block", lambda graphdef, state, layers, slots, *a, **k: (
      windows.append(engine.window_of(slots)), real_decode(graphdef, state, layers, slots, *a, **k))[1])
  run = lambda **extra: engine.run(tiny, PROMPTS, list(range(len(PROMPTS))), SamplingConfig(max_new_tokens=NEW),
                                   stop_ids=[], pad_id=PAD, num_slots=slots, topk_logprobs=0, length_bucket=8,
                                   window_bucket=8, prefill_chunk=slots, unrolled=unrolled,
                                   few_programs=few_programs, **extra)
  plain = run()
  plain_windows, windows[:] = list(windows), []
  scored = run(continuations=[s + [END] for s in SOLUTIONS])
  assert [g.tokens for g in scored] == [g.tokens for g in plain]
  assert windows == plain_windows
  assert all(g.continuation_nll is None and g.continuation_tokens is None for g in plain)
  for i, g in enumerate(scored):
    mean, count = expected_nll[i]
    assert g.continuation_tokens == count == len(SOLUTIONS[i]) + 1
    assert g.continuation_nll / count == pytest.approx(mean, abs=1e-5, rel=0), f"prompt {i}"
  assert len({round(m, 2) for m, _ in expected_nll.values()}) == len(PROMPTS)  # the rows really differ


def test_generate_checks_and_scores_continuations(tiny, expected_nll):
  """Through `generate`: an empty continuation scores nothing; bad continuations fail before any work."""
  sampling = SamplingConfig(max_new_tokens=NEW)
  outs = generate(tiny, PROMPTS[:3], sampling, stop_ids=[], pad_id=PAD, batch_size=4,
                  continuations=[SOLUTIONS[0] + [END], [], SOLUTIONS[2] + [END]])
  assert outs[1].continuation_nll == 0.0 and outs[1].continuation_tokens == 0
  assert outs[2].continuation_nll / outs[2].continuation_tokens == pytest.approx(expected_nll[2][0], abs=1e-5)
  with pytest.raises(GenerationError, match="continuations for"):
    generate(tiny, PROMPTS[:2], sampling, stop_ids=[], pad_id=PAD, continuations=[[1]])
  with pytest.raises(GenerationError, match="continuation 1 has token ids outside"):
    generate(tiny, PROMPTS[:2], sampling, stop_ids=[], pad_id=PAD, continuations=[[1], [np.int64(256)]])
