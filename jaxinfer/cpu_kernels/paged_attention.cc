// Decode attention over a paged KV cache for XLA:CPU, called through jax.ffi.
//
// One query token per sequence (token s belongs to sequence s). Keys and values are read in
// place from the stacked cache [L, NP, C, K, E] at `layer`, each exactly once per KV head,
// with the G query heads of that KV head (GQA) computed together. XLA:CPU has to gather the
// pages into a padded copy and then runs the small batched dots at a few GFLOP/s; this
// loop is bound by reading the cache instead.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error PagedDecodeAttentionImpl(
    ffi::Buffer<ffi::F32> q,            // [S, H, E]
    ffi::Buffer<ffi::F32> k_cache,      // [L, NP, C, K, E]
    ffi::Buffer<ffi::F32> v_cache,      // [L, NP, C, K, E]
    ffi::Buffer<ffi::S32> kv_lens,      // [S]
    ffi::Buffer<ffi::S32> page_table,   // [S, P]
    ffi::Buffer<ffi::S32> layer,        // []
    ffi::Buffer<ffi::S32> window,       // []: keys at distance >= window are masked
    ffi::ResultBuffer<ffi::F32> out,    // [S, H, E]
    float sm_scale, float soft_cap) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || page_table.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("paged_decode_attention: bad ranks");
  }
  const int64_t S = qd[0], H = qd[1], E = qd[2];
  const int64_t L = kd[0], NP = kd[1], C = kd[2], K = kd[3];
  const int64_t P = page_table.dimensions()[1];
  const int64_t G = H / K;
  if (kd[4] != E || H % K != 0 || kv_lens.dimensions()[0] != S ||
      page_table.dimensions()[0] != S) {
    return ffi::Error::InvalidArgument("paged_decode_attention: inconsistent shapes");
  }
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("layer index out of range");
  const int32_t win = window.typed_data()[0];
  const float* Q = q.typed_data();
  const float* KC = k_cache.typed_data() + static_cast<int64_t>(l) * NP * C * K * E;
  const float* VC = v_cache.typed_data() + static_cast<int64_t>(l) * NP * C * K * E;
  const int32_t* lens = kv_lens.typed_data();
  const int32_t* pt = page_table.typed_data();
  float* O = out->typed_data();

  // Threads pay off only with enough keys to read; small decode steps run on the caller.
  int64_t work = 0;
  for (int64_t s = 0; s < S; ++s) work += std::max<int32_t>(lens[s], 0);
  const bool parallel = work * K * E >= (int64_t{1} << 20);
  // Masked scores use a large finite negative (the library is built with -ffast-math so
  // that expf vectorizes; infinities are not allowed there).
  constexpr float kMasked = -1e30f;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) if (parallel)
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t kh = 0; kh < K; ++kh) {
      float* o = O + (s * H + kh * G) * E;
      std::fill(o, o + G * E, 0.0f);
      const int64_t len = std::min<int64_t>(std::max<int32_t>(lens[s], 0), P * C);
      if (len == 0) continue;
      const int64_t first = win > 0 ? std::max<int64_t>(0, len - win) : 0;
      const int64_t n_keys = len - first;
      const float* qs = Q + (s * H + kh * G) * E;
      // scores[g * n_keys + i]: one contiguous row per query head, so the exp vectorizes.
      std::vector<float> scores(G * n_keys, kMasked);
      for (int64_t i = 0; i < n_keys; ++i) {
        const int64_t n = first + i;
        const int32_t page = pt[s * P + n / C];
        if (page < 0 || page >= NP) continue;
        const float* kv = KC + ((static_cast<int64_t>(page) * C + n % C) * K + kh) * E;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qs + g * E;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t e = 0; e < E; ++e) acc += qg[e] * kv[e];
          acc *= sm_scale;
          if (soft_cap > 0.0f) acc = std::tanh(acc / soft_cap) * soft_cap;
          scores[g * n_keys + i] = acc;
        }
      }
      std::vector<float> inv_sum(G);
      for (int64_t g = 0; g < G; ++g) {
        float* row = scores.data() + g * n_keys;
        float mx = kMasked;
        for (int64_t i = 0; i < n_keys; ++i) mx = std::max(mx, row[i]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n_keys; ++i) {
          row[i] = std::exp(row[i] - mx);
          sum += row[i];
        }
        inv_sum[g] = 1.0f / sum;
      }
      for (int64_t i = 0; i < n_keys; ++i) {
        const int64_t n = first + i;
        const int32_t page = pt[s * P + n / C];
        if (page < 0 || page >= NP) continue;
        const float* vv = VC + ((static_cast<int64_t>(page) * C + n % C) * K + kh) * E;
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * n_keys + i] * inv_sum[g];
          float* og = o + g * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) og[e] += w * vv[e];
        }
      }
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PagedDecodeAttention, PagedDecodeAttentionImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("sm_scale")
        .Attr<float>("soft_cap"));
