// CPU kernels of flatkern::hessian_layer_terms and flatkern::hessian_layer_terms_backward.
//
// For weights W_1 ... W_L (W_j of shape (d_j, d_{j-1}), leading dims = independent
// problems) the forward computes, per problem, in one pass over the chain
//
//   prefix products  Q_1 = I, Q_{j+1} = W_j Q_j          (d_{j-1}, d_0)
//   suffix products  P_L = I, P_{j-1} = P_j W_j          (d_L, d_j)
//   layer terms      c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²  (MATH.md, per family)
//   optionally       E = W_L Q_L                         (d_L, d_0)
//
// and saves only what the backward needs: the products that are not weights
// themselves (Q_3..Q_L, P_1..P_{L-2}) and a few per-layer statistics of the
// family (norms, Grams). The backward is reverse accumulation along both chains,
// about two matrix products per chain step, without re-running the forward.
//
// Each problem runs start to finish on one thread with no dispatcher call and no
// tensor allocation per layer, and problems run in parallel over the batch with
// at::parallel_for. Products whose dimensions are all <= 128 run in an in-cache
// register-tiled loop (mm_small); larger ones call BLAS directly, and a single
// large problem runs alone on the calling thread, where BLAS uses its own threads.
//
// Families (the `family` argument; flatkern/kernels/cpp.py encodes them):
//   0 Isotropic   c_j = ‖P_j‖_F² ‖Q_j‖_F²                               a, b: none
//   1 Entries     c_j = (1/n) Σ_i r_j[rows_i] k_j[cols_i]               a = rows (n,), b = cols (n,), int64
//                 (r_j: squared row norms of P_j, k_j: squared column norms of Q_j)
//   2 RankOne     c_j = (1/n) Σ_i ‖P_jᵀ u_i‖² ‖Q_j v_i‖²                a = u (n, d_L), b = v (n, d_0)
//   3 Dense       c_j = <G_P, H>, H = (1/n) Σ_i A_i G_Q A_iᵀ            a = A permuted to (d_L, n, d_0)
//   4 Dense (K)   c_j = <G_P, H>, H[a,c] = Σ_{b,d} K[a,b,c,d] G_Q[d,b]  a = K permuted to (d_L, d_L, d_0, d_0)
//   5 Inputs      c_j = ‖P_j‖_F² ‖Q_j xᵀ‖_F² / (N d_L)                  a = x (N, d_0)
// with the Grams G_P = P_j P_jᵀ and G_Q = Q_jᵀ Q_j.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

// Fortran BLAS exported by libtorch_cpu (MKL or OpenBLAS, LP64): calling it
// directly skips ATen's dispatch and allocation, which dominate small problems.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL's thread-local thread count (the C entry; the lower-case symbol is the
// Fortran one, taking a pointer), weak so that a torch built on another BLAS
// still loads this extension: the address is then null and nothing is changed.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace flatkern {

void check_chain_cpu(const at::TensorList weights);  // csrc/cpu/end_to_end_cpu.cpp

namespace {

enum Family : int64_t { kIsotropic = 0, kEntries = 1, kRankOne = 2, kDense = 3, kDenseKernel = 4, kInputs = 5 };

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                      int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Products with every dimension up to kSmall run in an in-cache loop instead of
// BLAS: for 32 x 32 matrices the BLAS call overhead (argument checks, dispatch,
// threading decision) costs several times the arithmetic.
constexpr int64_t kSmall = 128;

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

template <typename T>
__attribute__((target("avx2,fma"))) void mm_small_avx2(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha,
                                                        const T* A, const T* B, T beta, T* C) {
  FLATKERN_SMALL_MM_BODY
}

template <typename T>
void mm_small_generic(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta,
                      T* C) {
  FLATKERN_SMALL_MM_BODY
}
#undef FLATKERN_SMALL_MM_BODY

// Bp[k * ldb + j] = B[j * K + k] for B row-major (N x K): 8 x 8 blocks go
// through registers (eight loads, an in-register transpose, eight stores)
// instead of N K scalar loads at stride K, the cost of a transposed operand.
__attribute__((target("avx2,fma"))) void pack_transposed_f32_avx2(const float* B, int64_t N, int64_t K, float* Bp,
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

// C (M x N) = alpha op(A) op(B) + beta C in float32 with AVX2/FMA intrinsics,
// every dimension <= kSmall. A 6 x 16 register tile (12 accumulators, two B
// vectors and one broadcast: 15 of the 16 ymm registers) over the whole k
// loop. op(B) is read in place when it is row-major with N a multiple of 16
// (widths 32, 64, 128); otherwise it is first copied, zero-padded, into Bp.
// Rows past M read row M - 1 again and are not stored.
__attribute__((target("avx2,fma"))) void mm_small_f32_avx2(bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                                                            float alpha, const float* A, const float* B, float beta,
                                                            float* C) {
  constexpr int64_t MR = 6, NR = 16;
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
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// Row-major C (M x N) = alpha op(A) op(B) + beta C, op(A): M x K, op(B): K x N,
// every matrix dense (leading dimension = its number of columns). BLAS is
// column-major, so it computes Cᵀ = op(B)ᵀ op(A)ᵀ on the same memory.
template <typename T>
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta, T* C) {
  if (M <= kSmall && N <= kSmall && K <= kSmall) {
    if (!cpu_has_avx2_fma()) mm_small_generic(ta, tb, M, N, K, alpha, A, B, beta, C);
    else if constexpr (std::is_same_v<T, float>) mm_small_f32_avx2(ta, tb, M, N, K, alpha, A, B, beta, C);
    else mm_small_avx2(ta, tb, M, N, K, alpha, A, B, beta, C);
    return;
  }
  const int64_t lda = ta ? M : K, ldb = tb ? K : N;
  blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), alpha, B,
            static_cast<int>(ldb), A, static_cast<int>(lda), beta, C, static_cast<int>(N));
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

// Layout of one problem's saved buffer, shared by forward and backward (and
// mirrored by the fake kernel in flatkern/kernels/cpp.py, _saved_size).
struct Layout {
  int64_t L = 0;
  std::vector<int64_t> d;      // widths d_0 .. d_L
  std::vector<int64_t> q_off;  // offset of Q_j (j = 3..L), index j
  std::vector<int64_t> p_off;  // offset of P_j (j = 1..L-2), index j
  int64_t stat_off = 0, stat_size = 0, size = 0;
  int64_t n = 0;               // measurements (Entries, RankOne, Dense)

  Layout(at::TensorList weights, int64_t family, int64_t n_) : L(weights.size()), n(n_) {
    d.resize(L + 1);
    d[0] = weights[0].size(-1);
    for (int64_t j = 1; j <= L; ++j) d[j] = weights[j - 1].size(-2);
    q_off.assign(L + 1, -1);
    p_off.assign(L + 1, -1);
    int64_t off = 0;
    for (int64_t j = 3; j <= L; ++j) q_off[j] = off, off += d[j - 1] * d[0];
    for (int64_t j = 1; j <= L - 2; ++j) p_off[j] = off, off += d[L] * d[j];
    stat_off = off;
    switch (family) {
      case kIsotropic: case kInputs: stat_size = 2; break;
      case kEntries: stat_size = d[L] + d[0]; break;
      case kRankOne: stat_size = 2 * n; break;
      default: stat_size = 2 * d[L] * d[L]; break;  // Dense: G_P and H
    }
    size = off + L * stat_size;
  }
  int64_t dmax() const { return *std::max_element(d.begin(), d.end()); }
  int64_t w_size(int64_t j) const { return d[j] * d[j - 1]; }  // entries of one problem's W_j
};

// W_j of problem 0, index j = 1..L; problem p's W_j starts lay.w_size(j) * p further on
template <typename T>
std::vector<const T*> layer_bases(at::TensorList weights) {
  std::vector<const T*> W0(weights.size() + 1);
  for (size_t j = 1; j <= weights.size(); ++j) W0[j] = weights[j - 1].data_ptr<T>();
  return W0;
}

// Measurement operands of one call, as raw pointers (checked before use).
template <typename T>
struct Meas {
  int64_t family = 0, n = 0;
  const int64_t* rows = nullptr;
  const int64_t* cols = nullptr;
  const T* u = nullptr;   // RankOne (n, d_L)
  const T* v = nullptr;   // RankOne (n, d_0)
  const T* Ap = nullptr;  // Dense (d_L, n, d_0)
  const T* Kp = nullptr;  // Dense kernel (d_L², d_0²)
  const T* S = nullptr;   // Inputs: xᵀx / (N d_L), (d_0, d_0)
  T trS = 0;
};

// ----------------------------------------------------------------- checks

void check_operand(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "flatkern: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "flatkern: ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "flatkern: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "flatkern: ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
}

const at::Tensor& require(const std::optional<at::Tensor>& t, const char* name, int64_t family) {
  TORCH_CHECK(t.has_value() && t->defined(), "flatkern: measurement family ", family, " needs operand ", name,
              " but it is None");
  return *t;
}

// Validates the chain, the family and its operands; returns the number of
// measurements n and fills `meas` (S for Inputs is computed into `S_out`).
template <typename T>
Meas<T> check_and_bind(at::TensorList weights, int64_t family, const std::optional<at::Tensor>& a,
                       const std::optional<at::Tensor>& b, at::Tensor& S_out) {
  // the callers have run check_chain_cpu (before dispatching on the dtype)
  for (size_t j = 0; j < weights.size(); ++j) {
    TORCH_CHECK(weights[j].is_contiguous(), "flatkern: weights[", j, "] must be contiguous (shape ",
                weights[j].sizes(), ", strides ", weights[j].strides(), ")");
    for (int64_t s : weights[j].sizes().slice(weights[j].dim() - 2)) {
      TORCH_CHECK(s >= 1 && s < (1 << 20), "flatkern: weights[", j, "] has shape ", weights[j].sizes(),
                  "; layer widths must lie in [1, 2^20)");
    }
  }
  const int64_t d_L = weights.back().size(-2), d_0 = weights[0].size(-1);
  const auto dtype = weights[0].scalar_type();
  Meas<T> m;
  m.family = family;
  switch (family) {
    case kIsotropic:
      TORCH_CHECK(!(a.has_value() && a->defined()) && !(b.has_value() && b->defined()),
                  "flatkern: family 0 (Isotropic) takes no operands");
      break;
    case kEntries: {
      const auto& rows = require(a, "a (rows)", family);
      const auto& cols = require(b, "b (cols)", family);
      m.n = rows.dim() == 1 ? rows.size(0) : -1;
      TORCH_CHECK(m.n >= 1, "flatkern: Entries rows must have shape (n,) with n >= 1, got ", rows.sizes());
      check_operand(rows, "Entries rows", at::kLong, {m.n});
      check_operand(cols, "Entries cols", at::kLong, {m.n});
      m.rows = rows.data_ptr<int64_t>();
      m.cols = cols.data_ptr<int64_t>();
      // the kernels gather with these indices: an out-of-range one must be an error
      for (int64_t i = 0; i < m.n; ++i) {
        TORCH_CHECK(m.rows[i] >= 0 && m.rows[i] < d_L, "flatkern: Entries rows[", i, "] = ", m.rows[i],
                    " is out of range for E with ", d_L, " rows");
        TORCH_CHECK(m.cols[i] >= 0 && m.cols[i] < d_0, "flatkern: Entries cols[", i, "] = ", m.cols[i],
                    " is out of range for E with ", d_0, " columns");
      }
      break;
    }
    case kRankOne: {
      const auto& u = require(a, "a (u)", family);
      const auto& v = require(b, "b (v)", family);
      m.n = u.dim() == 2 ? u.size(0) : -1;
      TORCH_CHECK(m.n >= 1 && m.n < INT_MAX, "flatkern: RankOne u must have shape (n, ", d_L, ") with n >= 1, got ",
                  u.sizes());
      check_operand(u, "RankOne u", dtype, {m.n, d_L});
      check_operand(v, "RankOne v", dtype, {m.n, d_0});
      m.u = u.data_ptr<T>();
      m.v = v.data_ptr<T>();
      break;
    }
    case kDense: {
      const auto& Ap = require(a, "a (A permuted to (d_L, n, d_0))", family);
      TORCH_CHECK(!(b.has_value() && b->defined()), "flatkern: family 3 (Dense) takes no operand b");
      m.n = Ap.dim() == 3 ? Ap.size(1) : -1;
      TORCH_CHECK(m.n >= 1, "flatkern: Dense operand must have shape (d_L, n, d_0) = (", d_L, ", n, ", d_0,
                  "), got ", Ap.sizes());
      TORCH_CHECK(m.n * d_L < INT_MAX && m.n * d_0 < INT_MAX, "flatkern: Dense has too many measurements (n = ",
                  m.n, ") for one BLAS call");
      check_operand(Ap, "Dense operand (A permuted to (d_L, n, d_0))", dtype, {d_L, m.n, d_0});
      m.Ap = Ap.data_ptr<T>();
      break;
    }
    case kDenseKernel: {
      const auto& Kp = require(a, "a (K permuted to (d_L, d_L, d_0, d_0))", family);
      TORCH_CHECK(!(b.has_value() && b->defined()), "flatkern: family 4 (Dense kernel) takes no operand b");
      TORCH_CHECK(d_L * d_L < INT_MAX && d_0 * d_0 < INT_MAX, "flatkern: E of shape (", d_L, ", ", d_0,
                  ") is too large for the Dense kernel K");
      check_operand(Kp, "Dense kernel (K permuted to (d_L, d_L, d_0, d_0))", dtype, {d_L, d_L, d_0, d_0});
      m.Kp = Kp.data_ptr<T>();
      break;
    }
    case kInputs: {
      const auto& x = require(a, "a (x)", family);
      TORCH_CHECK(!(b.has_value() && b->defined()), "flatkern: family 5 (Inputs) takes no operand b");
      const int64_t N = x.dim() == 2 ? x.size(0) : -1;
      TORCH_CHECK(N >= 1 && N < INT_MAX, "flatkern: Inputs x must have shape (N, ", d_0, ") with N >= 1, got ",
                  x.sizes());
      check_operand(x, "Inputs x", dtype, {N, d_0});
      // nn.MSELoss(mean) divides by N d_L; fold it into S = xᵀx / (N d_L) once
      S_out = at::mm(x.t(), x).div_(static_cast<double>(N * d_L)).contiguous();
      m.S = S_out.data_ptr<T>();
      for (int64_t i = 0; i < d_0; ++i) m.trS += m.S[i * d_0 + i];
      break;
    }
    default:
      TORCH_CHECK(false, "flatkern: unknown measurement family ", family, " (expected 0..5)");
  }
  return m;
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
      : active_(blas && dmax <= kSmall && &MKL_Set_Num_Threads_Local != nullptr) {
    if (active_) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlasIfSmall() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);  // 0 restores the global setting
  }

 private:
  bool active_;
  int previous_ = 0;
};

template <typename T>
bool may_call_blas(const Meas<T>& m) {
  return m.family == kDense || m.family == kDenseKernel || (m.family == kRankOne && m.n > kSmall);
}

// Problems per thread: small problems are grouped so that a thread gets at
// least ~64k multiply-adds; a large problem runs alone (BLAS threads it).
int64_t grain_size(const Layout& lay) {
  int64_t cost = 1;
  for (int64_t j = 1; j <= lay.L; ++j) cost += lay.d[j] * lay.d[j - 1] * std::max(lay.d[0], lay.d[lay.L]);
  return std::max<int64_t>(1, (int64_t{1} << 16) / cost);
}

// ----------------------------------------------------------------- forward

// c_j and its statistics from P (d_L x d_j, nullptr = I) and Q (d_{j-1} x d_0, nullptr = I).
template <typename T>
T family_forward(const Meas<T>& m, const Layout& lay, int64_t j, const T* P, const T* Q, T* st, T* work) {
  const int64_t dL = lay.d[lay.L], d0 = lay.d[0], dj = lay.d[j], dj1 = lay.d[j - 1];
  switch (m.family) {
    case kIsotropic: {
      st[0] = P ? sumsq(P, dL * dj) : T(dL);
      st[1] = Q ? sumsq(Q, dj1 * d0) : T(d0);
      return st[0] * st[1];
    }
    case kEntries: {
      T* r = st;       // squared row norms of P_j
      T* k = st + dL;  // squared column norms of Q_j
      for (int64_t a = 0; a < dL; ++a) r[a] = P ? sumsq(P + a * dj, dj) : T(1);
      if (Q) {
        std::fill(k, k + d0, T(0));
        for (int64_t c = 0; c < dj1; ++c)
          for (int64_t b = 0; b < d0; ++b) k[b] += Q[c * d0 + b] * Q[c * d0 + b];
      } else {
        std::fill(k, k + d0, T(1));
      }
      double s = 0;  // n can be 10^7: accumulate in double (see sumsq)
      for (int64_t i = 0; i < m.n; ++i) s += double(r[m.rows[i]]) * double(k[m.cols[i]]);
      return T(s / double(m.n));
    }
    case kRankOne: {
      T* pu = st;        // ‖P_jᵀ u_i‖²
      T* qv = st + m.n;  // ‖Q_j v_i‖²
      if (P) {
        mm<T>(false, false, m.n, dj, dL, 1, m.u, P, 0, work);  // U P: (n, d_j)
        for (int64_t i = 0; i < m.n; ++i) pu[i] = sumsq(work + i * dj, dj);
      } else {
        for (int64_t i = 0; i < m.n; ++i) pu[i] = sumsq(m.u + i * dL, dL);
      }
      if (Q) {
        mm<T>(false, true, m.n, dj1, d0, 1, m.v, Q, 0, work);  // V Qᵀ: (n, d_{j-1})
        for (int64_t i = 0; i < m.n; ++i) qv[i] = sumsq(work + i * dj1, dj1);
      } else {
        for (int64_t i = 0; i < m.n; ++i) qv[i] = sumsq(m.v + i * d0, d0);
      }
      return dot(pu, qv, m.n) / T(m.n);
    }
    case kDense:
    case kDenseKernel: {
      T* GP = st;            // P_j P_jᵀ (d_L, d_L), saved for the backward
      T* H = st + dL * dL;   // ∂c_j/∂G_P (d_L, d_L), saved for the backward
      T* GQ = work;          // Q_jᵀ Q_j (d_0, d_0)
      if (P) {
        mm<T>(false, true, dL, dL, dj, 1, P, P, 0, GP);
      } else {
        std::fill(GP, GP + dL * dL, T(0));
        for (int64_t a = 0; a < dL; ++a) GP[a * dL + a] = 1;
      }
      if (Q) {
        mm<T>(true, false, d0, d0, dj1, 1, Q, Q, 0, GQ);
      } else {
        std::fill(GQ, GQ + d0 * d0, T(0));
        for (int64_t b = 0; b < d0; ++b) GQ[b * d0 + b] = 1;
      }
      if (m.family == kDenseKernel) {
        // H[a,c] = Σ_{b,d} Kp[(a,c),(b,d)] G_Q[b,d]  (G_Q symmetric): one matrix-vector product
        mm<T>(false, false, dL * dL, 1, d0 * d0, 1, m.Kp, GQ, 0, H);
      } else {
        // Y = A_i G_Q for all i at once (rows of Ap), then H = (1/n) Σ_i Y_i A_iᵀ
        T* Y = work + d0 * d0;
        mm<T>(false, false, dL * m.n, d0, d0, 1, m.Ap, GQ, 0, Y);
        mm<T>(false, true, dL, dL, m.n * d0, T(1) / T(m.n), Y, m.Ap, 0, H);
      }
      return dot(GP, H, dL * dL);
    }
    case kInputs: {
      st[0] = P ? sumsq(P, dL * dj) : T(dL);
      if (Q) {
        mm<T>(false, false, dj1, d0, d0, 1, Q, m.S, 0, work);  // Q S
        st[1] = dot(work, Q, dj1 * d0);
      } else {
        st[1] = m.trS;
      }
      return st[0] * st[1];
    }
  }
  return 0;
}

template <typename T>
int64_t forward_work_size(const Meas<T>& m, const Layout& lay) {
  const int64_t dmax = lay.dmax(), d0 = lay.d[0], dL = lay.d[lay.L];
  switch (m.family) {
    case kRankOne: return m.n * dmax;
    case kDense: return d0 * d0 + dL * m.n * d0;
    case kDenseKernel: return d0 * d0;
    case kInputs: return dmax * d0;
    default: return 1;
  }
}

template <typename T>
void forward_impl(at::TensorList weights, const Meas<T>& m, const Layout& lay, int64_t B, T scale, bool sum_layers,
                  T* terms, T* E, T* saved) {
  const int64_t L = lay.L, dL = lay.d[L], d0 = lay.d[0];
  const int64_t wsize = forward_work_size(m, lay);
  const std::vector<const T*> W0 = layer_bases<T>(weights);

  SequentialBlasIfSmall sequential(lay.dmax(), may_call_blas(m));
  at::parallel_for(0, B, grain_size(lay), [&](int64_t begin, int64_t end) {
    std::unique_ptr<T[]> work(new T[wsize]);
    std::vector<const T*> W(L + 1), Q(L + 1), P(L + 1);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 1; j <= L; ++j) W[j] = W0[j] + p * lay.w_size(j);
      T* sv = saved + p * lay.size;
      // prefix chain: Q_1 = I, Q_2 = W_1, Q_{j+1} = W_j Q_j
      Q[1] = nullptr;
      if (L >= 2) Q[2] = W[1];
      for (int64_t j = 3; j <= L; ++j) {
        T* q = sv + lay.q_off[j];
        mm<T>(false, false, lay.d[j - 1], d0, lay.d[j - 2], 1, W[j - 1], Q[j - 1], 0, q);
        Q[j] = q;
      }
      // suffix chain: P_L = I, P_{L-1} = W_L, P_{j-1} = P_j W_j
      P[L] = nullptr;
      if (L >= 2) P[L - 1] = W[L];
      for (int64_t j = L - 2; j >= 1; --j) {
        T* q = sv + lay.p_off[j];
        mm<T>(false, false, dL, lay.d[j], lay.d[j + 1], 1, P[j + 1], W[j + 1], 0, q);
        P[j] = q;
      }
      if (E != nullptr) {
        T* e = E + p * dL * d0;
        if (L == 1) std::memcpy(e, W[1], sizeof(T) * dL * d0);
        else mm<T>(false, false, dL, d0, lay.d[L - 1], 1, W[L], Q[L], 0, e);
      }
      T total = 0;
      for (int64_t j = 1; j <= L; ++j) {
        T* st = sv + lay.stat_off + (j - 1) * lay.stat_size;
        const T c = scale * family_forward(m, lay, j, P[j], Q[j], st, work.get());
        if (sum_layers) total += c;
        else terms[p * L + j - 1] = c;
      }
      if (sum_layers) terms[p] = total;
    }
  });
}

// ----------------------------------------------------------------- backward

// out (d_L x d_j) = g ∂c_j/∂P_j
template <typename T>
void family_grad_P(const Meas<T>& m, const Layout& lay, int64_t j, T g, const T* P, const T* st, T* out, T* work) {
  const int64_t dL = lay.d[lay.L], dj = lay.d[j];
  switch (m.family) {
    case kIsotropic: case kInputs: {
      const T s = 2 * g * st[1];
      scale_into(out, s, P, dL * dj);
      return;
    }
    case kEntries: {
      // ∂c/∂r[a] = (1/n) Σ_{i: rows_i = a} k[cols_i]
      const T* k = st + dL;
      T* w = work;
      std::fill(w, w + dL, T(0));
      for (int64_t i = 0; i < m.n; ++i) w[m.rows[i]] += k[m.cols[i]];
      for (int64_t a = 0; a < dL; ++a) {
        const T s = 2 * g * w[a] / T(m.n);
        for (int64_t c = 0; c < dj; ++c) out[a * dj + c] = s * P[a * dj + c];
      }
      return;
    }
    case kRankOne: {
      // (2g/n) Uᵀ diag(qv) U P
      const T* qv = st + m.n;
      mm<T>(false, false, m.n, dj, dL, 1, m.u, P, 0, work);
      for (int64_t i = 0; i < m.n; ++i)
        for (int64_t c = 0; c < dj; ++c) work[i * dj + c] *= qv[i];
      mm<T>(true, false, dL, dj, m.n, 2 * g / T(m.n), m.u, work, 0, out);
      return;
    }
    case kDense: case kDenseKernel: {
      // g (H + Hᵀ) P: G_P = P Pᵀ is symmetric, so its gradient acts through H + Hᵀ
      const T* H = st + dL * dL;
      T* Hs = work;
      for (int64_t a = 0; a < dL; ++a)
        for (int64_t c = 0; c < dL; ++c) Hs[a * dL + c] = H[a * dL + c] + H[c * dL + a];
      mm<T>(false, false, dL, dj, dL, g, Hs, P, 0, out);
      return;
    }
  }
}

// out (d_{j-1} x d_0) = g ∂c_j/∂Q_j
template <typename T>
void family_grad_Q(const Meas<T>& m, const Layout& lay, int64_t j, T g, const T* Q, const T* st, T* out, T* work) {
  const int64_t dL = lay.d[lay.L], d0 = lay.d[0], dj1 = lay.d[j - 1];
  switch (m.family) {
    case kIsotropic: {
      const T s = 2 * g * st[0];
      scale_into(out, s, Q, dj1 * d0);
      return;
    }
    case kEntries: {
      // ∂c/∂k[b] = (1/n) Σ_{i: cols_i = b} r[rows_i]
      const T* r = st;
      T* w = work;
      std::fill(w, w + d0, T(0));
      for (int64_t i = 0; i < m.n; ++i) w[m.cols[i]] += r[m.rows[i]];
      for (int64_t b = 0; b < d0; ++b) w[b] *= 2 * g / T(m.n);
      for (int64_t c = 0; c < dj1; ++c)
        for (int64_t b = 0; b < d0; ++b) out[c * d0 + b] = w[b] * Q[c * d0 + b];
      return;
    }
    case kRankOne: {
      // (2g/n) (V Qᵀ)ᵀ diag(pu) V
      const T* pu = st;
      mm<T>(false, true, m.n, dj1, d0, 1, m.v, Q, 0, work);
      for (int64_t i = 0; i < m.n; ++i)
        for (int64_t c = 0; c < dj1; ++c) work[i * dj1 + c] *= pu[i];
      mm<T>(true, false, dj1, d0, m.n, 2 * g / T(m.n), work, m.v, 0, out);
      return;
    }
    case kDense: case kDenseKernel: {
      // D = ∂c/∂G_Q, then g Q (D + Dᵀ)
      const T* GP = st;
      T* D = work;
      if (m.family == kDenseKernel) {
        // D[b,d] = Σ_{(a,c)} Kp[(a,c),(b,d)] G_P[a,c]: one transposed matrix-vector product
        mm<T>(true, false, d0 * d0, 1, dL * dL, 1, m.Kp, GP, 0, D);
      } else {
        // Z = G_P A_i for all i (columns of Ap), then D = (1/n) Σ_i A_iᵀ Z_i
        T* Z = work + 2 * d0 * d0;
        mm<T>(false, false, dL, m.n * d0, dL, 1, GP, m.Ap, 0, Z);
        mm<T>(true, false, d0, d0, dL * m.n, T(1) / T(m.n), m.Ap, Z, 0, D);
      }
      T* Ds = work + d0 * d0;
      for (int64_t b = 0; b < d0; ++b)
        for (int64_t e = 0; e < d0; ++e) Ds[b * d0 + e] = D[b * d0 + e] + D[e * d0 + b];
      mm<T>(false, false, dj1, d0, d0, g, Q, Ds, 0, out);
      return;
    }
    case kInputs: {
      // 2 g ‖P‖² Q S
      mm<T>(false, false, dj1, d0, d0, 2 * g * st[0], Q, m.S, 0, out);
      return;
    }
  }
}

template <typename T>
int64_t backward_work_size(const Meas<T>& m, const Layout& lay) {
  const int64_t dmax = lay.dmax(), d0 = lay.d[0], dL = lay.d[lay.L];
  switch (m.family) {
    case kEntries: return std::max(dL, d0);
    case kRankOne: return m.n * dmax;
    case kDense: return std::max(dL * dL, 2 * d0 * d0 + dL * m.n * d0);
    case kDenseKernel: return std::max(dL * dL, 2 * d0 * d0);
    default: return 1;
  }
}

template <typename T>
void backward_impl(at::TensorList weights, const Meas<T>& m, const Layout& lay, int64_t B, const T* saved,
                   const T* grad_terms, T scale, bool sum_layers, const T* grad_E, std::vector<T*>& grads0) {
  const int64_t L = lay.L, dL = lay.d[L], d0 = lay.d[0];
  int64_t qmax = 1, pmax = 1;
  for (int64_t j = 2; j <= L; ++j) qmax = std::max(qmax, lay.d[j - 1] * d0);
  for (int64_t j = 1; j <= L - 1; ++j) pmax = std::max(pmax, dL * lay.d[j]);
  const int64_t wsize = backward_work_size(m, lay);
  const std::vector<const T*> W0 = layer_bases<T>(weights);

  SequentialBlasIfSmall sequential(lay.dmax(), may_call_blas(m));
  at::parallel_for(0, B, grain_size(lay), [&](int64_t begin, int64_t end) {
    std::unique_ptr<T[]> work(new T[wsize]);
    std::unique_ptr<T[]> qbuf(new T[2 * qmax]), pbuf(new T[2 * pmax]);
    std::vector<const T*> W(L + 1), Q(L + 1), P(L + 1);
    std::vector<T*> G(L + 1);
    std::vector<T> g(L);  // ∂/∂c_j of the output's cotangent
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 1; j <= L; ++j) W[j] = W0[j] + p * lay.w_size(j), G[j] = grads0[j] + p * lay.w_size(j);
      const T* sv = saved + p * lay.size;
      for (int64_t j = 0; j < L; ++j) g[j] = scale * (sum_layers ? grad_terms[p] : grad_terms[p * L + j]);
      const T* gE = grad_E ? grad_E + p * dL * d0 : nullptr;
      auto stats = [&](int64_t j) { return sv + lay.stat_off + (j - 1) * lay.stat_size; };
      if (L == 1) {
        // c_1 is a constant (P_1 = Q_1 = I); only E = W_1 carries a gradient
        if (gE) std::memcpy(G[1], gE, sizeof(T) * dL * d0);
        else std::fill(G[1], G[1] + lay.w_size(1), T(0));
        continue;
      }
      // Each G_j is first written (beta = 0) by the prefix chain, which reaches every
      // layer but the last, then accumulated by the suffix chain: no zero-fill pass.
      Q[1] = nullptr, Q[2] = W[1];
      for (int64_t j = 3; j <= L; ++j) Q[j] = sv + lay.q_off[j];
      P[L] = nullptr, P[L - 1] = W[L];
      for (int64_t j = 1; j <= L - 2; ++j) P[j] = sv + lay.p_off[j];

      // prefix chain, top down: barQ_j = g_j ∂c_j/∂Q_j + W_jᵀ barQ_{j+1}, and
      // Q_{j+1} = W_j Q_j gives barW_j += barQ_{j+1} Q_jᵀ (Q_1 = I: barW_1 += barQ_2)
      T* cur = qbuf.get();
      T* nxt = qbuf.get() + qmax;
      family_grad_Q(m, lay, L, g[L - 1], Q[L], stats(L), cur, work.get());
      if (gE) {
        // E = W_L Q_L
        mm<T>(true, false, lay.d[L - 1], d0, dL, 1, W[L], gE, 1, cur);
        mm<T>(false, true, dL, lay.d[L - 1], d0, 1, gE, Q[L], 0, G[L]);
      }
      for (int64_t j = L - 1; j >= 1; --j) {  // cur = barQ_{j+1}, (d_j, d_0)
        if (j == 1) {
          scale_into(G[1], T(1), cur, lay.w_size(1));
          break;
        }
        mm<T>(false, true, lay.d[j], lay.d[j - 1], d0, 1, cur, Q[j], 0, G[j]);
        family_grad_Q(m, lay, j, g[j - 1], Q[j], stats(j), nxt, work.get());
        mm<T>(true, false, lay.d[j - 1], d0, lay.d[j], 1, W[j], cur, 1, nxt);
        std::swap(cur, nxt);
      }
      // suffix chain, bottom up: barP_j = g_j ∂c_j/∂P_j + barP_{j-1} W_jᵀ, and
      // P_{j-1} = P_j W_j gives barW_j += P_jᵀ barP_{j-1} (P_L = I: barW_L += barP_{L-1})
      cur = pbuf.get();
      nxt = pbuf.get() + pmax;
      family_grad_P(m, lay, 1, g[0], P[1], stats(1), cur, work.get());
      for (int64_t j = 2; j <= L; ++j) {  // cur = barP_{j-1}, (d_L, d_{j-1})
        if (j == L) {
          if (gE) add_into(G[L], cur, lay.w_size(L));
          else scale_into(G[L], T(1), cur, lay.w_size(L));
          break;
        }
        mm<T>(true, false, lay.d[j], lay.d[j - 1], dL, 1, P[j], cur, 1, G[j]);
        family_grad_P(m, lay, j, g[j - 1], P[j], stats(j), nxt, work.get());
        mm<T>(false, true, dL, lay.d[j], lay.d[j - 1], 1, cur, W[j], 1, nxt);
        std::swap(cur, nxt);
      }
    }
  });
}

// ----------------------------------------------------------------- ops

std::vector<int64_t> batch_shape(const at::Tensor& w) {
  return std::vector<int64_t>(w.sizes().begin(), w.sizes().end() - 2);
}

}  // namespace

// Forward: (terms (..., L), E (..., d_L, d_0) or empty (0,) without with_end_to_end,
// saved (..., S) for the backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hessian_layer_terms_cpu(at::TensorList weights, int64_t family,
                                                                       const std::optional<at::Tensor>& a,
                                                                       const std::optional<at::Tensor>& b,
                                                                       bool with_end_to_end, double scale,
                                                                       bool sum_layers) {
  check_chain_cpu(weights);  // before dispatching on the dtype: an integer chain gets the clear message
  const auto opts = weights[0].options();
  at::Tensor terms, E, saved;
  AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "hessian_layer_terms_cpu", [&] {
    at::Tensor S;
    const Meas<scalar_t> m = check_and_bind<scalar_t>(weights, family, a, b, S);
    const Layout lay(weights, family, m.n);
    auto batch = batch_shape(weights[0]);
    const int64_t B = c10::multiply_integers(batch);
    auto shape = [&](std::initializer_list<int64_t> tail) {
      std::vector<int64_t> s(batch);
      s.insert(s.end(), tail);
      return s;
    };
    terms = sum_layers ? at::empty(batch, opts) : at::empty(shape({lay.L}), opts);
    saved = at::empty(shape({lay.size}), opts);
    E = with_end_to_end ? at::empty(shape({lay.d[lay.L], lay.d[0]}), opts) : at::empty({0}, opts);
    if (B == 0) return;
    forward_impl<scalar_t>(weights, m, lay, B, static_cast<scalar_t>(scale), sum_layers, terms.data_ptr<scalar_t>(),
                           with_end_to_end ? E.data_ptr<scalar_t>() : nullptr, saved.data_ptr<scalar_t>());
  });
  return {terms, E, saved};
}

// Backward: gradients of Σ_j grad_terms_j c_j + <grad_E, E> with respect to each W_j.
std::vector<at::Tensor> hessian_layer_terms_backward_cpu(at::TensorList weights, int64_t family,
                                                         const std::optional<at::Tensor>& a,
                                                         const std::optional<at::Tensor>& b, const at::Tensor& saved,
                                                         const at::Tensor& grad_terms,
                                                         const std::optional<at::Tensor>& grad_E, double scale,
                                                         bool sum_layers) {
  check_chain_cpu(weights);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "hessian_layer_terms_backward_cpu", [&] {
    at::Tensor S;
    const Meas<scalar_t> m = check_and_bind<scalar_t>(weights, family, a, b, S);
    const Layout lay(weights, family, m.n);
    auto batch = batch_shape(weights[0]);
    const int64_t B = c10::multiply_integers(batch);
    const auto dtype = weights[0].scalar_type();
    std::vector<int64_t> s_shape(batch), t_shape(batch), e_shape(batch);
    s_shape.push_back(lay.size);
    if (!sum_layers) t_shape.push_back(lay.L);
    e_shape.push_back(lay.d[lay.L]);
    e_shape.push_back(lay.d[0]);
    check_operand(saved, "saved", dtype, s_shape);
    check_operand(grad_terms, "grad_terms", dtype, t_shape);
    const bool has_gE = grad_E.has_value() && grad_E->defined();
    if (has_gE) check_operand(*grad_E, "grad_E", dtype, e_shape);
    std::vector<scalar_t*> G(lay.L + 1, nullptr);
    for (int64_t j = 1; j <= lay.L; ++j) {
      grads.push_back(at::empty(weights[j - 1].sizes(), weights[j - 1].options()));
      G[j] = grads.back().data_ptr<scalar_t>();
    }
    if (B == 0) return;
    backward_impl<scalar_t>(weights, m, lay, B, saved.data_ptr<scalar_t>(), grad_terms.data_ptr<scalar_t>(),
                            static_cast<scalar_t>(scale), sum_layers, has_gE ? grad_E->data_ptr<scalar_t>() : nullptr, G);
  });
  return grads;
}

TORCH_LIBRARY_IMPL(flatkern, CPU, m) {
  m.impl("hessian_layer_terms", &hessian_layer_terms_cpu);
  m.impl("hessian_layer_terms_backward", &hessian_layer_terms_backward_cpu);
}

// ----------------------------------------------------------------- autograd
//
// Registered in C++ for the Autograd key (extension-cpp's pattern) rather than
// with torch.library.register_autograd: the Python autograd wrapper costs more
// than the whole d=30 problem. The backward calls the backward op through the
// dispatcher, so torch.compile / AOTAutograd trace both directions.

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The backward op differentiated once more: not implemented, and says so.
class LayerTermsBackwardFunction : public torch::autograd::Function<LayerTermsBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, int64_t family,
                               const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                               const at::Tensor& saved, const at::Tensor& grad_terms,
                               const std::optional<at::Tensor>& grad_E, double scale, bool sum_layers) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flatkern::hessian_layer_terms_backward", "")
                         .typed<decltype(hessian_layer_terms_backward_cpu)>();
    return op.call(weights, family, a, b, saved, grad_terms, grad_E, scale, sum_layers);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false,
                "flatkern: the C++ backend computes first derivatives of the trace only; for a second "
                "derivative use backend=\"torch\"");
  }
};

class LayerTermsFunction : public torch::autograd::Function<LayerTermsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, int64_t family,
                               const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                               bool with_end_to_end, double scale, bool sum_layers) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flatkern::hessian_layer_terms", "")
                         .typed<decltype(hessian_layer_terms_cpu)>();
    auto [terms, E, saved] = op.call(weights, family, a, b, with_end_to_end, scale, sum_layers);
    ctx->mark_non_differentiable({saved});
    // an unused output gets an undefined gradient rather than zeros: no E, no work
    ctx->set_materialize_grads(false);
    variable_list to_save(weights.begin(), weights.end());
    to_save.push_back(saved);
    to_save.push_back(a.has_value() ? *a : at::Tensor());
    to_save.push_back(b.has_value() ? *b : at::Tensor());
    ctx->save_for_backward(to_save);
    ctx->saved_data["family"] = family;
    ctx->saved_data["with_end_to_end"] = with_end_to_end;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["sum_layers"] = sum_layers;
    return {terms, E, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list vars = ctx->get_saved_variables();
    const size_t L = vars.size() - 3;
    const std::vector<at::Tensor> weights(vars.begin(), vars.begin() + L);
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool sum_layers = ctx->saved_data["sum_layers"].toBool();
    at::Tensor grad_terms = grads[0];
    if (!grad_terms.defined()) {  // only E was used
      // sym sizes: under torch.compile the shapes may be symbolic
      const auto sizes = weights[0].sym_sizes();
      std::vector<c10::SymInt> shape(sizes.begin(), sizes.end() - 2);
      if (!sum_layers) shape.emplace_back(static_cast<int64_t>(L));
      grad_terms = at::zeros_symint(shape, weights[0].options());
    }
    std::optional<at::Tensor> grad_E;
    if (ctx->saved_data["with_end_to_end"].toBool() && grads[1].defined()) grad_E = grads[1].contiguous();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flatkern::hessian_layer_terms_backward", "")
                         .typed<decltype(hessian_layer_terms_backward_cpu)>();
    // with create_graph, through the Autograd key, where a second derivative meets
    // LayerTermsBackwardFunction's clear error; otherwise straight to the kernel
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    std::vector<at::Tensor> gW = op.call(weights, ctx->saved_data["family"].toInt(), defined_or_none(vars[L + 1]),
                                         defined_or_none(vars[L + 2]), vars[L], grad_terms.contiguous(), grad_E,
                                         scale, sum_layers);
    variable_list out(gW.begin(), gW.end());
    out.resize(L + 6);  // family, a, b, with_end_to_end, scale, sum_layers get no gradient
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> hessian_layer_terms_autograd(at::TensorList weights, int64_t family,
                                                                            const std::optional<at::Tensor>& a,
                                                                            const std::optional<at::Tensor>& b,
                                                                            bool with_end_to_end, double scale,
                                                                            bool sum_layers) {
  auto out = LayerTermsFunction::apply(weights, family, a, b, with_end_to_end, scale, sum_layers);
  return {out[0], out[1], out[2]};
}

std::vector<at::Tensor> hessian_layer_terms_backward_autograd(at::TensorList weights, int64_t family,
                                                              const std::optional<at::Tensor>& a,
                                                              const std::optional<at::Tensor>& b,
                                                              const at::Tensor& saved, const at::Tensor& grad_terms,
                                                              const std::optional<at::Tensor>& grad_E,
                                                              double scale, bool sum_layers) {
  return LayerTermsBackwardFunction::apply(weights, family, a, b, saved, grad_terms, grad_E, scale, sum_layers);
}

}  // namespace

TORCH_LIBRARY_IMPL(flatkern, Autograd, m) {
  m.impl("hessian_layer_terms", &hessian_layer_terms_autograd);
  m.impl("hessian_layer_terms_backward", &hessian_layer_terms_backward_autograd);
}

}  // namespace flatkern
