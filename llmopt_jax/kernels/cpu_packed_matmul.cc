// y = x @ W for a packed quantized kernel W (llmopt_jax/compress/packed.py's PackedTensor, int2/int4/int8 codes), on
// the CPU with AVX-512, through XLA's FFI. llmopt_jax/kernels/cpu.py compiles this file (-O3 -march=native) and
// registers it; without AVX-512 LlmoptKernelIsa() returns 0 and Python keeps XLA's path.
//
// Why: XLA:CPU dequantizes a packed kernel into a float temporary and then runs its dot (unrolled layers: it fuses
// the two into a slow naive loop), so int4 decoded no faster than int8 (bench_decode). Here each 64-byte line of
// codes is unpacked in registers, converted to float and multiply-added into accumulators that stay in registers
// for a whole quantization group; the float weights are never written anywhere.
//
// Layout (row-major): x f32 [M, K]; codes u8 [K*bits/8, N], 8/bits codes per byte along K, lowest bits first
// (int4: input 2r in the low nibble, 2r+1 in the high one); scale f16 [G, N] (or [1, 1] per tensor); zero u8 like
// scale or empty; offset f16 like scale or empty. The weight is w[k, n] = scale[g, n] * (u + lo - zero[g, n]) +
// offset[g, n] for the stored unsigned code u and g = k / (K / G); per group it is summed as
// scale * sum(x * (u - h - z)) + c * sum(x) with h = 2^(bits-1), z = zero - lo - h (integer zero-points, else 0) and
// c = scale * (lo + h) + offset (0 on a symmetric grid), so the inner loop is one FMA per code (two with zero-points).
//
// Work is cut into column blocks of 128 (two cache lines per row of codes, which the prefetcher streams better
// than one) that the calling thread and XLA's intra-op pool take from a shared counter; the shared state is
// reference counted, so a pool task that starts after the work is done touches nothing freed.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

extern "C" int LlmoptKernelIsa() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
  return 1;
#else
  return 0;
#endif
}

namespace {

struct Problem {
  const float* x;
  const uint8_t* codes;
  const uint16_t* scale;
  const uint8_t* zero;     // nullptr when absent
  const uint16_t* offset;  // nullptr when absent
  float* y;
  int64_t m, k, n, groups, bits, lo;
  bool per_tensor;  // scale (and zero/offset) of shape [1, 1]
};

constexpr int64_t kBlock = 128;                     // output columns per task
constexpr int64_t kPrefetchRows = 32;               // rows of codes ahead that are prefetched
constexpr int64_t kMinWeightsPerThread = 1 << 17;   // smaller products run on the calling thread alone

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)

inline __m512 U8ToFloat(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }
inline __m512 S8ToFloat(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); }

// The four 16-float quarters of 64 signed bytes.
inline void Quarters(__m512i b, __m512 out[4]) {
  out[0] = S8ToFloat(_mm512_castsi512_si128(b));
  out[1] = S8ToFloat(_mm512_extracti32x4_epi32(b, 1));
  out[2] = S8ToFloat(_mm512_extracti32x4_epi32(b, 2));
  out[3] = S8ToFloat(_mm512_extracti32x4_epi32(b, 3));
}

inline __m512 LoadHalf(const uint16_t* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

// Rows [m0, m0 + MB) of x times columns [n0, n0 + 64 V) (the last `width` of them valid, width <= 64 V; V = 1 when
// masked) of W, written to y.
// ZERO: the grid has integer zero-points, subtracted from the codes in the loop (one more op per 16 codes): folding
// them into the per-group sum term instead loses float32 digits to cancellation when a zero-point is far from the
// grid's middle and x has a large mean over a long group (per channel: K inputs).
template <int MB, int V, int BITS, bool ZERO>
void Block(const Problem& p, int64_t m0, int64_t n0, int64_t width) {
  const int64_t group = p.k / p.groups;
  constexpr int per_byte = 8 / BITS;  // codes per byte: 4 (int2), 2 (int4) or 1 (int8)
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const __m512i mid = _mm512_set1_epi8(static_cast<char>(1 << (BITS - 1)));
  __mmask64 line_mask[V];
  __mmask16 lane_mask[4 * V];
  for (int v = 0; v < V; ++v) {
    const int64_t w = std::clamp<int64_t>(width - 64 * v, 0, 64);
    line_mask[v] = w == 64 ? ~0ULL : ((1ULL << w) - 1);
  }
  for (int q = 0; q < 4 * V; ++q) {
    const int64_t w = std::clamp<int64_t>(width - 16 * q, 0, 16);
    lane_mask[q] = static_cast<__mmask16>((1u << w) - 1);
  }
  __m512 out[MB][4 * V];
  for (int r = 0; r < MB; ++r)
    for (int q = 0; q < 4 * V; ++q) out[r][q] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 acc[MB][4 * V];
    for (int r = 0; r < MB; ++r)
      for (int q = 0; q < 4 * V; ++q) acc[r][q] = _mm512_setzero_ps();
    const int64_t k0 = g * group;
    __m512 zc[4 * V];  // ZERO: zero - lo - 2^(bits-1), what the centred codes still need subtracted
    if (ZERO) {
      const float shift = static_cast<float>(p.lo + (1 << (BITS - 1)));
      for (int q = 0; q < 4 * V; ++q) {
        const __m512 z = p.per_tensor ? _mm512_set1_ps(static_cast<float>(p.zero[0]))
                                      : U8ToFloat(_mm_maskz_loadu_epi8(lane_mask[q], p.zero + g * p.n + n0 + 16 * q));
        zc[q] = _mm512_sub_ps(z, _mm512_set1_ps(shift));
      }
    }
    for (int64_t i = 0; i < group; i += per_byte) {
      const uint8_t* row = p.codes + ((k0 + i) / per_byte) * p.n + n0;
      for (int v = 0; v < V; ++v) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * p.n + 64 * v),
                                               _MM_HINT_T0);
      for (int v = 0; v < V; ++v) {
        const __m512i b = _mm512_maskz_loadu_epi8(line_mask[v], row + 64 * v);
        for (int c = 0; c < per_byte; ++c) {  // the c-th code of every byte: input k0 + i + c
          __m512 w[4];
          // Codes centred on the grid's middle (u - 2^(bits-1), wrapping to a signed byte): the sum stays small
          // when x has a large mean, so the zero-point term below does not cancel most of it.
          const __m512i u = per_byte == 1 ? b : _mm512_and_si512(_mm512_srli_epi16(b, BITS * c), mask);
          Quarters(_mm512_sub_epi8(u, mid), w);
          if (ZERO) {
            for (int q = 0; q < 4; ++q) w[q] = _mm512_sub_ps(w[q], zc[4 * v + q]);
          }
          for (int r = 0; r < MB; ++r) {
            const __m512 e = _mm512_set1_ps(p.x[(m0 + r) * p.k + k0 + i + c]);
            for (int q = 0; q < 4; ++q) acc[r][4 * v + q] = _mm512_fmadd_ps(w[q], e, acc[r][4 * v + q]);
          }
        }
      }
    }
    // out += scale * acc + c * sum(x over the group), c = scale * (lo + 2^(bits-1)) + offset (0 when symmetric:
    // lo = -2^(bits-1), no offset; also 0 with integer zero-points, already subtracted)
    float xsum[MB];
    for (int r = 0; r < MB; ++r) {
      const float* xr = p.x + (m0 + r) * p.k + k0;
      float t = 0.0f;
      for (int64_t i = 0; i < group; ++i) t += xr[i];
      xsum[r] = t;
    }
    const __m512 lo = _mm512_set1_ps(static_cast<float>(p.lo + (1 << (BITS - 1))));
    for (int q = 0; q < 4 * V; ++q) {
      __m512 s, off = _mm512_setzero_ps();
      if (p.per_tensor) {
        s = LoadHalf(p.scale, 1);
        s = _mm512_set1_ps(_mm512_cvtss_f32(s));
        if (p.offset) off = _mm512_set1_ps(_mm512_cvtss_f32(LoadHalf(p.offset, 1)));
      } else {
        const int64_t at = g * p.n + n0 + 16 * q;
        s = LoadHalf(p.scale + at, lane_mask[q]);
        if (p.offset) off = LoadHalf(p.offset + at, lane_mask[q]);
      }
      const __m512 c = ZERO ? off : _mm512_fmadd_ps(s, lo, off);
      for (int r = 0; r < MB; ++r) {
        out[r][q] = _mm512_fmadd_ps(c, _mm512_set1_ps(xsum[r]), _mm512_fmadd_ps(s, acc[r][q], out[r][q]));
      }
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int q = 0; q < 4 * V; ++q) _mm512_mask_storeu_ps(p.y + (m0 + r) * p.n + n0 + 16 * q, lane_mask[q], out[r][q]);
}

// Every row of x against one block of columns: full blocks of 128, then 64-column pieces (masked at the end).
template <int V, int BITS, bool ZERO>
void Columns(const Problem& p, int64_t n0, int64_t width) {
  int64_t m0 = 0;
  if (V == 1) {  // up to 16 accumulators (4 rows x 64 columns) leave registers for the converted codes
    for (; m0 + 4 <= p.m; m0 += 4) Block<4, 1, BITS, ZERO>(p, m0, n0, width);
    for (; m0 + 2 <= p.m; m0 += 2) Block<2, 1, BITS, ZERO>(p, m0, n0, width);
  }
  for (; m0 + 1 <= p.m; ++m0) Block<1, V, BITS, ZERO>(p, m0, n0, width);
}

template <int BITS, bool ZERO>
void TaskOf(const Problem& p, int64_t task) {
  const int64_t n0 = task * kBlock, width = std::min(kBlock, p.n - n0);
  if (width == kBlock && p.m == 1) {
    Columns<2, BITS, ZERO>(p, n0, width);
  } else {
    for (int64_t at = n0; at < n0 + width; at += 64) {
      Columns<1, BITS, ZERO>(p, at, std::min<int64_t>(64, n0 + width - at));
    }
  }
}

template <int BITS>
void TaskBits(const Problem& p, int64_t task) {
  if (p.zero) {
    TaskOf<BITS, true>(p, task);
  } else {
    TaskOf<BITS, false>(p, task);
  }
}

void Task(const Problem& p, int64_t task) {
  if (p.bits == 2) TaskBits<2>(p, task);
  if (p.bits == 4) TaskBits<4>(p, task);
  if (p.bits == 8) TaskBits<8>(p, task);
}

#else

void Task(const Problem&, int64_t) {}

#endif

struct Work {
  Problem p;
  int64_t tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      Task(p, t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                        ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::U8> zero, ffi::Buffer<ffi::F16> offset,
                        ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t lo) {
  if (!LlmoptKernelIsa()) return ffi::Error::Internal("packed_matmul: compiled without AVX-512");
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("packed_matmul: x, codes and scale must be 2-D");
  }
  if (bits != 2 && bits != 4 && bits != 8) {
    return ffi::Error::InvalidArgument("packed_matmul: bits must be 2, 4 or 8");
  }
  Problem p{x.typed_data(), codes.typed_data(), reinterpret_cast<const uint16_t*>(scale.typed_data()),
            zero.element_count() ? zero.typed_data() : nullptr,
            offset.element_count() ? reinterpret_cast<const uint16_t*>(offset.typed_data()) : nullptr,
            y->typed_data(), xd[0], xd[1], cd[1], sd[0], bits, lo, sd[0] == 1 && sd[1] == 1};
  if (cd[0] * 8 != p.k * bits) return ffi::Error::InvalidArgument("packed_matmul: codes rows do not match x's K");
  if (p.groups <= 0 || p.k % p.groups || (p.k / p.groups) % (8 / bits)) {
    return ffi::Error::InvalidArgument("packed_matmul: K must split into equal groups of whole bytes of codes");
  }
  if (!p.per_tensor && sd[1] != p.n) return ffi::Error::InvalidArgument("packed_matmul: scale columns != N");
  const auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != p.m || yd[1] != p.n) {
    return ffi::Error::InvalidArgument("packed_matmul: the result must be [M, N] (N = the codes' columns)");
  }
  const int64_t want = p.per_tensor ? 1 : p.groups * p.n;
  if ((p.zero && zero.element_count() != want) || (p.offset && offset.element_count() != want)) {
    return ffi::Error::InvalidArgument("packed_matmul: zero/offset must match scale");
  }
  auto work = std::make_shared<Work>();
  work->p = p;
  work->tasks = (p.n + kBlock - 1) / kBlock;
  const int64_t helpers = std::min<int64_t>({static_cast<int64_t>(pool.num_threads()), work->tasks - 1,
                                             p.m * p.k * p.n / kMinWeightsPerThread - 1});
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmoptPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("lo"));
