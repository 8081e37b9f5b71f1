"""Small-sample statistics for arm comparisons: Wilson intervals, exact McNemar with Holm's adjustment, and a
paired bootstrap for per-question metrics (reference-solution NLL)."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction
from typing import Hashable, Mapping, Sequence

import numpy as np


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion with `k` successes in `n` trials.

  With n == 0 nothing is known and the interval is the whole [0, 1].
  """
  if n < 0 or k < 0 or k > n:
    raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
  if n == 0:
    return 0.0, 1.0
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
  p = k / n
  z2_over_n = z * z / n
  centre = (p + z2_over_n / 2.0) / (1.0 + z2_over_n)
  half_width = z / (1.0 + z2_over_n) * math.sqrt(p * (1.0 - p) / n + z2_over_n / (4.0 * n))
  # At k == 0 and k == n the exact bound is 0 or 1; the formula leaves rounding noise there.
  low = 0.0 if k == 0 else max(0.0, centre - half_width)
  high = 1.0 if k == n else min(1.0, centre + half_width)
  return low, high


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
  """Exact (binomial) two-sided McNemar test on paired correctness vectors.

  Returns `b01` (a wrong, b right), `b10` (a right, b wrong) and `p_value`.
  """
  if len(a) != len(b):
    raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
  b01 = sum(1 for x, y in zip(a, b) if not x and y)
  b10 = sum(1 for x, y in zip(a, b) if x and not y)
  discordant = b01 + b10
  if discordant == 0:
    return {"b01": 0, "b10": 0, "p_value": 1.0}
  # Under H0 each discordant pair goes either way with probability 1/2. Exact rationals keep
  # the tail correct for the ~1000-pair case where floats of 2**-n would underflow.
  tail = sum(math.comb(discordant, i) for i in range(min(b01, b10) + 1))
  p_value = min(Fraction(1), 2 * Fraction(tail, 2**discordant))
  return {"b01": b01, "b10": b10, "p_value": float(p_value)}


def holm_adjust(p_values: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values, in the order given.

  Sorted ascending, the i-th smallest (0-based) of m is multiplied by m - i, capped at 1, and made
  non-decreasing along that order; rejecting where the adjusted value is <= alpha controls the family-wise
  error rate at alpha.
  """
  for p in p_values:
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"p-values must lie in [0, 1], got {p}")
  m = len(p_values)
  order = sorted(range(m), key=lambda i: p_values[i])
  adjusted = [0.0] * m
  running = 0.0
  for rank, index in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p_values[index]))
    adjusted[index] = running
  return adjusted


def paired_bootstrap_difference(values: Mapping[Hashable, float], control: Mapping[Hashable, float], *,
                                resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
  """Mean of `values - control` over the keys both hold, with a paired percentile-bootstrap interval.

  Each resample draws the shared keys (question ids) with replacement and takes the mean difference, so the
  interval accounts for the pairing: questions hard for both arms cancel. numpy's PCG64 seeded by `seed`.
  """
  if resamples < 1:
    raise ValueError(f"resamples must be >= 1, got {resamples}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
  shared = sorted(set(values) & set(control))
  n = len(shared)
  if n == 0:
    return {"n_paired": 0, "difference": None, "ci_low": None, "ci_high": None, "resamples": resamples,
            "seed": seed}
  differences = np.array([float(values[k]) - float(control[k]) for k in shared], dtype=np.float64)
  rng = np.random.default_rng(seed)
  means = np.empty(resamples, dtype=np.float64)
  # In blocks, so memory stays bounded for a large test set.
  block = max(1, 2_000_000 // n)
  for start in range(0, resamples, block):
    count = min(block, resamples - start)
    means[start:start + count] = differences[rng.integers(0, n, size=(count, n))].mean(axis=1)
  tail = (1.0 - confidence) / 2.0
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return {"n_paired": n, "difference": float(differences.mean()), "ci_low": float(low), "ci_high": float(high),
          "resamples": resamples, "seed": seed}
