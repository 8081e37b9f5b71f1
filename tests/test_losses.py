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


def np_sparse_buckets(student_logits, ids, teacher_lp, tail, temperature, mode):
  """(p, q) bucket distributions for a sparse teacher, written from the definitions."""
  q_full = np.exp(np_log_softmax(np.asarray(student_logits, np.float64) / temperature))
  q_ids = np.take_along_axis(q_full, ids, -1)
  teacher_lp = np.asarray(teacher_lp, np.float64)
  if mode == "renormalize":
    p = np.exp(teacher_lp / temperature)
    return p / p.sum(-1, keepdims=True), q_ids / q_ids.sum(-1, keepdims=True)
  if tail is None:
    tail = 1.0 - np.exp(teacher_lp).sum(-1)
  tail = np.clip(np.asarray(tail, np.float64), 0.0, None)
  p = np.concatenate([np.exp(teacher_lp / temperature), (tail ** (1.0 / temperature))[..., None]], -1)
  q = np.concatenate([q_ids, 1.0 - q_ids.sum(-1, keepdims=True)], -1)
  return p / p.sum(-1, keepdims=True), q


def make_teacher(rng, shape, vocab, k, spread=2.0):
  """Random full teacher log-probs and their top-k (ids, log-probs, tail) in float64."""
  full = np_log_softmax(rng.normal(size=shape + (vocab,)) * spread)
  ids = np.argsort(-full, axis=-1)[..., :k]
  lp = np.take_along_axis(full, ids, -1)
  return full, ids, lp, 1.0 - np.exp(lp).sum(-1)


def cfg_for(name, **kw):
  return losses.LossConfig(divergence=name, **kw)


@functools.partial(jax.jit, static_argnames="cfg")
def jit_sparse(logits, ids, lp, tail, cfg):
  return losses.per_token_divergence(logits, ids, lp, tail, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def jit_dense(logits, teacher_full, cfg):
  return losses.dense_divergence(logits, teacher_full, cfg)


f32 = functools.partial(jnp.asarray, dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Dense divergences


@pytest.mark.parametrize("name", KD_DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_matches_numpy(name, temperature):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 11)) * 2
  teacher_full, *_ = make_teacher(rng, (3, 4), 11, 1)
  cfg = cfg_for(name, beta=0.3, skew_alpha=0.2, temperature=temperature, scale_by_t2=False)
  got = jit_dense(f32(logits), f32(teacher_full), cfg)
  p = np.exp(np_log_softmax(teacher_full / temperature))
  q = np.exp(np_log_softmax(logits / temperature))
  want = np_divergence(p, q, name, beta=0.3, alpha=0.2)
  assert np.all(want > 1e-3)  # a real, non-trivial comparison
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_hand_computed_values():
  # p = (0.5, 0.5), q = (0.9, 0.1).
  logits = f32(np.log([[0.9, 0.1]]))
  teacher = f32(np.log([[0.5, 0.5]]))
  fwd = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
  rev = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
  np.testing.assert_allclose(jit_dense(logits, teacher, cfg_for("forward_kl")), [fwd], rtol=1e-6)
  np.testing.assert_allclose(jit_dense(logits, teacher, cfg_for("reverse_kl")), [rev], rtol=1e-6)
  np.testing.assert_allclose(jit_dense(logits, teacher, cfg_for("tv")), [0.4], rtol=1e-6)
  # JSD(0.5): m = (0.7, 0.3).
  jsd = 0.5 * (0.5 * np.log(0.5 / 0.7) + 0.5 * np.log(0.5 / 0.3)) + 0.5 * (
      0.9 * np.log(0.9 / 0.7) + 0.1 * np.log(0.1 / 0.3))
  np.testing.assert_allclose(jit_dense(logits, teacher, cfg_for("jsd", beta=0.5)), [jsd], rtol=1e-6)


def test_jsd_beta_is_teacher_weight_like_trl():
  """TRL: mixture = beta * teacher + (1 - beta) * student; jsd = beta * KL(teacher || m) + (1-beta) KL(student || m).

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
  got = jit_dense(f32(student), f32(teacher), cfg_for("jsd", beta=beta))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # beta is not symmetric: swapping it for 1 - beta gives a different value on these distributions.
  swapped = jit_dense(f32(student), f32(teacher), cfg_for("jsd", beta=1 - beta))
  assert np.max(np.abs(np.asarray(swapped) - want)) > 1e-3


def test_jsd_endpoints_and_skew_zero_are_plain_kl():
  rng = np.random.default_rng(2)
  logits = f32(rng.normal(size=(4, 10)) * 2)
  teacher = f32(np_log_softmax(rng.normal(size=(4, 10)) * 2))
  fwd = jit_dense(logits, teacher, cfg_for("forward_kl"))
  rev = jit_dense(logits, teacher, cfg_for("reverse_kl"))
  assert np.max(np.abs(np.asarray(fwd) - np.asarray(rev))) > 1e-2
  np.testing.assert_allclose(jit_dense(logits, teacher, cfg_for("jsd", beta=0.0)), fwd, rtol=1e-6)
  np.testing.assert_allclose(jit_dense(logits, teacher, cfg_for("jsd", beta=1.0)), rev, rtol=1e-6)
  np.testing.assert_allclose(jit_dense(logits, teacher, cfg_for("skew_forward_kl", skew_alpha=0.0)), fwd,
                             rtol=1e-6)
  np.testing.assert_allclose(jit_dense(logits, teacher, cfg_for("skew_reverse_kl", skew_alpha=0.0)), rev,
                             rtol=1e-6)


def test_temperature_and_t2_scaling():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 12)) * 3
  _, ids, lp, tail = make_teacher(rng, (6,), 12, 5)
  temperature = 2.0
  for mode in losses.TOPK_MODES:
    plain = cfg_for("forward_kl", temperature=temperature, scale_by_t2=False, topk_mode=mode)
    scaled = cfg_for("forward_kl", temperature=temperature, scale_by_t2=True, topk_mode=mode)
    got_plain = jit_sparse(f32(logits), ids, f32(lp), f32(tail), plain)
    got_scaled = jit_sparse(f32(logits), ids, f32(lp), f32(tail), scaled)
    p, q = np_sparse_buckets(logits, ids, lp, tail, temperature, mode)
    np.testing.assert_allclose(got_plain, np_kl(p, q), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got_scaled, temperature ** 2 * np_kl(p, q), rtol=2e-5, atol=4e-6)
    # T = 1 differs from T = 2 (the temperature is really applied).
    p1, q1 = np_sparse_buckets(logits, ids, lp, tail, 1.0, mode)
    assert np.max(np.abs(np_kl(p1, q1) - np_kl(p, q))) > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Sparse top-k


@pytest.mark.parametrize("name", KD_DIVERGENCES)
@pytest.mark.parametrize("mode", losses.TOPK_MODES)
def test_sparse_matches_numpy(name, mode):
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 17)) * 2
  _, ids, lp, tail = make_teacher(rng, (2, 5), 17, 4)
  ids = ids.astype(np.int32)
  for temperature in (1.0, 1.7):
    cfg = cfg_for(name, beta=0.4, skew_alpha=0.3, temperature=temperature, scale_by_t2=False, topk_mode=mode)
    p, q = np_sparse_buckets(logits, ids, lp, tail, temperature, mode)
    want = np_divergence(p, q, name, beta=0.4, alpha=0.3)
    assert np.all(want > 1e-4)
    got_given_tail = jit_sparse(f32(logits), ids, f32(lp), f32(tail), cfg)
    got_derived_tail = jit_sparse(f32(logits), ids, f32(lp), None, cfg)
    np.testing.assert_allclose(got_given_tail, want, rtol=5e-5, atol=2e-6)
    np.testing.assert_allclose(got_derived_tail, want, rtol=5e-5, atol=2e-6)


@pytest.mark.parametrize("name", KD_DIVERGENCES)
def test_full_k_equals_dense(name):
  rng = np.random.default_rng(5)
  vocab = 9
  logits = f32(rng.normal(size=(3, 4, vocab)) * 2)
  full, *_ = make_teacher(rng, (3, 4), vocab, 1)
  ids = np.argsort(rng.random((3, 4, vocab)), axis=-1).astype(np.int32)  # random order: order-invariant
  lp = np.take_along_axis(full, ids, -1)
  for temperature in (1.0, 2.0):
    dense = jit_dense(logits, f32(full), cfg_for(name, temperature=temperature))
    assert np.all(np.asarray(dense) > 1e-3)
    for mode in losses.TOPK_MODES:
      cfg = cfg_for(name, temperature=temperature, topk_mode=mode)
      for tail in (None, f32(np.zeros((3, 4)))):
        np.testing.assert_allclose(jit_sparse(logits, ids, f32(lp), tail, cfg), dense, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("mode", losses.TOPK_MODES)
def test_identical_distribution_gives_zero(mode):
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(4, 6, 40)) * 3
  # The teacher's top-k log-probs are exactly the student's own log-probs at those ids.
  student_lp = np_log_softmax(logits)
  ids = np.argsort(-student_lp, -1)[..., :8].astype(np.int32)
  lp = np.take_along_axis(student_lp, ids, -1)
  assert np.all(1.0 - np.exp(lp).sum(-1) > 1e-3)  # the tail bucket is really in play
  for name in KD_DIVERGENCES:
    got = jit_sparse(f32(logits), ids, f32(lp), None, cfg_for(name, topk_mode=mode))
    assert np.max(np.abs(np.asarray(got))) < 1e-6, name
  # Renormalize mode restricts the tempered teacher exactly, so it stays 0 at T != 1 as well.
  if mode == "renormalize":
    got = jit_sparse(f32(logits), ids, f32(lp), None, cfg_for("forward_kl", temperature=3.0, topk_mode=mode))
    assert np.max(np.abs(np.asarray(got))) < 1e-6


def test_neg_inf_teacher_logprobs_stay_finite_for_forward_kl():
  """Padding entries (-inf log-prob) carry zero teacher mass: finite loss and gradients."""
  rng = np.random.default_rng(7)
  logits = f32(rng.normal(size=(3, 10)))
  _, ids, lp, _ = make_teacher(rng, (3,), 10, 4)
  lp[:, -1] = -np.inf
  for name in ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"):
    for mode in losses.TOPK_MODES:
      cfg = cfg_for(name, topk_mode=mode)
      value, grad = jax.value_and_grad(lambda z: jit_sparse(z, ids, f32(lp), None, cfg).sum())(logits)
      assert np.isfinite(value) and np.all(np.isfinite(grad)), (name, mode)


# ----------------------------------------------------------------------------------------------------------
# Gradients (float64)


def test_forward_kl_gradient_is_q_minus_p_over_t():
  rng = np.random.default_rng(8)
  temperature = 1.5
  logits = rng.normal(size=(5, 7)) * 2
  teacher = np_log_softmax(rng.normal(size=(5, 7)) * 2)
  with jax.enable_x64(True):
    cfg = cfg_for("forward_kl", temperature=temperature, scale_by_t2=False)
    grad = jax.grad(lambda z: losses.dense_divergence(z, jnp.asarray(teacher), cfg).sum())(jnp.asarray(logits))
    assert grad.dtype == jnp.float64
    scaled_cfg = cfg_for("forward_kl", temperature=temperature, scale_by_t2=True)
    grad_scaled = jax.grad(lambda z: losses.dense_divergence(z, jnp.asarray(teacher), scaled_cfg).sum())(
        jnp.asarray(logits))
  q = np.exp(np_log_softmax(logits / temperature))
  p = np.exp(np_log_softmax(teacher / temperature))
  np.testing.assert_allclose(grad, (q - p) / temperature, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(grad_scaled, temperature * (q - p), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", KD_DIVERGENCES)
def test_sparse_gradient_matches_finite_differences(name):
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 8)) * 1.5
  _, ids, lp, tail = make_teacher(rng, (2,), 8, 3)
  with jax.enable_x64(True):
    for mode in losses.TOPK_MODES:
      cfg = cfg_for(name, beta=0.3, skew_alpha=0.25, temperature=1.3, topk_mode=mode)
      loss = jax.jit(lambda z: losses.per_token_divergence(z, jnp.asarray(ids), jnp.asarray(lp),
                                                          jnp.asarray(tail), cfg).sum())
      grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
      assert grad.dtype == np.float64
      eps = 1e-6
      numeric = np.zeros_like(logits)
      for index in np.ndindex(logits.shape):
        step = np.zeros_like(logits)
        step[index] = eps
        numeric[index] = (float(loss(jnp.asarray(logits + step))) - float(loss(jnp.asarray(logits - step)))) / (
            2 * eps)
      assert np.max(np.abs(numeric)) > 1e-3
      np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8, err_msg=f"{name} {mode}")


# ----------------------------------------------------------------------------------------------------------
# Chunked distill_loss


def make_batch(rng, batch_size=2, seq_len=7, dim=6, vocab=13, k=4):
  hidden = rng.normal(size=(batch_size, seq_len, dim))
  lm_head = rng.normal(size=(dim, vocab)) / np.sqrt(dim) * 2
  _, ids, lp, tail = make_teacher(rng, (batch_size, seq_len), vocab, k)
  mask = rng.random((batch_size, seq_len)) > 0.3
  mask[0, 0] = False
  mask[1, -1] = True
  batch = {"target_ids": rng.integers(0, vocab, (batch_size, seq_len)).astype(np.int32), "loss_mask": mask,
           "teacher_ids": ids.astype(np.int32), "teacher_logprobs": lp.astype(np.float32),
           "teacher_tail": tail.astype(np.float32)}
  return hidden, lm_head, batch


def np_distill_sums(hidden, lm_head, batch, cfg):
  logits = np.einsum("bsd,dv->bsv", hidden, lm_head)
  mask = np.asarray(batch["loss_mask"], np.float64)
  log_q1 = np_log_softmax(logits)
  ce = -np.take_along_axis(log_q1, batch["target_ids"][..., None], -1)[..., 0]
  p, q = np_sparse_buckets(logits, batch["teacher_ids"], batch["teacher_logprobs"], batch.get("teacher_tail"),
                           cfg.temperature, cfg.topk_mode)
  kd = np_divergence(p, q, cfg.divergence, cfg.beta, cfg.skew_alpha)
  if cfg.scale_by_t2:
    kd = kd * cfg.temperature ** 2
  return (mask * kd).sum(), (mask * ce).sum(), mask.sum()


def direct_total(hidden, lm_head, batch, cfg):
  """Unchunked jax computation of the same token-mean total loss."""
  logits = jnp.einsum("bsd,dv->bsv", hidden, lm_head)
  mask = jnp.asarray(batch["loss_mask"], jnp.float32)
  kd = losses.per_token_divergence(logits, batch["teacher_ids"], batch["teacher_logprobs"],
                                   batch.get("teacher_tail"), cfg)
  ce = losses.token_cross_entropy(logits, batch["target_ids"])
  return ((1 - cfg.ce_weight) * (mask * kd).sum() + cfg.ce_weight * (mask * ce).sum()) / mask.sum()


def chunked_total(hidden, lm_head, batch, cfg, chunk_size):
  sums, _ = losses.distill_loss(hidden, lm_head, batch, cfg, chunk_size=chunk_size)
  return losses.total_loss(sums, cfg)


@pytest.mark.parametrize("name,mode", [("forward_kl", "tail"), ("jsd", "renormalize"), ("skew_reverse_kl", "tail")])
def test_distill_loss_chunked_matches_direct(name, mode):
  rng = np.random.default_rng(10)
  hidden, lm_head, batch = make_batch(rng)  # 14 tokens
  cfg = cfg_for(name, temperature=1.5, ce_weight=0.3, topk_mode=mode)
  kd_want, ce_want, n_want = np_distill_sums(hidden, lm_head, batch, cfg)
  grad_direct = jax.jit(jax.grad(direct_total, argnums=(0, 1)), static_argnames="cfg")(
      f32(hidden), f32(lm_head), batch, cfg)
  for chunk_size in (1, 4, 7, 14, 64):  # 4 does not divide 14; 64 exceeds it
    run = jax.jit(functools.partial(losses.distill_loss, cfg=cfg, chunk_size=chunk_size))
    sums, metrics = run(f32(hidden), f32(lm_head), batch)
    np.testing.assert_allclose(sums.kd_sum, kd_want, rtol=2e-5)
    np.testing.assert_allclose(sums.ce_sum, ce_want, rtol=2e-5)
    assert float(sums.num_tokens) == n_want
    grad = jax.jit(jax.grad(chunked_total, argnums=(0, 1)), static_argnames=("cfg", "chunk_size"))(
        f32(hidden), f32(lm_head), batch, cfg, chunk_size)
    for got, want in zip(grad, grad_direct):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # Metrics are loss-token sums; check two against numpy.
  logits = np.einsum("bsd,dv->bsv", hidden, lm_head)
  mask = batch["loss_mask"]
  acc = ((logits.argmax(-1) == batch["target_ids"]) & mask).sum()
  agree = ((logits.argmax(-1) == batch["teacher_ids"][..., 0]) & mask).sum()
  assert float(metrics["student_target_acc_sum"]) == acc
  assert float(metrics["teacher_top1_agree_sum"]) == agree
  np.testing.assert_allclose(metrics["teacher_topk_mass_sum"], (np.exp(batch["teacher_logprobs"]).sum(-1) *
                                                                 mask).sum(), rtol=1e-5)


def test_masked_positions_get_zero_gradient_even_with_garbage():
  rng = np.random.default_rng(11)
  hidden, lm_head, batch = make_batch(rng)
  mask = batch["loss_mask"]
  # Garbage teacher data where the mask is off must not leak into values or gradients.
  batch["teacher_logprobs"] = np.where(mask[..., None], batch["teacher_logprobs"], np.nan).astype(np.float32)
  batch["teacher_ids"] = np.where(mask[..., None], batch["teacher_ids"], 10_000).astype(np.int32)
  batch["teacher_tail"] = np.where(mask, batch["teacher_tail"], -np.inf).astype(np.float32)
  for name in ("forward_kl", "reverse_kl"):
    cfg = cfg_for(name, ce_weight=0.5)
    loss, (grad_hidden, grad_head) = jax.jit(jax.value_and_grad(chunked_total, argnums=(0, 1)),
                                             static_argnames=("cfg", "chunk_size"))(
                                                 f32(hidden), f32(lm_head), batch, cfg, 3)
    assert np.isfinite(loss) and np.all(np.isfinite(grad_head))
    grad_hidden = np.asarray(grad_hidden)
    assert np.all(grad_hidden[~mask] == 0.0)
    assert np.all(np.abs(grad_hidden[mask]).sum(-1) > 0)


def test_divergence_none_is_plain_cross_entropy_and_needs_no_teacher():
  rng = np.random.default_rng(12)
  hidden, lm_head, batch = make_batch(rng)
  cfg = cfg_for("none", ce_weight=1.0)
  sft_batch = {key: batch[key] for key in ("target_ids", "loss_mask")}
  sums, metrics = jax.jit(functools.partial(losses.distill_loss, cfg=cfg, chunk_size=5))(
      f32(hidden), f32(lm_head), sft_batch)
  _, ce_want, n_want = np_distill_sums(hidden, lm_head, batch, cfg_for("forward_kl"))
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
  hidden, lm_head, batch = make_batch(rng)
  cfg = cfg_for("forward_kl")
  sums, _ = jax.jit(functools.partial(losses.distill_loss, cfg=cfg, chunk_size=4))(
      jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(lm_head, jnp.bfloat16), batch)
  assert sums.kd_sum.dtype == jnp.float32
  kd_want, _, _ = np_distill_sums(hidden, lm_head, batch, cfg)
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
  hidden, lm_head, batch = make_batch(rng)
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
