"""kdjax's CPU kernels (kdjax.serving.cpu.kernels) against XLA's own ops on SmolLM2-135M's decode shapes, in one run.

Products: a decode step's 16-row products with their weights read from memory (distinct weights, 256 MB per
timing, as a step reads all 538 MB of SmolLM2's), XLA's dot on the plain weights against the kernel on packed
ones. Attention: 30 layers of one new token per slot (the rotary embedding, its key and value written into a
cache window of 384, then attention; 16 slots, 3 kv heads x 3 query heads, head_dim 64), with all positions live
or 250 of 384, the engine's XLA form (its form without the kernels) against the kernel, which reads only the live
positions.

  JAX_PLATFORMS=cpu python -m benchmarks.bench_cpu_kernels
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
  import bench_generate
  from benchmarks.roofline import best_seconds
  from kdjax.serving.cpu import kernels as cpu_kernels
  from kdjax.models.llama import model as model_lib
  from kdjax.models.llama.config import get_preset
  print(f"CPU: {bench_generate.cpu_model()}, {os.cpu_count()} cpu(s)")
  if not cpu_kernels.available():
    raise SystemExit("kdjax's CPU kernels are not available here (see the warning above)")
  rng = np.random.default_rng(0)
  for m, k, n in [(16, 576, 1536), (16, 1536, 576), (16, 576, 192), (16, 576, 49152)]:
    count = max(2, int(np.ceil(256e6 / (4 * k * n))))
    x = jnp.asarray(rng.standard_normal((m, k), np.float32))
    weights = [jnp.asarray(rng.standard_normal((k, n), np.float32)) for _ in range(count)]
    packed = [cpu_kernels.pack(w, 1) for w in weights]
    xla = jax.jit(lambda x, ws: tuple(x @ w for w in ws))
    kernel = jax.jit(lambda x, ws: tuple(cpu_kernels.packed_matmul(x, w) for w in ws))
    xla_s = best_seconds(lambda: jax.block_until_ready(xla(x, weights)))
    kernel_s = best_seconds(lambda: jax.block_until_ready(kernel(x, packed)))
    flops, gb = 2.0 * m * k * n * count / 1e9, 4.0 * k * n * count / 1e9
    print(f"{m}x{k}x{n} x{count} ({gb * 1e3:.0f} MB of weights): XLA {flops / xla_s:.0f} GFLOP/s "
          f"({gb / xla_s:.1f} GB/s), kernel {flops / kernel_s:.0f} GFLOP/s ({gb / kernel_s:.1f} GB/s): "
          f"{xla_s / kernel_s:.2f}x")
    del weights, packed

  slots, heads, groups, head_dim, window, layers = 16, 3, 3, 64, 384, 30
  keys = [jnp.asarray(rng.standard_normal((slots, heads, head_dim, window), np.float32)) for _ in range(layers)]
  values = [jnp.asarray(rng.standard_normal((slots, heads, window, head_dim), np.float32)) for _ in range(layers)]
  values_copy = [jnp.array(a) for a in values]  # the kernel's own (donated caches cannot be shared)
  q = jnp.asarray(rng.standard_normal((slots, 1, heads * groups, head_dim), np.float32))
  k = jnp.asarray(rng.standard_normal((slots, 1, heads, head_dim), np.float32))
  v = jnp.asarray(rng.standard_normal((slots, 1, heads, head_dim), np.float32))
  qkv = jnp.concatenate([a.reshape(slots, -1) for a in (q, k, v)], axis=1)  # as the fused product gives them
  inv_freq = jnp.asarray(model_lib.rope_inv_freq(get_preset("smollm2-135m")))
  scale, rows = head_dim ** -0.5, jnp.arange(slots)

  def xla_attention(keys, values, at):  # the engine's form without the kernels (engine._slot_layer)
    rq, rk = model_lib.apply_rope(q, at[:, None], inv_freq), model_lib.apply_rope(k, at[:, None], inv_freq)
    valid = jnp.arange(window)[None, :] <= at[:, None]
    out, new_keys, new_values = [], [], []
    for layer_keys, layer_values in zip(keys, values):
      layer_keys = layer_keys.at[rows, :, :, at].set(rk[:, 0], mode="drop")
      layer_values = layer_values.at[rows, :, at].set(v[:, 0], mode="drop")
      scores = jnp.einsum("bgmk,bgkt->bgmt", rq.reshape(slots, heads, groups, head_dim), layer_keys)
      scores = jnp.where(valid[:, None, None, :], scores * scale, jnp.finfo(jnp.float32).min)
      out.append(jnp.einsum("bgmt,bgtk->bgmk", jax.nn.softmax(scores, axis=-1), layer_values))
      new_keys.append(layer_keys)
      new_values.append(layer_values)
    return out, new_keys, new_values

  def kernel_attention(keys, values, at):
    angles = at.astype(jnp.float32)[:, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    out, new_keys, new_values = [], [], []
    for layer_keys, layer_values in zip(keys, values):
      o, layer_keys, layer_values = cpu_kernels.decode_attention(qkv, layer_keys, layer_values, at, cos, sin, scale)
      out.append(o)
      new_keys.append(layer_keys)
      new_values.append(layer_values)
    return out, new_keys, new_values

  # The caches are donated and come back, as in the decode loop, where both update them in place.
  xla_attention = jax.jit(xla_attention, donate_argnums=(0, 1))
  kernel_attention = jax.jit(kernel_attention, donate_argnums=(0, 1))
  caches = {"XLA": [keys, values],  # each in its own layout: the kernel's keys in blocks of 16 positions
            "kernel": [[cpu_kernels.block_keys(jnp.swapaxes(a, -1, -2)) for a in keys], values_copy]}
  for live_length in (window, 250):
    at = jnp.full((slots,), live_length - 1, jnp.int32)
    seconds = {}
    for name, fn in (("XLA", xla_attention), ("kernel", kernel_attention)):
      state = caches[name]

      def call():
        out, state[0], state[1] = jax.block_until_ready(fn(state[0], state[1], at))
      seconds[name] = best_seconds(call)
    mb = 2 * slots * heads * head_dim * live_length * 4 * layers / 1e6
    print(f"attention with the rotary embedding and the cache write, {layers} layers, {live_length} of {window} "
          f"positions live ({mb:.0f} MB of live keys and values): XLA {seconds['XLA'] * 1e3:.2f} ms, kernel "
          f"{seconds['kernel'] * 1e3:.2f} ms: {seconds['XLA'] / seconds['kernel']:.2f}x")


if __name__ == "__main__":
  main()
