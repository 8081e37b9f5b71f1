// The decode step's weight products on CPU, as an XLA FFI custom call (kdjax/cpu_kernels.py says why).
//
// y[M, N] = x[M, K] @ W, with W packed in column tiles: [N / 16, K, 16], tile t holding columns 16t..16t+15
// row after row, so each tile is one contiguous stream. A tile is multiplied by up to 16 rows of x at a time,
// the 16 x 16 block of y held in vector registers over the whole of K: per k, one load of 16 weights and one
// broadcast multiply-add per row. Each row of y is a plain k = 0, 1, ... sum in float32.
//
// Decode reads every weight once per step and its working set is far larger than the caches; the hardware
// prefetcher does not run far enough ahead of a loop this dense, so the loop prefetches the weights
// kPrefetchRows rows (16 KB) ahead, into the next tile at a tile's end. The tiles are shared between XLA's
// intra-op threads in contiguous chunks; the calling thread takes chunks too, so the call finishes even when no
// other thread is free.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;           // columns per tile
constexpr int64_t kPrefetchRows = 256;  // weight rows read ahead (x 64 bytes)
typedef float Vec __attribute__((vector_size(kTile * sizeof(float))));

inline void Relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// y[0..R) x [16 columns] = xt rows (xt: [K, 16], row k holding x[0..15, k]) times one tile [K, 16].
template <int R>
inline void TileProduct(const float* xt, const float* tile, int64_t k_size, float* y, int64_t y_stride) {
  Vec acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = Vec{};
  for (int64_t k = 0; k < k_size; ++k) {
    __builtin_prefetch(tile + (k + kPrefetchRows) * kTile, 0, 0);
    Vec w;
    std::memcpy(&w, tile + k * kTile, sizeof(Vec));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] += xt[k * kTile + r] * w;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) std::memcpy(y + r * y_stride, &acc[r], sizeof(Vec));
}

// The rows a product of `rows` (1..16) rows computes and writes: the template that covers them.
inline int64_t RowsWritten(int64_t rows) { return rows > 8 ? 16 : rows > 4 ? 8 : rows > 1 ? 4 : 1; }

// Rows [0, rows) (at most 16) of xt times tiles [t0, t1) of w into y (row stride n); RowsWritten(rows) rows
// of y are written (the rows past `rows` are zeros in xt).
void Tiles(const float* xt, int64_t rows, int64_t k_size, const float* w, int64_t n, int64_t t0, int64_t t1,
           float* y) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* tile = w + t * k_size * kTile;
    float* out = y + t * kTile;
    if (rows > 8) {
      TileProduct<16>(xt, tile, k_size, out, n);
    } else if (rows > 4) {
      TileProduct<8>(xt, tile, k_size, out, n);
    } else if (rows > 1) {
      TileProduct<4>(xt, tile, k_size, out, n);
    } else {
      TileProduct<1>(xt, tile, k_size, out, n);
    }
  }
}

// exp(x) for x <= 0 in float32, branch-free so that loops over it vectorize: 2^n * p(r), x = n ln2 + r,
// |r| <= ln2 / 2, p of degree 6 (relative error below 2e-7); 0 below -87 (float32's smallest normal is e^-87.3).
inline float ExpNonPositive(float x) {
  const float clamped = x < -87.f ? -87.f : x;
  const float n = (clamped * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
};

// Runs `work` (which takes the call's chunks until none are left) on this thread and on XLA's intra-op threads;
// returns when all `count` chunks are finished. The calling thread takes chunks too, so the call finishes even
// when no other thread is free. A thread that starts after the call returned finds no chunk left: it touches
// only `shared` (which `work` holds), never the call's buffers.
// (Helpers of our own, spinning between calls, and pool tasks that linger for the next call were tried: no
// faster, and spinning threads slowed XLA's own ops on a 2-core machine.)
template <typename Work>
void RunChunks(ffi::ThreadPool& pool, const std::shared_ptr<Shared>& shared, int64_t count, const Work& work) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t i = 1; i < std::min(threads, count); ++i) pool.Schedule([work]() { work(); });
  work();
  while (shared->finished.load(std::memory_order_acquire) < count) Relax();
}

// The row of the product's left operand from row `x` of the input, as `prologue` says: the row itself (0); RMS
// normalised and scaled by `norm` (1: rms_norm, as model.rms_norm computes it); or silu(gate) * up of the
// input's halves [gate | up] (2: the MLP's SwiGLU, as jax.nn.silu(gate) * up), whose input has 2K columns.
void PrologueRow(const float* x, int64_t k_size, int prologue, const float* norm, float eps, float* out) {
  if (prologue == 1) {  // lane i sums x[i]^2, x[i + 16]^2, ... in turn, 16 lanes at a time
    Vec lanes{};
    int64_t k = 0;
    for (; k + kTile <= k_size; k += kTile) {
      Vec v;
      std::memcpy(&v, x + k, sizeof(Vec));
      lanes += v * v;
    }
    for (; k < k_size; ++k) lanes[k % kTile] += x[k] * x[k];
    float total = 0.f;
    for (int i = 0; i < kTile; ++i) total += lanes[i];
    const float inverse = 1.f / __builtin_sqrtf(total / static_cast<float>(k_size) + eps);
    for (k = 0; k < k_size; ++k) out[k] = norm[k] * (x[k] * inverse);
  } else if (prologue == 2) {
    for (int64_t k = 0; k < k_size; ++k) {  // sigmoid(g) from exp(-|g|) <= 1, so the exp's argument is <= 0
      const float g = x[k], e = ExpNonPositive(g < 0.f ? g : -g);
      const float sigmoid = g < 0.f ? e / (1.f + e) : 1.f / (1.f + e);
      out[k] = g * sigmoid * x[k_size + k];
    }
  } else {
    std::memcpy(out, x, k_size * sizeof(float));
  }
}

// y = prologue(x) @ W (+ residual). x [M, K] (or [M, 2K] for SwiGLU), w [N/16, K, 16], norm [K] (used by the
// rms_norm prologue), residual [M, N] or empty -> y [M, N].
ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> norm, ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y,
                        int32_t prologue, float eps) {
  const int64_t m = x.dimensions()[0], x_cols = x.dimensions()[1];
  const int64_t k_size = prologue == 2 ? x_cols / 2 : x_cols;
  const int64_t tiles = w.dimensions()[0], n = tiles * kTile;
  if (w.dimensions().size() != 3 || w.dimensions()[1] != k_size || w.dimensions()[2] != kTile ||
      y->dimensions()[0] != m || y->dimensions()[1] != n || (prologue == 2 && x_cols % 2) ||
      (prologue == 1 && norm.element_count() != static_cast<size_t>(k_size)) ||
      (residual.element_count() != 0 && residual.element_count() != static_cast<size_t>(m * n))) {
    return ffi::Error::InvalidArgument(
        "kdjax_packed_matmul: x [M, K] ([M, 2K] for SwiGLU), w [N/16, K, 16], norm [K], residual [M, N], y [M, N]");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // The left operand, transposed in row blocks of 16, zero-padded: block b is [K, 16]. A last block whose product
  // writes rows past M writes into scratch, copied out at the end. The calling thread builds it alone (the
  // helpers start after), so it is built row by row and then transposed reading 16 rows at once and writing
  // whole lines: 1.5-2.2 us for 16 rows of 576, where writing each row into the block's columns took 2.9-5.9.
  const int64_t blocks = (m + kTile - 1) / kTile;
  std::vector<float> xt_blocks(blocks * k_size * kTile), rows(kTile * k_size);
  float* xt = xt_blocks.data();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t in_block = std::min(kTile, m - b * kTile);
    for (int64_t r = 0; r < in_block; ++r) {
      PrologueRow(xp + (b * kTile + r) * x_cols, k_size, prologue, norm.typed_data(), eps, &rows[r * k_size]);
    }
    std::fill(rows.begin() + in_block * k_size, rows.end(), 0.f);
    float* block = xt + b * k_size * kTile;
    for (int64_t k = 0; k < k_size; ++k) {
#pragma GCC unroll 16
      for (int64_t r = 0; r < kTile; ++r) block[k * kTile + r] = rows[r * k_size + k];
    }
  }
  const int64_t tail_rows = m - (blocks - 1) * kTile;
  const bool padded = RowsWritten(tail_rows) != tail_rows;
  std::vector<float> scratch_rows(padded ? RowsWritten(tail_rows) * n : 0);
  float* scratch = scratch_rows.data();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Two chunks per thread: bench_decode's decode took 2.53-2.58 s so, against 2.58-2.59 with four and 2.67-2.71
  // with eight (more starts of a stream) or 2.58-2.63 with one (a late helper leaves the caller waiting).
  const int64_t chunk = std::max<int64_t>(1, tiles / (2 * threads));
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  auto shared = std::make_shared<Shared>();
  auto work = [=]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      const int64_t t0 = c * chunk, t1 = std::min(tiles, t0 + chunk);
      // The loop's own prefetch runs kPrefetchRows ahead of where it reads: request the chunk's first rows
      // now, all at once, rather than wait for each of them in turn.
      const float* first = wp + t0 * k_size * kTile;
      const int64_t ahead = std::min(kPrefetchRows, (t1 - t0) * k_size);
      for (int64_t r = 0; r < ahead; ++r) __builtin_prefetch(first + r * kTile, 0, 0);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t rows = std::min(kTile, m - b * kTile);
        float* out = (b == blocks - 1 && padded) ? scratch : yp + b * kTile * n;
        Tiles(xt + b * k_size * kTile, rows, k_size, wp, n, t0, t1, out);
      }
      shared->finished.fetch_add(1);
    }
  };
  RunChunks(pool, shared, chunks, work);
  if (padded) std::memcpy(yp + (blocks - 1) * kTile * n, scratch, tail_rows * n * sizeof(float));
  if (residual.element_count() != 0) {  // residual + product, as XLA's `x + project(...)` adds them
    const float* rp = residual.typed_data();
    for (int64_t i = 0; i < m * n; ++i) yp[i] = rp[i] + yp[i];
  }
  return ffi::Error::Success();
}


// ----------------------------------------------------------------------------- decode attention

// Max and sum of s[0..n), n >= 1, over 16 lanes (so they vectorize without reassociating a scalar loop).
inline float Max(const float* s, int64_t n) {
  float top = s[0];
  int64_t t = 0;
  if (n >= kTile) {
    Vec lanes;
    std::memcpy(&lanes, s, sizeof(Vec));
    for (t = kTile; t + kTile <= n; t += kTile) {
      Vec next;
      std::memcpy(&next, s + t, sizeof(Vec));
      lanes = lanes > next ? lanes : next;
    }
    for (int i = 0; i < kTile; ++i) top = lanes[i] > top ? lanes[i] : top;
  }
  for (; t < n; ++t) top = s[t] > top ? s[t] : top;
  return top;
}

inline float Sum(const float* s, int64_t n) {
  Vec lanes{};
  int64_t t = 0;
  for (; t + kTile <= n; t += kTile) {
    Vec next;
    std::memcpy(&next, s + t, sizeof(Vec));
    lanes += next;
  }
  float total = 0.f;
  for (int i = 0; i < kTile; ++i) total += lanes[i];
  for (; t < n; ++t) total += s[t];
  return total;
}

// s[0..n) <- softmax(scale * s), as jax.nn.softmax computes it: exp(x - max) / sum.
inline void Softmax(float* s, int64_t n, float scale) {
  for (int64_t t = 0; t < n; ++t) s[t] *= scale;
  const float top = Max(s, n);
  for (int64_t t = 0; t < n; ++t) s[t] = ExpNonPositive(s[t] - top);
  const float total = Sum(s, n);
  for (int64_t t = 0; t < n; ++t) s[t] /= total;
}

// All G query heads of a kv head at once, in one pass over its keys and one over its values (they come from
// memory once, not G times from L2): scores [G, n], then out [G, D], D = 16 * V, G * V accumulators in registers.
// Keys in blocks of 16 positions [D, 16] (`DecodeAttention`): a block's 16 scores of a head are one vector, and
// the block one contiguous 4 KB read. In the last, partial block the lanes past n (never-written or stale
// positions, whatever they hold) are computed and not stored.
template <int G, int V>
void GroupAttention(const float* q, const float* keys, const float* values, int64_t n, float scale, float* scores,
                    float* out) {
  constexpr int64_t kDim = V * kTile;
  for (int64_t t = 0; t < n; t += kTile) {
    const float* block = keys + t * kDim;
    Vec acc[G] = {};
    for (int64_t d = 0; d < kDim; ++d) {
      const float* row = block + d * kTile;
      __builtin_prefetch(row + 2 * kDim * kTile, 0, 0);  // two blocks ahead
      Vec k;
      std::memcpy(&k, row, sizeof(Vec));
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g] += q[g * kDim + d] * k;
    }
    const int64_t lanes = std::min(kTile, n - t);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) std::memcpy(scores + g * n + t, &acc[g], lanes * sizeof(float));
  }
  for (int g = 0; g < G; ++g) Softmax(scores + g * n, n, scale);
  Vec acc[G][V] = {};
  for (int64_t t = 0; t < n; ++t) {
    const float* row = values + t * kDim;
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) {
      __builtin_prefetch(row + (8 * V + j) * kTile, 0, 0);  // 8 positions ahead
      Vec v;
      std::memcpy(&v, row + j * kTile, sizeof(Vec));
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g][j] += scores[g * n + t] * v;
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

// Any head_dim: one query head, the same sums one position and one dimension at a time.
void PlainHeadAttention(const float* q, const float* keys, const float* values, int64_t head_dim, int64_t n,
                        float scale, float* scores, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* column = keys + (t / kTile) * head_dim * kTile + t % kTile;  // position t of its block
    float acc = 0.f;
    for (int64_t d = 0; d < head_dim; ++d) acc += q[d] * column[d * kTile];
    scores[t] = acc;
  }
  Softmax(scores, n, scale);
  std::memset(out, 0, head_dim * sizeof(float));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < head_dim; ++d) out[d] += scores[t] * values[t * head_dim + d];
}

// The G query heads of a kv head with head_dim 16 * V, in batches of up to 16 / V heads (GroupAttention keeps
// batch * V accumulators in registers): SmolLM2's 3 x 64 in one batch, Llama 3.1's 4 x 128 in two.
template <int V>
void BatchedGroupAttention(const float* q, const float* keys, const float* values, int64_t groups, int64_t n,
                           float scale, float* scores, float* out) {
  constexpr int64_t kBatch = 16 / V, kDim = V * kTile;
  for (int64_t g = 0; g < groups; g += kBatch) {
    const float* qg = q + g * kDim;
    float* og = out + g * kDim;
    switch (std::min(kBatch, groups - g)) {
      case 1: GroupAttention<1, V>(qg, keys, values, n, scale, scores, og); break;
      case 2: GroupAttention<2, V>(qg, keys, values, n, scale, scores, og); break;
      case 3: if constexpr (kBatch >= 3) GroupAttention<3, V>(qg, keys, values, n, scale, scores, og); break;
      default: if constexpr (kBatch >= 4) GroupAttention<4, V>(qg, keys, values, n, scale, scores, og);
    }
  }
}

// One (slot, kv head): out[G, D] = softmax(scale * q[G, D] @ keys[:n]^T) @ values[:n, D], reading only the n
// live positions (keys in blocks [ceil(W / 16), D, 16], values [W, D]). scores: scratch of G * n floats.
void SlotHeadAttention(const float* q, const float* keys, const float* values, int64_t groups, int64_t head_dim,
                       int64_t n, float scale, float* scores, float* out) {
  if (n <= 0) {
    std::memset(out, 0, groups * head_dim * sizeof(float));
  } else if (head_dim == 64) {
    BatchedGroupAttention<4>(q, keys, values, groups, n, scale, scores, out);
  } else if (head_dim == 128) {
    BatchedGroupAttention<8>(q, keys, values, groups, n, scale, scores, out);
  } else {
    for (int64_t g = 0; g < groups; ++g) {
      PlainHeadAttention(q + g * head_dim, keys, values, head_dim, n, scale, scores, out + g * head_dim);
    }
  }
}

// Rotates x [D] by the rotary angles of its position, in HF's rotate-half layout (pairs i and i + D/2).
inline void Rotate(const float* x, const float* cos, const float* sin, int64_t head_dim, float* out) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
  }
}

// One decode token per slot, per (slot, kv head): the new key (rotated) and value are written into the cache at
// the slot's position, then the G query heads (rotated) attend to positions 0..position. A slot at position < 0
// is finished or empty: nothing is written and its output is zeros.
// qkv [S, (G + 2) * H * D] (queries [H, G, D], then keys [H, D], then values [H, D]), keys [S, H, B, D, 16]
// (positions in blocks of 16, B = ceil(W / 16)) and values [S, H, W, D] (updated in place: aliased to results 1
// and 2), positions [S] int32, cos and sin [S, D/2] -> out [S, H * G * D].
// Why blocks: a slot's live keys are then one contiguous read, as its values are; stored [D, W] they were D
// strided streams, which the prefetchers follow badly. (Reading the next task's keys and values ahead during the
// current one, as well, gained nothing more: 3.65-3.76 ms against 3.65 at 192 of 384 positions live, and
// 6.80-7.21 against 6.01-6.10 with the whole window live.)
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> keys_in,
                           ffi::Buffer<ffi::F32> values_in, ffi::Buffer<ffi::S32> positions,
                           ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> keys, ffi::ResultBuffer<ffi::F32> values, float scale) {
  const auto kd = keys->dimensions(), vd = values->dimensions();
  if (kd.size() != 5 || vd.size() != 4 || qkv.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("kdjax_decode_attention: qkv must have rank 2, keys rank 5, values rank 4");
  }
  const int64_t slots = vd[0], heads = vd[1], window = vd[2], head_dim = vd[3];
  const int64_t blocks = (window + kTile - 1) / kTile;
  const int64_t row = qkv.dimensions()[1], groups = row / (heads * head_dim) - 2;
  if (qkv.dimensions()[0] != slots || groups < 1 || row != (groups + 2) * heads * head_dim || kd[0] != slots ||
      kd[1] != heads || kd[2] != blocks || kd[3] != head_dim || kd[4] != kTile ||
      positions.dimensions()[0] != slots || head_dim % 2 ||
      cos.element_count() != static_cast<size_t>(slots * head_dim / 2) ||
      sin.element_count() != static_cast<size_t>(slots * head_dim / 2)) {
    return ffi::Error::InvalidArgument(
        "kdjax_decode_attention: qkv [S,(G+2)*H*D], keys [S,H,ceil(W/16),D,16], values [S,H,W,D], cos and sin "
        "[S,D/2]");
  }
  if (keys_in.untyped_data() != keys->untyped_data() || values_in.untyped_data() != values->untyped_data()) {
    return ffi::Error::InvalidArgument("kdjax_decode_attention: the caches must be aliased to the results");
  }
  const float* qkv_p = qkv.typed_data();
  const float *cp = cos.typed_data(), *sp = sin.typed_data();
  const int32_t* at = positions.typed_data();
  float *keys_p = keys->typed_data(), *values_p = values->typed_data(), *op = out->typed_data();
  const int64_t tasks = slots * heads, half = head_dim / 2;
  auto shared = std::make_shared<Shared>();
  auto work = [=]() {
    std::vector<float> scores(groups * window), rotated(groups * head_dim), key(head_dim);
    for (int64_t i; (i = shared->next.fetch_add(1)) < tasks;) {
      const int64_t slot = i / heads, position = at[slot];
      float* slot_keys = keys_p + i * blocks * head_dim * kTile;
      float* slot_values = values_p + i * window * head_dim;
      if (position >= 0 && position < window) {
        const int64_t head = i % heads;
        const float* new_key = qkv_p + slot * row + (groups * heads + head) * head_dim;
        const float* new_value = qkv_p + slot * row + (groups * heads + heads + head) * head_dim;
        Rotate(new_key, cp + slot * half, sp + slot * half, head_dim, key.data());
        float* column = slot_keys + (position / kTile) * head_dim * kTile + position % kTile;
        for (int64_t d = 0; d < head_dim; ++d) column[d * kTile] = key[d];
        std::memcpy(slot_values + position * head_dim, new_value, head_dim * sizeof(float));
      }
      for (int64_t g = 0; g < groups; ++g) {
        const float* query = qkv_p + slot * row + ((i % heads) * groups + g) * head_dim;
        Rotate(query, cp + slot * half, sp + slot * half, head_dim, rotated.data() + g * head_dim);
      }
      const int64_t n = position < 0 ? 0 : std::min<int64_t>(position + 1, window);
      SlotHeadAttention(rotated.data(), slot_keys, slot_values, groups, head_dim, n, scale, scores.data(),
                        op + i * groups * head_dim);
      shared->finished.fetch_add(1);
    }
  };
  RunChunks(pool, shared, tasks, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w, packed
                                  .Arg<ffi::Buffer<ffi::F32>>()   // norm (or empty)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // residual (or empty)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Attr<int32_t>("prologue")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // keys (aliased to the second result)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // values (aliased to the third result)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // keys
                                  .Ret<ffi::Buffer<ffi::F32>>()   // values
                                  .Attr<float>("scale"));
