"""Distillation losses against independent numpy float64 references (and torch's F.kl_div for JSD's beta)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.distill import losses

KD_DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]


# ----------------------------------------------------------------------------------------------------------
# numpy float64 references


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kl(a, b):
  """sum a log(a / b) with 0 log 0 = 0."""
  safe_a = np.where(a > 0, a, 1.0)
  safe_b = np.where(a > 0, b, 1.0)
  return np.sum(np.where(a > 0, a * np.log(safe_a / safe_b), 0.0), axis=-1)


def np_divergence(p, q, name, beta=0.5, alpha=0.1):
  """Divergence between teacher probabilities p and student probabilities q (float64, last axis)."""
  if name == "forward_kl":
    return np_kl(p, q)
  if name == "reverse_kl":
    return np_kl(q, p)
  if name == "jsd":
    if beta == 0.0:
      return np_kl(p, q)
    if beta == 1.0:
      return np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
  if name == "skew_forward_kl":
    return np_kl(p, alpha * p + (1 - alpha) * q)
  if name == "skew_reverse_kl":
    return np_kl(q, alpha * q + (1 - alpha) * p)
  if name == "tv":
    return 0.5 * np.abs(p - q).sum(-1)
  raise AssertionError(name)


def np_coarse_buckets(student_logits, teacher_logits, ids, temperature, mode):
  """(p, q): the FULL tempered teacher and student distributions coarse-grained onto the teacher's k ids.

  "tail": the k ids plus one bucket holding all the rest of the vocabulary (summed, not 1 - sum);
  "renormalize": the k ids only, renormalised. float64 from first principles, never from a top-k store.
  """
  p_full = np.exp(np_log_softmax(np.asarray(teacher_logits, np.float64) / temperature))
  q_full = np.exp(np_log_softmax(np.asarray(student_logits, np.float64) / temperature))
  p_ids, q_ids = np.take_along_axis(p_full, ids, -1), np.take_along_axis(q_full, ids, -1)
  if mode == "renormalize":
    return p_ids / p_ids.sum(-1, keepdims=True), q_ids / q_ids.sum(-1, keepdims=True)
  outside = np.ones(p_full.shape, bool)
  np.put_along_axis(outside, ids, False, axis=-1)
  p_rest = np.where(outside, p_full, 0.0).sum(-1, keepdims=True)
  q_rest = np.where(outside, q_full, 0.0).sum(-1, keepdims=True)
  return np.concatenate([p_ids, p_rest], -1), np.concatenate([q_ids, q_rest], -1)


def np_log_tail(teacher_logits, ids, temperature):
  """What a store holds as the tail at `temperature`: log of the mass softmax(logits / T) puts outside `ids`."""
  log_p = np_log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
  np.put_along_axis(log_p, ids, -np.inf, axis=-1)
  with np.errstate(divide="ignore"):
    return np.logaddexp.reduce(log_p, axis=-1)


def make_teacher(rng, shape, vocab, k, spread=2.0, temperature=1.0):
  """Random full teacher log-probs and their top-k (ids, log-probs at T = 1, log tail at `temperature`), float64."""
  full = np_log_softmax(rng.normal(size=shape + (vocab,)) * spread)
  ids = np.argsort(-full, axis=-1)[..., :k]
  lp = np.take_along_axis(full, ids, -1)
  return full, ids, lp, np_log_tail(full, ids, temperature)


def cfg_for(name, **kw):
  return losses.LossConfig(divergence=name, **kw)


@functools.partial(jax.jit, static_argnames="cfgs")
def sparse_many(logits, ids, lp, tail, cfgs):
  """per_token_divergence for (cfg, use_given_tail) pairs in ONE compilation: compiles dominate run time."""
  return [losses.per_token_divergence(logits, ids, lp, tail if use_tail else None, cfg) for cfg, use_tail in cfgs]


@functools.partial(jax.jit, static_argnames="cfgs")
def dense_many(logits, teacher_full, cfgs):
  return [losses.dense_divergence(logits, teacher_full, cfg) for cfg in cfgs]


f32 = functools.partial(jnp.asarray, dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Dense divergences


def test_dense_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 11)) * 2
  teacher_full, *_ = make_teacher(rng, (3, 4), 11, 1)
  cases = [(name, temperature) for name in KD_DIVERGENCES for temperature in (1.0, 2.5)]
  cfgs = tuple(cfg_for(name, beta=0.3, skew_alpha=0.2, temperature=t, scale_by_t2=False) for name, t in cases)
  got = dense_many(f32(logits), f32(teacher_full), cfgs)
  for (name, temperature), value in zip(cases, got):
    p = np.exp(np_log_softmax(teacher_full / temperature))
    q = np.exp(np_log_softmax(logits / temperature))
    want = np_divergence(p, q, name, beta=0.3, alpha=0.2)
    assert np.all(want > 1e-3)  # a real, non-trivial comparison
    np.testing.assert_allclose(value, want, rtol=2e-5, atol=2e-6, err_msg=f"{name} T={temperature}")


def test_hand_computed_values():
  # p = (0.5, 0.5), q = (0.9, 0.1); JSD(0.5) mixture m = (0.7, 0.3).
  logits = f32(np.log([[0.9, 0.1]]))
  teacher = f32(np.log([[0.5, 0.5]]))
  fwd = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
  rev = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
  jsd = 0.5 * (0.5 * np.log(0.5 / 0.7) + 0.5 * np.log(0.5 / 0.3)) + 0.5 * (
      0.9 * np.log(0.9 / 0.7) + 0.1 * np.log(0.1 / 0.3))
  got = dense_many(logits, teacher, tuple(cfg_for(n, beta=0.5) for n in ("forward_kl", "reverse_kl", "tv", "jsd")))
  np.testing.assert_allclose(np.concatenate(got), [fwd, rev, 0.4, jsd], rtol=1e-6)


def test_jsd_beta_is_teacher_weight_like_trl():
  """TRL: m = beta * teacher + (1 - beta) * student; jsd = beta KL(teacher || m) + (1 - beta) KL(student || m).

  Rebuilt with torch's F.kl_div(input=log m, target=log x, log_target=True) = KL(x || m).
  """
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  student = rng.normal(size=(5, 9)) * 2
  teacher = rng.normal(size=(5, 9)) * 2
  beta = 0.2
  log_q = torch.log_softmax(torch.tensor(student), -1)
  log_p = torch.log_softmax(torch.tensor(teacher), -1)
  log_m = torch.logsumexp(torch.stack([log_p + np.log(beta), log_q + np.log(1 - beta)]), 0)
  kl = functools.partial(torch.nn.functional.kl_div, reduction="none", log_target=True)
  want = (beta * kl(log_m, log_p) + (1 - beta) * kl(log_m, log_q)).sum(-1).numpy()
  got, swapped = dense_many(f32(student), f32(teacher), (cfg_for("jsd", beta=beta), cfg_for("jsd", beta=1 - beta)))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # beta is not symmetric: 1 - beta gives a different value on these distributions.
  assert np.max(np.abs(np.asarray(swapped) - want)) > 1e-3


def test_jsd_endpoints_and_skew_zero_are_plain_kl():
  rng = np.random.default_rng(2)
  logits = f32(rng.normal(size=(4, 10)) * 2)
  teacher = f32(np_log_softmax(rng.normal(size=(4, 10)) * 2))
  fwd, rev, jsd0, jsd1, skew_fwd0, skew_rev0 = dense_many(logits, teacher, (
      cfg_for("forward_kl"), cfg_for("reverse_kl"), cfg_for("jsd", beta=0.0), cfg_for("jsd", beta=1.0),
      cfg_for("skew_forward_kl", skew_alpha=0.0), cfg_for("skew_reverse_kl", skew_alpha=0.0)))
  assert np.max(np.abs(np.asarray(fwd) - np.asarray(rev))) > 1e-2
  np.testing.assert_allclose(jsd0, fwd, rtol=1e-6)
  np.testing.assert_allclose(jsd1, rev, rtol=1e-6)
  np.testing.assert_allclose(skew_fwd0, fwd, rtol=1e-6)
  np.testing.assert_allclose(skew_rev0, rev, rtol=1e-6)


def test_temperature_and_t2_scaling():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 12)) * 3
  temperature = 2.0
  full, ids, lp, tail = make_teacher(rng, (6,), 12, 5, temperature=temperature)
  cases = [(mode, scale) for mode in losses.TOPK_MODES for scale in (False, True)]
  got = sparse_many(f32(logits), ids, f32(lp), f32(tail), tuple(
      (cfg_for("forward_kl", temperature=temperature, scale_by_t2=scale, topk_mode=mode), True)
      for mode, scale in cases))
  for (mode, scale), value in zip(cases, got):
    p, q = np_coarse_buckets(logits, full, ids, temperature, mode)
    want = np_kl(p, q) * (temperature ** 2 if scale else 1.0)
    np.testing.assert_allclose(value, want, rtol=2e-5, atol=4e-6, err_msg=f"{mode} {scale}")
    # T = 1 differs from T = 2 (the temperature is really applied).
    p1, q1 = np_coarse_buckets(logits, full, ids, 1.0, mode)
    assert np.max(np.abs(np_kl(p1, q1) - np_kl(p, q))) > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Sparse top-k


def test_sparse_matches_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 17)) * 2
  full, ids, lp, _ = make_teacher(rng, (2, 5), 17, 4)
  ids = ids.astype(np.int32)
  temperatures = (1.0, 1.7)
  tails = np.stack([np_log_tail(full, ids, t) for t in temperatures])
  # Without a given tail, tail mode derives the T = 1 one (1 - sum of the top-k probabilities).
  cases = [(name, mode, t, use_tail) for name in KD_DIVERGENCES for mode in losses.TOPK_MODES
           for t in range(len(temperatures)) for use_tail in ((False, True) if mode == "tail" and t == 0 else (True,))]

  @functools.partial(jax.jit, static_argnames="cfgs")
  def run(logits, tails, cfgs):
    return [losses.per_token_divergence(logits, ids, f32(lp), tails[t] if use_tail else None, cfg)
            for cfg, t, use_tail in cfgs]

  got = run(f32(logits), f32(tails), tuple(
      (cfg_for(name, beta=0.4, skew_alpha=0.3, temperature=temperatures[t], scale_by_t2=False, topk_mode=mode),
       t, use_tail) for name, mode, t, use_tail in cases))
  for (name, mode, t, use_tail), value in zip(cases, got):
    p, q = np_coarse_buckets(logits, full, ids, temperatures[t], mode)
    want = np_divergence(p, q, name, beta=0.4, alpha=0.3)
    assert np.all(want > 1e-4)
    np.testing.assert_allclose(value, want, rtol=5e-5, atol=2e-6,
                               err_msg=f"{name} {mode} T={temperatures[t]} tail={use_tail}")


def test_tail_mode_at_t_not_1_needs_the_tempered_tail():
  rng = np.random.default_rng(15)
  _, ids, lp, _ = make_teacher(rng, (3,), 10, 4)
  with pytest.raises(ValueError, match="tail mass at that temperature"):
    losses.per_token_divergence(f32(rng.normal(size=(3, 10))), ids, f32(lp), None,
                                cfg_for("reverse_kl", temperature=2.0))


def test_full_k_equals_dense():
  rng = np.random.default_rng(5)
  vocab = 9
  logits = f32(rng.normal(size=(3, 4, vocab)) * 2)
  full, *_ = make_teacher(rng, (3, 4), vocab, 1)
  ids = np.argsort(rng.random((3, 4, vocab)), axis=-1).astype(np.int32)  # random order: order-invariant
  lp = np.take_along_axis(full, ids, -1)
  dense_cases = [(name, t) for name in KD_DIVERGENCES for t in (1.0, 2.0)]
  dense = dict(zip(dense_cases, dense_many(logits, f32(full), tuple(
      cfg_for(name, temperature=t) for name, t in dense_cases))))
  # k = V: the tail is 0 at every temperature; derived from the top-k (no tail given) only at T = 1.
  sparse_cases = [(name, t, mode, use_tail) for name, t in dense_cases for mode in losses.TOPK_MODES
                  for use_tail in ((False, True) if mode == "tail" and t == 1.0 else (True,))]
  sparse = sparse_many(logits, ids, f32(lp), f32(np.full((3, 4), -np.inf)), tuple(
      (cfg_for(name, temperature=t, topk_mode=mode), use_tail) for name, t, mode, use_tail in sparse_cases))
  for (name, t, mode, use_tail), value in zip(sparse_cases, sparse):
    assert np.all(np.asarray(dense[name, t]) > 1e-3)
    np.testing.assert_allclose(value, dense[name, t], rtol=1e-5, atol=2e-6,
                               err_msg=f"{name} T={t} {mode} tail={use_tail}")


def test_identical_distribution_gives_zero():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(4, 6, 40)) * 3
  # The teacher's top-k log-probs are exactly the student's own log-probs at those ids.
  student_lp = np_log_softmax(logits)
  ids = np.argsort(-student_lp, -1)[..., :8].astype(np.int32)
  lp = np.take_along_axis(student_lp, ids, -1)
  temperatures = (1.0, 2.0, 5.94)
  tails = np.stack([np_log_tail(logits, ids, t) for t in temperatures])
  assert np.all(tails > np.log(1e-3))  # the tail bucket is really in play
  cases = [(name, mode, t) for name in KD_DIVERGENCES for mode in losses.TOPK_MODES for t in range(3)]

  @functools.partial(jax.jit, static_argnames="cfgs")
  def run(logits, tails, cfgs):
    return [losses.per_token_divergence(logits, ids, f32(lp), tails[t], cfg) for cfg, t in cfgs]

  got = run(f32(logits), f32(tails), tuple(
      (cfg_for(name, temperature=temperatures[t], scale_by_t2=False, topk_mode=mode), t) for name, mode, t in cases))
  for case, value in zip(cases, got):
    assert np.max(np.abs(np.asarray(value))) < 1e-6, case


def test_neg_inf_teacher_logprobs_stay_finite():
  """Padding entries (-inf log-prob) carry zero teacher mass: finite loss and gradients."""
  rng = np.random.default_rng(7)
  logits = f32(rng.normal(size=(3, 10)))
  _, ids, lp, _ = make_teacher(rng, (3,), 10, 4)
  lp[:, -1] = -np.inf
  cfgs = [cfg_for(name, topk_mode=mode) for name in ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")
          for mode in losses.TOPK_MODES]

  @jax.jit
  def values_and_grads(z):
    return [jax.value_and_grad(lambda x, c=c: losses.per_token_divergence(x, ids, f32(lp), None, c).sum())(z)
            for c in cfgs]

  for cfg, (value, grad) in zip(cfgs, values_and_grads(logits)):
    assert np.isfinite(value) and np.all(np.isfinite(grad)), cfg


# ----------------------------------------------------------------------------------------------------------
# Gradients (float64)


def test_forward_kl_gradient_is_q_minus_p_over_t():
  rng = np.random.default_rng(8)
  temperature = 1.5
  logits = rng.normal(size=(5, 7)) * 2
  teacher = np_log_softmax(rng.normal(size=(5, 7)) * 2)
  with jax.enable_x64(True):
    cfgs = [cfg_for("forward_kl", temperature=temperature, scale_by_t2=scale) for scale in (False, True)]
    grad_fn = jax.jit(lambda z, t: [jax.grad(lambda x, c=c: losses.dense_divergence(x, t, c).sum())(z)
                                    for c in cfgs])
    grad, grad_scaled = grad_fn(jnp.asarray(logits), jnp.asarray(teacher))
    assert grad.dtype == jnp.float64
  q = np.exp(np_log_softmax(logits / temperature))
  p = np.exp(np_log_softmax(teacher / temperature))
  np.testing.assert_allclose(grad, (q - p) / temperature, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(grad_scaled, temperature * (q - p), rtol=1e-10, atol=1e-12)


def test_sparse_gradients_match_finite_differences():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 8)) * 1.5
  _, ids, lp, tail = make_teacher(rng, (2,), 8, 3, temperature=1.3)
  cases = [(name, mode) for name in KD_DIVERGENCES for mode in losses.TOPK_MODES]
  eps = 1e-6
  steps = eps * np.eye(logits.size).reshape((logits.size,) + logits.shape)
  with jax.enable_x64(True):
    cfgs = [cfg_for(name, beta=0.3, skew_alpha=0.25, temperature=1.3, topk_mode=mode) for name, mode in cases]

    def loss_per_cfg(z):
      return jnp.stack([losses.per_token_divergence(z, jnp.asarray(ids), jnp.asarray(lp), jnp.asarray(tail),
                                                    cfg).sum() for cfg in cfgs])

    @jax.jit
    def analytic_and_numeric(z):
      numeric = (jax.vmap(loss_per_cfg)(z + steps) - jax.vmap(loss_per_cfg)(z - steps)) / (2 * eps)
      return jax.jacrev(loss_per_cfg)(z), numeric.T.reshape((len(cfgs),) + z.shape)

    analytic, numeric = analytic_and_numeric(jnp.asarray(logits))
    assert analytic.dtype == jnp.float64
  for case, got, want in zip(cases, np.asarray(analytic), np.asarray(numeric)):
    assert np.max(np.abs(want)) > 1e-3, case
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8, err_msg=str(case))


# ----------------------------------------------------------------------------------------------------------
# Chunked distill_loss


def make_batch(rng, batch_size=2, seq_len=7, dim=6, vocab=13, k=4, temperature=1.0):
  """(hidden, lm_head, batch with the teacher's tail at `temperature`, the teacher's full log-probs)."""
  hidden = rng.normal(size=(batch_size, seq_len, dim))
  lm_head = rng.normal(size=(dim, vocab)) / np.sqrt(dim) * 2
  full, ids, lp, tail = make_teacher(rng, (batch_size, seq_len), vocab, k, temperature=temperature)
  mask = rng.random((batch_size, seq_len)) > 0.3
  mask[0, 0] = False
  mask[1, -1] = True
  batch = {"target_ids": rng.integers(0, vocab, (batch_size, seq_len)).astype(np.int32), "loss_mask": mask,
           "teacher_ids": ids.astype(np.int32), "teacher_logprobs": lp.astype(np.float32),
           "teacher_log_tail": tail.astype(np.float32)}
  return hidden, lm_head, batch, full


def np_distill_sums(hidden, lm_head, batch, teacher_full, cfg):
  logits = np.einsum("bsd,dv->bsv", hidden, lm_head)
  mask = np.asarray(batch["loss_mask"], np.float64)
  log_q1 = np_log_softmax(logits)
  ce = -np.take_along_axis(log_q1, batch["target_ids"][..., None], -1)[..., 0]
  p, q = np_coarse_buckets(logits, teacher_full, batch["teacher_ids"], cfg.temperature, cfg.topk_mode)
  kd = np_divergence(p, q, cfg.divergence, cfg.beta, cfg.skew_alpha)
  if cfg.scale_by_t2:
    kd = kd * cfg.temperature ** 2
  return (mask * kd).sum(), (mask * ce).sum(), mask.sum()


def direct_total(hidden, lm_head, batch, cfg):
  """Unchunked jax computation of the same token-mean total loss."""
  logits = jnp.einsum("bsd,dv->bsv", hidden, lm_head)
  mask = jnp.asarray(batch["loss_mask"], jnp.float32)
  kd = losses.per_token_divergence(logits, batch["teacher_ids"], batch["teacher_logprobs"],
                                   batch.get("teacher_log_tail"), cfg)
  ce = losses.token_cross_entropy(logits, batch["target_ids"])
  return ((1 - cfg.ce_weight) * (mask * kd).sum() + cfg.ce_weight * (mask * ce).sum()) / mask.sum()


def chunked_total(hidden, lm_head, batch, cfg, chunk_size, residual_budget_bytes=losses.DEFAULT_RESIDUAL_BUDGET):
  sums, metrics = losses.distill_loss(hidden, lm_head, batch, cfg, chunk_size=chunk_size,
                                      residual_budget_bytes=residual_budget_bytes)
  return losses.total_loss(sums, cfg), (sums, metrics)


def test_distill_loss_chunked_matches_direct():
  rng = np.random.default_rng(10)
  hidden, lm_head, batch, full = make_batch(rng, temperature=1.5)  # 14 tokens
  cfg_tail = cfg_for("forward_kl", temperature=1.5, ce_weight=0.3, topk_mode="tail")
  cfg_renorm = cfg_for("skew_reverse_kl", temperature=1.5, ce_weight=0.3, topk_mode="renormalize")
  # 4 does not divide 14; 7 does; 64 exceeds it (one chunk of 14).
  cases = [(cfg_tail, 4), (cfg_tail, 7), (cfg_renorm, 64)]

  @jax.jit
  def run(h, w):
    direct = [jax.grad(direct_total, argnums=(0, 1))(h, w, batch, cfg) for cfg in (cfg_tail, cfg_renorm)]
    chunked = [jax.grad(chunked_total, argnums=(0, 1), has_aux=True)(h, w, batch, cfg, size)
               for cfg, size in cases]
    return direct, chunked

  direct, chunked = run(f32(hidden), f32(lm_head))
  for (cfg, size), (grads, (sums, metrics)) in zip(cases, chunked):
    kd_want, ce_want, n_want = np_distill_sums(hidden, lm_head, batch, full, cfg)
    np.testing.assert_allclose(sums.kd_sum, kd_want, rtol=2e-5, err_msg=f"{cfg.divergence} {size}")
    np.testing.assert_allclose(sums.ce_sum, ce_want, rtol=2e-5, err_msg=f"{cfg.divergence} {size}")
    assert float(sums.num_tokens) == n_want
    for got, want in zip(grads, direct[0 if cfg is cfg_tail else 1]):
      assert np.max(np.abs(np.asarray(want))) > 1e-3
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"{cfg.divergence} {size}")
    # Metrics are loss-token sums too.
    logits = np.einsum("bsd,dv->bsv", hidden, lm_head)
    mask = batch["loss_mask"]
    assert float(metrics["student_target_acc_sum"]) == ((logits.argmax(-1) == batch["target_ids"]) & mask).sum()
    assert float(metrics["teacher_top1_agree_sum"]) == (
        (logits.argmax(-1) == batch["teacher_ids"][..., 0]) & mask).sum()
    np.testing.assert_allclose(metrics["teacher_topk_mass_sum"],
                               (np.exp(batch["teacher_logprobs"]).sum(-1) * mask).sum(), rtol=1e-5)
    student_mass = np.take_along_axis(np.exp(np_log_softmax(logits)), batch["teacher_ids"], -1).sum(-1)
    np.testing.assert_allclose(metrics["student_topk_mass_sum"], (student_mass * mask).sum(), rtol=1e-5)


def _loss_grad_temp_bytes(residual_budget_bytes: int) -> tuple[int, int, int]:
  """(XLA's temp bytes for loss + gradients, one [B*S, V] float32 buffer, one [chunk, V] float32 buffer)."""
  dim, vocab, k, chunk_size = 16, 8192, 8, 32
  batch_size, seq_len = 4, 256
  spec = jax.ShapeDtypeStruct
  batch = {"target_ids": spec((batch_size, seq_len), jnp.int32), "loss_mask": spec((batch_size, seq_len), bool),
           "teacher_ids": spec((batch_size, seq_len, k), jnp.int32),
           "teacher_logprobs": spec((batch_size, seq_len, k), jnp.float32),
           "teacher_log_tail": spec((batch_size, seq_len), jnp.float32)}
  cfg = cfg_for("jsd", temperature=2.0, ce_weight=0.5)
  grad_fn = jax.jit(jax.grad(
      lambda h, w, b: chunked_total(h, w, b, cfg, chunk_size, residual_budget_bytes)[0], argnums=(0, 1)))
  compiled = grad_fn.lower(spec((batch_size, seq_len, dim), jnp.float32), spec((dim, vocab), jnp.float32),
                           batch).compile()
  return (compiled.memory_analysis().temp_size_in_bytes, batch_size * seq_len * vocab * 4,
          chunk_size * vocab * 4)


def test_distill_loss_memory_does_not_scale_with_tokens_times_vocab():
  """Over the residual budget, XLA's buffer plan stays far below one [B*S, V] float32 logits buffer."""
  temp_bytes, full_logits_bytes, chunk_logits_bytes = _loss_grad_temp_bytes(residual_budget_bytes=0)
  assert temp_bytes < full_logits_bytes / 4
  assert temp_bytes < 12 * chunk_logits_bytes


def test_distill_loss_keeps_residuals_under_the_budget_with_equal_gradients():
  """Under the budget the chunks' residuals are kept (no recomputation); values and gradients do not change."""
  temp_bytes, full_logits_bytes, _ = _loss_grad_temp_bytes(residual_budget_bytes=1 << 30)
  assert temp_bytes >= full_logits_bytes
  rng = np.random.default_rng(13)
  hidden, lm_head, batch, full = make_batch(rng)
  cfg = cfg_for("forward_kl", ce_weight=0.3, topk_mode="tail")
  results = [jax.jit(jax.value_and_grad(chunked_total, argnums=(0, 1), has_aux=True), static_argnums=(3, 4, 5))(
      f32(hidden), f32(lm_head), batch, cfg, 4, budget) for budget in (0, 1 << 30)]
  (recomputed, _), grads_recomputed = results[0]
  (kept, _), grads_kept = results[1]
  np.testing.assert_allclose(kept, recomputed, rtol=1e-6)
  for a, b in zip(grads_kept, grads_recomputed):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_masked_positions_get_zero_gradient_even_with_garbage():
  rng = np.random.default_rng(11)
  hidden, lm_head, batch, full = make_batch(rng)
  mask = batch["loss_mask"]
  # Garbage teacher data where the mask is off must not leak into values or gradients.
  batch["teacher_logprobs"] = np.where(mask[..., None], batch["teacher_logprobs"], np.nan).astype(np.float32)
  batch["teacher_ids"] = np.where(mask[..., None], batch["teacher_ids"], 10_000).astype(np.int32)
  batch["teacher_log_tail"] = np.where(mask, batch["teacher_log_tail"], np.nan).astype(np.float32)
  cfgs = [cfg_for("reverse_kl", ce_weight=0.5)]  # reverse KL: the direction where 0 * inf could appear
  run = jax.jit(lambda h, w: [jax.value_and_grad(chunked_total, argnums=(0, 1), has_aux=True)(h, w, batch, c, 3)
                              for c in cfgs])
  for cfg, ((loss, _), (grad_hidden, grad_head)) in zip(cfgs, run(f32(hidden), f32(lm_head))):
    assert np.isfinite(loss) and np.all(np.isfinite(grad_head)), cfg
    grad_hidden = np.asarray(grad_hidden)
    assert np.all(grad_hidden[~mask] == 0.0)
    assert np.all(np.abs(grad_hidden[mask]).sum(-1) > 0)


def test_divergence_none_is_plain_cross_entropy_and_needs_no_teacher():
  rng = np.random.default_rng(12)
  hidden, lm_head, batch, full = make_batch(rng)
  cfg = cfg_for("none", ce_weight=1.0)
  sft_batch = {key: batch[key] for key in ("target_ids", "loss_mask")}
  sums, metrics = jax.jit(functools.partial(losses.distill_loss, cfg=cfg, chunk_size=5))(
      f32(hidden), f32(lm_head), sft_batch)
  _, ce_want, n_want = np_distill_sums(hidden, lm_head, batch, full, cfg_for("forward_kl"))
  assert float(sums.kd_sum) == 0.0
  np.testing.assert_allclose(sums.ce_sum, ce_want, rtol=2e-5)
  np.testing.assert_allclose(losses.total_loss(sums, cfg), ce_want / n_want, rtol=2e-5)
  assert "teacher_top1_agree_sum" not in metrics


def test_total_loss_combines_token_means():
  sums = losses.LossSums(kd_sum=jnp.float32(6.0), ce_sum=jnp.float32(2.0), num_tokens=jnp.float32(4.0))
  np.testing.assert_allclose(losses.total_loss(sums, cfg_for("forward_kl", ce_weight=0.25)),
                             (0.75 * 6.0 + 0.25 * 2.0) / 4.0)
  empty = losses.LossSums(jnp.float32(0.0), jnp.float32(0.0), jnp.float32(0.0))
  assert float(losses.total_loss(empty, cfg_for("forward_kl"))) == 0.0


def test_bfloat16_inputs_give_float32_sums():
  rng = np.random.default_rng(13)
  hidden, lm_head, batch, full = make_batch(rng)
  cfg = cfg_for("forward_kl")
  sums, _ = jax.jit(functools.partial(losses.distill_loss, cfg=cfg, chunk_size=4))(
      jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(lm_head, jnp.bfloat16), batch)
  assert sums.kd_sum.dtype == jnp.float32
  kd_want, _, _ = np_distill_sums(hidden, lm_head, batch, full, cfg)
  np.testing.assert_allclose(sums.kd_sum, kd_want, rtol=5e-2)


# ----------------------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("kwargs", [{"divergence": "kl"}, {"topk_mode": "dense"}, {"beta": 1.5},
                                    {"skew_alpha": 1.0}, {"temperature": 0.0}, {"ce_weight": -0.1},
                                    {"divergence": "none", "ce_weight": 0.5}])
def test_config_rejects_bad_values(kwargs):
  with pytest.raises(ValueError):
    losses.LossConfig(**kwargs)


def test_distill_loss_rejects_bad_batches():
  rng = np.random.default_rng(14)
  hidden, lm_head, batch, full = make_batch(rng)
  cfg = cfg_for("forward_kl")
  with pytest.raises(KeyError, match="teacher_logprobs"):
    losses.distill_loss(f32(hidden), f32(lm_head), {k: v for k, v in batch.items() if k != "teacher_logprobs"},
                        cfg)
  with pytest.raises(ValueError, match="lm_head"):
    losses.distill_loss(f32(hidden), f32(lm_head.T), batch, cfg)
  with pytest.raises(ValueError, match="chunk_size"):
    losses.distill_loss(f32(hidden), f32(lm_head), batch, cfg, chunk_size=0)
  with pytest.raises(ValueError, match="loss_mask"):
    losses.distill_loss(f32(hidden), f32(lm_head), {**batch, "loss_mask": batch["loss_mask"][:, :3]}, cfg)


# ----------------------------------------------------------------------------------------------------------
# The authors' loss (distill.ipynb of arXiv 2412.17846) in the paper configs

AUTHORS_TEMPERATURE = 5.942267335064758
AUTHORS_ALPHA = 0.6093348343631224  # CE weight
PAPER_KD_CONFIGS = ("base", "teacher", "gt", "confidence", "gold_hint")


def _config_file(name):
  import pathlib
  from kdjax.experiment.config import sibling_config
  return sibling_config(str(pathlib.Path(__file__).parents[2] / "configs" / "gt.py"), name)


def np_authors_loss_and_grads(hidden, lm_head, teacher_logits, targets, mask, temperature, alpha):
  """alpha * CE + (1 - alpha) * T**2 * KL(p_student || p_teacher), token mean over `mask`, and its gradients
  with respect to `hidden` and `lm_head`: float64, from the definitions (softmax, KL, the chain rule by hand)."""
  z = np.einsum("bsd,dv->bsv", hidden, lm_head)
  log_q_t = np_log_softmax(z / temperature)
  log_p_t = np_log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
  q_t = np.exp(log_q_t)
  kl = np.sum(q_t * (log_q_t - log_p_t), axis=-1)
  log_q1 = np_log_softmax(z)
  onehot = np.eye(z.shape[-1])[targets]
  ce = -np.sum(onehot * log_q1, axis=-1)
  w = np.asarray(mask, np.float64) / np.sum(mask)
  loss = np.sum(w * (alpha * ce + (1 - alpha) * temperature ** 2 * kl))
  # d CE / dz = softmax(z) - onehot;  d KL(q_T || p_T) / dz = q_T * (log q_T - log p_T - KL) / T
  d_ce = np.exp(log_q1) - onehot
  d_kl = q_t * (log_q_t - log_p_t - kl[..., None]) / temperature
  d_z = w[..., None] * (alpha * d_ce + (1 - alpha) * temperature ** 2 * d_kl)
  return loss, np.einsum("bsv,dv->bsd", d_z, lm_head), np.einsum("bsd,bsv->dv", hidden, d_z)


@pytest.mark.parametrize("name", PAPER_KD_CONFIGS)
def test_paper_configs_use_the_authors_loss(name):
  """Every paper kd arm: reverse KL, T**2 scaling, the authors' T and alpha to the digit, tail mode."""
  from kdjax.experiment import settings
  c = _config_file(name)
  cfg = settings.loss_config(c, "kd")
  assert (cfg.divergence, cfg.scale_by_t2, cfg.topk_mode) == ("reverse_kl", True, "tail")
  assert cfg.temperature == AUTHORS_TEMPERATURE and cfg.ce_weight == AUTHORS_ALPHA


def test_paper_loss_equals_the_authors_formula_in_float64():
  """kdjax's loss and gradient at the paper config equal the authors' formula on full-vocabulary logits.

  top-k = the whole vocabulary, where tail mode is exact (the stored tail is empty): the only difference left is
  MIN_TAIL_MASS in the empty rest bucket, ~1e-8 relative."""
  c = _config_file("gt")
  from kdjax.experiment import settings
  cfg = settings.loss_config(c, "kd")
  rng = np.random.default_rng(24)
  batch_size, seq_len, dim, vocab = 2, 5, 8, 17
  hidden = rng.normal(size=(batch_size, seq_len, dim))
  lm_head = rng.normal(size=(dim, vocab)) * 1.5
  teacher_logits = rng.normal(size=(batch_size, seq_len, vocab)) * 4.0
  targets = rng.integers(0, vocab, (batch_size, seq_len))
  mask = rng.random((batch_size, seq_len)) > 0.25
  mask[0, 0] = True
  ids = np.argsort(-teacher_logits, axis=-1)  # every id, the teacher's ranking: k = V
  lp = np.take_along_axis(np_log_softmax(teacher_logits), ids, axis=-1)
  want_loss, want_dh, want_dw = np_authors_loss_and_grads(hidden, lm_head, teacher_logits, targets, mask,
                                                          AUTHORS_TEMPERATURE, AUTHORS_ALPHA)
  with jax.enable_x64(True):
    batch = {"target_ids": jnp.asarray(targets, jnp.int32), "loss_mask": jnp.asarray(mask),
             "teacher_ids": jnp.asarray(ids, jnp.int32), "teacher_logprobs": jnp.asarray(lp, jnp.float64),
             "teacher_log_tail": jnp.full((batch_size, seq_len), -jnp.inf, jnp.float64)}  # nothing outside k = V

    def loss(h, w):
      sums, _ = losses.distill_loss(h, w, batch, cfg, chunk_size=4)
      return losses.total_loss(sums, cfg)

    got_loss, (got_dh, got_dw) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(lm_head))
    assert got_loss.dtype == jnp.float64
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-7)
  np.testing.assert_allclose(got_dh, want_dh, rtol=1e-6, atol=1e-10)
  np.testing.assert_allclose(got_dw, want_dw, rtol=1e-6, atol=1e-10)
  # The KD term is not negligible next to CE here: without T**2 the loss would differ by far more than rtol.
  kd_share = 1 - AUTHORS_ALPHA * np.sum(mask * -np.take_along_axis(
      np_log_softmax(np.einsum("bsd,dv->bsv", hidden, lm_head)), targets[..., None], -1)[..., 0]) / mask.sum() / want_loss
  assert kd_share > 0.1
