// Few-row matmuls y = x W^T on CPU for decode: x [M, K] (M small: one token per sequence), W [N, K]
// held bf16, int8 (one scale per output row) or int4 (a scale and an offset per group of columns). Decode reads every weight once per step, so these kernels are written to stream W at
// the memory's speed: W is read once for all M rows of x, x is converted to fp32 once per call
// (not once per output row), the accumulators are fp32 vectors in independent chains, and the
// output rows are split across threads. Intrinsics for AVX-512 or AVX2 + FMA, whichever the host
// it is built on has (-march=native).
//
// int4 weights (gemv_int4, AVX512_VNNI hosts) take integer dot products instead: x is quantized to
// int8 per chunk of 64 columns for the call (see int4_dot_row), which is what makes int4 cheap
// enough in instructions to read at the memory's speed.
//
// Registered as torch ops zoo::gemv_bf16 / zoo::gemv_int8 / zoo::gemv_int4 (see cpu_kernels.py),
// so torch.compile calls them as extern kernels from its graphs.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// One SIMD register of fp32 lanes and the few operations the kernels need, for AVX-512 or AVX2
// hosts (the build uses -march=native, so the host decides).
#if defined(__AVX512F__)
constexpr int VL = 16;
typedef __m512 vfloat;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat fma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat add(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline float hsum(vfloat v) { return _mm512_reduce_add_ps(v); }
// VL bf16 weights -> fp32: a bf16 is the high half of an fp32
inline vfloat load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vfloat load_int8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VL = 8;
typedef __m256 vfloat;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat load_f32(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat fma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat add(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline float hsum(vfloat v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vfloat load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vfloat load_int8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
#error "zoo's CPU decode kernels need AVX2 with FMA, or AVX-512"
#endif

// Weight element loaders for the scalar tail (K not a multiple of 2 * VL).
inline float scalar_weight(const uint16_t* w, int64_t k) {
  uint32_t bits = static_cast<uint32_t>(w[k]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float scalar_weight(const int8_t* w, int64_t k) { return static_cast<float>(w[k]); }
inline float scalar_weight(const float* w, int64_t k) { return w[k]; }

inline vfloat load_weight(const uint16_t* w) { return load_bf16(w); }
inline vfloat load_weight(const int8_t* w) { return load_int8(w); }
inline vfloat load_weight(const float* w) { return load_f32(w); }

// fn(std::integral_constant<int, MB>{}, m0) for the rows of x in blocks of MB <= MaxRows rows from
// m0: the kernels take the block's row count as a template argument (their accumulators' shape).
template <int MB, int MaxRows, typename Fn>
inline void call_row_block(int64_t rows, int64_t m0, Fn& fn) {
  if (rows == MB) {
    fn(std::integral_constant<int, MB>{}, m0);
  } else if constexpr (MB < MaxRows) {
    call_row_block<MB + 1, MaxRows>(rows, m0, fn);
  }
}

template <int MaxRows, typename Fn>
void for_row_blocks(int64_t M, Fn&& fn) {
  for (int64_t m0 = 0; m0 < M; m0 += MaxRows) call_row_block<1, MaxRows>(std::min<int64_t>(MaxRows, M - m0), m0, fn);
}

// fn(std::integral_constant<int, RB or 1>{}, n) for rows [n0, n1) of W: blocks of RB rows, then the
// tail one row at a time; w_blocks counts the calls.
template <int RB, typename Fn>
void for_w_blocks(int64_t n0, int64_t n1, Fn&& fn) {
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) fn(std::integral_constant<int, RB>{}, n);
  for (; n < n1; ++n) fn(std::integral_constant<int, 1>{}, n);
}

constexpr int64_t w_blocks(int64_t n0, int64_t n1, int64_t RB) { return (n1 - n0) / RB + (n1 - n0) % RB; }

// RB output rows (W rows n .. n + RB) for M rows of x: out[m * ldo + r] = dot(x[m], w[r]).
// Two chains per (m, r) pair hide the FMA latency; RB * M * 2 accumulators stay in registers.
template <int M, int RB, typename W>
inline void dot_rows(const float* x, int64_t K, const W* w, int64_t ldw, float* out, int64_t ldo) {
  vfloat acc[M][RB][2];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r][0] = acc[m][r][1] = vzero();
  const int64_t K2 = K / (2 * VL) * (2 * VL);
  for (int64_t k = 0; k < K2; k += 2 * VL) {
    vfloat xv[M][2];
    for (int m = 0; m < M; ++m) {
      xv[m][0] = load_f32(x + m * K + k);
      xv[m][1] = load_f32(x + m * K + k + VL);
    }
    for (int r = 0; r < RB; ++r) {
      const vfloat w0 = load_weight(w + r * ldw + k);
      const vfloat w1 = load_weight(w + r * ldw + k + VL);
      for (int m = 0; m < M; ++m) {
        acc[m][r][0] = fma(xv[m][0], w0, acc[m][r][0]);
        acc[m][r][1] = fma(xv[m][1], w1, acc[m][r][1]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = hsum(add(acc[m][r][0], acc[m][r][1]));
      for (int64_t k = K2; k < K; ++k) s += x[m * K + k] * scalar_weight(w + r * ldw, k);
      out[m * ldo + r] = s;
    }
  }
}

#if defined(__AVX512BF16__)
// Cache lines a dot_rows call prefetches while it runs: `lines` lines from `next`, spread evenly
// over its K / 32 steps.
struct Prefetch {
  const char* next = nullptr;
  int64_t lines = 0;
};

// bf16 x bf16 on AVX512_BF16: one vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32
// lanes (exact products, fp32 sums), so the weights need no conversion and a step costs half
// the FMAs of the fp32 path. x stays bf16 (the model's activations are).
template <int M, int RB>
inline void dot_rows(const uint16_t* x, int64_t K, const uint16_t* w, int64_t ldw, float* out, int64_t ldo,
                     Prefetch pf = {}) {
  __m512 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t K32 = K / 32 * 32, steps = K / 32;
  int64_t due = 0;
  for (int64_t k = 0; k < K32; k += 32) {
    for (due += pf.lines; due >= steps; due -= steps, pf.next += 64) _mm_prefetch(pf.next, _MM_HINT_T0);
    __m512i xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < RB; ++r) {
      const __m512i wv = _mm512_loadu_si512(w + r * ldw + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)xv[m], (__m512bh)wv);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t k = K32; k < K; ++k) s += scalar_weight(x + m * K, k) * scalar_weight(w + r * ldw, k);
      out[m * ldo + r] = s;
    }
  }
}
#endif

// Output rows per block for M rows of x, so that the accumulators (RB * M, two chains each on the
// fp32 path) and the M x vectors stay in the 32 vector registers. The bf16 path sees M <= 4.
// int8 weights go one row at a time, so W's rows are read as one sequential stream: four
// interleaved streams of 2 KB rows (a 2048-wide int8 layer) read at 35-38 GB/s where one stream
// and a sequential read probe reached 44-48 (a C++ microbenchmark on the 2-core EPYC host,
// 2026-12-07). bf16 rows are twice as long and read at the probe's speed either way.
template <int M, typename X, typename W>
constexpr int rows_per_block() {
  if constexpr (std::is_same_v<W, int8_t>) return 1;
  if constexpr (std::is_same_v<X, uint16_t>) return 4;
  return M <= 2 ? 4 : (M <= 4 ? 2 : 1);
}

// y [M, N] (fp32) = x [M, K] @ W^T for rows [n0, n1) of W: x fp32 (any W), or bf16 with bf16 W.
template <int M, typename X, typename W>
void gemv_block(const X* x, int64_t K, const W* w, int64_t n0, int64_t n1, float* y, int64_t N) {
  for_w_blocks<rows_per_block<M, X, W>()>(n0, n1, [&](auto rb, int64_t n) {
    dot_rows<M, decltype(rb)::value>(x, K, w + n * K, K, y + n, N);
  });
}

#if defined(__AVX512BF16__)
// More than 4 rows of x: 8 rows of W at a time (8 x K bf16, in L1 / L2) meet x in blocks of at most
// 4 rows, so W comes from memory once and each block keeps 4 x 4 accumulators in registers. Left
// alone, a tile's first block would wait on memory and its other blocks on compute, one after the
// other; so while a tile's blocks run, each of its dot_rows calls prefetches a share of the next
// tile, and the memory works while the core computes (8 rows of x over eight 2048 x 11264 weights:
// 13.2 -> 11.0 ms, 12 rows 15.4 -> 12.8 ms, in an interleaved C++ microbenchmark on the 2-core
// EPYC host, 2026-12-07).
void gemv_dispatch_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, float* y,
                        int64_t N) {
  constexpr int XB = 4;  // rows of x per block
  if (M <= XB) {
    for_row_blocks<XB>(M, [&](auto mb, int64_t m0) { gemv_block<decltype(mb)::value>(x + m0 * K, K, w, n0, n1, y + m0 * N, N); });
    return;
  }
  constexpr int TILE = 8, RB = rows_per_block<XB, uint16_t, uint16_t>();
  for (int64_t t0 = n0; t0 < n1; t0 += TILE) {
    const int64_t t1 = std::min(n1, t0 + TILE);
    const char* next = reinterpret_cast<const char*>(w + t1 * K);  // the next tile's rows: contiguous
    const int64_t lines = (std::min(n1, t1 + TILE) - t1) * K * static_cast<int64_t>(sizeof(uint16_t)) / 64;
    const int64_t calls = (M + XB - 1) / XB * w_blocks(t0, t1, RB);  // the dot_rows calls below
    int64_t call = 0;
    auto share = [&]() {  // lines [call * lines / calls, (call + 1) * lines / calls) of the next tile
      const int64_t a = call * lines / calls, b = (call + 1) * lines / calls;
      ++call;
      return Prefetch{next + 64 * a, b - a};
    };
    for_row_blocks<XB>(M, [&](auto mb, int64_t m0) {
      for_w_blocks<RB>(t0, t1, [&](auto rb, int64_t n) {
        dot_rows<decltype(mb)::value, decltype(rb)::value>(x + m0 * K, K, w + n * K, K, y + m0 * N + n, N, share());
      });
    });
  }
}
#endif

template <typename W>
void gemv_dispatch(const float* x, int64_t M, int64_t K, const W* w, int64_t n0, int64_t n1, float* y, int64_t N) {
  for_row_blocks<8>(M, [&](auto mb, int64_t m0) { gemv_block<decltype(mb)::value>(x + m0 * K, K, w, n0, n1, y + m0 * N, N); });
}

// Output rows per parallel task: a multiple of 4 (the row blocks), large enough that a task
// streams a few hundred KB of weights.
constexpr int64_t GRAIN = 64;

void check_inputs(const at::Tensor& x, const at::Tensor& w, int64_t k_per_row) {
  TORCH_CHECK(x.dim() == 2, "zoo gemv: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "zoo gemv: the weight must be a contiguous [N, K'] tensor");
  TORCH_CHECK(x.size(1) == w.size(1) * k_per_row, "zoo gemv: x has ", x.size(1), " columns, the weight ",
              w.size(1) * k_per_row);
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "zoo gemv: CPU tensors only");
}

at::Tensor finish(const at::Tensor& y32, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  check_inputs(x, w, 1);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "zoo::gemv_bf16: bf16 weights");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16) {
    const at::Tensor xc = x.contiguous();
    const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) { gemv_dispatch_bf16(xp, M, K, wp, n0, n1, yp, N); });
    return finish(y, x);
  }
#endif
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xp = x32.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) { gemv_dispatch(xp, M, K, wp, n0, n1, yp, N); });
  return finish(y, x);
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  check_inputs(x, q, 1);
  TORCH_CHECK(q.scalar_type() == at::kChar, "zoo::gemv_int8: int8 weights");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == q.size(0), "zoo::gemv_int8: one scale per output row");
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor s32 = scales.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = x32.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s32.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    gemv_dispatch(xp, M, K, qp, n0, n1, yp, N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) yp[m * N + n] *= sp[n];
  });
  return finish(y, x);
}

// gemv_int4 needs 512-bit byte shifts and masked 256-bit loads (BW, VL) and the uint8 x int8 dot
// product (VNNI).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ZOO_HAS_GEMV_INT4 1
#else
#define ZOO_HAS_GEMV_INT4 0
#endif

#if ZOO_HAS_GEMV_INT4
// ---- int4: integer dot products on int8-quantized activations ----------------------------------
//
// The weight is zoo's stored int4 form: q [N, K/2] bytes (column 2j in the low nibble, 2j + 1 in
// the high one), W[n, k] = (q - 8) * scales[n, g] + zeros[n, g] for k in group g of G columns. For a
// chunk of 64 columns in group g, x is taken as xscale * xq with xq = round(x / xscale) in int8 and
// xscale = max |x| / 127 over the chunk, and
//   sum_k W x = scales[g] * sum_k (q - 8) x  +  zeros[g] * sum_k x
//            ~= scales[g] * xscale * (sum_k q xq - 8 sum_k xq)  +  zeros[g] * sum_k x
// where one vpdpbusd multiplies the chunk's 64 unsigned nibbles q by the 64 signed xq, and sum_k x
// is exact (fp32). The rounding error of xq meets the centred weights q - 8, as it would in a
// float product with W; folding the - 8 into the offset instead (zeros - 8 scales) made it meet
// q's mean of 7.5 and tripled the error. The nibbles unpack as [the 32 even columns | the 32 odd
// ones], so xq is stored in that order.
constexpr int64_t CHUNK = 64;

// x [M, K] fp32 or bf16 (T) -> xq [M, K] int8 (per chunk: even columns, then odd) and xscale [M, K / CHUNK];
// per group of G columns [M, K / G]: xsum = sum_k x and xqsum = sum_k xscale * xq.
template <typename T>
void quantize_activations(const T* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* xscale, float* xsum,
                          float* xqsum) {
  const int64_t chunks_per_group = G / CHUNK;
  for (int64_t i = 0; i < M * (K / CHUNK); ++i) {
    const T* v = x + i * CHUNK;
    float amax = 0.f, sum = 0.f;
    for (int64_t j = 0; j < CHUNK; ++j) {
      const float f = scalar_weight(v, j);
      amax = std::max(amax, std::fabs(f));
      sum += f;
    }
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    const float inv = 1.f / scale;
    int8_t* out = xq + i * CHUNK;
    int32_t qsum = 0;
    for (int64_t j = 0; j < CHUNK / 2; ++j) {
      out[j] = static_cast<int8_t>(std::nearbyint(scalar_weight(v, 2 * j) * inv));
      out[CHUNK / 2 + j] = static_cast<int8_t>(std::nearbyint(scalar_weight(v, 2 * j + 1) * inv));
      qsum += out[j] + out[CHUNK / 2 + j];
    }
    xscale[i] = scale;
    const int64_t g = i / chunks_per_group;  // chunks run along a row, and groups do too
    if (i % chunks_per_group == 0) xsum[g] = xqsum[g] = 0.f;
    xsum[g] += sum;
    xqsum[g] += scale * static_cast<float>(qsum);
  }
}

// n <= 16 bf16 or fp32 values from p as fp32 lanes, the rest zero
inline __m512 load_masked(const uint16_t* p, int n) {
  const __m256i h = n == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                            : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_masked(const float* p, int n) {
  return n == 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}

// out[m * ldo] = dot(x[m], W[n]) for one weight row and MB rows of x (quantized as above); a group
// is 1 << group_shift chunks. The row's scales and zeros are fp32 or bf16 (S).
template <int MB, typename S>
inline void int4_dot_row(const int8_t* xq, const float* xscale, const float* xsum, const float* xqsum, int64_t chunks,
                         int group_shift, const uint8_t* q, const S* scales, const S* zeros, float* out, int64_t ldo) {
  // 16-bit shifts of 0 (low half: the low nibbles) and 4 (high half: the high nibbles), then & 0x0F
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MB][2];  // two chains: a chunk takes fewer cycles than an FMA's latency
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  // scales[g] * xscale[m, c] for 16 chunks at a time, vectorized ahead of the chunks that use them
  alignas(64) float chunk_scales[16];
  alignas(64) float combined[MB][16];
  auto chunk = [&](int64_t c, int j, int chain) {
    const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * CHUNK / 2)));
    const __m512i w = _mm512_and_si512(_mm512_srlv_epi16(bytes, shifts), low4);  // 64 values 0..15
    for (int m = 0; m < MB; ++m) {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq + (m * chunks + c) * CHUNK));
      acc[m][chain] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(combined[m][j]), acc[m][chain]);
    }
  };
  for (int64_t c0 = 0; c0 < chunks; c0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, chunks - c0));
    if (group_shift == 0 && n == 16) {
      _mm512_store_ps(chunk_scales, load_weight(scales + c0));
    } else {
      for (int j = 0; j < n; ++j) chunk_scales[j] = scalar_weight(scales, (c0 + j) >> group_shift);
    }
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < n; ++j) combined[m][j] = chunk_scales[j] * xscale[m * chunks + c0 + j];
    int j = 0;
    for (; j + 2 <= n; j += 2) {
      chunk(c0 + j, j, 0);
      chunk(c0 + j + 1, j + 1, 1);
    }
    if (j < n) chunk(c0 + j, j, 0);
  }
  // the offsets, sum_g zeros[g] xsum[g] - 8 scales[g] xqsum[g], in the lanes of the first chain
  const int64_t groups = chunks >> group_shift;
  for (int64_t g = 0; g < groups; g += VL) {
    const int n = static_cast<int>(std::min<int64_t>(VL, groups - g));
    const __m512 z = load_masked(zeros + g, n), s8 = _mm512_mul_ps(load_masked(scales + g, n), _mm512_set1_ps(8.f));
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = _mm512_fmadd_ps(z, load_masked(xsum + m * groups + g, n), acc[m][0]);
      acc[m][0] = _mm512_fnmadd_ps(s8, load_masked(xqsum + m * groups + g, n), acc[m][0]);
    }
  }
  for (int m = 0; m < MB; ++m) out[m * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros) {
  check_inputs(x, q, 2);
  TORCH_CHECK(q.scalar_type() == at::kByte, "zoo::gemv_int4: uint8 weights (two columns per byte)");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const auto stype = scales.scalar_type();
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.sizes() == zeros.sizes() &&
                  (stype == at::kFloat || stype == at::kBFloat16) && zeros.scalar_type() == stype &&
                  scales.is_contiguous() && zeros.is_contiguous(),
              "zoo::gemv_int4: scales and zeros must be contiguous float32 or bfloat16 [N, K / group] tensors");
  const int64_t groups = scales.size(1), G = groups > 0 && K % groups == 0 ? K / groups : 0;
  const int64_t chunks = K / CHUNK, chunks_per_group = G / CHUNK;
  TORCH_CHECK(G > 0 && G % CHUNK == 0 && (chunks_per_group & (chunks_per_group - 1)) == 0,
              "zoo::gemv_int4: needs groups of 64 x 2^i columns, got K = ", K, " in ", groups, " groups");
  const int group_shift = __builtin_ctzll(static_cast<unsigned long long>(chunks_per_group));
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xstats = at::empty({M * chunks + 2 * M * groups}, x.options().dtype(at::kFloat));
  float* xscale = xstats.data_ptr<float>();  // [M, chunks]
  float* xsum = xscale + M * chunks;         // [M, groups]
  float* xqsum = xsum + M * groups;          // [M, groups]
  if (x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {  // a bf16 run's x, read as it is (no fp32 copy)
    quantize_activations(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K, G,
                         xq.data_ptr<int8_t>(), xscale, xsum, xqsum);
  } else {
    const at::Tensor x32 = x.to(at::kFloat).contiguous();
    quantize_activations(x32.data_ptr<float>(), M, K, G, xq.data_ptr<int8_t>(), xscale, xsum, xqsum);
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* sp, const auto* zp) {
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for_row_blocks<4>(M, [&](auto mb, int64_t m0) {
          int4_dot_row<decltype(mb)::value>(xqp + m0 * K, xscale + m0 * chunks, xsum + m0 * groups,
                                            xqsum + m0 * groups, chunks, group_shift, qp + n * (K / 2),
                                            sp + n * groups, zp + n * groups, yp + m0 * N + n, N);
        });
      }
    });
  };
  if (stype == at::kFloat) {
    run(scales.data_ptr<float>(), zeros.data_ptr<float>());
  } else {
    run(reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()),
        reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::BFloat16>()));
  }
  return finish(y, x);
}
#endif

// Whether this build has gemv_int4 (the host has AVX512_VNNI): a layer keeps its int4 weights in
// the form gemv_int4 reads only then.
bool has_gemv_int4() { return ZOO_HAS_GEMV_INT4; }

}  // namespace

TORCH_LIBRARY(zoo, m) {
  m.def("gemv_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros) -> Tensor");
  m.def("has_gemv_int4() -> bool", &has_gemv_int4);
}

TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
#if ZOO_HAS_GEMV_INT4
  m.impl("gemv_int4", &gemv_int4);
#endif
}
