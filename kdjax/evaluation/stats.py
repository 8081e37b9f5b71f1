"""Small-sample statistics for accuracy comparisons: Wilson intervals and exact McNemar."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction
from typing import Sequence


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
