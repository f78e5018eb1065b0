// The measurement families' contractions, forward and backward, for one layer
// of one problem (the chain walk that calls them is in hessian_trace_kernel.cpp).
//
// With the suffix product P_j (d_L x d_j) and the prefix product Q_j
// (d_{j-1} x d_0) formed, each family's term c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²
// (docs/MATH.md) has a cheap exact form:
//   Isotropic     c_j = ‖P_j‖_F² ‖Q_j‖_F²
//   Entries       c_j = (1/n) Σ_i r_j[rows_i] k_j[cols_i]
//                 (r_j: squared row norms of P_j, k_j: squared column norms of Q_j)
//   RankOne       c_j = (1/n) Σ_i ‖P_jᵀ u_i‖² ‖Q_j v_i‖²
//   Dense         c_j = <G_P, H>, H = (1/n) Σ_i A_i G_Q A_iᵀ
//   Dense (K)     c_j = <G_P, H>, H[a,c] = Σ_{b,d} K[a,b,c,d] G_Q[d,b]
//   Inputs        c_j = ‖P_j‖_F² ‖Q_j xᵀ‖_F² / (N d_L)
// with the Grams G_P = P_j P_jᵀ and G_Q = Q_jᵀ Q_j. The forward writes a few
// statistics per layer (Layout::stat_size) that the gradients reuse.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "layout.h"
#include "small_gemm.h"

namespace flatkern {
namespace cpu {

// One call's measurement operands as raw pointers (checked by check_trace_inputs first),
// pointing at problem 0's set; `at(p)` points at problem p's (the same set when shared).
template <typename T>
struct Meas {
  int64_t family = 0, n = 0;
  const int64_t* rows = nullptr;  // Entries (n,)
  const int64_t* cols = nullptr;  // Entries (n,)
  const T* u = nullptr;           // RankOne (n, d_L)
  const T* v = nullptr;           // RankOne (n, d_0)
  const T* Ap = nullptr;          // Dense (d_L, n, d_0)
  const T* Kp = nullptr;          // Dense kernel (d_L², d_0²)
  const T* S = nullptr;           // Inputs: xᵀx / (N d_L), (d_0, d_0)
  T trS = 0;
  bool batched = false;           // one set per problem, problem p's `stride` elements after p-1's
  int64_t d0 = 0, dL = 0;

  // Problem p's set: the shared one, or every pointer moved on by p sets (sizes from OP_SPEC.md's table).
  Meas at(int64_t p) const {
    if (!batched) return *this;
    Meas q = *this;
    switch (family) {
      case ENTRIES: q.rows += p * n, q.cols += p * n; break;
      case RANK_ONE: q.u += p * n * dL, q.v += p * n * d0; break;
      case DENSE: q.Ap += p * dL * n * d0; break;
      case DENSE_KERNEL: q.Kp += p * dL * dL * d0 * d0; break;
      case INPUTS: {
        q.S += p * d0 * d0;
        q.trS = 0;
        for (int64_t i = 0; i < d0; ++i) q.trS += q.S[i * d0 + i];
        break;
      }
    }
    return q;
  }
};

// The pointers of `operands` (OP_SPEC.md's order; `batched`: each with a leading per-problem
// batch); for Inputs S = xᵀx / (N d_L) is computed into S_out, one (d_0, d_0) per set
// (nn.MSELoss(mean) divides by N d_L: folded in once).
template <typename T>
Meas<T> bind_operands(int64_t family, const Layout& lay, at::TensorList operands, at::Tensor& S_out,
                      bool batched = false) {
  Meas<T> m;
  m.family = family;
  m.n = lay.n;
  m.batched = batched;
  m.d0 = lay.d[0];
  m.dL = lay.d[lay.L];
  switch (family) {
    case ENTRIES:
      m.rows = operands[0].data_ptr<int64_t>();
      m.cols = operands[1].data_ptr<int64_t>();
      break;
    case RANK_ONE:
      m.u = operands[0].data_ptr<T>();
      m.v = operands[1].data_ptr<T>();
      break;
    case DENSE: m.Ap = operands[0].data_ptr<T>(); break;
    case DENSE_KERNEL: m.Kp = operands[1].data_ptr<T>(); break;
    case INPUTS: {
      const at::Tensor& x = operands[0];
      const int64_t d0 = lay.d[0];
      if (batched) {  // (B, d_0, d_0): one batched product for every problem's set; traces in at(p)
        const at::Tensor xb = x.reshape({-1, lay.n, d0});
        S_out = at::bmm(xb.transpose(1, 2), xb).div_(static_cast<double>(lay.n * lay.d[lay.L])).contiguous();
        m.S = S_out.data_ptr<T>();
        break;
      }
      S_out = at::mm(x.t(), x).div_(static_cast<double>(lay.n * lay.d[lay.L])).contiguous();
      m.S = S_out.data_ptr<T>();
      for (int64_t i = 0; i < d0; ++i) m.trS += m.S[i * d0 + i];
      break;
    }
  }
  return m;
}

// Whether the family's products can reach BLAS at all (with every width <= kSmall
// only RankOne with n > kSmall and Dense do): SequentialBlasIfSmall is skipped otherwise.
template <typename T>
bool may_call_blas(const Meas<T>& m) {
  return m.family == DENSE || m.family == DENSE_KERNEL || (m.family == RANK_ONE && m.n > kSmall);
}

// ----------------------------------------------------------------- forward

// c_j and its statistics from P (d_L x d_j, nullptr = I) and Q (d_{j-1} x d_0, nullptr = I).
template <typename T>
T family_forward(const Meas<T>& m, const Layout& lay, int64_t j, const T* P, const T* Q, T* st, T* work) {
  const int64_t dL = lay.d[lay.L], d0 = lay.d[0], dj = lay.d[j], dj1 = lay.d[j - 1];
  switch (m.family) {
    case ISOTROPIC: {
      st[0] = P ? sumsq(P, dL * dj) : T(dL);
      st[1] = Q ? sumsq(Q, dj1 * d0) : T(d0);
      return st[0] * st[1];
    }
    case ENTRIES: {
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
    case RANK_ONE: {
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
    case DENSE:
    case DENSE_KERNEL: {
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
      if (m.family == DENSE_KERNEL) {
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
    case INPUTS: {
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
    case RANK_ONE: return m.n * dmax;
    case DENSE: return d0 * d0 + dL * m.n * d0;
    case DENSE_KERNEL: return d0 * d0;
    case INPUTS: return dmax * d0;
    default: return 1;
  }
}

// ----------------------------------------------------------------- backward

// out (d_L x d_j) = g ∂c_j/∂P_j
template <typename T>
void family_grad_P(const Meas<T>& m, const Layout& lay, int64_t j, T g, const T* P, const T* st, T* out, T* work) {
  const int64_t dL = lay.d[lay.L], dj = lay.d[j];
  switch (m.family) {
    case ISOTROPIC: case INPUTS: {
      const T s = 2 * g * st[1];
      scale_into(out, s, P, dL * dj);
      return;
    }
    case ENTRIES: {
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
    case RANK_ONE: {
      // (2g/n) Uᵀ diag(qv) U P
      const T* qv = st + m.n;
      mm<T>(false, false, m.n, dj, dL, 1, m.u, P, 0, work);
      for (int64_t i = 0; i < m.n; ++i)
        for (int64_t c = 0; c < dj; ++c) work[i * dj + c] *= qv[i];
      mm<T>(true, false, dL, dj, m.n, 2 * g / T(m.n), m.u, work, 0, out);
      return;
    }
    case DENSE: case DENSE_KERNEL: {
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
    case ISOTROPIC: {
      const T s = 2 * g * st[0];
      scale_into(out, s, Q, dj1 * d0);
      return;
    }
    case ENTRIES: {
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
    case RANK_ONE: {
      // (2g/n) (V Qᵀ)ᵀ diag(pu) V
      const T* pu = st;
      mm<T>(false, true, m.n, dj1, d0, 1, m.v, Q, 0, work);
      for (int64_t i = 0; i < m.n; ++i)
        for (int64_t c = 0; c < dj1; ++c) work[i * dj1 + c] *= pu[i];
      mm<T>(true, false, dj1, d0, m.n, 2 * g / T(m.n), work, m.v, 0, out);
      return;
    }
    case DENSE: case DENSE_KERNEL: {
      // D = ∂c/∂G_Q, then g Q (D + Dᵀ)
      const T* GP = st;
      T* D = work;
      if (m.family == DENSE_KERNEL) {
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
    case INPUTS: {
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
    case ENTRIES: return std::max(dL, d0);
    case RANK_ONE: return m.n * dmax;
    case DENSE: return std::max(dL * dL, 2 * d0 * d0 + dL * m.n * d0);
    case DENSE_KERNEL: return std::max(dL * dL, 2 * d0 * d0);
    default: return 1;
  }
}

}  // namespace cpu
}  // namespace flatkern
