// Small-batch dense layer for XLA:CPU, called through jax.ffi: y[T, N] = x[T, D] . W[l]^T.
//
// W is the whole stacked weight [L, N, D] (row-major, PyTorch layout) and `layer` selects
// one slice, so no copy of the layer's weights is made (a dynamic slice passed to a custom
// call would be materialized). Each thread streams its block of rows. With AVX-512: one
// token is a bandwidth-tuned row dot, several go through 4-row x 6-token register tiles;
// otherwise each row is applied to 4 tokens at a time while it is in L1 (measurements in
// docs/architecture.md).
#include <algorithm>
#include <cstdint>

#include <immintrin.h>
#include <omp.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
// One token: four accumulators and a software prefetch keep enough loads in flight.
inline float RowDot(const float* __restrict w, const float* __restrict x, int64_t d_size) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 64 <= d_size; d += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + d + 1024), _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + d), _mm512_loadu_ps(x + d), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + d + 16), _mm512_loadu_ps(x + d + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + d + 32), _mm512_loadu_ps(x + d + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + d + 48), _mm512_loadu_ps(x + d + 48), a3);
  }
  for (; d + 16 <= d_size; d += 16) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + d), _mm512_loadu_ps(x + d), a0);
  }
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; d < d_size; ++d) sum += w[d] * x[d];
  return sum;
}

// Several tokens: an R x TT register tile (R weight rows by TT tokens). Each step over D
// loads R weight vectors and TT token vectors for R * TT FMAs, so the loop is bound by
// the FMA units rather than by loads; the weight rows stay in L1 across token tiles.
// `pf`, when set, is the next R-row group of W: one cache line of each of its rows is
// prefetched per step, so the stream of weights is already in flight when the next tile
// starts (rows are only D floats long, too short for the hardware prefetcher to ramp up
// on R interleaved streams: 8 tokens ran at 12.6 GB/s without it).
template <int R, int TT>
inline void Tile(const float* __restrict w, const float* __restrict x, int64_t d_size,
                 float* y, int64_t out_stride, const float* pf) {
  __m512 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= d_size; d += 16) {
    if (pf != nullptr) {
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + r * d_size + d), _MM_HINT_T0);
      }
    }
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * d_size + d);
    for (int t = 0; t < TT; ++t) {
      __m512 xv = _mm512_loadu_ps(x + t * d_size + d);
      // Keep the token vector in a register: left alone, GCC folds its load into each of
      // the R FMAs (R loads instead of 1), and the loop became bound by loads (a 32-token
      // decode step's matrices: 130 -> 141 GFLOP/s on 2 cores).
      asm("" : "+v"(xv));
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TT; ++t) {
      float sum = _mm512_reduce_add_ps(acc[r][t]);
      for (int64_t e = d; e < d_size; ++e) sum += w[r * d_size + e] * x[t * d_size + e];
      y[t * out_stride + r] = sum;
    }
  }
}

constexpr int kTileRows = 4, kTileTokens = 6;

template <int R>
inline void TileTokens(const float* w, const float* x, int64_t d_size, int64_t tokens, float* y,
                       int64_t out_stride, const float* pf) {
  switch (tokens) {
    case 1: Tile<R, 1>(w, x, d_size, y, out_stride, pf); break;
    case 2: Tile<R, 2>(w, x, d_size, y, out_stride, pf); break;
    case 3: Tile<R, 3>(w, x, d_size, y, out_stride, pf); break;
    case 4: Tile<R, 4>(w, x, d_size, y, out_stride, pf); break;
    case 5: Tile<R, 5>(w, x, d_size, y, out_stride, pf); break;
    default: Tile<R, 6>(w, x, d_size, y, out_stride, pf); break;
  }
}

// Rows [lo, hi) of W times tokens [t_lo, t_hi).
inline void RowsTimesTokenBlock(const float* W, const float* X, int64_t D, int64_t T,
                                int64_t N, int64_t lo, int64_t hi, float* Y) {
  int64_t n = lo;
  for (; n + kTileRows <= hi; n += kTileRows) {
    // The first token tile prefetches the next row group (the others find this group in L1).
    const float* next = n + 2 * kTileRows <= hi ? W + (n + kTileRows) * D : nullptr;
    for (int64_t t0 = 0; t0 < T; t0 += kTileTokens) {
      TileTokens<kTileRows>(W + n * D, X + t0 * D, D, std::min<int64_t>(kTileTokens, T - t0),
                            Y + t0 * N + n, N, t0 == 0 ? next : nullptr);
    }
  }
  for (; n < hi; ++n) {
    for (int64_t t0 = 0; t0 < T; t0 += kTileTokens) {
      TileTokens<1>(W + n * D, X + t0 * D, D, std::min<int64_t>(kTileTokens, T - t0),
                    Y + t0 * N + n, N, nullptr);
    }
  }
}
// Rows [lo, hi) of W times all T tokens, in token blocks whose activations stay in L2
// while the weight rows stream past them.
inline void RowsTimesTokens(const float* W, const float* X, int64_t D, int64_t T, int64_t N,
                            int64_t lo, int64_t hi, float* Y) {
  if (T == 1) {
    for (int64_t n = lo; n < hi; ++n) Y[n] = RowDot(W + n * D, X, D);
    return;
  }
  const int64_t block = std::max<int64_t>(
      kTileTokens, (int64_t{256} * 1024 / (4 * D)) / kTileTokens * kTileTokens);
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    RowsTimesTokenBlock(W, X + t0 * D, D, std::min(block, T - t0), N, lo, hi, Y + t0 * N);
  }
}
#else
// Without AVX-512, rows of W are applied to up to kTokens tokens at once: each loaded chunk
// of the row feeds one independent accumulator per token.
constexpr int64_t kTokens = 4;
#if defined(__AVX2__) && defined(__FMA__)
inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline void RowTimesTokens(const float* __restrict w, const float* __restrict x, int64_t d_size,
                           int64_t tokens, float* out, int64_t out_stride) {
  __m256 acc[kTokens];
  for (int64_t t = 0; t < kTokens; ++t) acc[t] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= d_size; d += 8) {
    const __m256 wv = _mm256_loadu_ps(w + d);
    for (int64_t t = 0; t < tokens; ++t)
      acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * d_size + d), acc[t]);
  }
  for (int64_t t = 0; t < tokens; ++t) {
    float sum = Sum8(acc[t]);
    for (int64_t e = d; e < d_size; ++e) sum += w[e] * x[t * d_size + e];
    out[t * out_stride] = sum;
  }
}
#else
inline void RowTimesTokens(const float* __restrict w, const float* __restrict x, int64_t d_size,
                           int64_t tokens, float* out, int64_t out_stride) {
  for (int64_t t = 0; t < tokens; ++t) {
    float sum = 0.f;
    for (int64_t e = 0; e < d_size; ++e) sum += w[e] * x[t * d_size + e];
    out[t * out_stride] = sum;
  }
}
#endif

// Rows [lo, hi) of W times all T tokens, kTokens tokens per pass over a row.
inline void RowsTimesTokens(const float* W, const float* X, int64_t D, int64_t T, int64_t N,
                            int64_t lo, int64_t hi, float* Y) {
  for (int64_t t0 = 0; t0 < T; t0 += kTokens) {
    const int64_t tokens = std::min<int64_t>(kTokens, T - t0);
    for (int64_t n = lo; n < hi; ++n) {
      RowTimesTokens(W + n * D, X + t0 * D, D, tokens, Y + t0 * N + n, N);
    }
  }
}
#endif

}  // namespace

static ffi::Error LinearImpl(ffi::Buffer<ffi::F32> x,      // [T, D]
                             ffi::Buffer<ffi::F32> w,      // [L, N, D]
                             ffi::Buffer<ffi::S32> layer,  // []
                             ffi::ResultBuffer<ffi::F32> y) {  // [T, N]
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || xd[1] != wd[2]) {
    return ffi::Error::InvalidArgument("linear: expected x [T, D] and w [L, N, D]");
  }
  const int64_t T = xd[0], D = xd[1], L = wd[0], N = wd[1];
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("linear: layer out of range");
  const float* W = w.typed_data() + static_cast<int64_t>(l) * N * D;
  const float* X = x.typed_data();
  float* Y = y->typed_data();
#pragma omp parallel
  {
    // Contiguous row blocks per thread: each thread streams one region of the matrix.
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (N + threads - 1) / threads;
    const int64_t lo = std::min<int64_t>(N, id * per), hi = std::min<int64_t>(N, lo + per);
    RowsTimesTokens(W, X, D, T, N, lo, hi, Y);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Linear, LinearImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
