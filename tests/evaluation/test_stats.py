"""Wilson intervals and the exact McNemar test against hand-computed references."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from kdjax.evaluation import stats


@pytest.mark.parametrize("k,n,confidence,expected", [
    # Published/hand-computed values (z = 1.959964 for 95%, 2.575829 for 99%).
    (50, 100, 0.95, (0.4038, 0.5962)),
    (0, 10, 0.95, (0.0, 0.2775)),
    (10, 10, 0.95, (0.7225, 1.0)),
    (5, 8, 0.95, (0.3057, 0.8632)),
    (1, 20, 0.95, (0.0089, 0.2361)),
    (50, 100, 0.99, (0.3753, 0.6247)),
])
def test_wilson_known_values(k, n, confidence, expected):
  low, high = stats.wilson_interval(k, n, confidence)
  assert low == pytest.approx(expected[0], abs=1e-4)
  assert high == pytest.approx(expected[1], abs=1e-4)


def test_wilson_matches_score_test_inversion():
  # The Wilson interval is the set of p whose score test |k - n p| / sqrt(n p (1-p)) <= z
  # accepts; check the bounds solve that equation (an independent characterisation).
  z = 1.959963984540054
  for k, n in [(3, 17), (120, 1319), (700, 1319)]:
    for bound in stats.wilson_interval(k, n):
      assert abs(k - n * bound) / math.sqrt(n * bound * (1 - bound)) == pytest.approx(z, rel=1e-9)


def test_wilson_edge_cases_and_errors():
  assert stats.wilson_interval(0, 0) == (0.0, 1.0)
  assert stats.wilson_interval(0, 5)[0] == 0.0
  assert stats.wilson_interval(5, 5)[1] == 1.0
  with pytest.raises(ValueError, match="0 <= k <= n"):
    stats.wilson_interval(6, 5)
  with pytest.raises(ValueError, match="0 <= k <= n"):
    stats.wilson_interval(-1, 5)
  with pytest.raises(ValueError, match="confidence"):
    stats.wilson_interval(1, 5, confidence=1.0)


def _pairs(b01, b10, both_right=0, both_wrong=0):
  a = [False] * b01 + [True] * b10 + [True] * both_right + [False] * both_wrong
  b = [True] * b01 + [False] * b10 + [True] * both_right + [False] * both_wrong
  return a, b


def _two_sided_by_enumeration(b01, b10):
  """Sum of Binomial(n, 1/2) probabilities no larger than the observed one."""
  n = b01 + b10
  observed = math.comb(n, b01)
  return float(sum(Fraction(math.comb(n, i), 2**n) for i in range(n + 1)
                   if math.comb(n, i) <= observed))


@pytest.mark.parametrize("b01,b10,expected", [
    (5, 0, 0.0625),  # 2 * (1/2)^5
    (1, 9, 0.021484375),  # 2 * (1 + 10) / 1024
    (0, 1, 1.0),  # 2 * 1/2
    (3, 3, 1.0),  # capped at 1
    (0, 0, 1.0),  # no discordant pairs
    (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
])
def test_mcnemar_hand_values(b01, b10, expected):
  a, b = _pairs(b01, b10, both_right=7, both_wrong=4)
  result = stats.mcnemar_exact(a, b)
  assert result["b01"] == b01 and result["b10"] == b10
  assert result["p_value"] == pytest.approx(expected, rel=1e-12)


def test_mcnemar_matches_enumeration_and_is_symmetric():
  for b01, b10 in itertools.product(range(12), repeat=2):
    if b01 + b10 == 0:
      continue
    a, b = _pairs(b01, b10)
    p = stats.mcnemar_exact(a, b)["p_value"]
    assert p == pytest.approx(_two_sided_by_enumeration(b01, b10), rel=1e-12)
    assert p == stats.mcnemar_exact(b, a)["p_value"]


def test_mcnemar_large_counts_do_not_underflow():
  # 1319 discordant pairs, 600 vs 719: tiny but non-zero, equal to the exact rational sum.
  a, b = _pairs(600, 719)
  p = stats.mcnemar_exact(a, b)["p_value"]
  assert 0.0 < p < 0.01
  assert p == pytest.approx(_two_sided_by_enumeration(600, 719), rel=1e-12)


def test_mcnemar_length_mismatch():
  with pytest.raises(ValueError, match="differ in length"):
    stats.mcnemar_exact([True], [True, False])


# ----------------------------------------------------------------------------- Holm

def test_holm_hand_computed():
  # m = 4, sorted p: 0.01, 0.02, 0.03, 0.04 -> 4*0.01 = 0.04, 3*0.02 = 0.06, 2*0.03 = 0.06, 1*0.04 = 0.04
  # made monotone: 0.04, 0.06, 0.06, 0.06; returned in the input order.
  adjusted = stats.holm_adjust([0.03, 0.01, 0.04, 0.02])
  assert adjusted == pytest.approx([0.06, 0.04, 0.06, 0.06])
  # Sorted 0.001, 0.4, 0.5 -> 0.003, 0.8, max(0.8, 0.5) = 0.8; and 2 * 0.6 = 1.2 is capped at 1.
  assert stats.holm_adjust([0.5, 0.4, 0.001]) == pytest.approx([0.8, 0.8, 0.003])
  assert stats.holm_adjust([0.6, 0.7, 0.001]) == pytest.approx([1.0, 1.0, 0.003])
  # A single p-value is unchanged; none at all is fine.
  assert stats.holm_adjust([0.2]) == [0.2]
  assert stats.holm_adjust([]) == []
  with pytest.raises(ValueError, match="p-values"):
    stats.holm_adjust([1.5])


def test_holm_is_between_raw_and_bonferroni():
  rng = np.random.default_rng(1)
  p = list(rng.uniform(0, 0.2, size=7))
  adjusted = stats.holm_adjust(p)
  for raw, adj in zip(p, adjusted):
    assert raw <= adj <= min(1.0, 7 * raw) + 1e-12


# ----------------------------------------------------------------------------- paired bootstrap

def test_bootstrap_constant_difference_has_a_point_interval():
  a = {i: 2.0 + i for i in range(20)}
  b = {i: 1.5 + i for i in range(20)}  # every question 0.5 apart, however hard the question
  result = stats.paired_bootstrap_difference(a, b, resamples=500, seed=3)
  assert result["n_paired"] == 20
  assert (result["difference"], result["ci_low"], result["ci_high"]) == pytest.approx((0.5, 0.5, 0.5))


def test_bootstrap_two_values_by_enumeration():
  # Differences {0, 1}: a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so the 2.5% and
  # 97.5% quantiles of 4000 resamples are 0 and 1, and the resampled means average 1/2.
  result = stats.paired_bootstrap_difference({0: 1.0, 1: 3.0}, {0: 1.0, 1: 2.0}, resamples=4000, seed=0)
  assert result["difference"] == 0.5
  assert (result["ci_low"], result["ci_high"]) == (0.0, 1.0)


def test_bootstrap_matches_normal_theory_and_pairs_by_id():
  rng = np.random.default_rng(7)
  n = 400
  difficulty = rng.normal(3.0, 2.0, size=n)  # shared by both arms: pairing cancels it
  noise = rng.normal(0.0, 0.5, size=n)
  ids = list(range(n))
  control = {i: float(difficulty[i]) for i in ids}
  arm = {i: float(difficulty[i] + 0.1 + noise[i]) for i in reversed(ids)}  # other insertion order
  arm[10_000] = 99.0  # a question the control lacks is not paired
  result = stats.paired_bootstrap_difference(arm, control, resamples=4000, seed=0)
  d = np.array([arm[i] - control[i] for i in ids])
  standard_error = d.std(ddof=1) / math.sqrt(n)
  z = 1.959964
  assert result["n_paired"] == n and result["difference"] == pytest.approx(d.mean())
  # The percentile interval of a mean of 400 iid values is the normal one within Monte-Carlo error.
  assert result["ci_low"] == pytest.approx(d.mean() - z * standard_error, abs=0.1 * standard_error * z)
  assert result["ci_high"] == pytest.approx(d.mean() + z * standard_error, abs=0.1 * standard_error * z)
  # Seeded: the same call gives the same interval.
  assert stats.paired_bootstrap_difference(arm, control, resamples=4000, seed=0) == result


def test_bootstrap_edge_cases():
  empty = stats.paired_bootstrap_difference({0: 1.0}, {1: 1.0})
  assert empty["n_paired"] == 0 and empty["difference"] is None
  with pytest.raises(ValueError, match="resamples"):
    stats.paired_bootstrap_difference({0: 1.0}, {0: 1.0}, resamples=0)
