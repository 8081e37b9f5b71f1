"""The generation engine against full forwards (numpy float64 for derived numbers) and transformers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import generation
from kdjax.generation import GenerationError, SamplingConfig, generate
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib

PAD = 0
RAGGED_PROMPTS = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [100, 101, 102, 103, 104, 105, 106], [42]]


@pytest.fixture(scope="module")
def tiny() -> model_lib.Llama:
  """The "tiny" preset with random weights; the head is scaled up so distributions are peaked, not flat."""
  model = model_lib.init_model(config_lib.get_preset("tiny"), seed=0)
  model.lm_head[...] = model.lm_head[...] * 20.0
  return model


def full_logits(model: model_lib.Llama, tokens: list[int]) -> np.ndarray:
  """float64 logits [len, V] of one unpadded sequence, from a plain forward with no cache."""
  return np.asarray(model(jnp.asarray([tokens], jnp.int32))[0], np.float64)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------- cache vs full forward

def test_cached_decoding_equals_full_forward_for_ragged_left_padded_batch(tiny):
  """Issue acceptance: prefill + cached steps give the full-sequence logits at every step (fp32, 1e-5)."""
  steps = 6
  rng = np.random.default_rng(0)
  continuations = rng.integers(1, tiny.config.vocab_size, size=(len(RAGGED_PROMPTS), steps)).astype(np.int32)
  length = generation.round_up(max(map(len, RAGGED_PROMPTS)), 16)
  ids, mask = generation.left_pad(RAGGED_PROMPTS, length, PAD)
  assert ids.shape == (4, 16) and mask.sum(axis=1).tolist() == [3, 11, 7, 1]
  graphdef, state = nnx.split(tiny)
  cache, logits = generation._prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                      max_len=length + steps)
  per_step = [np.asarray(logits)]
  for t in range(steps - 1):
    logits, cache = generation._step_jit(graphdef, state, cache, jnp.asarray(continuations[:, t]))
    per_step.append(np.asarray(logits))
  for row, prompt in enumerate(RAGGED_PROMPTS):
    reference = full_logits(tiny, prompt + continuations[row].tolist())
    for t in range(steps):
      expected = reference[len(prompt) - 1 + t]
      np.testing.assert_allclose(per_step[t][row], expected, atol=1e-5, rtol=0,
                                 err_msg=f"row {row} step {t}")


def test_decode_loop_logprobs_equal_full_forward(tiny):
  """The whole jitted loop: with k = vocab, each step's log-probs are the full forward's log-softmax."""
  vocab = tiny.config.vocab_size
  outs = generate(tiny, RAGGED_PROMPTS, SamplingConfig(max_new_tokens=7), stop_ids=[], pad_id=PAD,
                  topk_logprobs=vocab, length_bucket=16)
  for prompt, out in zip(RAGGED_PROMPTS, outs):
    assert out.finish_reason == "length" and len(out.tokens) == 7
    expected = log_softmax64(full_logits(tiny, prompt + out.tokens))[len(prompt) - 1:-1]
    got = np.full_like(expected, np.nan)
    np.put_along_axis(got, out.topk_ids.astype(np.int64), out.topk_logprobs, axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # Greedy: every response token is the argmax of the distribution that produced it.
    assert out.tokens == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(out.tail_mass, 0.0, atol=1e-6)


def test_topk_logprobs_and_tail_mass_match_fresh_forward(tiny):
  k = 5
  sampling = SamplingConfig(temperature=1.0, max_new_tokens=9, seed=4)
  outs = generate(tiny, RAGGED_PROMPTS, sampling, stop_ids=[], pad_id=PAD, topk_logprobs=k, batch_size=3)
  for prompt, out in zip(RAGGED_PROMPTS, outs):
    n = len(out.tokens)
    assert out.topk_ids.shape == (n, k) and out.topk_ids.dtype == np.int32
    assert out.topk_logprobs.shape == (n, k) and out.topk_logprobs.dtype == np.float32
    assert out.tail_mass.shape == (n,) and out.tail_mass.dtype == np.float32
    logprobs = log_softmax64(full_logits(tiny, prompt + out.tokens))[len(prompt) - 1:-1]
    expected_ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(out.topk_ids, expected_ids)
    np.testing.assert_allclose(out.topk_logprobs, np.take_along_axis(logprobs, expected_ids, 1),
                               atol=1e-5, rtol=0)
    expected_tail = 1.0 - np.exp(np.take_along_axis(logprobs, expected_ids, 1)).sum(axis=1)
    np.testing.assert_allclose(out.tail_mass, expected_tail, atol=1e-6, rtol=1e-4)


def test_tail_mass_keeps_precision_when_top_k_hold_almost_everything():
  logits = np.array([[30.0, 10.0, 0.0, -5.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  ids, logprobs, tail = generation.topk_logprobs(jnp.asarray(logits), 2)
  expected = np.exp(log_softmax64(logits.astype(np.float64))[:, 2:]).sum(axis=1)
  assert np.asarray(ids).tolist() == [[0, 1], [0, 1]]
  # 1 - sum(top-k probs) in float32 would give exactly 0 for the first row (true value ~2e-13).
  np.testing.assert_allclose(np.asarray(tail), expected, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logprobs), log_softmax64(logits.astype(np.float64))[:, :2], atol=1e-6)


# ----------------------------------------------------------------------------- sampling

def test_filter_logits_top_k_and_top_p_hand_cases():
  probs = np.array([[0.5, 0.2, 0.15, 0.1, 0.05]])
  logits = jnp.asarray(np.log(probs), jnp.float32)
  kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()
  assert kept(generation.filter_logits(logits, 2, 1.0, False)) == [True, True, False, False, False]
  # Nucleus: the smallest set reaching top_p; 0.5 + 0.2 = 0.7 < 0.8, so 0.15 joins.
  assert kept(generation.filter_logits(logits, 0, 0.8, True)) == [True, True, True, False, False]
  assert kept(generation.filter_logits(logits, 0, 0.3, True)) == [True, False, False, False, False]
  # top-k first, then top-p renormalised within the k: 0.5/0.85 = 0.59 < 0.6, so the second joins.
  assert kept(generation.filter_logits(logits, 3, 0.6, True)) == [True, True, False, False, False]
  assert kept(generation.filter_logits(logits, 0, 1.0, False)) == [True] * 5


def test_sampling_is_independent_of_batch_size_and_order(tiny):
  prompts = RAGGED_PROMPTS + [[7, 7, 7, 7], [250, 3]]
  example_ids = [10, 11, 12, 13, 14, 15]
  sampling = SamplingConfig(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=10, seed=123)
  run = lambda p, e, b: [o.tokens for o in generate(tiny, p, sampling, stop_ids=[], pad_id=PAD,
                                                    example_ids=e, batch_size=b)]
  whole = run(prompts, example_ids, 8)
  assert run(prompts, example_ids, 2) == whole
  order = [4, 0, 5, 2, 3, 1]
  shuffled = run([prompts[i] for i in order], [example_ids[i] for i in order], 3)
  assert shuffled == [whole[i] for i in order]
  # The draws really come from the seed and the example id.
  assert run(prompts, [20, 21, 22, 23, 24, 25], 8) != whole
  other_seed = [o.tokens for o in generate(tiny, prompts, SamplingConfig(temperature=1.0, top_p=0.95, top_k=50,
                                                                         max_new_tokens=10, seed=124),
                                           stop_ids=[], pad_id=PAD, example_ids=example_ids)]
  assert other_seed != whole


def test_top_k_one_equals_greedy(tiny):
  greedy = generate(tiny, RAGGED_PROMPTS, SamplingConfig(max_new_tokens=8), stop_ids=[], pad_id=PAD)
  top1 = generate(tiny, RAGGED_PROMPTS, SamplingConfig(temperature=0.7, top_k=1, max_new_tokens=8, seed=9),
                  stop_ids=[], pad_id=PAD)
  assert [o.tokens for o in top1] == [o.tokens for o in greedy]


def test_stop_tokens_end_rows_and_length_limit(tiny):
  sampling = SamplingConfig(max_new_tokens=12)
  free = [o.tokens for o in generate(tiny, RAGGED_PROMPTS, sampling, stop_ids=[], pad_id=PAD)]
  # A stop id that row 0 produces first at a position j > 0.
  j = next(i for i in range(1, 12) if free[0][i] not in free[0][:i])
  stop = free[0][j]
  outs = generate(tiny, RAGGED_PROMPTS, sampling, stop_ids=[stop], pad_id=PAD, topk_logprobs=3)
  for tokens, out in zip(free, outs):
    if stop in tokens:
      end = tokens.index(stop) + 1
      assert out.tokens == tokens[:end] and out.finish_reason == "stop"
    else:
      assert out.tokens == tokens and out.finish_reason == "length"
    assert out.topk_ids.shape == (len(out.tokens), 3) and out.tail_mass.shape == (len(out.tokens),)
  assert outs[0].tokens == free[0][:j + 1]
  short = generate(tiny, RAGGED_PROMPTS, SamplingConfig(max_new_tokens=3), stop_ids=[], pad_id=PAD)
  assert [o.tokens for o in short] == [t[:3] for t in free]
  assert all(o.finish_reason == "length" for o in short)


def test_progress_and_bad_inputs(tiny):
  calls = []
  outs = generate(tiny, RAGGED_PROMPTS, SamplingConfig(max_new_tokens=4), stop_ids=[], pad_id=PAD, batch_size=3,
                  progress=lambda *args: calls.append(args))
  assert [(c[0], c[2], c[3]) for c in calls] == [(12, 3, 4), (16, 4, 4)]
  assert all(c[1] >= 0 for c in calls) and len(outs) == 4
  assert generate(tiny, [], SamplingConfig(), stop_ids=[], pad_id=PAD) == []
  with pytest.raises(GenerationError, match="prompt 1 is empty"):
    generate(tiny, [[1], []], SamplingConfig(), stop_ids=[], pad_id=PAD)
  with pytest.raises(GenerationError, match="example_ids"):
    generate(tiny, [[1], [2]], SamplingConfig(), stop_ids=[], pad_id=PAD, example_ids=[0])
  with pytest.raises(GenerationError, match="outside the vocabulary"):
    generate(tiny, [[1, 256]], SamplingConfig(), stop_ids=[], pad_id=PAD)
  with pytest.raises(GenerationError, match="top_p"):
    SamplingConfig(top_p=0.0)


# ----------------------------------------------------------------------------- SmolLM2 vs transformers

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, gsm8k_dir):
  import transformers
  import kdjax
  from kdjax import priming
  model, _ = kdjax.load_model(smollm2_gguf, dtype="float32")
  tokenizer = kdjax.load_tokenizer(smollm2_gguf)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, torch_dtype="float32")
  hf_model.eval()
  with open(gsm8k_dir / "test.jsonl") as f:
    questions = [json.loads(next(f))["question"] for _ in range(3)]
  prompts = [priming.encode_chat(tokenizer, priming.student_messages(q)) for q in questions]
  return model, tokenizer, hf_model, prompts, priming.stop_token_ids(tokenizer)


def test_smollm2_greedy_and_logits_match_transformers(smollm2):
  """Issue acceptance: 64 greedy tokens equal HF generate's, and logits agree within 1e-3."""
  import torch
  model, tokenizer, hf_model, prompts, stop_ids = smollm2
  outs = generate(model, prompts, SamplingConfig(max_new_tokens=64), stop_ids=stop_ids,
                  pad_id=tokenizer.pad_token_id, batch_size=4)
  for prompt, out in zip(prompts, outs):
    with torch.no_grad():
      hf = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=64, eos_token_id=stop_ids,
                             pad_token_id=tokenizer.pad_token_id)
    assert out.tokens == hf[0, len(prompt):].tolist()
    with torch.no_grad():
      hf_logits = hf_model(hf[:, :len(prompt) + 64]).logits[0].numpy()
    ours = np.asarray(model(jnp.asarray(hf[:, :len(prompt) + 64].numpy(), jnp.int32))[0])
    assert np.max(np.abs(ours - hf_logits)) < 1e-3
  assert any(len(o.tokens) == 64 for o in outs)  # at least one row ran the full 64 steps
