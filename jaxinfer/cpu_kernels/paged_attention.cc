// Ragged paged attention for XLA:CPU, called through jax.ffi: decode tokens and prefill
// chunks of any length, mixed in one call.
//
// Sequence s owns query tokens [query_start[s], query_start[s+1]) at the last positions of
// its kv_lens[s] cached tokens (causal; the step's own keys are already in the cache).
// Keys and values are read in place from the stacked cache [L, NP, C, K, E] at `layer`.
// Decodes and short chunks: each cached slot once per block of queries for all heads (GQA:
// the G query heads of a KV head share its row). Chunks of 8+ queries: per KV head, in
// matrix form (MatrixBlock). XLA:CPU has to gather the pages into a padded copy and then
// runs small batched dots at a few GFLOP/s.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t e = 0; e < n; e += 16) {
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + e), _mm512_loadu_ps(b + e), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t e = 0; e < n; ++e) acc += a[e] * b[e];
  return acc;
}

inline void Axpy(float w, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) y[e] += w * x[e];
}

// Ask for every cache line of `floats` floats from p: into L1 (keys, read next) or L2
// (values, read after the softmax).
template <int kHint = _MM_HINT_T0>
inline void Prefetch(const float* p, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(p + i), static_cast<_mm_hint>(kHint));
  }
}

#if defined(__AVX512F__)
// out[n][0:16*NV] = sum over keys k in [lo, hi) of w[n][k] * rows[k][0:16*NV] for NQ weight
// rows at once (the G query heads of one KV head, which see the same keys), accumulated in
// registers (an in-memory accumulator updated key after key was ~4x slower: every update
// waits for the previous one's store). Each value vector is loaded once for NQ FMAs, where
// one head at a time loaded it per FMA.
template <int NV, int NQ>
inline void WeightedRowsN(const float* const* rows, int64_t offset, const float* const* w,
                          int64_t lo, int64_t hi, float* const* out) {
  __m512 acc[NQ][NV];
  for (int n = 0; n < NQ; ++n)
    for (int v = 0; v < NV; ++v) acc[n][v] = _mm512_setzero_ps();
  for (int64_t k = lo; k < hi; ++k) {
    __m512 wk[NQ];
    for (int n = 0; n < NQ; ++n) wk[n] = _mm512_set1_ps(w[n][k]);
    const float* r = rows[k] + offset;
    for (int v = 0; v < NV; ++v) {
      __m512 vv = _mm512_loadu_ps(r + 16 * v);
      asm("" : "+v"(vv));
      for (int n = 0; n < NQ; ++n) acc[n][v] = _mm512_fmadd_ps(wk[n], vv, acc[n][v]);
    }
  }
  for (int n = 0; n < NQ; ++n)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out[n] + 16 * v, acc[n][v]);
}

template <int NV>
inline void WeightedRowsUpTo3(const float* const* rows, int64_t offset, const float* const* w,
                              int64_t lo, int64_t hi, float* const* out, int64_t nq) {
  switch (nq) {
    case 1: WeightedRowsN<NV, 1>(rows, offset, w, lo, hi, out); return;
    case 2: WeightedRowsN<NV, 2>(rows, offset, w, lo, hi, out); return;
    default: WeightedRowsN<NV, 3>(rows, offset, w, lo, hi, out); return;
  }
}

// Lane j = the sum of acc[j]'s 16 lanes, for 16 registers at once: a transpose-and-add tree
// (~30 instructions for all 16, where a horizontal sum per register costs ~10 each).
inline __m512 Sum16(const __m512* acc) {
  // 16 -> 8: w[k] holds registers 2k (lanes 0-7) and 2k+1 (lanes 8-15), 8 partial sums each.
  __m512 w[8];
  for (int k = 0; k < 8; ++k) {
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], 0xEE));
  }
  // 8 -> 4: x[m]'s 128-bit block r holds register 4m + r, 4 partial sums.
  __m512 x[4];
  for (int m = 0; m < 4; ++m) {
    x[m] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0xDD));
  }
  // 4 -> 1 inside each 128-bit block: lane 4r + m holds register 4m + r.
  const __m512 y0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 y1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y0, y1, 0x44), _mm512_shuffle_ps(y0, y1, 0xEE));
  // Lane k <- lane 4 (k % 4) + k / 4.
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, z);
}

// Scores of NQ query vectors q[n] against 8 keys (rows[j] + offset), over E floats
// (E % 16 == 0): out[n * 8 + j]. The queries sharing a KV head (its G heads, and a work
// item's queries) share each loaded key vector: 8 + NQ loads per 8 * NQ FMAs, where one
// query against 16 keys loaded a key vector per FMA and was bound by loads. With the
// value sums below (WeightedRowsN), over 30 layers: 8 decodes plus a 16-token chunk at
// 1,800 cached tokens 34.9 -> 27.3 ms, two 256-token prompts 60 -> 42 ms, 32 decodes at
// 320 tokens 28.7 -> 22.1 ms.
template <int NQ>
inline void DotN8(const float* const* q, const float* const* rows, int64_t offset, int64_t E,
                  float* out) {
  __m512 acc[NQ * 8];
  for (int r = 0; r < NQ * 8; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += 16) {
    __m512 qv[NQ];
    for (int n = 0; n < NQ; ++n) qv[n] = _mm512_loadu_ps(q[n] + e);
    for (int j = 0; j < 8; ++j) {
      __m512 kv = _mm512_loadu_ps(rows[j] + offset + e);
      asm("" : "+v"(kv));  // one load per key vector, not one per FMA
      for (int n = 0; n < NQ; ++n) acc[n * 8 + j] = _mm512_fmadd_ps(qv[n], kv, acc[n * 8 + j]);
    }
  }
  int r = 0;
  for (; r + 16 <= NQ * 8; r += 16) _mm512_storeu_ps(out + r, Sum16(acc + r));
  if (r < NQ * 8) {  // the last 8 registers, padded with zeros
    __m512 tail[16];
    for (int k = 0; k < 16; ++k) tail[k] = k < 8 ? acc[r + k] : _mm512_setzero_ps();
    _mm256_storeu_ps(out + r, _mm512_castps512_ps256(Sum16(tail)));
  }
}
#endif

// out[0:E] = sum over keys n in [lo, hi) of w[n] * rows[n][offset : offset + E].
inline void WeightedSum(const float* const* rows, int64_t offset, const float* w, int64_t lo,
                        int64_t hi, int64_t E, float* out) {
#if defined(__AVX512F__)
  switch (E) {
    case 32: WeightedRowsN<2, 1>(rows, offset, &w, lo, hi, &out); return;
    case 64: WeightedRowsN<4, 1>(rows, offset, &w, lo, hi, &out); return;
    case 128: WeightedRowsN<8, 1>(rows, offset, &w, lo, hi, &out); return;
    case 256: WeightedRowsN<16, 1>(rows, offset, &w, lo, hi, &out); return;
    default: break;
  }
#endif
  std::fill(out, out + E, 0.0f);
  for (int64_t n = lo; n < hi; ++n) Axpy(w[n], rows[n] + offset, out, E);
}


// Masked scores use a large finite negative (the library is built with -ffast-math so that
// expf vectorizes; infinities are not allowed there).
constexpr float kMasked = -1e30f;

#if defined(__AVX512F__)
// cap * tanh(x / cap) on 16 scores (Gemma 2's logit soft cap; rare, so not vectorized).
inline __m512 SoftCap(__m512 x, float cap) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, x);
  for (int j = 0; j < 16; ++j) tmp[j] = std::tanh(tmp[j] / cap) * cap;
  return _mm512_load_ps(tmp);
}

// A prefill block against one KV head as two small matrix products, for blocks of many
// queries. The block's R = nt * G (query, head) rows sit in the vector lanes: row
// r = i * G + (h - g * G). Scores: S[key][r] = sum_d K[key][d] * QT[d][r], each key element
// broadcast against 16 * NR rows (8 keys x NR vectors of accumulators, no horizontal sums);
// the causal/window masks, the running max and the exponentials are elementwise over the
// lanes. Values: O[r][e] = sum_key P[key][r] * V[key][e] in tiles of TR rows x 16 * NVC
// floats. The dot form (one (query, head) pair at a time against 8 keys, then a tree sum
// per 16 registers) reached ~60-110 GFLOP/s on long histories.
struct MatrixScratch {
  std::vector<float> qt, s, sums;
  std::vector<const float*> krows, vrows;
  std::vector<uint8_t> valid;
};

template <int NVC, int TR>
inline void MatrixValues(const float* p, int64_t rp, const float* const* vrows, int64_t offset,
                         int64_t r0, int64_t n_keys, int64_t e0, float* const* out,
                         const float* inv) {
  __m512 acc[TR][NVC];
  for (int t = 0; t < TR; ++t)
    for (int c = 0; c < NVC; ++c) acc[t][c] = _mm512_setzero_ps();
  for (int64_t n = 0; n < n_keys; ++n) {
    const float* vr = vrows[n] + offset + e0;
    __m512 vv[NVC];
    for (int c = 0; c < NVC; ++c) vv[c] = _mm512_loadu_ps(vr + 16 * c);
    const float* pn = p + n * rp + r0;
    for (int t = 0; t < TR; ++t) {
      const __m512 w = _mm512_set1_ps(pn[t]);
      for (int c = 0; c < NVC; ++c) acc[t][c] = _mm512_fmadd_ps(w, vv[c], acc[t][c]);
    }
  }
  for (int t = 0; t < TR; ++t) {
    if (out[t] == nullptr) continue;  // a padding row
    const __m512 scale = _mm512_set1_ps(inv[t]);
    for (int c = 0; c < NVC; ++c) {
      _mm512_storeu_ps(out[t] + e0 + 16 * c, _mm512_mul_ps(acc[t][c], scale));
    }
  }
}

template <int NR>
void MatrixBlock(const float* Q, int64_t H, int64_t E, int64_t G, int64_t g, int64_t t0,
                 int64_t nt, int64_t len, int32_t win, const float* KC, const float* VC,
                 const int32_t* pages, int64_t NP, int64_t C, float sm_scale, float soft_cap,
                 float* O, MatrixScratch* m) {
  constexpr int64_t kRp = 16 * NR;  // lanes: R rows padded
  const int64_t R = nt * G;
  const int64_t pos0 = len - nt;  // position of the block's first query
  const int64_t first = win > 0 ? std::max<int64_t>(0, pos0 - win + 1) : 0;
  const int64_t n_keys = len - first;
  const int64_t n_pad = (n_keys + 7) / 8 * 8;
  const int64_t key_stride = (H / G) * E;
  const int64_t offset = g * E;
  // Queries, transposed and pre-scaled: qt[d * kRp + r].
  m->qt.assign(E * kRp, 0.0f);
  for (int64_t r = 0; r < R; ++r) {
    const float* qr = Q + ((t0 + r / G) * H + g * G + r % G) * E;
    for (int64_t d = 0; d < E; ++d) m->qt[d * kRp + r] = qr[d] * sm_scale;
  }
  // Key and value slots of keys [first, first + n_pad); missing pages and keys past the end
  // point at slot 0 and are masked.
  m->krows.assign(n_pad, KC);
  m->vrows.assign(n_pad, VC);
  m->valid.assign(n_pad, 0);
  for (int64_t n = first; n < len; ++n) {
    const int32_t page = pages[n / C];
    if (page < 0 || page >= NP) continue;
    const int64_t slot = (static_cast<int64_t>(page) * C + n % C) * key_stride;
    m->krows[n - first] = KC + slot;
    m->vrows[n - first] = VC + slot;
    m->valid[n - first] = 1;
  }
  // Row r (query i = r / G) sees key n when lo[r] < n <= pos[r]; padding rows copy the last
  // query's range so that every lane stays finite.
  __m512i pos_v[NR], lo_v[NR];
  {
    alignas(64) int32_t pos[kRp], lo[kRp];
    for (int64_t r = 0; r < kRp; ++r) {
      pos[r] = static_cast<int32_t>(pos0 + std::min<int64_t>(r, R - 1) / G);
      lo[r] = win > 0 ? pos[r] - win : -1;
    }
    for (int v = 0; v < NR; ++v) {
      pos_v[v] = _mm512_load_si512(pos + 16 * v);
      lo_v[v] = _mm512_load_si512(lo + 16 * v);
    }
  }
  const int64_t window_edge = win > 0 ? pos0 + nt - 1 - win : -1;  // keys <= it leave some row's window
  m->s.resize(n_pad * kRp);
  float* S = m->s.data();
  __m512 mx[NR];
  for (int v = 0; v < NR; ++v) mx[v] = _mm512_set1_ps(kMasked);
  for (int64_t b = 0; b < n_pad; b += 8) {
    __m512 acc[8][NR];
    for (int j = 0; j < 8; ++j)
      for (int v = 0; v < NR; ++v) acc[j][v] = _mm512_setzero_ps();
    const float* const* rows = m->krows.data() + b;
    // The keys two blocks ahead into L1, and this block's values into L2 for the value pass.
    for (int j = 0; j < 8 && b + 16 + j < n_pad; ++j) Prefetch(rows[16 + j] + offset, E);
    for (int j = 0; j < 8; ++j) Prefetch<_MM_HINT_T1>(m->vrows[b + j] + offset, E);
    for (int64_t d = 0; d < E; ++d) {
      __m512 qv[NR];
      for (int v = 0; v < NR; ++v) qv[v] = _mm512_loadu_ps(m->qt.data() + d * kRp + 16 * v);
      for (int j = 0; j < 8; ++j) {
        const __m512 kb = _mm512_set1_ps(rows[j][offset + d]);
        for (int v = 0; v < NR; ++v) acc[j][v] = _mm512_fmadd_ps(kb, qv[v], acc[j][v]);
      }
    }
    const int64_t n0 = first + b;
    // Keys before the first query's position (and inside every row's window) need no mask.
    bool all_visible = n0 + 7 <= pos0 && n0 > window_edge;
    for (int j = 0; j < 8 && all_visible; ++j) all_visible = m->valid[b + j] != 0;
    for (int j = 0; j < 8; ++j) {
      float* out = S + (b + j) * kRp;
      for (int v = 0; v < NR; ++v) {
        __m512 sc = acc[j][v];
        if (soft_cap > 0.0f) sc = SoftCap(sc, soft_cap);
        if (!all_visible) {
          const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(n0 + j));
          __mmask16 see = _mm512_cmple_epi32_mask(key, pos_v[v]) &
                          _mm512_cmpgt_epi32_mask(key, lo_v[v]);
          if (!m->valid[b + j]) see = 0;
          sc = _mm512_mask_blend_ps(see, _mm512_set1_ps(kMasked), sc);
        }
        mx[v] = _mm512_max_ps(mx[v], sc);
        _mm512_storeu_ps(out + 16 * v, sc);
      }
    }
  }
  alignas(64) float mxa[kRp];
  for (int v = 0; v < NR; ++v) _mm512_store_ps(mxa + 16 * v, mx[v]);
  m->sums.assign(kRp, 0.0f);
  float* sums = m->sums.data();
  for (int64_t n = 0; n < n_keys; ++n) {
    float* row = S + n * kRp;
#pragma omp simd
    for (int64_t r = 0; r < kRp; ++r) {
      row[r] = std::exp(row[r] - mxa[r]);  // masked entries underflow to 0
      sums[r] += row[r];
    }
  }
  // Values, TR rows at a time, over the keys the tile's last query sees.
  constexpr int TR = 4;
  for (int64_t r0 = 0; r0 < R; r0 += TR) {
    float* out[TR];
    float inv[TR];
    for (int t = 0; t < TR; ++t) {
      const int64_t r = r0 + t;
      out[t] = r < R ? O + ((t0 + r / G) * H + g * G + r % G) * E : nullptr;
      inv[t] = r < R && sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f;
    }
    const int64_t keys = std::min<int64_t>(n_keys, pos0 + std::min(R - 1, r0 + TR - 1) / G + 1 - first);
    for (int64_t e0 = 0; e0 < E; e0 += (E % 64 == 0 ? 64 : 32)) {
      if (E % 64 == 0) MatrixValues<4, TR>(S, kRp, m->vrows.data(), offset, r0, keys, e0, out, inv);
      else MatrixValues<2, TR>(S, kRp, m->vrows.data(), offset, r0, keys, e0, out, inv);
    }
  }
}
#endif

}  // namespace

static ffi::Error RaggedPagedAttentionImpl(
    ffi::Buffer<ffi::F32> q,            // [T, H, E]
    ffi::Buffer<ffi::F32> k_cache,      // [L, NP, C, K, E]
    ffi::Buffer<ffi::F32> v_cache,      // [L, NP, C, K, E]
    ffi::Buffer<ffi::S32> kv_lens,      // [S]
    ffi::Buffer<ffi::S32> page_table,   // [S, P]
    ffi::Buffer<ffi::S32> query_start,  // [S + 1]
    ffi::Buffer<ffi::S32> layer,        // []
    ffi::Buffer<ffi::S32> window,       // []: keys at distance >= window are masked
    ffi::ResultBuffer<ffi::F32> out,    // [T, H, E]
    float sm_scale, float soft_cap) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || page_table.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: bad ranks");
  }
  const int64_t T = qd[0], H = qd[1], E = qd[2];
  const int64_t L = kd[0], NP = kd[1], C = kd[2], K = kd[3];
  const int64_t S = kv_lens.dimensions()[0];
  const int64_t P = page_table.dimensions()[1];
  const int64_t G = H / K;
  if (kd[4] != E || H % K != 0 || page_table.dimensions()[0] != S ||
      query_start.dimensions()[0] != S + 1) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: inconsistent shapes");
  }
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("layer index out of range");
  const int32_t win = window.typed_data()[0];
  const float* Q = q.typed_data();
  const float* KC = k_cache.typed_data() + static_cast<int64_t>(l) * NP * C * K * E;
  const float* VC = v_cache.typed_data() + static_cast<int64_t>(l) * NP * C * K * E;
  const int32_t* lens = kv_lens.typed_data();
  const int32_t* pt = page_table.typed_data();
  const int32_t* qs = query_start.typed_data();
  float* O = out->typed_data();
  std::fill(O, O + T * H * E, 0.0f);  // padding tokens stay zero

  // Work items: a sequence's query tokens in blocks, so that a long chunk is spread over
  // the threads (each block reads the keys its queries see). A block's queries are the last
  // ones of its first `len` keys, like a whole sequence's. Decodes and short chunks: blocks
  // of kQueryBlock queries with all heads (g = -1). Chunks of kMatrixMinQueries or more:
  // blocks of up to 48 (query, head) rows of one KV head g, in matrix form (MatrixBlock).
  constexpr int64_t kQueryBlock = 4;
  constexpr int64_t kMatrixMinQueries = 8;
#if defined(__AVX512F__)
  const bool matrix_form = E % 32 == 0 && G <= 48;
#else
  const bool matrix_form = false;
#endif
  struct Item { int64_t s, t0, nt, len, g, cost; };
  std::vector<Item> items;
  int64_t work = 0;  // key rows x queries x KV heads x E: threads pay off only with enough
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = std::min<int64_t>(std::max<int32_t>(lens[s], 0), P * C);
    const int64_t t0 = std::clamp<int64_t>(qs[s], 0, T);
    const int64_t nt = std::clamp<int64_t>(qs[s + 1], t0, T) - t0;
    if (len == 0 || nt == 0) continue;
    const bool matrix = matrix_form && nt >= kMatrixMinQueries;
    const int64_t block = matrix ? std::max<int64_t>(1, 48 / G) : kQueryBlock;
    for (int64_t lo = 0; lo < nt; lo += block) {
      const int64_t hi = std::min(nt, lo + block);
      const int64_t block_len = len - nt + hi;
      if (block_len <= 0) continue;  // queries before position 0 see nothing
      const int64_t cost = block_len * (hi - lo) * E;
      if (matrix) {
        for (int64_t g = 0; g < K; ++g) items.push_back({s, t0 + lo, hi - lo, block_len, g, cost});
      } else {
        items.push_back({s, t0 + lo, hi - lo, block_len, -1, cost * K});
      }
      work += cost * K;
    }
  }
  // Largest first, so that the dynamic schedule ends with the small items.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const bool parallel = work >= (int64_t{1} << 20);
  const int64_t key_stride = K * E;  // floats between consecutive cached slots
  // One work item per sequence with all its heads, so each cached slot (K * E contiguous
  // floats) is read in one sequential sweep of the page: visiting one KV head at a time (a
  // 1/K-strided read) was 1.6-2.5x slower, even with the heads spread over threads.
#pragma omp parallel if (parallel)
  {
    std::vector<float> scores;
    std::vector<const float*> vrows;
    struct Pair { const float* q; float* out; __mmask16 mask; int64_t offset; };
    std::vector<Pair> pair_buf;
#if defined(__AVX512F__)
    MatrixScratch matrix_scratch;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < static_cast<int64_t>(items.size()); ++item) {
      const int64_t s = items[item].s, t0 = items[item].t0, nt = items[item].nt;
      const int64_t len = items[item].len;
#if defined(__AVX512F__)
      if (items[item].g >= 0) {
        const int64_t rows = (nt * G + 15) / 16;
        auto* block = rows == 1 ? MatrixBlock<1> : rows == 2 ? MatrixBlock<2> : MatrixBlock<3>;
        block(Q, H, E, G, items[item].g, t0, nt, len, win, KC, VC, pt + s * P, NP, C, sm_scale,
              soft_cap, O, &matrix_scratch);
        continue;
      }
#endif
      const int64_t pos0 = len - nt;  // position of the first query token (may be < 0)
      // Keys any query of this sequence may see: [first, len).
      const int64_t first = win > 0 ? std::max<int64_t>(0, pos0 - win + 1) : 0;
      const int64_t n_keys = len - first;
      // scores[(i * H + h) * stride + key]: a contiguous row per (query, head).
      int64_t stride = n_keys;
      // Query i sees key n when pos0 + i >= n and (no window or pos0 + i - n < win).
      auto query_range = [&](int64_t n, int64_t* lo, int64_t* hi) {
        *lo = std::max<int64_t>(0, n - pos0);
        *hi = win > 0 ? std::min<int64_t>(nt, n - pos0 + win) : nt;
      };
#if defined(__AVX512F__)
      const bool blocked = E % 16 == 0;
#else
      const bool blocked = false;
#endif
      if (blocked) {
#if defined(__AVX512F__)
        // Blocks of 16 consecutive keys (possibly across pages), scored 8 keys per pass.
        stride = (n_keys + 15) / 16 * 16;
        scores.assign(nt * H * stride, kMasked);
        pair_buf.resize(nt * H);
        Pair* pairs = pair_buf.data();
        const float* rows[16];
        const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2,
                                              1, 0);
        const __m512 masked = _mm512_set1_ps(kMasked);
        const __m512 scale = _mm512_set1_ps(sm_scale);
        for (int64_t n0 = first; n0 < len; n0 += 16) {
          const int64_t nb = std::min<int64_t>(16, len - n0);
          // Prefetch into L2 the key slots (all heads) of the next three blocks and the
          // value slots of this block and the next two, so the misses overlap the dots: a
          // KV head's dot pass touches a third of each slot, and values were otherwise first
          // read after the softmax. Each slot is requested on three successive blocks;
          // requesting each once, at any distance, gained little (prefetches dropped when
          // the queues are full). Batch 32 x 320 cached tokens, 30 layers: 37.5 -> 27.5 ms
          // (12.6 -> 17 GB/s; the same data hot in cache takes 12.5 ms).
          // Only for decode items: a prefill item (4 queries) finds its sequence's slots
          // in cache, read by the item before it, and the prefetch instructions cost more.
          const int64_t ahead = nt == 1 ? 4 * 16 : 0;
          for (int64_t n = n0; n < std::min<int64_t>(len, n0 + ahead); ++n) {
            const int32_t page = pt[s * P + n / C];
            if (page < 0 || page >= NP) continue;
            const int64_t slot = (static_cast<int64_t>(page) * C + n % C) * key_stride;
            if (n >= n0 + 16) Prefetch<_MM_HINT_T1>(KC + slot, key_stride);
            if (n < n0 + 3 * 16) Prefetch<_MM_HINT_T1>(VC + slot, key_stride);
          }
          __mmask16 valid = 0;
          for (int64_t j = 0; j < 16; ++j) {
            rows[j] = KC;  // any readable row; its score is masked
            if (j >= nb) continue;
            const int64_t n = n0 + j;
            const int32_t page = pt[s * P + n / C];
            if (page < 0 || page >= NP) continue;
            rows[j] = KC + (static_cast<int64_t>(page) * C + n % C) * key_stride;
            valid |= static_cast<__mmask16>(1u << j);
          }
          if (valid == 0) continue;
          const __m512i keys = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(n0)), iota);
          int64_t i_lo, i_hi, unused;
          query_range(n0, &i_lo, &unused);
          query_range(n0 + nb - 1, &unused, &i_hi);
          // The (query, head) pairs that see a key of this block, by KV head.
          __mmask16 query_mask[kQueryBlock];  // which keys of the block query i sees
          for (int64_t i = i_lo; i < i_hi; ++i) {
            const int64_t pos = pos0 + i;
            query_mask[i] = valid & _mm512_cmple_epi32_mask(
                keys, _mm512_set1_epi32(static_cast<int32_t>(pos)));
            if (win > 0) {
              query_mask[i] &= _mm512_cmpgt_epi32_mask(
                  keys, _mm512_set1_epi32(static_cast<int32_t>(pos - win)));
            }
          }
          int64_t n_pairs = 0;
          for (int64_t g = 0; g < K; ++g) {
            for (int64_t i = i_lo; i < i_hi; ++i) {
              if (query_mask[i] == 0) continue;
              for (int64_t h = g * G; h < (g + 1) * G; ++h) {
                pairs[n_pairs++] = {Q + ((t0 + i) * H + h) * E,
                                    scores.data() + (i * H + h) * stride + (n0 - first),
                                    query_mask[i], g * E};
              }
            }
          }
          // Three pairs of one KV head at a time, 8 keys per pass, then each pair's 16
          // scores scaled, capped and masked together.
          for (int64_t p0 = 0; p0 < n_pairs;) {
            int64_t np = 1;
            while (np < 3 && p0 + np < n_pairs && pairs[p0 + np].offset == pairs[p0].offset) ++np;
            const float* qs[3] = {pairs[p0].q, pairs[p0 + (np > 1)].q, pairs[p0 + (np > 2 ? 2 : 0)].q};
            alignas(64) float lo[32], hi[32];
            switch (np) {
              case 1: DotN8<1>(qs, rows, pairs[p0].offset, E, lo);
                      DotN8<1>(qs, rows + 8, pairs[p0].offset, E, hi); break;
              case 2: DotN8<2>(qs, rows, pairs[p0].offset, E, lo);
                      DotN8<2>(qs, rows + 8, pairs[p0].offset, E, hi); break;
              default: DotN8<3>(qs, rows, pairs[p0].offset, E, lo);
                       DotN8<3>(qs, rows + 8, pairs[p0].offset, E, hi); break;
            }
            for (int64_t n = 0; n < np; ++n) {
              const Pair& pair = pairs[p0 + n];
              __m512 sc = _mm512_shuffle_f32x4(_mm512_castps256_ps512(_mm256_load_ps(lo + 8 * n)),
                                               _mm512_castps256_ps512(_mm256_load_ps(hi + 8 * n)),
                                               0x44);  // keys 0-7, then 8-15
              sc = _mm512_mul_ps(sc, scale);
              if (soft_cap > 0.0f) sc = SoftCap(sc, soft_cap);
              _mm512_storeu_ps(pair.out, _mm512_mask_blend_ps(pair.mask, masked, sc));
            }
            p0 += np;
          }
        }
#endif
      } else {
        scores.assign(nt * H * n_keys, kMasked);
        for (int64_t p = first / C; p * C < len; ++p) {
          const int32_t page = pt[s * P + p];
          if (page < 0 || page >= NP) continue;
          const float* base = KC + static_cast<int64_t>(page) * C * key_stride;
          const int64_t lo = std::max(first, p * C), hi = std::min(len, (p + 1) * C);
          for (int64_t n = lo; n < hi; ++n) {
            const float* row = base + (n - p * C) * key_stride;
            int64_t i_lo, i_hi;
            query_range(n, &i_lo, &i_hi);
            for (int64_t i = i_lo; i < i_hi; ++i) {
              const float* qi = Q + (t0 + i) * H * E;
              float* sc = scores.data() + i * H * n_keys + (n - first);
              for (int64_t h = 0; h < H; ++h) {
                float acc = Dot(qi + h * E, row + h / G * E, E) * sm_scale;
                if (soft_cap > 0.0f) acc = std::tanh(acc / soft_cap) * soft_cap;
                sc[h * n_keys] = acc;
              }
            }
          }
        }
      }
      for (int64_t r = 0; r < nt * H; ++r) {
        float* row = scores.data() + r * stride;
        float mx = kMasked;
        for (int64_t i = 0; i < n_keys; ++i) mx = std::max(mx, row[i]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n_keys; ++i) {
          row[i] = std::exp(row[i] - mx);  // masked entries underflow to 0
          sum += row[i];
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma omp simd
        for (int64_t i = 0; i < n_keys; ++i) row[i] *= inv;
      }
      // Values: the row of every visible key, then one register-accumulated weighted sum
      // per (query, head). Keys of invalid pages have zero weight: point them at row 0.
      vrows.assign(n_keys, VC);
      for (int64_t p = first / C; p * C < len; ++p) {
        const int32_t page = pt[s * P + p];
        if (page < 0 || page >= NP) continue;
        const float* base = VC + static_cast<int64_t>(page) * C * key_stride;
        const int64_t lo = std::max(first, p * C), hi = std::min(len, (p + 1) * C);
        for (int64_t n = lo; n < hi; ++n) vrows[n - first] = base + (n - p * C) * key_stride;
      }
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t pos = pos0 + i;
        if (pos < 0) continue;
        const int64_t k_hi = pos + 1 - first;
        const int64_t k_lo = win > 0 ? std::max<int64_t>(0, pos - win + 1 - first) : 0;
#if defined(__AVX512F__)
        if (E == 32 || E == 64 || E == 128) {  // up to 3 heads of a KV head together
          for (int64_t h0 = 0; h0 < H;) {
            const int64_t nq = std::min<int64_t>({3, G - h0 % G, H - h0});
            const float* w[3];
            float* o[3];
            for (int64_t n = 0; n < nq; ++n) {
              w[n] = scores.data() + (i * H + h0 + n) * stride;
              o[n] = O + ((t0 + i) * H + h0 + n) * E;
            }
            const int64_t offset = h0 / G * E;
            if (E == 32) WeightedRowsUpTo3<2>(vrows.data(), offset, w, k_lo, k_hi, o, nq);
            else if (E == 64) WeightedRowsUpTo3<4>(vrows.data(), offset, w, k_lo, k_hi, o, nq);
            else WeightedRowsUpTo3<8>(vrows.data(), offset, w, k_lo, k_hi, o, nq);
            h0 += nq;
          }
          continue;
        }
#endif
        for (int64_t h = 0; h < H; ++h) {
          WeightedSum(vrows.data(), h / G * E, scores.data() + (i * H + h) * stride, k_lo, k_hi,
                      E, O + ((t0 + i) * H + h) * E);
        }
      }
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RaggedPagedAttention, RaggedPagedAttentionImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("sm_scale")
        .Attr<float>("soft_cap"));
