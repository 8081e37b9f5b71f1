"""Attention analysis over many GSM8K questions: per-layer statistics and the heads that differ across models.

For each model (a base model, one with LoRA attached, merged weights...) the prompts run through
`model.forward(..., return_attention=True)` and, per question, layer and head, four statistics are taken over the
valid part of the attention map (query rows of real tokens; keys that are real and not in the future):

  entropy      mean over rows of -sum_j p_ij log p_ij (nats)
  self_weight  mean over rows of p_ii, the weight a token gives itself
  share_above  mean over rows of the fraction of valid keys whose weight exceeds `threshold`
  cosine_prev  cosine similarity of the head's map with the same head's map one layer below (layer 0: NaN)

Per-head values average over questions (each question counts once); per-layer values also average over heads.

Inputs: by default the prompt alone (the student's chat prompt). Maps are only comparable across models on the
same tokens, so with `answer_from=name` one model's greedy answer is appended to every prompt, for every model.

Head locator: heads ranked by how much their maps differ across models, the mean over questions and model pairs
of 1 - cosine(map_a, map_b) on the valid region (`map_distance`). Without maps it falls back to the spread of
the per-head statistics across models, each statistic scaled by its spread over all heads and models.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.serving import generation
from kdjax.infra import parallel
from kdjax.teacher import priming
from kdjax.infra import storage

METRICS = ("entropy", "self_weight", "share_above", "cosine_prev")
METRICS_PLOT = "attention_metrics.png"
HEAD_MAPS_PLOT = "head_maps.png"
DISTANCE_PLOT = "head_distance.png"
ANALYSIS_FILE = "analysis.json"


class AnalysisError(ValueError):
  """Bad input to the attention analysis."""


# ----------------------------------------------------------------------------- statistics of one batch

def _valid_regions(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(query rows [B, S], keys [B, S, S]) that count: real tokens, and real keys at or before the query."""
  valid = np.asarray(valid, bool)
  s = valid.shape[1]
  causal = np.tril(np.ones((s, s), bool))
  return valid, causal[None] & valid[:, None, :] & valid[:, :, None]


def attention_metrics(attention: np.ndarray, valid: np.ndarray, threshold: float = 0.1) -> dict[str, np.ndarray]:
  """Per-question statistics [B, L, H] of attention probabilities [L, B, H, S, S] (float64 inside).

  `valid` [B, S] is True on real tokens (False on padding); padding rows are left out of every mean.
  """
  attention = np.asarray(attention)
  if attention.ndim != 5 or attention.shape[3] != attention.shape[4]:
    raise AnalysisError(f"attention must be [layers, batch, heads, seq, seq], got shape {attention.shape}")
  layers, batch, heads, s, _ = attention.shape
  if np.shape(valid) != (batch, s):
    raise AnalysisError(f"valid must be [batch, seq] = {(batch, s)}, got {np.shape(valid)}")
  rows, keys = _valid_regions(valid)
  num_rows = rows.sum(axis=1).astype(np.float64)  # [B]
  if np.any(num_rows == 0):
    raise AnalysisError("every sequence needs at least one real token")
  keys_per_row = np.maximum(keys.sum(axis=2), 1).astype(np.float64)  # [B, S]
  out = {name: np.full((batch, layers, heads), np.nan) for name in METRICS}
  previous = None
  for layer in range(layers):
    p = np.where(keys[:, None], attention[layer].astype(np.float64), 0.0)  # [B, H, S, S]
    row_entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    row_self = np.diagonal(p, axis1=-2, axis2=-1)
    row_share = np.sum(keys[:, None] & (p > threshold), axis=-1) / keys_per_row[:, None]
    for name, per_row in (("entropy", row_entropy), ("self_weight", row_self), ("share_above", row_share)):
      out[name][:, layer] = np.sum(np.where(rows[:, None], per_row, 0.0), axis=-1) / num_rows[:, None]
    if previous is not None:
      out["cosine_prev"][:, layer] = _cosine(p, previous)
    previous = p
  return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine of maps [B, H, S, S] (already zero outside the valid region), per (batch, head)."""
  dot = np.sum(a * b, axis=(-2, -1))
  norms = np.sqrt(np.sum(a * a, axis=(-2, -1)) * np.sum(b * b, axis=(-2, -1)))
  return dot / np.where(norms > 0, norms, 1.0)


def map_cosine(attention_a: np.ndarray, attention_b: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Cosine [B, L, H] between two models' maps [L, B, H, S, S] of the same tokens, on the valid region."""
  if np.shape(attention_a) != np.shape(attention_b):
    raise AnalysisError(f"attention shapes differ: {np.shape(attention_a)} vs {np.shape(attention_b)}")
  _, keys = _valid_regions(valid)
  layers = np.shape(attention_a)[0]
  cosines = [_cosine(np.where(keys[:, None], np.asarray(attention_a[l], np.float64), 0.0),
                     np.where(keys[:, None], np.asarray(attention_b[l], np.float64), 0.0)) for l in range(layers)]
  return np.stack(cosines, axis=1)


def aggregate(per_question: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Means over questions ([N, L, H] -> per_head [L, H]) and then over heads (per_layer [L])."""
  per_head = {name: np.mean(np.asarray(values, np.float64), axis=0) for name, values in per_question.items()}
  per_layer = {name: np.mean(values, axis=-1) for name, values in per_head.items()}
  return {"per_head": per_head, "per_layer": per_layer}


# ----------------------------------------------------------------------------- running the models

@functools.partial(jax.jit, static_argnums=0)
def _attention(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  return model.forward(ids, attention_mask=mask, return_logits=False, return_attention=True).attention


def collect(models: Mapping[str, Any], prompts: Sequence[Sequence[int]], *, threshold: float = 0.1,
            batch_size: int = 2, pad_id: int = 0, length_bucket: int = 32) -> dict[str, Any]:
  """Runs every model on every prompt (token ids), left-padded in batches.

  Returns {"per_question": {model: {metric: [N, L, H]}}, "map_distance": [N, L, H] mean over model pairs of
  1 - cosine (None for one model), "first_maps": {model: [L, H, n, n] of the first prompt}}.
  """
  if not models:
    raise AnalysisError("need at least one model")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise AnalysisError("need at least one prompt, none of them empty")
  if batch_size < 1:
    raise AnalysisError(f"batch_size must be >= 1, got {batch_size}")
  split = {name: nnx.split(model) for name, model in models.items()}
  per_question = {name: {m: [] for m in METRICS} for name in models}
  distances, first_maps = [], {}
  pairs = list(itertools.combinations(models, 2))
  for first in range(0, len(prompts), batch_size):
    batch = list(prompts[first:first + batch_size])
    length = generation.round_up(max(len(p) for p in batch), length_bucket)
    ids, mask = generation.left_pad(batch, length, pad_id)
    attention = {name: np.asarray(_attention(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))
                 for name, (graphdef, state) in split.items()}
    for name, maps in attention.items():
      for metric, values in attention_metrics(maps, mask, threshold).items():
        per_question[name][metric].append(values)
      if first == 0:
        n = len(batch[0])
        first_maps[name] = maps[:, 0, :, length - n:, length - n:].copy()
    if pairs:
      distances.append(np.mean([1.0 - map_cosine(attention[a], attention[b], mask) for a, b in pairs], axis=0))
    del attention
  return {
      "per_question": {name: {m: np.concatenate(v, axis=0) for m, v in metrics.items()}
                       for name, metrics in per_question.items()},
      "map_distance": np.concatenate(distances, axis=0) if distances else None,
      "first_maps": first_maps,
  }


# ----------------------------------------------------------------------------- head locator

def _per_head(entry: Mapping) -> Mapping[str, np.ndarray]:
  return entry["per_head"] if "per_head" in entry else entry


def locate_heads(metrics_by_model: Mapping[str, Mapping], top: int = 10, *,
                 map_distance: np.ndarray | None = None) -> list[dict]:
  """The `top` (layer, head) pairs that differ most across models, most different first.

  `metrics_by_model` maps a model name to its per-head statistics ({metric: [L, H]}, or an entry holding them
  under "per_head"). With `map_distance` [L, H] (mean 1 - cosine of maps across models), heads rank by it;
  otherwise by the sum over statistics of (max - min across models) / (spread of that statistic over all heads
  and models), NaNs (layer 0's cosine_prev) left out.
  """
  if top < 1:
    raise AnalysisError(f"top must be >= 1, got {top}")
  names = list(metrics_by_model)
  if not names:
    raise AnalysisError("need the metrics of at least one model")
  per_head = {name: {m: np.asarray(v, np.float64) for m, v in _per_head(metrics_by_model[name]).items()}
              for name in names}
  shape = per_head[names[0]]["entropy"].shape
  if map_distance is not None:
    score = np.asarray(map_distance, np.float64)
    if score.shape != shape:
      raise AnalysisError(f"map_distance must be [layers, heads] = {shape}, got {score.shape}")
    method = "map_distance"
  else:
    if len(names) < 2:
      raise AnalysisError("the metric-spread locator needs at least two models")
    score = np.zeros(shape)
    for metric in METRICS:
      stacked = np.stack([per_head[name][metric] for name in names])  # [M, L, H]
      if np.all(np.isnan(stacked)):
        continue
      scale = np.nanmax(stacked) - np.nanmin(stacked)
      stacked = np.nan_to_num(stacked, nan=0.0)  # undefined entries (layer 0's cosine_prev) add nothing
      spread = np.max(stacked, axis=0) - np.min(stacked, axis=0)
      if scale > 0:
        score += spread / scale
    method = "metric_spread"
  order = np.argsort(-score, axis=None, kind="stable")[:top]
  located = []
  for flat in order:
    layer, head = np.unravel_index(flat, shape)
    located.append({"layer": int(layer), "head": int(head), "score": float(score[layer, head]),
                    "method": method,
                    "metrics": {name: {m: _json_float(per_head[name][m][layer, head]) for m in per_head[name]}
                                for name in names}})
  return located


# ----------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
  # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
  from matplotlib.backends import backend_agg  # pylint: disable=import-outside-toplevel
  from matplotlib import figure as figure_lib  # pylint: disable=import-outside-toplevel
  figure = figure_lib.Figure(figsize=(width, height))
  backend_agg.FigureCanvasAgg(figure)
  return figure


_TITLES = {"entropy": "attention entropy (nats)", "self_weight": "self-attention weight",
           "share_above": "share of keys above threshold", "cosine_prev": "cosine with layer below"}


def plot_metrics(per_layer_by_model: Mapping[str, Mapping[str, np.ndarray]], path: pathlib.Path,
                 threshold: float) -> None:
  """One panel per statistic, one line per model, layers on the x axis."""
  figure = _figure(11.0, 7.5)
  for index, metric in enumerate(METRICS):
    axes = figure.add_subplot(2, 2, index + 1)
    for name, per_layer in per_layer_by_model.items():
      values = np.asarray(per_layer[metric], np.float64)
      axes.plot(np.arange(len(values)), values, marker="o", markersize=3, label=name)
    title = _TITLES[metric] + (f" ({threshold:g})" if metric == "share_above" else "")
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("layer")
    axes.grid(alpha=0.3)
  figure.axes[0].legend(fontsize=8)
  figure.tight_layout()
  storage.save_figure(figure, path, format="png", dpi=110)


def plot_head_maps(first_maps: Mapping[str, np.ndarray], heads: Sequence[tuple[int, int]],
                   path: pathlib.Path) -> None:
  """Attention maps of the first question: a row per (layer, head), a column per model."""
  names = list(first_maps)
  figure = _figure(3.2 * len(names) + 0.8, 3.0 * len(heads))
  for row, (layer, head) in enumerate(heads):
    for col, name in enumerate(names):
      axes = figure.add_subplot(len(heads), len(names), row * len(names) + col + 1)
      # Square root spreads the many small weights so structure beside the attention sink stays visible.
      image = axes.imshow(np.sqrt(first_maps[name][layer, head]), cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
      axes.set_title(f"{name}: L{layer} H{head}", fontsize=9)
      axes.set_xlabel("key", fontsize=8)
      axes.set_ylabel("query", fontsize=8)
      axes.tick_params(labelsize=7)
  figure.subplots_adjust(left=0.08, right=0.82, top=0.95, bottom=0.05, hspace=0.4, wspace=0.3)
  colorbar_axes = figure.add_axes((0.86, 0.3, 0.025, 0.4))
  figure.colorbar(image, cax=colorbar_axes, label="sqrt(attention weight)")
  storage.save_figure(figure, path, format="png", dpi=100)


def plot_distance(map_distance: np.ndarray, path: pathlib.Path) -> None:
  figure = _figure(6.0, 7.0)
  axes = figure.add_subplot()
  image = axes.imshow(map_distance, aspect="auto", cmap="magma", interpolation="nearest")
  axes.set_xlabel("head")
  axes.set_ylabel("layer")
  axes.set_title("mean 1 - cosine of attention maps across models", fontsize=10)
  figure.colorbar(image, ax=axes)
  figure.tight_layout()
  storage.save_figure(figure, path, format="png", dpi=110)


# ----------------------------------------------------------------------------- driver

def _json_float(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def _json_array(array: np.ndarray) -> Any:
  return [_json_array(a) for a in array] if np.ndim(array) else _json_float(array)


def _prompts(models: Mapping[str, Any], tokenizer, questions: Sequence[Mapping], answer_from: str | None,
             max_new_tokens: int, batch_size: int) -> list[list[int]]:
  prompts = [priming.encode_chat(tokenizer, priming.student_messages(q["question"])) for q in questions]
  if answer_from is None:
    return prompts
  if answer_from not in models:
    raise AnalysisError(f"answer_from={answer_from!r} is not one of the models {list(models)}")
  stop_ids = priming.stop_token_ids(tokenizer)
  pad_id = priming.pad_token_id(tokenizer)
  answers = generation.generate(models[answer_from], prompts, generation.SamplingConfig(max_new_tokens=max_new_tokens),
                                stop_ids=stop_ids, pad_id=pad_id, batch_size=batch_size)
  return [p + a.tokens for p, a in zip(prompts, answers)]


def _gather_questions(collected: dict, prompt_lengths: list[int]) -> tuple[dict, list[int]]:
  """Every process's per-question rows (and prompt lengths) in question order; a collective: every process
  calls it, in the same order."""
  def merged(rows):
    return np.stack(parallel.interleave_shares(parallel.gather_rows(np.asarray(rows, np.float64))))
  per_question = {name: {m: merged(v) for m, v in metrics.items()}
                  for name, metrics in collected["per_question"].items()}
  distance = None if collected["map_distance"] is None else merged(collected["map_distance"])
  lengths = parallel.interleave_shares(parallel.gather_rows(np.asarray(prompt_lengths, np.int64)))
  return ({"per_question": per_question, "map_distance": distance, "first_maps": collected["first_maps"]},
          [int(n) for n in lengths])


def analyze(models: Mapping[str, Any], tokenizer, questions: Sequence[Mapping], out_dir: str | os.PathLike, *,
            num_questions: int = 16, threshold: float = 0.1, heads: Sequence[tuple[int, int]] | None = None,
            answer_from: str | None = None, max_new_tokens: int = 256, batch_size: int = 2,
            top: int = 10) -> dict:
  """Attention statistics of every model on the first `num_questions` questions; writes analysis.json + PNGs.

  `heads` picks the (layer, head) maps to draw; None draws the 4 located heads (with one model: the 4 heads of
  lowest entropy). Returns the analysis.json content (NaN written as null).
  """
  if num_questions < 1:
    raise AnalysisError(f"num_questions must be >= 1, got {num_questions}")
  if not 0.0 < threshold < 1.0:
    raise AnalysisError(f"threshold must lie in (0, 1), got {threshold}")
  if not questions:
    raise AnalysisError("no questions given")
  chosen = list(questions[:num_questions])
  writer = jax.process_index() == 0
  if writer:
    out_dir = storage.makedirs(out_dir)
  some_model = next(iter(models.values()))
  num_layers, num_heads = some_model.config.num_layers, some_model.config.num_heads
  # Each process runs its strided share of the questions (process 0 always holds the first, whose maps are
  # drawn); the per-question rows are then gathered in question order, and process 0 alone writes.
  mine = [chosen[i] for i in parallel.host_slice(len(chosen))]
  prompts = _prompts(models, tokenizer, mine, answer_from, max_new_tokens, batch_size) if mine else []
  pad_id = priming.pad_token_id(tokenizer)  # any id: pads are masked
  if prompts:
    collected = collect(models, prompts, threshold=threshold, batch_size=batch_size, pad_id=pad_id)
  else:
    empty = np.zeros((0, num_layers, num_heads))
    collected = {"per_question": {name: {m: empty for m in METRICS} for name in models},
                 "map_distance": empty if len(models) > 1 else None, "first_maps": {}}
  prompt_lengths = [len(p) for p in prompts]
  if jax.process_count() > 1:
    collected, prompt_lengths = _gather_questions(collected, prompt_lengths)
  summaries = {name: aggregate(per_q) for name, per_q in collected["per_question"].items()}
  map_distance = None
  if collected["map_distance"] is not None:
    map_distance = np.mean(collected["map_distance"], axis=0)
  located = locate_heads(summaries, top=top, map_distance=map_distance) if len(models) > 1 else []

  if heads is None:
    if located:
      heads = [(h["layer"], h["head"]) for h in located[:4]]
    else:
      entropy = summaries[next(iter(summaries))]["per_head"]["entropy"]
      heads = [tuple(int(i) for i in np.unravel_index(f, entropy.shape)) for f in np.argsort(entropy, axis=None)[:4]]
  heads = [(int(l), int(h)) for l, h in heads]
  bad = [(l, h) for l, h in heads if not (0 <= l < num_layers and 0 <= h < num_heads)]
  if bad:
    raise AnalysisError(f"heads {bad} are outside {num_layers} layers x {num_heads} heads")

  plots = [METRICS_PLOT, HEAD_MAPS_PLOT] + ([DISTANCE_PLOT] if map_distance is not None else [])
  result = {
      "num_questions": len(chosen),
      "question_ids": [q.get("id") for q in chosen],
      "threshold": threshold,
      "input": "prompt" if answer_from is None else f"prompt + greedy answer of {answer_from}",
      "prompt_tokens": prompt_lengths,
      "models": {name: {"per_layer": {m: _json_array(v) for m, v in s["per_layer"].items()},
                        "per_head": {m: _json_array(v) for m, v in s["per_head"].items()}}
                 for name, s in summaries.items()},
      "map_distance": None if map_distance is None else _json_array(map_distance),
      "located_heads": located,
      "plotted_heads": [list(h) for h in heads],
      "plots": plots,
  }
  if not writer:
    return result
  plot_metrics({name: s["per_layer"] for name, s in summaries.items()}, out_dir / METRICS_PLOT, threshold)
  plot_head_maps(collected["first_maps"], heads, out_dir / HEAD_MAPS_PLOT)
  if map_distance is not None:
    plot_distance(map_distance, out_dir / DISTANCE_PLOT)
  storage.write_json(out_dir / ANALYSIS_FILE, result, indent=1, allow_nan=False)
  return result
