// Group-quantized small-batch dense layer for XLA:CPU, called through jax.ffi:
// y[T, N] = x[T, K] . W[l]^T with W[n, k] = q[n, k] * scale[n, k / g] + offset[n, k / g].
//
// XLA:CPU converts int8 to f32 inside a dot about 10x slower than an f32 dot, so the weights
// are dequantized here in registers instead. q is the whole stacked tensor (int8 [L, N, K] or
// packed int4 uint8 [L, N, K / 2], low nibble = even element, nibble u means u - 8) and
// `layer` selects a slice, read in place. One token (decode) streams each group through
// int -> f32 conversions and FMAs into a per-group accumulator, scaled once per group; the
// offset contributes offset * sum(x over the group), precomputed once per call. Several
// tokens dequantize 4 rows into an L1 buffer and run them through 4-row register tiles.
// Int4 rows are unpacked without shuffles: x is permuted once per call so that within each
// 32-element block the 16 even elements come first, matching the low nibbles of 16 bytes.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>
#include <omp.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum class Real { kF32, kF16, kBF16 };

float HalfToFloat(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    int e = -1;
    do { mantissa <<= 1; ++e; } while ((mantissa & 0x400) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((mantissa & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

#if defined(__AVX512F__)
inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}
#endif

// Row `n` of a [N, G] scale/offset matrix as float32: the row itself, or converted into buf.
const float* RowAsFloat(const void* base, Real real, int64_t n, int64_t count, float* buf) {
  if (real == Real::kF32) return static_cast<const float*>(base) + n * count;
  const uint16_t* h = static_cast<const uint16_t*>(base) + n * count;
  int64_t i = 0;
  if (real == Real::kBF16) {
    for (; i < count; ++i) {  // bf16 is the top half of an f32
      const uint32_t bits = uint32_t(h[i]) << 16;
      std::memcpy(buf + i, &bits, 4);
    }
    return buf;
  }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  for (; i < count; i += 16) {  // masked: a row's G groups are rarely a multiple of 16
    const __mmask16 m = TailMask(count - i);
    _mm512_mask_storeu_ps(buf + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
  }
#endif
#if defined(__F16C__)
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(buf + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
#endif
  for (; i < count; ++i) buf[i] = HalfToFloat(h[i]);
  return buf;
}

// Everything a thread needs to handle rows of one call.
struct Problem {
  int64_t T, K, N, G, g;  // tokens, inputs, outputs, groups per row, group size
  int bits;
  const uint8_t* q;       // layer l, [N, K] int8 or [N, K / 2] packed int4
  const void* scale;      // layer l, [N, G]
  const void* offset;     // layer l, [N, G] or nullptr
  Real scale_real, offset_real;
  const float* x;         // [T, K], int4: permuted within 32-element blocks
  const float* xsum;      // [G] sums of x per group (one token, AVX-512 only)
  float* y;               // [T, N]
  int64_t row_bytes() const { return bits == 8 ? K : K / 2; }
};

// Per-thread scratch: converted scale/offset rows and dequantized weight rows.
struct Scratch {
  std::vector<float> scale, offset, rows;
};

#if defined(__AVX512F__)
// Lanes 0-7 = a, lanes 8-15 = b (AVX-512F only, no DQ needed).
inline __m512 Halves(float a, float b) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(a)),
                                             _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}

inline __m512 Int8x16(const uint8_t* q) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}

// Sum over one int8 group of q * x, as a vector (g is a multiple of 16).
inline __m512 GroupDot8(const uint8_t* q, const float* x, int64_t g) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= g; k += 32) {
    a0 = _mm512_fmadd_ps(Int8x16(q + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(Int8x16(q + k + 16), _mm512_loadu_ps(x + k + 16), a1);
  }
  if (k < g) a0 = _mm512_fmadd_ps(Int8x16(q + k), _mm512_loadu_ps(x + k), a0);
  return _mm512_add_ps(a0, a1);
}

// 16 bytes of packed int4 (32 elements) times the permuted x block: lanes hold
// u_low * x_even + u_high * x_odd, elements 2j and 2j + 1 of the block in lane j.
inline __m512 Int4Block(const uint8_t* q, const float* x, __m512 acc) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  acc = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), acc);
  return _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), acc);
}

// Sum of nibble * x over one int4 group of g >= 32 elements (g / 2 bytes).
inline __m512 GroupDot4(const uint8_t* q, const float* x, int64_t g) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= g; k += 64) {
    a0 = Int4Block(q + k / 2, x + k, a0);
    a1 = Int4Block(q + k / 2 + 16, x + k + 32, a1);
  }
  if (k < g) a0 = Int4Block(q + k / 2, x + k, a0);
  return _mm512_add_ps(a0, a1);
}

// Software prefetch distance for the one-token stream (as linear.cc does for f32 rows).
constexpr int64_t kPrefetchBytes = 4096;

// One token, one row: sum over groups of scale * dot(q, x) + sum of offset' * xsum, where
// offset' = offset (int8) or offset - 8 * scale (int4, nibbles are u not u - 8). Two row
// accumulators alternate groups so consecutive groups do not wait on one FMA chain.
float RowOneToken(const Problem& p, int64_t n, Scratch& s) {
  const float* sc = RowAsFloat(p.scale, p.scale_real, n, p.G, s.scale.data());
  const uint8_t* q = p.q + n * p.row_bytes();
  const int64_t G = p.G, g = p.g;
  // The hardware prefetcher alone left one thread at ~6 GB/s: ask for rows ahead.
  for (int64_t b = 0; b < p.row_bytes(); b += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchBytes + b), _MM_HINT_T0);
  }
  __m512 r0 = _mm512_setzero_ps(), r1 = _mm512_setzero_ps();
  if (p.bits == 8) {
    int64_t gi = 0;
    for (; gi + 2 <= G; gi += 2) {
      r0 = _mm512_fmadd_ps(GroupDot8(q + gi * g, p.x + gi * g, g), _mm512_set1_ps(sc[gi]), r0);
      r1 = _mm512_fmadd_ps(GroupDot8(q + (gi + 1) * g, p.x + (gi + 1) * g, g),
                           _mm512_set1_ps(sc[gi + 1]), r1);
    }
    if (gi < G) {
      r0 = _mm512_fmadd_ps(GroupDot8(q + gi * g, p.x + gi * g, g), _mm512_set1_ps(sc[gi]), r0);
    }
  } else if (g >= 32) {
    int64_t gi = 0;
    for (; gi + 2 <= G; gi += 2) {
      r0 = _mm512_fmadd_ps(GroupDot4(q + gi * g / 2, p.x + gi * g, g), _mm512_set1_ps(sc[gi]), r0);
      r1 = _mm512_fmadd_ps(GroupDot4(q + (gi + 1) * g / 2, p.x + (gi + 1) * g, g),
                           _mm512_set1_ps(sc[gi + 1]), r1);
    }
    if (gi < G) {
      r0 = _mm512_fmadd_ps(GroupDot4(q + gi * g / 2, p.x + gi * g, g), _mm512_set1_ps(sc[gi]),
                           r0);
    }
  } else {
    // g == 16: a 32-block spans two groups, lanes 0-7 the first and 8-15 the second.
    for (int64_t gi = 0; gi < G; gi += 2) {
      const __m512 d = Int4Block(q + gi * 8, p.x + gi * 16, _mm512_setzero_ps());
      r0 = _mm512_fmadd_ps(d, Halves(sc[gi], sc[gi + 1]), r0);
    }
  }
  if (p.offset != nullptr || p.bits == 4) {
    // + sum over groups of (offset - shift * scale) * xsum, 16 groups at a time.
    const float* of = p.offset ? RowAsFloat(p.offset, p.offset_real, n, G, s.offset.data())
                               : nullptr;
    const __m512 shift = _mm512_set1_ps(p.bits == 4 ? 8.f : 0.f);
    for (int64_t gi = 0; gi < G; gi += 16) {
      const __mmask16 m = TailMask(G - gi);
      const __m512 ov = of ? _mm512_maskz_loadu_ps(m, of + gi) : _mm512_setzero_ps();
      const __m512 shifted = _mm512_fnmadd_ps(shift, _mm512_maskz_loadu_ps(m, sc + gi), ov);
      r1 = _mm512_fmadd_ps(shifted, _mm512_maskz_loadu_ps(m, p.xsum + gi), r1);
    }
  }
  const float y = _mm512_reduce_add_ps(_mm512_add_ps(r0, r1));
  return y;
}

// R dequantized rows (stride K) times TT tokens in an R x TT register tile.
template <int R, int TT>
inline void Tile(const float* __restrict w, const float* __restrict x, int64_t K, float* y,
                 int64_t out_stride) {
  __m512 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {  // K is a multiple of 32
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * K + k);
    for (int t = 0; t < TT; ++t) {
      __m512 xv = _mm512_loadu_ps(x + t * K + k);
      asm("" : "+v"(xv));  // one load per token, not one per FMA (see linear.cc)
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) y[t * out_stride + r] = _mm512_reduce_add_ps(acc[r][t]);
}

constexpr int kTileRows = 4, kTileTokens = 6;

template <int R>
inline void TileTokens(const float* w, const float* x, int64_t K, int64_t tokens, float* y,
                       int64_t out_stride) {
  switch (tokens) {
    case 1: Tile<R, 1>(w, x, K, y, out_stride); break;
    case 2: Tile<R, 2>(w, x, K, y, out_stride); break;
    case 3: Tile<R, 3>(w, x, K, y, out_stride); break;
    case 4: Tile<R, 4>(w, x, K, y, out_stride); break;
    case 5: Tile<R, 5>(w, x, K, y, out_stride); break;
    default: Tile<R, 6>(w, x, K, y, out_stride); break;
  }
}

// Row n dequantized into out[K] (int4: in the permuted order of x), for the tiles.
void DequantizeRowVector(const Problem& p, int64_t n, Scratch& s, float* out) {
  const float* sc = RowAsFloat(p.scale, p.scale_real, n, p.G, s.scale.data());
  const float* of = p.offset ? RowAsFloat(p.offset, p.offset_real, n, p.G, s.offset.data())
                             : nullptr;
  const uint8_t* q = p.q + n * p.row_bytes();
  const int64_t g = p.g;
  if (p.bits == 8) {
    for (int64_t gi = 0; gi < p.G; ++gi) {
      const __m512 sv = _mm512_set1_ps(sc[gi]), ov = _mm512_set1_ps(of ? of[gi] : 0.f);
      for (int64_t k = gi * g; k < (gi + 1) * g; k += 16)
        _mm512_storeu_ps(out + k, _mm512_fmadd_ps(Int8x16(q + k), sv, ov));
    }
    return;
  }
  // Int4: 16 bytes (32 elements) at a time; for g == 16 their lanes 0-7 and 8-15 are two
  // groups. The nibble is u = q + 8, so the offset becomes offset - 8 * scale.
  const int64_t groups_per_block = g == 16 ? 2 : 1;
  for (int64_t gi = 0; gi < p.G; gi += groups_per_block) {
    const int64_t gj = gi + groups_per_block - 1;  // the second group of a g == 16 block
    const __m512 sv = Halves(sc[gi], sc[gj]);
    const __m512 ov = Halves((of ? of[gi] : 0.f) - 8.f * sc[gi],
                             (of ? of[gj] : 0.f) - 8.f * sc[gj]);
    for (int64_t k = gi * g; k < (gi + groups_per_block) * g; k += 32) {
      const __m512i v =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      _mm512_storeu_ps(out + k, _mm512_fmadd_ps(lo, sv, ov));
      _mm512_storeu_ps(out + k + 16, _mm512_fmadd_ps(hi, sv, ov));
    }
  }
}

// Rows [lo, hi), several tokens: dequantize kTileRows rows once, apply them to every token.
void RowsManyTokens(const Problem& p, int64_t lo, int64_t hi, Scratch& s) {
  for (int64_t n = lo; n < hi; n += kTileRows) {
    const int64_t rows = std::min<int64_t>(kTileRows, hi - n);
    for (int64_t r = 0; r < rows; ++r) DequantizeRowVector(p, n + r, s, s.rows.data() + r * p.K);
    for (int64_t t0 = 0; t0 < p.T; t0 += kTileTokens) {
      const int64_t tokens = std::min<int64_t>(kTileTokens, p.T - t0);
      float* y = p.y + t0 * p.N + n;
      const float* x = p.x + t0 * p.K;
      if (rows == kTileRows) {
        TileTokens<kTileRows>(s.rows.data(), x, p.K, tokens, y, p.N);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          TileTokens<1>(s.rows.data() + r * p.K, x, p.K, tokens, y + r, p.N);
      }
    }
  }
}

void Rows(const Problem& p, int64_t lo, int64_t hi, Scratch& s) {
  if (p.T == 1) {
    for (int64_t n = lo; n < hi; ++n) p.y[n] = RowOneToken(p, n, s);
  } else {
    RowsManyTokens(p, lo, hi, s);
  }
}
#else
// Without AVX-512: dequantize each row into L1, then apply it to up to 4 tokens at a time.
constexpr int64_t kTileRows = 4, kTokens = 4;

// Row n dequantized into out[K] (int4: in the permuted order of x); plain C++ that the
// compiler vectorizes for whatever the target has.
void DequantizeRow(const Problem& p, int64_t n, Scratch& s, float* out) {
  const float* sc = RowAsFloat(p.scale, p.scale_real, n, p.G, s.scale.data());
  const float* of = p.offset ? RowAsFloat(p.offset, p.offset_real, n, p.G, s.offset.data())
                             : nullptr;
  const uint8_t* q = p.q + n * p.row_bytes();
  if (p.bits == 8) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(q);
    for (int64_t gi = 0; gi < p.G; ++gi) {
      const float a = sc[gi], b = of ? of[gi] : 0.f;
      const int8_t* qg = qs + gi * p.g;
      float* o = out + gi * p.g;
      for (int64_t k = 0; k < p.g; ++k) o[k] = float(qg[k]) * a + b;
    }
    return;
  }
  // Int4: each 16-element half of a 32-block lies in one group (16 divides g); its 8 bytes
  // give 8 low nibbles (positions 8h..) and 8 high nibbles (positions 16 + 8h..).
  for (int64_t half = 0; half < p.K / 16; ++half) {
    const int64_t gi = half * 16 / p.g, block = half / 2, h = half % 2;
    const float a = sc[gi], b = (of ? of[gi] : 0.f) - 8.f * a;  // u - 8: fold -8 into offset
    const uint8_t* qb = q + block * 16 + h * 8;
    float* o = out + block * 32 + h * 8;
    for (int j = 0; j < 8; ++j) {
      o[j] = float(qb[j] & 15) * a + b;
      o[16 + j] = float(qb[j] >> 4) * a + b;
    }
  }
}


inline void RowTimesTokens(const float* __restrict w, const float* __restrict x, int64_t K,
                           int64_t tokens, float* out, int64_t out_stride) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[kTokens];
  for (int64_t t = 0; t < kTokens; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {  // K is a multiple of 32
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int64_t t = 0; t < tokens; ++t)
      acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * K + k), acc[t]);
  }
  for (int64_t t = 0; t < tokens; ++t) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    out[t * out_stride] = _mm_cvtss_f32(v);
  }
#else
  for (int64_t t = 0; t < tokens; ++t) {
    float sum = 0.f;
    for (int64_t k = 0; k < K; ++k) sum += w[k] * x[t * K + k];
    out[t * out_stride] = sum;
  }
#endif
}

void Rows(const Problem& p, int64_t lo, int64_t hi, Scratch& s) {
  for (int64_t n = lo; n < hi; ++n) {
    DequantizeRow(p, n, s, s.rows.data());
    for (int64_t t0 = 0; t0 < p.T; t0 += kTokens) {
      RowTimesTokens(s.rows.data(), p.x + t0 * p.K, p.K, std::min(kTokens, p.T - t0),
                     p.y + t0 * p.N + n, p.N);
    }
  }
}
#endif

bool RealOf(ffi::DataType type, Real* real) {
  switch (type) {
    case ffi::DataType::F32: *real = Real::kF32; return true;
    case ffi::DataType::F16: *real = Real::kF16; return true;
    case ffi::DataType::BF16: *real = Real::kBF16; return true;
    default: return false;
  }
}

}  // namespace

static ffi::Error QuantLinearImpl(ffi::Buffer<ffi::F32> x,       // [T, K]
                                  ffi::AnyBuffer q,              // [L, N, K] s8 | [L, N, K/2] u8
                                  ffi::AnyBuffer scale,          // [L, N, G]
                                  ffi::AnyBuffer offset,         // [L, N, G] or [0]: none
                                  ffi::Buffer<ffi::S32> layer,   // []
                                  ffi::ResultBuffer<ffi::F32> y,  // [T, N]
                                  int32_t bits, int32_t group_size) {
  auto xd = x.dimensions();
  auto qd = q.dimensions();
  auto sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 3 || sd.size() != 3) {
    return ffi::Error::InvalidArgument("quant_linear: expected x [T, K], q/scale [L, N, .]");
  }
  const int64_t T = xd[0], K = xd[1], L = qd[0], N = qd[1], g = group_size;
  if (bits != 8 && bits != 4) return ffi::Error::InvalidArgument("quant_linear: bits not 4/8");
  const auto want = bits == 8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (q.element_type() != want || qd[2] != (bits == 8 ? K : K / 2)) {
    return ffi::Error::InvalidArgument("quant_linear: q dtype/shape does not match bits and K");
  }
  if (g < 16 || g % 16 != 0 || K % 32 != 0 || K % g != 0) {
    return ffi::Error::InvalidArgument("quant_linear: need 16 | group_size | K and 32 | K");
  }
  const int64_t G = K / g;
  if (sd[0] != L || sd[1] != N || sd[2] != G) {
    return ffi::Error::InvalidArgument("quant_linear: scale shape must be [L, N, K / g]");
  }
  const bool has_offset = offset.element_count() != 0;
  Real scale_real = Real::kF32, offset_real = Real::kF32;
  if (!RealOf(scale.element_type(), &scale_real) ||
      (has_offset && !RealOf(offset.element_type(), &offset_real))) {
    return ffi::Error::InvalidArgument("quant_linear: scale/offset must be f32, f16 or bf16");
  }
  if (has_offset && (offset.dimensions().size() != 3 ||
                     offset.element_count() != scale.element_count())) {
    return ffi::Error::InvalidArgument("quant_linear: offset shape must match scale");
  }
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("quant_linear: layer out of range");
  if (T == 0 || N == 0) return ffi::Error::Success();

  // Permuted x (int4) and per-group sums of x (offsets, int4's -8), once per call.
  const float* X = x.typed_data();
  std::vector<float> permuted, xsum;
  if (bits == 4) {
    permuted.resize(T * K);
    for (int64_t i = 0; i < T * K; i += 32) {
      for (int j = 0; j < 16; ++j) {
        permuted[i + j] = X[i + 2 * j];
        permuted[i + 16 + j] = X[i + 2 * j + 1];
      }
    }
  }
#if defined(__AVX512F__)
  if (T == 1 && (bits == 4 || has_offset)) {  // only the one-token path reads them
    xsum.assign(G, 0.f);
    for (int64_t gi = 0; gi < G; ++gi)
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) xsum[gi] += X[k];
  }
#endif
  const int64_t row_bytes = bits == 8 ? K : K / 2;
  const int64_t scale_bytes = static_cast<int64_t>(ffi::ByteWidth(scale.element_type())) * N * G;
  const int64_t offset_bytes =
      has_offset ? static_cast<int64_t>(ffi::ByteWidth(offset.element_type())) * N * G : 0;
  Problem p{T, K, N, G, g, bits,
            static_cast<const uint8_t*>(q.untyped_data()) + l * N * row_bytes,
            static_cast<const char*>(scale.untyped_data()) + l * scale_bytes,
            has_offset ? static_cast<const char*>(offset.untyped_data()) + l * offset_bytes
                       : nullptr,
            scale_real, offset_real, bits == 4 ? permuted.data() : X,
            xsum.empty() ? nullptr : xsum.data(), y->typed_data()};
#pragma omp parallel
  {
    // Contiguous blocks of whole tiles per thread: each thread streams one region of q.
    thread_local Scratch scratch;
    scratch.scale.resize(G);
    scratch.offset.resize(G);
    scratch.rows.resize(kTileRows * K);
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t tiles = (N + kTileRows - 1) / kTileRows;
    const int64_t per = (tiles + threads - 1) / threads * kTileRows;
    const int64_t lo = std::min<int64_t>(N, id * per), hi = std::min<int64_t>(N, lo + per);
    if (lo < hi) Rows(p, lo, hi, scratch);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantLinear, QuantLinearImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("group_size"));
