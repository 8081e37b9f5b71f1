"""Attention analysis against a float64 numpy re-implementation of the tiny Llama and hand-computed cases."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.evaluation import attention as analysis
from kdjax.serving import generation
from kdjax.models.llama import config as config_lib
from kdjax.models.llama import model as model_lib

PROMPTS = [[5, 17, 33, 2, 90, 91, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13], [100, 101, 102]]
THRESHOLD = 0.1
PAD = 0


@pytest.fixture(scope="module")
def tiny() -> model_lib.Llama:
  """The "tiny" preset; q and k are scaled up so attention is peaked rather than nearly uniform."""
  model = model_lib.init_model(config_lib.get_preset("tiny"), seed=0)
  model.layers.wq[...] = model.layers.wq[...] * 8.0
  model.layers.wk[...] = model.layers.wk[...] * 8.0
  return model


# ----------------------------------------------------------------------------- numpy float64 reference

def _inv_freq64(config) -> np.ndarray:
  """Rotary inverse frequencies with Llama 3's frequency scaling, written from the HF formula."""
  dim = config.head_dim
  inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  s = config.rope_scaling
  if s is None:
    return inv
  wavelen = 2 * math.pi / inv
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  out = inv.copy()
  for i, (w, f) in enumerate(zip(wavelen, inv)):
    if w > low_wavelen:
      out[i] = f / s.factor
    elif w >= high_wavelen:
      smooth = (s.original_max_position_embeddings / w - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
      out[i] = (1 - smooth) * f / s.factor + smooth * f
  return out


def _rms64(x, w, eps):
  return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope64(x, inv_freq):
  """x [S, heads, hd] at positions 0..S-1, rotate-half layout."""
  angles = np.arange(x.shape[0], dtype=np.float64)[:, None] * inv_freq[None, :]
  cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_attention(model: model_lib.Llama, tokens: list[int]) -> np.ndarray:
  """Attention probabilities [L, H, n, n] of one unpadded sequence, computed in float64 from the weights."""
  cfg = model.config
  w = {name: np.asarray(v, np.float64) for name, v in model.layers.arrays().items()}
  x = np.asarray(model.embed[...], np.float64)[tokens]
  n, groups = len(tokens), cfg.num_heads // cfg.num_kv_heads
  inv_freq = _inv_freq64(cfg)
  causal = np.tril(np.ones((n, n), bool))
  maps = []
  for layer in range(cfg.num_layers):
    h = _rms64(x, w["attn_norm"][layer], cfg.rms_norm_eps)
    q = _rope64(np.einsum("sd,dhk->shk", h, w["wq"][layer]), inv_freq)
    k = _rope64(np.einsum("sd,dgk->sgk", h, w["wk"][layer]), inv_freq)
    v = np.einsum("sd,dgk->sgk", h, w["wv"][layer])
    probs = np.zeros((cfg.num_heads, n, n))
    heads_out = np.zeros((n, cfg.num_heads, cfg.head_dim))
    for head in range(cfg.num_heads):
      group = head // groups
      scores = q[:, head] @ k[:, group].T / math.sqrt(cfg.head_dim)
      scores = np.where(causal, scores, -np.inf)
      e = np.exp(scores - scores.max(axis=-1, keepdims=True))
      probs[head] = e / e.sum(axis=-1, keepdims=True)
      heads_out[:, head] = probs[head] @ v[:, group]
    maps.append(probs)
    x = x + np.einsum("shk,hkd->sd", heads_out, w["wo"][layer])
    h = _rms64(x, w["mlp_norm"][layer], cfg.rms_norm_eps)
    gate, up = h @ w["w_gate"][layer], h @ w["w_up"][layer]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w["w_down"][layer]
  return np.stack(maps)


def reference_metrics(maps: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
  """[L, H] statistics of one question's maps [L, H, n, n], row by row."""
  layers, heads, n, _ = maps.shape
  out = {name: np.full((layers, heads), np.nan) for name in analysis.METRICS}
  for l in range(layers):
    for h in range(heads):
      entropy, self_weight, share = [], [], []
      for i in range(n):
        row = maps[l, h, i, :i + 1]
        entropy.append(-sum(p * math.log(p) for p in row if p > 0))
        self_weight.append(row[i])
        share.append(np.mean(row > threshold))
      out["entropy"][l, h] = np.mean(entropy)
      out["self_weight"][l, h] = np.mean(self_weight)
      out["share_above"][l, h] = np.mean(share)
      if l > 0:
        a, b = maps[l, h].ravel(), maps[l - 1, h].ravel()
        out["cosine_prev"][l, h] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  return out


@pytest.fixture(scope="module")
def padded_batch(tiny):
  """The prompts left-padded to 16 (every row has padding), and the model's attention on them."""
  ids, mask = generation.left_pad(PROMPTS, 16, PAD)
  out = tiny.forward(jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_attention=True)
  return ids, mask, np.asarray(out.attention)


@pytest.fixture(scope="module")
def references(tiny):
  maps = [reference_attention(tiny, p) for p in PROMPTS]
  # share_above is a count: no reference weight may sit within float32 noise of the threshold.
  for m in maps:
    assert np.min(np.abs(m[m > 0] - THRESHOLD)) > 1e-4
  return maps, [reference_metrics(m, THRESHOLD) for m in maps]


# ----------------------------------------------------------------------------- tests

def test_model_attention_matches_numpy_reference(padded_batch, references):
  _, mask, attention = padded_batch
  maps, _ = references
  for row, expected in enumerate(maps):
    n = len(PROMPTS[row])
    got = attention[:, row]  # [L, H, 16, 16]
    np.testing.assert_allclose(got[:, :, -n:, -n:], expected, atol=1e-5)
    # Real queries give padding keys no weight.
    assert np.all(got[:, :, -n:, :-n] < 1e-30)
  # The maps are far from uniform, so the statistics below test something.
  assert np.max(maps[1]) > 0.9 and np.min(maps[1][maps[1] > 0]) < 0.01


def test_metrics_match_numpy_reference(padded_batch, references):
  _, mask, attention = padded_batch
  _, expected = references
  got = analysis.attention_metrics(attention, mask, THRESHOLD)
  assert set(got) == set(analysis.METRICS)
  for row, reference in enumerate(expected):
    for metric in analysis.METRICS:
      np.testing.assert_allclose(got[metric][row], reference[metric], atol=1e-5, equal_nan=True,
                                 err_msg=f"{metric}, question {row}")
  assert np.all(np.isnan(got["cosine_prev"][:, 0])) and np.all(np.isfinite(got["cosine_prev"][:, 1:]))
  summary = analysis.aggregate(got)
  for metric in ("entropy", "self_weight", "share_above"):
    per_layer = np.mean([np.mean(r[metric], axis=-1) for r in expected], axis=0)
    np.testing.assert_allclose(summary["per_layer"][metric], per_layer, atol=1e-5)
    np.testing.assert_allclose(summary["per_head"][metric], np.mean([r[metric] for r in expected], axis=0),
                               atol=1e-5)


def test_padding_rows_are_excluded(padded_batch):
  """Garbage in padding rows and keys changes nothing; the batch gives each question's unpadded statistics."""
  _, mask, attention = padded_batch
  clean = analysis.attention_metrics(attention, mask, THRESHOLD)
  noisy = attention.copy()
  rng = np.random.default_rng(1)
  for row in range(len(PROMPTS)):
    pad = np.flatnonzero(~mask[row])
    noisy[:, row, :, pad, :] = rng.random(noisy[:, row, :, pad, :].shape)
    noisy[:, row, :, :, pad] = rng.random(noisy[:, row, :, :, pad].shape)
  noisy_metrics = analysis.attention_metrics(noisy, mask, THRESHOLD)
  for metric in analysis.METRICS:
    np.testing.assert_array_equal(noisy_metrics[metric], clean[metric])
  row = 2
  n = len(PROMPTS[row])
  alone = analysis.attention_metrics(attention[:, row:row + 1, :, -n:, -n:], np.ones((1, n), bool), THRESHOLD)
  for metric in analysis.METRICS:
    np.testing.assert_allclose(alone[metric][0], clean[metric][row], atol=1e-12, equal_nan=True)


def test_hand_computed_uniform_causal_attention():
  """Uniform causal rows over 3 tokens: entropies 0, ln 2, ln 3; self weights 1, 1/2, 1/3."""
  p = np.array([[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])
  attention = np.stack([p, p])[:, None, None]  # [L=2, B=1, H=1, 3, 3]
  got = analysis.attention_metrics(attention, np.ones((1, 3), bool), threshold=0.4)
  assert got["entropy"][0, 0, 0] == pytest.approx((0 + math.log(2) + math.log(3)) / 3)
  assert got["self_weight"][0, 0, 0] == pytest.approx((1 + 0.5 + 1 / 3) / 3)
  assert got["share_above"][0, 0, 0] == pytest.approx((1 + 1 + 0) / 3)
  assert math.isnan(got["cosine_prev"][0, 0, 0]) and got["cosine_prev"][0, 1, 0] == pytest.approx(1.0)


def test_collect_matches_reference_with_its_own_padding(tiny, references):
  _, expected = references
  collected = analysis.collect({"a": tiny}, PROMPTS, threshold=THRESHOLD, batch_size=2, length_bucket=8)
  assert collected["map_distance"] is None
  for row, reference in enumerate(expected):
    for metric in analysis.METRICS:
      np.testing.assert_allclose(collected["per_question"]["a"][metric][row], reference[metric], atol=1e-5,
                                 equal_nan=True)
  maps, _ = references
  np.testing.assert_allclose(collected["first_maps"]["a"], maps[0], atol=1e-5)


@pytest.fixture(scope="module")
def changed_head(tiny):
  """A copy of `tiny` whose layer-0 head 2 has new random query weights."""
  other = nnx.clone(tiny)
  rng = np.random.default_rng(7)
  wq = np.asarray(other.layers.wq[...]).copy()
  wq[0, :, 2, :] = rng.normal(0.0, 0.16, wq[0, :, 2, :].shape)
  other.layers.wq[...] = jnp.asarray(wq)
  return other


def test_locator_finds_the_changed_head(tiny, changed_head):
  collected = analysis.collect({"base": tiny, "changed": changed_head}, PROMPTS, threshold=THRESHOLD)
  distance = np.mean(collected["map_distance"], axis=0)
  # Heads of layer 0 other than 2 see identical inputs and weights: identical maps.
  assert np.all(np.delete(distance[0], 2) < 1e-6) and distance[0, 2] > 0.05
  summaries = {name: analysis.aggregate(m) for name, m in collected["per_question"].items()}
  by_map = analysis.locate_heads(summaries, top=3, map_distance=distance)
  assert (by_map[0]["layer"], by_map[0]["head"]) == (0, 2) and len(by_map) == 3
  assert by_map[0]["score"] >= by_map[1]["score"] >= by_map[2]["score"]
  by_metrics = analysis.locate_heads(summaries, top=1)
  assert (by_metrics[0]["layer"], by_metrics[0]["head"]) == (0, 2)
  assert by_metrics[0]["method"] == "metric_spread"


def test_locator_metric_spread_on_hand_made_numbers():
  a = {m: np.zeros((2, 3)) for m in analysis.METRICS}
  b = {m: np.zeros((2, 3)) for m in analysis.METRICS}
  b["entropy"][1, 1] = 2.0   # largest spread, but its statistic is scaled by its own range
  b["self_weight"][0, 2] = 0.1
  b["share_above"][0, 2] = 0.1
  located = analysis.locate_heads({"a": a, "b": {"per_head": b}}, top=2)
  assert [(h["layer"], h["head"]) for h in located] == [(0, 2), (1, 1)]
  assert located[0]["score"] == pytest.approx(2.0) and located[1]["score"] == pytest.approx(1.0)


class ByteTokenizer:
  """Just enough of a chat tokenizer for `analyze`: bytes of the question's first 24 characters."""
  pad_token_id = PAD
  eos_token_id = 1

  def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
    return [2 + b % 250 for b in messages[-1]["content"][:24].encode()]

  def get_vocab(self):
    return {"<eos>": 1}


def test_analyze_writes_json_and_plots(tiny, changed_head, tmp_path):
  questions = [{"id": i, "question": q} for i, q in
               enumerate(["Tom has 3 apples and buys", "A train leaves at 5 pm and", "Half of 48 is what?"])]
  result = analysis.analyze({"base": tiny, "changed": changed_head}, ByteTokenizer(), questions, tmp_path,
                            num_questions=2, top=4)
  saved = json.loads((tmp_path / analysis.ANALYSIS_FILE).read_text())
  assert saved == result and saved["num_questions"] == 2 and saved["question_ids"] == [0, 1]
  assert (saved["located_heads"][0]["layer"], saved["located_heads"][0]["head"]) == (0, 2)
  assert saved["plotted_heads"] == [[h["layer"], h["head"]] for h in saved["located_heads"]]
  per_layer = saved["models"]["base"]["per_layer"]
  assert per_layer["cosine_prev"][0] is None and len(per_layer["entropy"]) == tiny.config.num_layers
  for name in saved["plots"]:
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert set(saved["plots"]) == {analysis.METRICS_PLOT, analysis.HEAD_MAPS_PLOT, analysis.DISTANCE_PLOT}


def test_bad_input_raises():
  with pytest.raises(analysis.AnalysisError, match="attention must be"):
    analysis.attention_metrics(np.zeros((2, 1, 1, 3, 4)), np.ones((1, 3), bool))
  with pytest.raises(analysis.AnalysisError, match="valid must be"):
    analysis.attention_metrics(np.zeros((2, 1, 1, 3, 3)), np.ones((1, 4), bool))
  with pytest.raises(analysis.AnalysisError, match="at least two models"):
    analysis.locate_heads({"a": {m: np.zeros((1, 1)) for m in analysis.METRICS}})
  with pytest.raises(analysis.AnalysisError, match="map_distance must be"):
    analysis.locate_heads({"a": {m: np.zeros((2, 2)) for m in analysis.METRICS}}, map_distance=np.zeros(3))


def test_analyze_one_model_with_its_own_answer(tiny, tmp_path):
  """answer_from appends the model's greedy answer; one model gets no locator and plots its sharpest heads."""
  questions = [{"id": 7, "question": "Tom has 3 apples and buys"}]
  tokenizer = ByteTokenizer()
  prompt = [2 + b % 250 for b in questions[0]["question"][:24].encode()]
  answer = generation.generate(tiny, [prompt], generation.SamplingConfig(max_new_tokens=5), stop_ids=[1],
                               pad_id=PAD)[0].tokens
  result = analysis.analyze({"base": tiny}, tokenizer, questions, tmp_path, answer_from="base", max_new_tokens=5)
  assert result["prompt_tokens"] == [len(prompt) + len(answer)] and "greedy answer of base" in result["input"]
  assert result["located_heads"] == [] and result["map_distance"] is None
  assert set(result["plots"]) == {analysis.METRICS_PLOT, analysis.HEAD_MAPS_PLOT}
  entropy = np.array(result["models"]["base"]["per_head"]["entropy"])
  plotted = [tuple(h) for h in result["plotted_heads"]]
  assert len(plotted) == 4 and max(entropy[h] for h in plotted) <= min(
      entropy[l, h] for l in range(entropy.shape[0]) for h in range(entropy.shape[1]) if (l, h) not in plotted)
  # The maps cover prompt and answer: the reference computation on the same tokens agrees.
  expected = reference_metrics(reference_attention(tiny, prompt + answer), THRESHOLD)
  np.testing.assert_allclose(entropy, expected["entropy"], atol=1e-5)
  with pytest.raises(analysis.AnalysisError, match="answer_from"):
    analysis.analyze({"base": tiny}, tokenizer, questions, tmp_path, answer_from="other")
