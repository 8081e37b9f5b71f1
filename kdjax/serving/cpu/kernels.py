"""The CPU decode's weight products and attention as our own kernels (`kernels.cc`), called through `jax.ffi`.

Why our own. A decode step multiplies a few rows (one per slot) by every weight of the model, and on CPU its
weights come from memory, not cache, on every step, where XLA:CPU's dot reaches about half the machine's memory
rate. `packed_matmul` keeps each weight in a layout read once, front to back (`pack`: column tiles of 16), holds a
16 x 16 block of the result in registers over the whole contraction and prefetches far enough ahead that the reads
overlap the arithmetic (`python -m benchmarks.bench_cpu_kernels` compares it with XLA; figures in
docs/benchmarks.md). It also takes what a decoder layer does around its products (the RMS norm or the SwiGLU before,
the residual add after), each otherwise one more XLA op and its dispatch. `decode_attention` writes the new
token's key and value, applies the rotary embedding and attends over each slot's live positions only, where
XLA's form reads the whole cache window at every step. Its
keys are kept in blocks of 16 positions (`block_keys`), so that a slot's live keys are one contiguous read.
Nothing in XLA, YNNPACK or oneDNN (their flags were tried) does this for a handful of rows.

The source is compiled on first use with the system's C++ compiler for this CPU (`-march=native`) into the cache
folder, keyed by the source, compiler, flags, jaxlib and CPU; without a compiler, off CPU, or with
KDJAX_CPU_KERNELS=0, `available()` is False and the engine keeps XLA's forms (one log line says why).
Results differ from XLA's by float32 rounding only: each product is a plain sum over k in order.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from kdjax.infra import fetch, storage
from kdjax.models.llama import model as model_lib

log = logging.getLogger(__name__)

TILE = 16  # columns per packed tile (kernels.cc's kTile)
MAX_KERNEL_ROWS = 64  # more rows (more slots than this) run on XLA's GEMM over the packed layout
_TARGET = "kdjax_packed_matmul"
_ATTENTION_TARGET = "kdjax_decode_attention"
_SOURCE = os.path.join(os.path.dirname(__file__), "kernels.cc")
# Warnings on: the build shows what the compiler finds in our source (XLA's FFI headers are system headers here).
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra")


def _cpu_signature() -> str:
  """What `-march=native` compiles for: the CPU model and its feature flags."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def _kernel_folder() -> str:
  root = fetch.cache_dir()
  if storage.is_remote(root):  # a shared library must be a local file
    return os.path.join(tempfile.gettempdir(), "kdjax-kernels")
  return os.path.join(str(root), "kernels")


def _build(compiler: str) -> str:
  """The compiled library's path, compiling it unless this source was already built here."""
  with open(_SOURCE, "rb") as f:
    source = f.read()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in (
      source, version, " ".join(_FLAGS), jaxlib.__version__, _cpu_signature(), platform.machine()))).hexdigest()[:16]
  folder = _kernel_folder()
  target = os.path.join(folder, f"cpu_kernels-{key}.so")
  if os.path.exists(target):
    return target
  storage.makedirs(folder)
  # Each process compiles into its own temporary folder beside the target; concurrent first uses each publish a
  # whole library, and the last rename wins.
  with tempfile.TemporaryDirectory(dir=folder) as scratch:
    built = os.path.join(scratch, "cpu_kernels.so")
    proc = subprocess.run([compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), _SOURCE, "-o", built],
                          capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"{compiler} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    for line in proc.stderr.splitlines():
      if "warning:" in line:
        log.warning("%s: %s", compiler, line)
    storage.publish(built, target)
  return target


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered with XLA for this process's CPU backend."""
  if os.environ.get("KDJAX_CPU_KERNELS", "1") == "0":
    log.info("CPU kernels off (KDJAX_CPU_KERNELS=0): the decode uses XLA's products")
    return False
  if jax.default_backend() != "cpu":
    return False
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if compiler is None:
    log.warning("no C++ compiler found (g++, c++, clang++ or $CXX): the CPU decode uses XLA's products")
    return False
  try:
    library = ctypes.cdll.LoadLibrary(_build(compiler))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.KdjaxPackedMatmul), platform="cpu")
    jax.ffi.register_ffi_target(_ATTENTION_TARGET, jax.ffi.pycapsule(library.KdjaxDecodeAttention), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as error:
    log.warning("CPU kernels unavailable (%s): the decode uses XLA's products", error)
    return False
  return True


def packable(w: jax.Array, num_in: int) -> bool:
  """Whether weight `w` [*in dims, *out dims] can be packed: float32, its outputs in whole tiles of 16."""
  return w.dtype == jnp.float32 and w.ndim > num_in and math.prod(w.shape[num_in:]) % TILE == 0


def pack(w: jax.Array, num_in: int) -> jax.Array:
  """`w` [*in, *out] as column tiles [N / 16, K, 16] (K = prod(in), N = prod(out)): tile t holds the flattened
  output columns 16t..16t+15 for every k, row after row. Tiles of several weights concatenate into one product."""
  k = math.prod(w.shape[:num_in])
  return w.reshape(k, -1, TILE).transpose(1, 0, 2)


def unpack(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`pack`'s inverse: the weight of `shape` [*in, *out]."""
  return packed.transpose(1, 0, 2).reshape(shape)


def _prologue(x: jax.Array, norm: jax.Array | None, eps: float, swiglu: bool) -> jax.Array:
  """What the kernel does to its left operand first, in XLA (the fallback for many rows)."""
  if norm is not None:
    return model_lib.rms_norm(x, norm, eps)
  if swiglu:
    gate, up = jnp.split(x, 2, axis=-1)
    return jax.nn.silu(gate) * up
  return x


def packed_matmul(x: jax.Array, packed: jax.Array, *, norm: jax.Array | None = None, eps: float = 0.0,
                  swiglu: bool = False, residual: jax.Array | None = None) -> jax.Array:
  """`x` [M, K] times a `pack`ed weight [N / 16, K, 16]: [M, N] float32, with what a decoder layer does around its
  products folded in: `norm` [K] RMS-normalises each row of x first and scales it (model.rms_norm, `eps`),
  `swiglu` takes x [M, 2K] as [gate | up] and multiplies silu(gate) * up, `residual` [M, N] is added to the
  product. A few rows (a decode step) run on the kernel; more rows, or without the kernel, on XLA."""
  rows, tiles = x.shape[0], packed.shape[0]
  x, f32 = x.astype(jnp.float32), jnp.float32
  if rows > MAX_KERNEL_ROWS or not available():
    y = jnp.einsum("mk,tkj->mtj", _prologue(x, norm, eps, swiglu), packed).reshape(rows, tiles * TILE)
    return y if residual is None else residual.astype(f32) + y
  empty = jnp.zeros((0,), f32)
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((rows, tiles * TILE), f32))(
      x, packed, empty if norm is None else norm.astype(f32), empty if residual is None else residual.astype(f32),
      prologue=np.int32(1 if norm is not None else 2 if swiglu else 0), eps=np.float32(eps))


def block_keys(keys: jax.Array) -> jax.Array:
  """Keys [..., P, D] as `decode_attention` keeps them: [..., ceil(P / 16), D, 16], positions in blocks of 16
  (block b holding positions 16b..16b+15, lane p % 16 of each of the D rows), zero-padded to whole blocks."""
  *lead, p, d = keys.shape
  blocks = key_blocks(p)
  padded = jnp.pad(keys, [(0, 0)] * len(lead) + [(0, blocks * TILE - p), (0, 0)])
  return jnp.swapaxes(padded.reshape(*lead, blocks, TILE, d), -1, -2)


def unblock_keys(blocked: jax.Array, positions: int) -> jax.Array:
  """`block_keys`'s inverse: keys [..., positions, D]."""
  *lead, blocks, d, _ = blocked.shape
  return jnp.swapaxes(blocked, -1, -2).reshape(*lead, blocks * TILE, d)[..., :positions, :]


def key_blocks(window: int) -> int:
  """The blocks of 16 positions that hold a window of `window` positions."""
  return -(-window // TILE)


def decode_attention(qkv: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array, cos: jax.Array,
                     sin: jax.Array, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decode token per slot: its key and value written into the slot's cache, then attention over its own
  positions. qkv [S, (groups + 2) * kv_heads * head_dim]: the query heads (kv head h's groups first), the keys,
  the values, as the fused q/k/v product gives them, q and k before the rotary embedding, which is applied here
  from cos and sin [S, head_dim / 2] (HF's rotate-half layout). The caches: keys [S, kv_heads, ceil(W / 16),
  head_dim, 16] (`block_keys`: a slot's live keys are one contiguous read) and values [S, kv_heads, W, head_dim];
  positions [S], each slot's new token's (< 0: a finished or empty slot, nothing written, output zeros).
  Returns (softmax(scale * q k) v over positions 0..position, [S, kv_heads * groups * head_dim]; keys; values),
  the caches updated in place (their buffers are the results'). Only live positions are read, not the window.
  `available()` must hold; everything is float32."""
  f32 = lambda a: a.astype(jnp.float32)
  slots, heads, _, head_dim = values.shape
  queries = qkv.shape[1] - 2 * heads * head_dim
  return jax.ffi.ffi_call(
      _ATTENTION_TARGET, (jax.ShapeDtypeStruct((slots, queries), jnp.float32),
                          jax.ShapeDtypeStruct(keys.shape, jnp.float32),
                          jax.ShapeDtypeStruct(values.shape, jnp.float32)),
      input_output_aliases={1: 1, 2: 2})(
          f32(qkv), f32(keys), f32(values), positions.astype(jnp.int32), f32(cos), f32(sin), scale=np.float32(scale))
