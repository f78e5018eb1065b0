// The dense building blocks of the CPU kernels: C = alpha op(A) op(B) + beta C
// for row-major matrices, and the elementwise passes around it.
//
// Products whose dimensions are all <= kSmall (128) run in an in-cache
// register-tiled loop: a 6 x 16 AVX2/FMA tile for float32 (with an in-register
// 8 x 8 transpose when op(B) is transposed), a 4 x 2W GCC-vector tile for
// float64 and for CPUs without AVX2. The x86 code sits behind
// `#if defined(__x86_64__) || defined(_M_X64)` and is compiled for AVX2/FMA per
// function (target attributes, chosen at run time), never with a global -mavx2;
// elsewhere (ARM, macOS arm64) the portable tile runs. Larger products call the
// Fortran BLAS that libtorch exports (no ATen dispatch or allocation), or, where
// it does not export one, at::addmm_out on the same memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// FLATKERN_PORTABLE_ONLY / FLATKERN_NO_FORTRAN_BLAS: compile the portable paths on any
// machine, to test what ARM and macOS builds run
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FLATKERN_PORTABLE_ONLY)
#define FLATKERN_X86 1
#include <immintrin.h>
#if defined(__GNUC__)
#define FLATKERN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else  // MSVC compiles AVX2 intrinsics without a target attribute
#define FLATKERN_TARGET_AVX2
#endif
#else
#define FLATKERN_X86 0
#endif

#if defined(__GNUC__) && !defined(_WIN32) && !defined(FLATKERN_NO_FORTRAN_BLAS)
// Fortran BLAS exported by libtorch_cpu (MKL or OpenBLAS, LP64): calling it
// directly skips ATen's dispatch and allocation, which dominate small problems.
// Weak, as is MKL's thread-local thread count (the C entry; the lower-case
// symbol is the Fortran one, taking a pointer): a torch that exports neither
// still loads this extension; the addresses are then null and mm() falls back
// to ATen, SequentialBlasIfSmall to nothing.
#define FLATKERN_FORTRAN_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}
#else
#define FLATKERN_FORTRAN_BLAS 0
#endif

namespace flatkern {
namespace cpu {

#if FLATKERN_FORTRAN_BLAS
inline bool has_fortran_blas() {
  static const bool yes = &sgemm_ != nullptr && &dgemm_ != nullptr;
  return yes;
}
inline bool has_mkl_thread_control() { return &MKL_Set_Num_Threads_Local != nullptr; }
inline int set_blas_threads_local(int nt) { return MKL_Set_Num_Threads_Local(nt); }

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                      int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
#else
inline bool has_mkl_thread_control() { return false; }
inline int set_blas_threads_local(int) { return 0; }
#endif

// The portable large product: ATen's addmm on tensors over the same memory
// (beta = 0: C is ignored, so it may be uninitialized).
template <typename T>
void mm_aten(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta, T* C) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  T* a_ = const_cast<T*>(A);
  T* b_ = const_cast<T*>(B);
  const at::Tensor a = ta ? at::from_blob(a_, {K, M}, opts).t() : at::from_blob(a_, {M, K}, opts);
  const at::Tensor b = tb ? at::from_blob(b_, {N, K}, opts).t() : at::from_blob(b_, {K, N}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, opts);
  at::addmm_out(c, c, a, b, beta, alpha);
}

// Products with every dimension up to kSmall run in an in-cache loop instead of
// BLAS: for 32 x 32 matrices the BLAS call overhead (argument checks, dispatch,
// threading decision) costs several times the arithmetic.
constexpr int64_t kSmall = 128;

#if defined(__GNUC__)
// 256-bit vectors (GCC vector extensions): W lanes of T.
template <typename T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(32))); };

// C (M x N) = alpha op(A) op(B) + beta C for M, N, K <= kSmall. op(B) is first
// copied into `Bp` with its rows padded with zeros to a multiple of the tile
// width JB = 2W, then C is computed in 4 x JB tiles whose eight vector
// accumulators stay in registers over the whole k loop; a last partial tile
// recomputes a valid row and stores only the rows and columns inside C.
#define FLATKERN_SMALL_MM_BODY                                                                \
  using V = typename Vec<T>::type;                                                            \
  constexpr int64_t W = 32 / sizeof(T), JB = 2 * W;                                           \
  const int64_t NP = (N + JB - 1) / JB * JB;                                                  \
  alignas(64) T Bp[kSmall * (kSmall + JB)];                                                   \
  for (int64_t k = 0; k < K; ++k) {                                                           \
    T* row = Bp + k * NP;                                                                     \
    if (tb) for (int64_t j = 0; j < N; ++j) row[j] = B[j * K + k];                            \
    else for (int64_t j = 0; j < N; ++j) row[j] = B[k * N + j];                               \
    for (int64_t j = N; j < NP; ++j) row[j] = 0;                                              \
  }                                                                                           \
  /* element (i, k) of op(A) is A[i * sa + k * sk] */                                         \
  const int64_t sa = ta ? 1 : K, sk = ta ? M : 1;                                             \
  alignas(64) T out[4][JB];                                                                   \
  for (int64_t i0 = 0; i0 < M; i0 += 4) {                                                     \
    const T* a0 = A + std::min<int64_t>(i0, M - 1) * sa;                                      \
    const T* a1 = A + std::min<int64_t>(i0 + 1, M - 1) * sa;                                  \
    const T* a2 = A + std::min<int64_t>(i0 + 2, M - 1) * sa;                                  \
    const T* a3 = A + std::min<int64_t>(i0 + 3, M - 1) * sa;                                  \
    for (int64_t j0 = 0; j0 < NP; j0 += JB) {                                                 \
      V c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};       \
      const T* b = Bp + j0;                                                                   \
      for (int64_t k = 0; k < K; ++k, b += NP) {                                              \
        const V b0 = *reinterpret_cast<const V*>(b);                                          \
        const V b1 = *reinterpret_cast<const V*>(b + W);                                      \
        const T x0 = a0[k * sk], x1 = a1[k * sk], x2 = a2[k * sk], x3 = a3[k * sk];           \
        c00 += x0 * b0; c01 += x0 * b1;                                                       \
        c10 += x1 * b0; c11 += x1 * b1;                                                       \
        c20 += x2 * b0; c21 += x2 * b1;                                                       \
        c30 += x3 * b0; c31 += x3 * b1;                                                       \
      }                                                                                       \
      *reinterpret_cast<V*>(out[0]) = c00; *reinterpret_cast<V*>(out[0] + W) = c01;           \
      *reinterpret_cast<V*>(out[1]) = c10; *reinterpret_cast<V*>(out[1] + W) = c11;           \
      *reinterpret_cast<V*>(out[2]) = c20; *reinterpret_cast<V*>(out[2] + W) = c21;           \
      *reinterpret_cast<V*>(out[3]) = c30; *reinterpret_cast<V*>(out[3] + W) = c31;           \
      const int64_t jn = std::min<int64_t>(JB, N - j0);                                       \
      for (int64_t r = 0; r < 4 && i0 + r < M; ++r) {                                         \
        T* crow = C + (i0 + r) * N + j0;                                                      \
        if (beta == T(0)) { /* C may be uninitialized: never read it */                       \
          for (int64_t jj = 0; jj < jn; ++jj) crow[jj] = alpha * out[r][jj];                  \
        } else {                                                                              \
          for (int64_t jj = 0; jj < jn; ++jj) crow[jj] = alpha * out[r][jj] + beta * crow[jj]; \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
  }

#if FLATKERN_X86
template <typename T>
FLATKERN_TARGET_AVX2 void mm_small_avx2(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                                        const T* B, T beta, T* C) {
  FLATKERN_SMALL_MM_BODY
}
#endif

template <typename T>
void mm_small_generic(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta,
                      T* C) {
  FLATKERN_SMALL_MM_BODY
}
#undef FLATKERN_SMALL_MM_BODY
#else  // no GCC vector extensions (MSVC): the same contract, plain loops
template <typename T>
void mm_small_generic(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta,
                      T* C) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      T s = 0;
      for (int64_t k = 0; k < K; ++k) s += A[ta ? k * M + i : i * K + k] * B[tb ? j * K + k : k * N + j];
      C[i * N + j] = beta == T(0) ? alpha * s : alpha * s + beta * C[i * N + j];
    }
}
#endif

#if FLATKERN_X86
// Bp[k * ldb + j] = B[j * K + k] for B row-major (N x K): 8 x 8 blocks go
// through registers (eight loads, an in-register transpose, eight stores)
// instead of N K scalar loads at stride K, the cost of a transposed operand.
FLATKERN_TARGET_AVX2 inline void pack_transposed_f32_avx2(const float* B, int64_t N, int64_t K, float* Bp,
                                                         int64_t ldb) {
  const int64_t N8 = N / 8 * 8, K8 = K / 8 * 8;
  for (int64_t j0 = 0; j0 < N8; j0 += 8) {
    for (int64_t k0 = 0; k0 < K8; k0 += 8) {
      __m256 r[8];
      for (int64_t t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(B + (j0 + t) * K + k0);
      // 8 x 8 transpose: unpack pairs, then 4-lane shuffles, then 128-bit lane swaps
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      _mm256_storeu_ps(Bp + (k0 + 0) * ldb + j0, _mm256_permute2f128_ps(s0, s4, 0x20));
      _mm256_storeu_ps(Bp + (k0 + 1) * ldb + j0, _mm256_permute2f128_ps(s1, s5, 0x20));
      _mm256_storeu_ps(Bp + (k0 + 2) * ldb + j0, _mm256_permute2f128_ps(s2, s6, 0x20));
      _mm256_storeu_ps(Bp + (k0 + 3) * ldb + j0, _mm256_permute2f128_ps(s3, s7, 0x20));
      _mm256_storeu_ps(Bp + (k0 + 4) * ldb + j0, _mm256_permute2f128_ps(s0, s4, 0x31));
      _mm256_storeu_ps(Bp + (k0 + 5) * ldb + j0, _mm256_permute2f128_ps(s1, s5, 0x31));
      _mm256_storeu_ps(Bp + (k0 + 6) * ldb + j0, _mm256_permute2f128_ps(s2, s6, 0x31));
      _mm256_storeu_ps(Bp + (k0 + 7) * ldb + j0, _mm256_permute2f128_ps(s3, s7, 0x31));
    }
    for (int64_t k = K8; k < K; ++k)
      for (int64_t j = j0; j < j0 + 8; ++j) Bp[k * ldb + j] = B[j * K + k];
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = N8; j < N; ++j) Bp[k * ldb + j] = B[j * K + k];
}

// The narrow case of mm_small_f32_avx2 (N <= 8, as for the widths of a batch of
// many tiny problems): an 8 x 8 register tile, one vector per row of C, so that
// no lane of a 16-wide tile is wasted. Each entry of C is accumulated over k in
// the same order, with the same FMAs and the same final scaling as in the
// 16-wide tile, so the results are bit for bit those of mm_small_f32_avx2.
FLATKERN_TARGET_AVX2 inline void mm_small_f32_avx2_n8(bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                                                     float alpha, const float* A, const float* B, float beta,
                                                     float* C) {
  constexpr int64_t MR = 8, NR = 8;
  alignas(64) float Bp[kSmall * NR];
  const float* Bu = B;
  if (tb || N != NR) {  // op(B) as K rows of 8, zero-padded
    for (int64_t k = 0; k < K; ++k) {
      float* row = Bp + k * NR;
      for (int64_t j = 0; j < N; ++j) row[j] = tb ? B[j * K + k] : B[k * N + j];
      for (int64_t j = N; j < NR; ++j) row[j] = 0.f;
    }
    Bu = Bp;
  }
  const int64_t sa = ta ? 1 : K, sk = ta ? M : 1;
  alignas(32) float out[NR];
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const float* a[MR];
    for (int64_t r = 0; r < MR; ++r) a[r] = A + std::min<int64_t>(i0 + r, M - 1) * sa;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    const float* b = Bu;
    for (int64_t k = 0, ka = 0; k < K; ++k, ka += sk, b += NR) {
      const __m256 bv = _mm256_loadu_ps(b);
      c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a[0] + ka), bv, c0);
      c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a[1] + ka), bv, c1);
      c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a[2] + ka), bv, c2);
      c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a[3] + ka), bv, c3);
      c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(a[4] + ka), bv, c4);
      c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(a[5] + ka), bv, c5);
      c6 = _mm256_fmadd_ps(_mm256_broadcast_ss(a[6] + ka), bv, c6);
      c7 = _mm256_fmadd_ps(_mm256_broadcast_ss(a[7] + ka), bv, c7);
    }
    const __m256 acc[MR] = {c0, c1, c2, c3, c4, c5, c6, c7};
    const int64_t rows = std::min<int64_t>(MR, M - i0);
    for (int64_t r = 0; r < rows; ++r) {
      float* crow = C + (i0 + r) * N;
      // the 16-wide tile's partial-tile store, expression for expression (N < 16 always is one)
      _mm256_store_ps(out, acc[r]);
      for (int64_t jj = 0; jj < N; ++jj)
        crow[jj] = beta == 0.f ? alpha * out[jj] : alpha * out[jj] + beta * crow[jj];
    }
  }
}

// C (M x N) = alpha op(A) op(B) + beta C in float32 with AVX2/FMA intrinsics,
// every dimension <= kSmall. A 6 x 16 register tile (12 accumulators, two B
// vectors and one broadcast: 15 of the 16 ymm registers) over the whole k
// loop. op(B) is read in place when it is row-major with N a multiple of 16
// (widths 32, 64, 128); otherwise it is first copied, zero-padded, into Bp.
// Rows past M read row M - 1 again and are not stored.
FLATKERN_TARGET_AVX2 inline void mm_small_f32_avx2(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                                                  const float* A, const float* B, float beta, float* C) {
  constexpr int64_t MR = 6, NR = 16;
  if (N <= 8) {  // half a tile would be zeros: the 8-wide tile, with the same arithmetic
    mm_small_f32_avx2_n8(ta, tb, M, N, K, alpha, A, B, beta, C);
    return;
  }
  alignas(64) float Bp[kSmall * (kSmall + NR)];
  const float* Bu = B;
  int64_t ldb = N;
  if (tb || N % NR != 0) {
    ldb = (N + NR - 1) / NR * NR;
    if (tb) pack_transposed_f32_avx2(B, N, K, Bp, ldb);
    else for (int64_t k = 0; k < K; ++k) std::memcpy(Bp + k * ldb, B + k * N, sizeof(float) * N);
    for (int64_t k = 0; k < K; ++k) std::fill(Bp + k * ldb + N, Bp + (k + 1) * ldb, 0.f);
    Bu = Bp;
  }
  // element (i, k) of op(A) is A[i * sa + k * sk]
  const int64_t sa = ta ? 1 : K, sk = ta ? M : 1;
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  alignas(32) float out[MR][NR];
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const float* a0 = A + std::min<int64_t>(i0 + 0, M - 1) * sa;
    const float* a1 = A + std::min<int64_t>(i0 + 1, M - 1) * sa;
    const float* a2 = A + std::min<int64_t>(i0 + 2, M - 1) * sa;
    const float* a3 = A + std::min<int64_t>(i0 + 3, M - 1) * sa;
    const float* a4 = A + std::min<int64_t>(i0 + 4, M - 1) * sa;
    const float* a5 = A + std::min<int64_t>(i0 + 5, M - 1) * sa;
    const int64_t rows = std::min<int64_t>(MR, M - i0);
    for (int64_t j0 = 0; j0 < ldb; j0 += NR) {
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
      __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
      const float* b = Bu + j0;
      for (int64_t k = 0, ka = 0; k < K; ++k, ka += sk, b += ldb) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        __m256 x = _mm256_broadcast_ss(a0 + ka);
        c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a1 + ka);
        c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a2 + ka);
        c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a3 + ka);
        c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
        x = _mm256_broadcast_ss(a4 + ka);
        c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
        x = _mm256_broadcast_ss(a5 + ka);
        c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
      }
      const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
      const int64_t cols = std::min<int64_t>(NR, N - j0);
      for (int64_t r = 0; r < rows; ++r) {
        float* crow = C + (i0 + r) * N + j0;
        if (cols == NR) {  // a full tile row: two vector stores
          for (int64_t h = 0; h < 2; ++h) {
            __m256 v = _mm256_mul_ps(va, acc[r][h]);
            // beta == 0: C may be uninitialized, never read it
            if (beta != 0.f) v = _mm256_fmadd_ps(vb, _mm256_loadu_ps(crow + 8 * h), v);
            _mm256_storeu_ps(crow + 8 * h, v);
          }
        } else {
          _mm256_store_ps(out[r], acc[r][0]);
          _mm256_store_ps(out[r] + 8, acc[r][1]);
          for (int64_t jj = 0; jj < cols; ++jj)
            crow[jj] = beta == 0.f ? alpha * out[r][jj] : alpha * out[r][jj] + beta * crow[jj];
        }
      }
    }
  }
}

inline bool cpu_has_avx2_fma() {
#if defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}
#endif  // FLATKERN_X86

// Row-major C (M x N) = alpha op(A) op(B) + beta C, op(A): M x K, op(B): K x N,
// every matrix dense (leading dimension = its number of columns). BLAS is
// column-major, so it computes Cᵀ = op(B)ᵀ op(A)ᵀ on the same memory.
template <typename T>
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta, T* C) {
  if (M <= kSmall && N <= kSmall && K <= kSmall) {
#if FLATKERN_X86
    if (cpu_has_avx2_fma()) {
      if constexpr (std::is_same_v<T, float>) {
        mm_small_f32_avx2(ta, tb, M, N, K, alpha, A, B, beta, C);
        return;
      }
#if defined(__GNUC__)
      mm_small_avx2(ta, tb, M, N, K, alpha, A, B, beta, C);
      return;
#endif
    }
#endif
    mm_small_generic(ta, tb, M, N, K, alpha, A, B, beta, C);
    return;
  }
#if FLATKERN_FORTRAN_BLAS
  if (has_fortran_blas()) {
    const int64_t lda = ta ? M : K, ldb = tb ? K : N;
    blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), alpha,
              B, static_cast<int>(ldb), A, static_cast<int>(lda), beta, C, static_cast<int>(N));
    return;
  }
#endif
  mm_aten(ta, tb, M, N, K, alpha, A, B, beta, C);
}

// Elementwise passes. A large problem's d x d products have ~10^6 entries, and a
// pass on one thread while BLAS uses all of them is what made the d = 1024 chain
// slower than eager torch (whose elementwise ops are parallel): above kElementGrain
// entries they are split over the threads like ATen's. Inside the batch's
// parallel_for (small problems) at::parallel_for and at::parallel_reduce run inline.
constexpr int64_t kElementGrain = int64_t{1} << 15;

// simd reductions (OpenMP, no -ffast-math): a plain sum is one dependency chain;
// double accumulation: a float32 sum over d^2 ~ 10^6 squares otherwise loses
// ~1e-4 relative accuracy against the reference's pairwise summation
template <typename T>
double dot_serial(const T* x, const T* y, int64_t size) {
  double s = 0;  // a local accumulator: the simd reduction vectorizes
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < size; ++i) s += double(x[i]) * double(y[i]);
  return s;
}

template <typename T>
T dot(const T* x, const T* y, int64_t size) {
  if (size < kElementGrain) return T(dot_serial(x, y, size));
  return T(at::parallel_reduce(
      0, size, kElementGrain, 0.0,
      [&](int64_t begin, int64_t end, double s) { return s + dot_serial(x + begin, y + begin, end - begin); },
      std::plus<double>()));
}

template <typename T>
T sumsq(const T* x, int64_t size) {
  return dot(x, x, size);
}

// out = s x, and out += x, over `size` entries
template <typename T>
void scale_into(T* out, T s, const T* x, int64_t size) {
  auto pass = [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = s * x[i];
  };
  if (size < kElementGrain) pass(0, size);
  else at::parallel_for(0, size, kElementGrain, pass);
}

template <typename T>
void add_into(T* out, const T* x, int64_t size) {
  auto pass = [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] += x[i];
  };
  if (size < kElementGrain) pass(0, size);
  else at::parallel_for(0, size, kElementGrain, pass);
}

// MKL threads even a 30 x 30 product, and on a busy machine every such
// parallel region costs more than the product. Small problems (widths <= 128)
// therefore run their products on one thread; their parallelism is the batch
// (inside at::parallel_for, MKL is sequential anyway).
class SequentialBlasIfSmall {
 public:
  // blas: whether the family's products can reach BLAS at all (with every width
  // <= kSmall only RankOne with n > kSmall and Dense do); if not, the two MKL
  // calls are skipped, they cost as much as a d = 30 chain step
  SequentialBlasIfSmall(int64_t dmax, bool blas)
      : active_(blas && dmax <= kSmall && has_mkl_thread_control()) {
    if (active_) previous_ = set_blas_threads_local(1);
  }
  ~SequentialBlasIfSmall() {
    if (active_) set_blas_threads_local(previous_);  // 0 restores the global setting
  }

 private:
  bool active_;
  int previous_ = 0;
};

}  // namespace cpu
}  // namespace flatkern
