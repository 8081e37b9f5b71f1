"""The generation engine against full forwards (numpy float64 for derived numbers) and transformers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from kdjax.serving import generation, sampling
from kdjax.serving.generation import GenerationError, SamplingConfig, generate
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib

PAD = 0
RAGGED_PROMPTS = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [100, 101, 102, 103, 104, 105, 106], [42]]


# Every tiny test decodes NEW tokens with batches of 4 (or 2) rows, so they share a handful of compiled shapes.
NEW = 8
REFERENCE_ROWS, REFERENCE_LEN = 8, 32


@pytest.fixture(scope="module")
def tiny() -> model_lib.Llama:
  return helpers.tiny_peaked_model()


_forward = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids), static_argnums=0)


def full_logits(model: model_lib.Llama, sequences: list[list[int]], rows: int = REFERENCE_ROWS,
                length: int = REFERENCE_LEN) -> list[np.ndarray]:
  """float64 logits [len, V] of each sequence from a plain forward: no cache, no left padding.

  Rows are right-padded to one shape (one compile); causal attention keeps the padding after a sequence from
  touching its logits, so each row is the unpadded forward of that sequence.
  """
  assert len(sequences) <= rows and max(map(len, sequences)) <= length
  ids = np.full((rows, length), PAD, np.int32)
  for row, seq in enumerate(sequences):
    ids[row, :len(seq)] = seq
  logits = np.asarray(_forward(*nnx.split(model), jnp.asarray(ids)), np.float64)
  return [logits[row, :len(seq)] for row, seq in enumerate(sequences)]


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy_free(model: model_lib.Llama) -> list[list[int]]:
  return [o.tokens for o in generate(model, RAGGED_PROMPTS, SamplingConfig(max_new_tokens=NEW), stop_ids=[],
                                     pad_id=PAD)]


# ----------------------------------------------------------------------------- engine vs full forward

def reference_greedy(model: model_lib.Llama, prompts: list[list[int]], new: int, stop_ids=()) -> list[list[int]]:
  """Greedy responses from a plain loop of full forwards (no cache, no slots): argmax, append, repeat."""
  responses = [[] for _ in prompts]
  for _ in range(new):
    running = [i for i, r in enumerate(responses) if len(r) < new and not (r and r[-1] in stop_ids)]
    if not running:
      break
    logits = full_logits(model, [prompts[i] + responses[i] for i in running])
    for i, rows in zip(running, logits):
      responses[i].append(int(rows[-1].argmax()))
  return responses


@pytest.mark.parametrize("unrolled", [True, False], ids=["unrolled", "scanned"])
def test_engine_greedy_equals_full_forward_loop_for_any_slot_count(tiny, unrolled):
  """Ragged prompts, rows stopping at different steps, slots refilled mid-decode: the full-forward greedy loop."""
  from kdjax.serving import engine
  prompts = RAGGED_PROMPTS + [[7, 7, 7, 7], [250, 3]]
  free = reference_greedy(tiny, prompts, NEW)
  # Stop tokens that end some rows early, each at a different step, and leave others to run to the limit.
  stops = sorted({free[0][2], free[3][5]})
  expected = reference_greedy(tiny, prompts, NEW, stops)
  assert len({len(r) for r in expected}) >= 3, "rows should stop at different steps"
  for slots in (1, 3, 4):  # one slot at a time; prefills of 2 + 1 prompts, then refills; of 4, then of 2
    outs = engine.run(tiny, prompts, list(range(len(prompts))), SamplingConfig(max_new_tokens=NEW),
                      stop_ids=stops, pad_id=PAD, num_slots=slots, topk_logprobs=0, length_bucket=8,
                      prefill_chunk=slots, unrolled=unrolled)
    assert [o.tokens for o in outs] == expected, f"{slots} slots"
    assert [o.finish_reason for o in outs] == ["stop" if r[-1] in stops else "length" for r in expected]


def test_engine_window_grows_and_shrinks_with_live_lengths(tiny):
  """One slot, windows of 4 positions: a row grows the window as it decodes; the next, shorter, shrinks it."""
  from kdjax.serving import engine
  sizes = []
  real_resize = engine.resize_window
  prompts = [[6], [4, 5], [7, 8]]
  engine.resize_window = lambda slots, window, layout: (sizes.append(window),
                                                       real_resize(slots, window=window, layout=layout))[1]
  try:
    outs = engine.run(tiny, prompts, [0, 1, 2], SamplingConfig(max_new_tokens=NEW), stop_ids=[], pad_id=PAD,
                      num_slots=1, topk_logprobs=0, length_bucket=4, window_bucket=4)
  finally:
    engine.resize_window = real_resize
  assert [o.tokens for o in outs] == reference_greedy(tiny, prompts, NEW)
  # [6]: prompt bucket 4 + 1 -> 8, done at length 8. [4, 5] fills 8 while live -> 12. [7, 8]: back to 8, then 12.
  assert sizes == [8, 12, 8, 12]


def test_engine_few_programs_decodes_one_wave_in_one_window(tiny):
  """few_programs with every prompt in a slot: the final window from the start (longest prompt 5 + 8 new tokens
  -> 16 with buckets of 4), no resize, one decode program, every prefill at the longest prompt's bucket (8);
  the greedy outputs of the full forward."""
  from kdjax.serving import engine
  prompts = [[6], [4, 5, 9, 9, 9], [7, 8]]
  resized, windows, prefilled = [], set(), set()
  real_resize, real_decode, real_prefill = engine.resize_window, engine.decode_block, engine.prefill
  engine.resize_window = lambda slots, window, layout: (resized.append(window),
                                                       real_resize(slots, window=window, layout=layout))[1]
  engine.decode_block = lambda graphdef, state, layers, slots, *a, **k: (
      windows.add(engine.window_of(slots)), real_decode(graphdef, state, layers, slots, *a, **k))[1]
  engine.prefill = lambda graphdef, state, layers, ids, *a: (
      prefilled.add(ids.shape[1]), real_prefill(graphdef, state, layers, ids, *a))[1]
  try:
    outs = engine.run(tiny, prompts, [0, 1, 2], SamplingConfig(max_new_tokens=NEW), stop_ids=[], pad_id=PAD,
                      num_slots=4, topk_logprobs=0, length_bucket=4, window_bucket=4, prefill_chunk=1,
                      few_programs=True)
  finally:
    engine.resize_window, engine.decode_block, engine.prefill = real_resize, real_decode, real_prefill
  assert [o.tokens for o in outs] == reference_greedy(tiny, prompts, NEW)
  assert resized == [] and windows == {16} and prefilled == {8}  # three prefills of one prompt, all at 8


def test_engine_compiles_one_insert_per_shape_on_a_one_device_mesh():
  """A model placed on a mesh of one device (as the pipeline loads it): the slots start out placed as the
  programs return them, so four prefill chunks of one shape compile one insert program, not two."""
  from kdjax.serving import engine
  from kdjax.infra import parallel
  model = model_lib.init_model(config_lib.get_preset("tiny"), seed=0)
  parallel.shard_model(model, parallel.make_mesh({"fsdp": 1}, jax.devices()[:1]))
  # window_bucket 29: one window (prompt buckets + NEW) that no other test uses, so the count starts at 0
  before = engine.insert._cache_size()
  engine.run(model, [[5, 6, 7]] * 4, [0, 1, 2, 3], SamplingConfig(max_new_tokens=NEW), stop_ids=[], pad_id=PAD,
             num_slots=4, topk_logprobs=0, length_bucket=4, window_bucket=29, prefill_chunk=1)
  assert engine.insert._cache_size() - before == 1


def test_decode_loop_logprobs_equal_full_forward(tiny):
  """The whole jitted loop: with k = vocab, each step's log-probs are the full forward's log-softmax."""
  vocab = tiny.config.vocab_size
  outs = generate(tiny, RAGGED_PROMPTS, SamplingConfig(max_new_tokens=NEW), stop_ids=[], pad_id=PAD,
                  topk_logprobs=vocab)
  references = full_logits(tiny, [p + o.tokens for p, o in zip(RAGGED_PROMPTS, outs)])
  for prompt, out, reference in zip(RAGGED_PROMPTS, outs, references):
    assert out.finish_reason == "length" and len(out.tokens) == NEW
    expected = log_softmax64(reference)[len(prompt) - 1:-1]
    got = np.full_like(expected, np.nan)
    np.put_along_axis(got, out.topk_ids.astype(np.int64), out.topk_logprobs, axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # Greedy: every response token is the argmax of the distribution that produced it.
    assert out.tokens == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(out.tail_mass, 0.0, atol=1e-6)


def test_topk_logprobs_and_tail_mass_match_fresh_forward(tiny):
  k = 5
  sampling = SamplingConfig(temperature=1.0, max_new_tokens=NEW, seed=4)
  outs = generate(tiny, RAGGED_PROMPTS, sampling, stop_ids=[], pad_id=PAD, topk_logprobs=k)
  references = full_logits(tiny, [p + o.tokens for p, o in zip(RAGGED_PROMPTS, outs)])
  for prompt, out, reference in zip(RAGGED_PROMPTS, outs, references):
    n = len(out.tokens)
    assert out.topk_ids.shape == (n, k) and out.topk_ids.dtype == np.int32
    assert out.topk_logprobs.shape == (n, k) and out.topk_logprobs.dtype == np.float32
    assert out.tail_mass.shape == (n,) and out.tail_mass.dtype == np.float32
    logprobs = log_softmax64(reference)[len(prompt) - 1:-1]
    expected_ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(out.topk_ids, expected_ids)
    top = np.take_along_axis(logprobs, expected_ids, 1)
    np.testing.assert_allclose(out.topk_logprobs, top, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.tail_mass, 1.0 - np.exp(top).sum(axis=1), atol=1e-6, rtol=1e-4)
  # Sampled, not greedy: some token is not the argmax (the test would not notice a greedy fallback otherwise).
  assert any(o.tokens != o.topk_ids[:, 0].tolist() for o in outs)


def test_tail_mass_keeps_precision_when_top_k_hold_almost_everything():
  logits = np.array([[30.0, 10.0, 0.0, -5.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  ids, logprobs, tail, tempered = generation.topk_logprobs(jnp.asarray(logits), 2, (1.0, 40.0))
  expected = np.exp(log_softmax64(logits.astype(np.float64))[:, 2:]).sum(axis=1)
  assert np.asarray(ids).tolist() == [[0, 1], [0, 1]]
  # 1 - sum(top-k probs) in float32 would give exactly 0 for the first row (true value ~2e-13).
  np.testing.assert_allclose(np.asarray(tail), expected, rtol=1e-4)
  np.testing.assert_allclose(np.exp(np.asarray(tempered[:, 0])), expected, rtol=1e-4)
  # At T = 40 the tail holds about half the mass; its log keeps the top-k's mass 1 - tail to float32 precision.
  tail_40 = np.exp(log_softmax64(logits.astype(np.float64) / 40.0)[:, 2:]).sum(axis=1)
  np.testing.assert_allclose(-np.expm1(np.asarray(tempered[:, 1], np.float64)), 1.0 - tail_40, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(logprobs), log_softmax64(logits.astype(np.float64))[:, :2], atol=1e-6)


# ----------------------------------------------------------------------------- sampling

def test_filter_logits_top_k_and_top_p_hand_cases():
  probs = np.array([[0.5, 0.2, 0.15, 0.1, 0.05]])
  logits = jnp.asarray(np.log(probs), jnp.float32)
  kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()
  assert kept(sampling.filter_logits(logits, 2, 1.0, False)) == [True, True, False, False, False]
  # Nucleus: the smallest set reaching top_p; 0.5 + 0.2 = 0.7 < 0.8, so 0.15 joins.
  assert kept(sampling.filter_logits(logits, 0, 0.8, True)) == [True, True, True, False, False]
  assert kept(sampling.filter_logits(logits, 0, 0.3, True)) == [True, False, False, False, False]
  # top-k first, then top-p renormalised within the k: 0.5/0.85 = 0.59 < 0.6, so the second joins.
  assert kept(sampling.filter_logits(logits, 3, 0.6, True)) == [True, True, False, False, False]
  assert kept(sampling.filter_logits(logits, 0, 1.0, False)) == [True] * 5


def nucleus64(logits: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
  """(kept mask [B, V], the margin |mass before the boundary token - top_p| per row) of the top-p nucleus in
  numpy float64: sort each row, softmax, keep the shortest prefix whose mass reaches top_p, plus ties."""
  kept, margins = np.zeros(logits.shape, bool), []
  for row, x in enumerate(logits.astype(np.float64)):
    order = np.argsort(-x, kind="stable")
    p = np.exp(x[order] - x.max())
    p /= p.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
    n = int(np.sum(mass_before < top_p))
    kept[row] = x >= x[order[n - 1]]
    margins.append(np.min(np.abs(mass_before[max(n - 1, 1):n + 1] - top_p)))
  return kept, np.asarray(margins)


@pytest.mark.parametrize("scale", [5.0, 0.3, "mixed"])
def test_top_p_from_candidates_equals_float64_nucleus(scale):
  """Top-p alone looks among 64 candidates; flat rows (scale 0.3: the nucleus holds more than 64 tokens) take the
  full sort, and one flat row sends the whole batch there ("mixed"). The kept sets equal numpy's float64 ones."""
  rng = np.random.default_rng(5)  # a draw whose nucleus boundaries all lie > 2e-5 from top_p
  logits = rng.standard_normal((6, 3000))
  logits *= np.array([5.0] * 5 + [0.3])[:, None] if scale == "mixed" else scale
  logits = logits.astype(np.float32)
  top_p = 0.9
  expected, margins = nucleus64(logits, top_p)
  # No boundary within float32 rounding of the accumulated mass (~1e-6 here): the reference is unambiguous.
  assert margins.min() > 2e-5
  sizes = expected.sum(axis=1)
  if scale == 5.0:
    assert sizes.max() <= 64  # the candidates hold every nucleus
  else:
    assert sizes.max() > 64  # the fallback is exercised: 64 candidates cannot hold this nucleus
  out = sampling.filter_logits(jnp.asarray(logits), 0, jnp.float32(top_p), True, candidates=64)
  np.testing.assert_array_equal(np.isfinite(np.asarray(out)), expected)
  np.testing.assert_array_equal(np.asarray(out)[expected], logits[expected])


def test_sampling_is_independent_of_batch_size_and_order(tiny):
  prompts = RAGGED_PROMPTS + [[7, 7, 7, 7], [250, 3]]
  example_ids = [10, 11, 12, 13, 14, 15]

  def run(prompts, example_ids, batch_size, seed=123, progress=None):
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=NEW, seed=seed)
    return [o.tokens for o in generate(tiny, prompts, sampling, stop_ids=[], pad_id=PAD, example_ids=example_ids,
                                       batch_size=batch_size, progress=progress)]

  calls = []
  whole = run(prompts, example_ids, 4, progress=lambda *args: calls.append(args))
  # 4 slots run 4 prompts to the limit together, then the last 2: (tokens so far, elapsed, examples done, total).
  assert [(c[0], c[2], c[3]) for c in calls] == [(4 * NEW, 4, 6), (6 * NEW, 6, 6)] and calls[1][1] >= 0
  assert run(prompts, example_ids, 2) == whole
  assert run(prompts, example_ids, 1) == whole
  order = [4, 0, 5, 2, 3, 1]
  assert run([prompts[i] for i in order], [example_ids[i] for i in order], 4) == [whole[i] for i in order]
  # The draws really come from the seed and the example id.
  assert run(prompts, [20, 21, 22, 23, 24, 25], 4) != whole
  assert run(prompts, example_ids, 4, seed=124) != whole


def test_greedy_tokens_equal_numpy_argmax_with_ties_and_nans():
  """The two-reduction argmax against numpy's: the first maximum of each row, the first NaN in a row that has one."""
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((6, 1000)).astype(np.float32)
  logits[1, [10, 500, 999]] = 9.0           # a three-way tie: the first wins
  logits[2, [0, 7]] = 8.0                   # a tie at column 0
  logits[3, 999] = 7.0                      # the last column
  logits[4, [3, 40]] = np.nan               # NaN: numpy returns the first NaN
  logits[5, :] = -np.inf                    # every entry equal
  logits[5, 600] = np.nan
  got = np.asarray(sampling.greedy_tokens(jnp.asarray(logits)))
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
  assert got[1] == 10 and got[2] == 0 and got[3] == 999 and got[4] == 3 and got[5] == 600
  flat = np.full((1, 50), -np.inf, np.float32)
  assert int(sampling.greedy_tokens(jnp.asarray(flat))[0]) == 0


def test_top_k_one_equals_greedy(tiny):
  top1 = generate(tiny, RAGGED_PROMPTS, SamplingConfig(temperature=0.7, top_k=1, max_new_tokens=NEW, seed=9),
                  stop_ids=[], pad_id=PAD)
  assert [o.tokens for o in top1] == greedy_free(tiny)


def test_stop_tokens_end_rows_and_length_limit(tiny):
  free = greedy_free(tiny)
  # A stop id that row 0 produces first at a position j > 0.
  j = next(i for i in range(1, NEW) if free[0][i] not in free[0][:i])
  stop = free[0][j]
  outs = generate(tiny, RAGGED_PROMPTS, SamplingConfig(max_new_tokens=NEW), stop_ids=[stop, 255], pad_id=PAD,
                  topk_logprobs=3)
  for tokens, out in zip(free, outs):
    cut = [i + 1 for i, t in enumerate(tokens) if t in (stop, 255)]
    if cut:
      assert out.tokens == tokens[:cut[0]] and out.finish_reason == "stop"
    else:  # max_new_tokens reached
      assert out.tokens == tokens and len(tokens) == NEW and out.finish_reason == "length"
    assert out.topk_ids.shape == (len(out.tokens), 3) and out.tail_mass.shape == (len(out.tokens),)
  assert outs[0].tokens == free[0][:j + 1] and outs[0].finish_reason == "stop"
  # Every row stops at once: the loop ends early and nothing but the stop token comes back.
  firsts = sorted({t[0] for t in free})
  early = generate(tiny, RAGGED_PROMPTS, SamplingConfig(max_new_tokens=NEW), stop_ids=firsts, pad_id=PAD)
  assert [o.tokens for o in early] == [t[:1] for t in free] and all(o.finish_reason == "stop" for o in early)


def test_bad_inputs(tiny):
  assert generate(tiny, [], SamplingConfig(), stop_ids=[], pad_id=PAD) == []
  with pytest.raises(GenerationError, match="prompt 1 is empty"):
    generate(tiny, [[1], []], SamplingConfig(), stop_ids=[], pad_id=PAD)
  with pytest.raises(GenerationError, match="example_ids"):
    generate(tiny, [[1], [2]], SamplingConfig(), stop_ids=[], pad_id=PAD, example_ids=[0])
  with pytest.raises(GenerationError, match="outside the vocabulary"):
    generate(tiny, [[1, 256]], SamplingConfig(), stop_ids=[], pad_id=PAD)
  with pytest.raises(GenerationError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(GenerationError, match="temperature"):
    SamplingConfig(temperature=-1.0)


# ----------------------------------------------------------------------------- SmolLM2 vs transformers

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, gsm8k_dir):
  import torch
  import transformers
  import kdjax
  from kdjax.gsm8k import data
  from kdjax.teacher import priming
  model, _ = kdjax.load_model(smollm2_gguf, dtype="float32")
  tokenizer = kdjax.load_tokenizer(smollm2_gguf)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
  questions = [row["question"] for row in data.load_gsm8k(gsm8k_dir, "test")[:3]]
  prompts = [priming.encode_chat(tokenizer, priming.student_messages(q)) for q in questions]
  # One torch thread: on a shared 2-core machine torch's spinning thread pool is ~10x slower with two.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield model, tokenizer, hf_model, prompts, priming.stop_token_ids(tokenizer)
  torch.set_num_threads(threads)


# ~55 s of CPU, but 150 s wall on the shared 2-core machine (loading both models dominates), hence slow.
@pytest.mark.slow
def test_smollm2_greedy_and_logits_match_transformers(smollm2):
  """Issue acceptance: 64 greedy tokens equal HF generate's, and logits agree within 1e-3."""
  import torch
  model, tokenizer, hf_model, prompts, stop_ids = smollm2
  new = 64
  outs = generate(model, prompts, SamplingConfig(max_new_tokens=new), stop_ids=stop_ids,
                  pad_id=tokenizer.pad_token_id)
  # HF's batched generate on the same prompts, left-padded as it expects.
  width = max(map(len, prompts))
  ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt):] = torch.tensor(prompt)
    mask[row, width - len(prompt):] = 1
  with torch.no_grad():
    hf = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=stop_ids,
                           pad_token_id=tokenizer.pad_token_id)[:, width:].tolist()
  for out, hf_tokens in zip(outs, hf):
    if out.finish_reason == "stop":  # HF pads the rows that stopped before the longest one
      hf_tokens = hf_tokens[:len(out.tokens)]
    assert out.tokens == hf_tokens
  assert any(len(o.tokens) == new for o in outs)  # at least one row ran all 64 steps

  sequences = [p + o.tokens for p, o in zip(prompts, outs)]
  length = generation.round_up(max(map(len, sequences)), 64)
  ours = full_logits(model, sequences, rows=len(sequences), length=length)
  for seq, logits in zip(sequences, ours):
    with torch.no_grad():
      hf_logits = hf_model(torch.tensor([seq])).logits[0].numpy()
    assert np.max(np.abs(logits - hf_logits)) < 1e-3


@pytest.mark.slow
def test_smollm2_engine_with_refills_equals_transformers_row_by_row(smollm2, gsm8k_dir):
  """Issue 13 acceptance 1: ragged GSM8K prompts through 2 slots (so rows are refilled mid-decode), rows stopping
  at different steps, greedy tokens equal to HF `generate` run on each prompt alone (no padding at all)."""
  import torch
  from kdjax.gsm8k import data
  from kdjax.teacher import priming
  model, tokenizer, hf_model, _, stop_ids = smollm2
  questions = [row["question"] for row in data.load_gsm8k(gsm8k_dir, "test")[3:8]]
  prompts = [priming.encode_chat(tokenizer, priming.student_messages(q)) for q in questions]
  assert len({len(p) for p in prompts}) == len(prompts)  # ragged
  new = 48

  def hf_alone(stops):
    out = []
    for prompt in prompts:
      with torch.no_grad():
        tokens = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones_like(torch.tensor([prompt])),
                                   do_sample=False, max_new_tokens=new, eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id)
      out.append(tokens[0, len(prompt):].tolist())
    return out

  free = hf_alone(stop_ids)
  # Extra stop tokens: a token new to row 0 from step 9 on, and to row 1 from step 30 on: rows end at different steps.
  extra = [next(t for i, t in enumerate(free[row]) if i >= step and t not in free[row][:i])
           for row, step in ((0, 9), (1, 30))]
  stops = list(stop_ids) + extra
  expected = hf_alone(stops)
  assert len({len(e) for e in expected}) >= 3, [len(e) for e in expected]
  outs = generate(model, prompts, SamplingConfig(max_new_tokens=new), stop_ids=stops,
                  pad_id=tokenizer.pad_token_id, batch_size=2)
  assert [o.tokens for o in outs] == expected
  assert [o.finish_reason for o in outs] == ["stop" if e[-1] in stops else "length" for e in expected]


# ----------------------------------------------------------------------------- slots on a mesh

_MESH_CHILD = """
import json, sys
import jax
import numpy as np
from kdjax.serving import engine
from kdjax.infra import parallel
from kdjax.serving.generation import SamplingConfig, generate
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib
prompts = json.loads(sys.argv[1])
model = model_lib.init_model(config_lib.get_preset("tiny"), seed=0)
model.lm_head[...] = model.lm_head[...] * 20.0
seen = []
real_decode_block = engine.decode_block
def recording_decode_block(graphdef, state, layers, slots, *args, **kwargs):
  out = real_decode_block(graphdef, state, layers, slots, *args, **kwargs)
  seen.append([str(getattr(a.sharding, "spec", a.sharding)) for a in (slots.lengths, slots.k[0], out.lengths, out.k[0], out.tokens)])
  return out
engine.decode_block = recording_decode_block
# Two tokens of the free-running greedy outputs as stop tokens, so rows end at different steps.
free = [g.tokens for g in generate(model, prompts, SamplingConfig(max_new_tokens=8), stop_ids=[], pad_id=0)]
stops = [free[0][2], free[1][5]]

def run(unrolled):
  engine.unrolled_layers_default = lambda: unrolled
  out = {}
  for name, sampling in (("greedy", SamplingConfig(max_new_tokens=8)),
                         ("sampled", SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3))):
    gens = generate(model, prompts, sampling, stop_ids=stops, pad_id=0, batch_size=4, topk_logprobs=5)
    out[name] = {"tokens": [g.tokens for g in gens], "topk_ids": [g.topk_ids.tolist() for g in gens],
                 "topk_logprobs": [g.topk_logprobs.tolist() for g in gens]}
  return out

result = {"devices": jax.device_count(), "single": {u: run(u) for u in (True, False)}}
seen.clear()
parallel.shard_model(model, parallel.make_mesh({"data": 4, "tensor": 2}))
result["mesh"] = {u: run(u) for u in (True, False)}
result["specs"] = seen
print("RESULT" + json.dumps(result))
"""


@pytest.mark.slow  # a subprocess on 8 CPU devices compiling the engine for one device and for a 4 x 2 mesh
def test_slots_sharded_over_the_data_axis_give_the_single_device_results():
  """The model on a data 4 x tensor 2 mesh of 8 CPU devices: the slots' arrays are sharded over `data` going into
  and out of every decode block, and greedy and sampled outputs (with refills: 8 prompts, 4 slots) and their
  top-k log-probs equal those of one device, for both layer layouts."""
  import os
  import subprocess
  import sys
  prompts = RAGGED_PROMPTS + [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8], [60], [61, 62]]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _MESH_CHILD, json.dumps(prompts)], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert result["devices"] == 8
  # lengths in and out, caches in and out ([S, kv, W, d] unrolled, [L, S, kv, W, d] scanned), tokens out
  assert result["specs"] and all(("'data'" in spec) for specs in result["specs"] for spec in specs), result["specs"]
  assert all(specs[0] == specs[2] == specs[4] == "P('data',)" for specs in result["specs"]), result["specs"]
  for layout in ("true", "false"):
    for name in ("greedy", "sampled"):
      one, mesh = result["single"][layout][name], result["mesh"][layout][name]
      assert mesh["tokens"] == one["tokens"] and mesh["topk_ids"] == one["topk_ids"], (layout, name)
      for a, b in zip(one["topk_logprobs"], mesh["topk_logprobs"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
  assert len({len(t) for t in result["single"]["true"]["greedy"]["tokens"]}) > 1  # rows stopped at different steps
