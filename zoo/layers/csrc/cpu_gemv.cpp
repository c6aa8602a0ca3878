// Few-row matmuls y = x W^T on CPU for decode: x [M, K] (M small: one token per sequence), W [N, K]
// held bf16 or int8 (one scale per output row). Decode reads every weight once per step, so these kernels are written to stream W at
// the memory's speed: W is read once for all M rows of x, x is converted to fp32 once per call
// (not once per output row), the accumulators are fp32 vectors in independent chains, and the
// output rows are split across threads. Intrinsics for AVX-512 or AVX2 + FMA, whichever the host
// it is built on has (-march=native).
//
// Registered as torch ops zoo::gemv_bf16 / zoo::gemv_int8 (see cpu_kernels.py),
// so torch.compile calls them as extern kernels from its graphs.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <immintrin.h>

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

inline vfloat load_weight(const uint16_t* w) { return load_bf16(w); }
inline vfloat load_weight(const int8_t* w) { return load_int8(w); }

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
// bf16 x bf16 on AVX512_BF16: one vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32
// lanes (exact products, fp32 sums), so the weights need no conversion and a step costs half
// the FMAs of the fp32 path. x stays bf16 (the model's activations are).
template <int M, int RB>
inline void dot_rows(const uint16_t* x, int64_t K, const uint16_t* w, int64_t ldw, float* out, int64_t ldo) {
  __m512 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32) {
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
  constexpr int RB = rows_per_block<M, X, W>();
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) dot_rows<M, RB>(x, K, w + n * K, K, y + n, N);
  for (; n < n1; ++n) dot_rows<M, 1>(x, K, w + n * K, K, y + n, N);
}

#if defined(__AVX512BF16__)
// More than 4 rows of x: 8 rows of W at a time (8 x K bf16, in L1 / L2) meet x in blocks of at most
// 4 rows, so W comes from memory once and each block keeps 4 x 4 accumulators in registers.
void gemv_dispatch_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, float* y,
                        int64_t N) {
  const int64_t tile = M <= 4 ? n1 - n0 : 8;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for_row_blocks<4>(M, [&](auto mb, int64_t m0) {
      gemv_block<decltype(mb)::value>(x + m0 * K, K, w, t0, t1, y + m0 * N, N);
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

}  // namespace

TORCH_LIBRARY(zoo, m) {
  m.def("gemv_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
}
