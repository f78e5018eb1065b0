// CPU kernels of flatkern::mlp_hessian_trace, mlp_hessian_trace_backward and
// mlp_hessian_trace_and_grad (schemas: flatkern/kernels/schemas.py): the exact Hessian
// trace of a network of Linear layers with ReLU / LeakyReLU activations (docs/MATH.md,
// "Beyond linear"; the plain-torch twin is flatkern/piecewise.py).
//
// Per sample i, with z_l = W_l a_{l-1} + b_l, D_l = diag(σ'(z_l)) (the product of the masks
// of the activations after layer l, each at its own input), and H_i = S_i S_iᵀ:
//
//   G_L = S_iᵀ D_L,   G_l = (G_{l+1} W_{l+1}) D_l             (C × d_l)
//   terms_l = s Σ_i ‖G_l^i‖_F² (‖a_{l-1}^i‖² + [b_l given])
//
// G_{L-1} is formed elementwise from W_L (O(M C d), no GEMM with inner dimension C);
// each lower G_l is one GEMM (M·C × d_{l+1}) · (d_{l+1} × d_l) done in blocks of samples
// (at::mm_out: BLAS), each block's mask and squared row norms applied while it is in
// cache. The value keeps two G buffers; the gradient keeps every G_l (what its reverse
// sweep reads) and computes, in place in them,
//
//   U_1 = 2 c_1 h_1 G_1 D_1,   U_{l+1} = (U_l W_{l+1}ᵀ + 2 c_{l+1} h_{l+1} G_{l+1}) D_{l+1}
//   ∂/∂W_{l+1} += Σ_i G_{l+1}^iᵀ U_l^i                         (one GEMM (d_{l+1} × M·C)·(M·C × d_l))
//
// then (cross-entropy: S depends on the logits) ∂/∂f = (u - p Σ_k u_k) D_L with
// u_k = Σ_l c_l h_l ‖G_l[k, :]‖², and ordinary backprop of ∂/∂f and of the h-terms
// ∂/∂a_{l-1} = 2 c_l ‖G_l‖² a_{l-1}. c_l = s · (the cotangent of terms_l).
//
// saved = [z_1, ..., z_L] ((M, d_l) each): the backward rebuilds a_l and D_l from them
// elementwise and re-runs the C-column sweep (it needs every G_l; keeping them between
// forward and backward would hold M·C·Σd_l numbers for as long as the graph lives).
//
// One file over 600 lines, as hessian_trace_kernel.cpp is for the linear op: the three ops' CPU
// kernels share the Net/Forward types, the argument checks and the blocked sweep, which a header
// split would only expose to files that do not use them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace flatkern {
namespace cpu {
namespace {

constexpr int64_t kMSE = 0, kCrossEntropy = 1;

// The network the op's arguments describe, checked once.
struct Net {
  int64_t L = 0, M = 0, C = 0;
  std::vector<int64_t> d;                  // d_0 .. d_L
  std::vector<at::Tensor> W;               // index 1..L, contiguous (d_l, d_{l-1})
  std::vector<at::Tensor> b;               // index 1..L, undefined where no bias
  std::vector<std::vector<double>> acts;   // index 1..L: slopes of the activations after layer l
  bool ce = false;
  double s = 1.0;                          // the loss's scale: 2/(M C) or 2 (MSE), 1/M or 1 (CE)
};

std::string shape_str(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t k = 0; k < t.dim(); ++k) out += (k ? ", " : "") + std::to_string(t.size(k));
  return out + (t.dim() == 1 ? ",)" : ")");
}

Net check(const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::ArrayRef<double> slopes,
          at::IntArrayRef num_acts, int64_t loss, bool mean) {
  Net net;
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, "mlp_hessian_trace: weights is empty; need at least one layer");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L, "mlp_hessian_trace: biases has ", biases.size(),
              " entries but weights has ", L, " (one per layer; an empty (0,) tensor where a layer has no bias)");
  TORCH_CHECK(static_cast<int64_t>(num_acts.size()) == L, "mlp_hessian_trace: num_acts has ", num_acts.size(),
              " entries but weights has ", L);
  TORCH_CHECK(loss == kMSE || loss == kCrossEntropy, "mlp_hessian_trace: loss must be 0 (mse) or 1 (cross_entropy), got ",
              loss);
  TORCH_CHECK(x.dim() == 2, "mlp_hessian_trace: x must be (M, d_0), got shape ", shape_str(x));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "mlp_hessian_trace: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "mlp_hessian_trace (CPU kernel): x is on ", x.device());
  net.L = L;
  net.M = x.size(0);
  net.d.resize(L + 1);
  net.d[0] = x.size(1);
  net.W.resize(L + 1);
  net.b.resize(L + 1);
  net.acts.resize(L + 1);
  int64_t total_acts = 0;
  for (int64_t l = 1; l <= L; ++l) {
    const at::Tensor& W = weights[l - 1];
    TORCH_CHECK(W.dim() == 2 && W.size(1) == net.d[l - 1], "mlp_hessian_trace: weights[", l - 1, "] has shape ",
                shape_str(W), " but its input has ", net.d[l - 1], " features: need (d_", l, ", ", net.d[l - 1], ")");
    TORCH_CHECK(W.scalar_type() == x.scalar_type() && W.device() == x.device(), "mlp_hessian_trace: weights[", l - 1,
                "] is ", W.scalar_type(), " on ", W.device(), " but x is ", x.scalar_type(), " on ", x.device());
    TORCH_CHECK(W.size(0) >= 1, "mlp_hessian_trace: weights[", l - 1, "] has no outputs (shape ", shape_str(W), ")");
    net.d[l] = W.size(0);
    net.W[l] = W.contiguous();
    const at::Tensor& b = biases[l - 1];
    if (b.numel() > 0) {
      TORCH_CHECK(b.dim() == 1 && b.size(0) == net.d[l], "mlp_hessian_trace: biases[", l - 1, "] has shape ",
                  shape_str(b), ", need (", net.d[l], ",) or an empty (0,) tensor for no bias");
      TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.device() == x.device(), "mlp_hessian_trace: biases[", l - 1,
                  "] is ", b.scalar_type(), " on ", b.device(), " but x is ", x.scalar_type(), " on ", x.device());
      net.b[l] = b.contiguous();
    }
    TORCH_CHECK(num_acts[l - 1] >= 0, "mlp_hessian_trace: num_acts[", l - 1, "] = ", num_acts[l - 1], " < 0");
    TORCH_CHECK(total_acts + num_acts[l - 1] <= static_cast<int64_t>(slopes.size()), "mlp_hessian_trace: num_acts sums past the ",
                slopes.size(), " slopes given");
    for (int64_t k = 0; k < num_acts[l - 1]; ++k) {
      const double slope = slopes[total_acts + k];
      TORCH_CHECK(std::isfinite(slope), "mlp_hessian_trace: slopes[", total_acts + k, "] = ", slope, " is not finite");
      net.acts[l].push_back(slope);
    }
    total_acts += num_acts[l - 1];
  }
  TORCH_CHECK(total_acts == static_cast<int64_t>(slopes.size()), "mlp_hessian_trace: num_acts sums to ", total_acts,
              " but ", slopes.size(), " slopes were given");
  net.C = net.d[L];
  net.ce = loss == kCrossEntropy;
  TORCH_CHECK(!(mean && net.M == 0), "mlp_hessian_trace: x has no samples (shape ", shape_str(x),
              "): the mean over no samples is undefined");
  const double MC = static_cast<double>(net.M) * static_cast<double>(net.C);
  net.s = net.ce ? (mean ? 1.0 / static_cast<double>(net.M) : 1.0) : (mean ? 2.0 / MC : 2.0);
  return net;
}

// ------------------------------------------------------------------ the forward pass

struct Forward {
  std::vector<at::Tensor> z;  // index 1..L: pre-activations (M, d_l)
  std::vector<at::Tensor> a;  // index 0..L: a[0] = x, a[l] = σ(z_l) (a_L: the network's output, the logits)
  std::vector<at::Tensor> m;  // index 1..L: masks (M, d_l), undefined where no activation follows
  Forward(int64_t L, const at::Tensor& x) : z(L + 1), a(L + 1), m(L + 1) { a[0] = x; }
};

constexpr int64_t kElementGrain = 1 << 14;

// a_l = σ(z_l) and D_l = σ'(z_l) for the chain of activations after layer l, each stage's mask
// taken at its own input (relu(relu(z)) has the mask of torch's backward). σ'(0) = slope: torch's
// convention (0 for ReLU). NaN stays NaN with mask `slope`, as torch's (z > 0) mask gives.
template <typename T>
void activate(const Net& net, Forward& f, int64_t l) {
  const auto& acts = net.acts[l];
  if (acts.empty()) {
    f.m[l] = at::Tensor();
    f.a[l] = f.z[l];
    return;
  }
  at::Tensor a = at::empty_like(f.z[l]), m = at::empty_like(f.z[l]);
  const T* z = f.z[l].data_ptr<T>();
  T* ap = a.data_ptr<T>();
  T* mp = m.data_ptr<T>();
  std::vector<T> s(acts.begin(), acts.end());  // the slopes in T: 0.01 as float, as torch rounds it
  at::parallel_for(0, f.z[l].numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    if (s.size() == 1) {  // one activation (the common case): branch-free selects, vectorized
      const T slope = s[0];
      if (slope == T(0)) {
#pragma omp simd
        for (int64_t e = begin; e < end; ++e) {
          const T v = z[e];
          const bool keep = v > T(0) || v != v;  // relu keeps NaN
          ap[e] = keep ? v : T(0);
          mp[e] = v > T(0) ? T(1) : T(0);
        }
      } else {
#pragma omp simd
        for (int64_t e = begin; e < end; ++e) {
          const T v = z[e];
          ap[e] = v > T(0) ? v : v * slope;
          mp[e] = v > T(0) ? T(1) : slope;
        }
      }
      return;
    }
    for (int64_t e = begin; e < end; ++e) {
      T v = z[e], mk = T(1);
      for (const T slope : s) {
        if (v > T(0)) continue;
        mk *= slope;
        if (v == v) v = slope == T(0) ? T(0) : v * slope;
      }
      ap[e] = v;
      mp[e] = mk;
    }
  });
  f.m[l] = m;
  f.a[l] = a;
}

template <typename T>
Forward run_forward(const Net& net, const at::Tensor& x) {
  Forward f(net.L, x);
  for (int64_t l = 1; l <= net.L; ++l) {
    f.z[l] = net.b[l].defined() ? at::addmm(net.b[l], f.a[l - 1], net.W[l].t()) : at::mm(f.a[l - 1], net.W[l].t());
    activate<T>(net, f, l);
  }
  return f;
}

template <typename T>
Forward from_saved(const Net& net, const at::Tensor& x, at::TensorList saved) {
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == net.L, "mlp_hessian_trace_backward: saved has ", saved.size(),
              " tensors, need the forward's ", net.L);
  Forward f(net.L, x);
  for (int64_t l = 1; l <= net.L; ++l) {
    const at::Tensor& z = saved[l - 1];
    TORCH_CHECK(z.dim() == 2 && z.size(0) == net.M && z.size(1) == net.d[l] && z.scalar_type() == x.scalar_type(),
                "mlp_hessian_trace_backward: saved[", l - 1, "] has shape ", shape_str(z), ", need (", net.M, ", ",
                net.d[l], ")");
    f.z[l] = z.contiguous();
    activate<T>(net, f, l);
  }
  return f;
}

// h_l[i] = ‖a_{l-1}^i‖² + [b_l given], index 1..L, in double
template <typename T>
std::vector<std::vector<double>> input_norms(const Net& net, const Forward& f) {
  std::vector<std::vector<double>> h(net.L + 1);
  for (int64_t l = 1; l <= net.L; ++l) {
    h[l].assign(net.M, net.b[l].defined() ? 1.0 : 0.0);
    const int64_t n = net.d[l - 1];
    const T* a = f.a[l - 1].data_ptr<T>();
    double* hp = h[l].data();
    at::parallel_for(0, net.M, std::max<int64_t>(1, kElementGrain / n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* row = a + i * n;
        double acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) acc += static_cast<double>(row[j]) * static_cast<double>(row[j]);
        hp[i] += acc;
      }
    });
  }
  return h;
}

// ------------------------------------------------------------------ the C-column sweep

struct Sweep {
  std::vector<double> terms;            // index 1..L: Σ_i ‖G_l^i‖² h_l[i] (unscaled)
  std::vector<std::vector<double>> V;   // index 1..L: ‖G_l^i‖², (M,)
  std::vector<at::Tensor> G;            // index 1..L-1: (M·C, d_l), kept only when the gradient is wanted
  at::Tensor top;                       // cross-entropy: G_L = Sᵀ D_L (M·C, C)
  at::Tensor p;                         // cross-entropy: softmax (M, C)
  std::vector<double> u;                // cross-entropy with coefficients: Σ_l c_l h_l ‖G_l[k,:]‖², (M·C)
  bool u1_done = false;                 // G[1] holds U_1 already
};

// samples per block of the blocked GEMMs: ~256 rows of G, so a block's product and epilogue stay in cache
int64_t samples_per_block(const Net& net) { return std::max<int64_t>(1, 256 / net.C); }

// Rows [r0, r1) of G (width n) times the mask row of their sample (mask may be null), in place;
// rows[r] gets the masked row's ‖·‖². With u1 (per sample, or null) the row is then turned into the
// reverse sweep's U_1 = u1[i] · G_1 D_1 in the same pass: G_1 itself is read by nothing else.
template <typename T>
void mask_and_norms(T* G, int64_t n, int64_t C, const T* mask, int64_t r0, int64_t r1, double* rows,
                    const double* u1 = nullptr) {
  for (int64_t r = r0; r < r1; ++r) {
    T* g = G + r * n;
    T acc = 0;
    if (mask != nullptr) {
      const T* mk = mask + (r / C) * n;
      if (u1 != nullptr) {
        const T coef = static_cast<T>(u1[r / C]);
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const T v = g[j] * mk[j];
          g[j] = coef * v * mk[j];
          acc += v * v;
        }
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const T v = g[j] * mk[j];
          g[j] = v;
          acc += v * v;
        }
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) acc += g[j] * g[j];
      if (u1 != nullptr) {
        const T coef = static_cast<T>(u1[r / C]);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) g[j] *= coef;
      }
    }
    rows[r] = static_cast<double>(acc);
  }
}

// Accumulate a layer's row norms into V (and into u with weight coef·h, cross-entropy gradient).
void reduce_rows(const Net& net, const std::vector<double>& rows, const std::vector<double>& h, std::vector<double>& V,
                 double& term, std::vector<double>* u, double coef) {
  const int64_t C = net.C;
  V.assign(net.M, 0.0);
  double t = 0;
  for (int64_t i = 0; i < net.M; ++i) {
    double v = 0;
    for (int64_t k = 0; k < C; ++k) v += rows[i * C + k];
    V[i] = v;
    t += v * h[i];
    if (u != nullptr) {
      const double w = coef * h[i];
      for (int64_t k = 0; k < C; ++k) (*u)[i * C + k] += w * rows[i * C + k];
    }
  }
  term = t;
}

// The sweep from the top down. keep: every G_l is kept (the gradient's reverse sweep reads them);
// coef (index 1..L, the gradient's c_l, or empty for the value): the cross-entropy gradient's u is
// accumulated with these weights, and (with keep) G_1 leaves as U_1 = 2 c_1 h_1 G_1 D_1.
template <typename T>
Sweep run_sweep(const Net& net, const Forward& f, const std::vector<std::vector<double>>& h, bool keep,
                const std::vector<double>& coef) {
  const int64_t L = net.L, M = net.M, C = net.C;
  Sweep sw;
  sw.terms.assign(L + 1, 0.0);
  sw.V.resize(L + 1);
  sw.G.resize(L);
  std::vector<double> rows(M * C);
  std::vector<double>* u = nullptr;
  if (net.ce && !coef.empty()) {
    sw.u.assign(M * C, 0.0);
    u = &sw.u;
  }
  const T* mL = f.m[L].defined() ? f.m[L].data_ptr<T>() : nullptr;

  // ---- the top: G_L = Sᵀ D_L
  // with the gradient's coefficients, G_1 leaves the sweep as U_1 = 2 c_1 h_1 G_1 D_1 (mask_and_norms)
  std::vector<double> u1;
  if (keep && !coef.empty()) {
    u1.resize(M);
    for (int64_t i = 0; i < M; ++i) u1[i] = 2.0 * coef[1] * h[1][i];
    sw.u1_done = L >= 2;
  }
  std::vector<T> sp;  // cross-entropy: √p
  if (net.ce) {
    at::Tensor logp = at::log_softmax(f.a[L], 1);  // of the output, after its activations
    sw.p = logp.exp();
    sw.top = at::empty({M * C, C}, f.z[L].options());
    const T* lp = logp.data_ptr<T>();
    const T* p = sw.p.data_ptr<T>();
    T* top = sw.top.data_ptr<T>();
    sp.resize(M * C);
    for (int64_t e = 0; e < M * C; ++e) sp[e] = std::exp(T(0.5) * lp[e]);  // √p without 0·inf in √'s derivative
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < C; ++k) {
        T* row = top + (i * C + k) * C;
        const T spk = sp[i * C + k];
        for (int64_t j = 0; j < C; ++j) {
          const T v = spk * (j == k ? -std::expm1(lp[i * C + k]) : -p[i * C + j]);
          row[j] = mL ? v * mL[i * C + j] : v;
        }
      }
    mask_and_norms<T>(top, C, C, nullptr, 0, M * C, rows.data());
    reduce_rows(net, rows, h[L], sw.V[L], sw.terms[L], u, coef.empty() ? 0.0 : coef[L]);
  } else {
    // MSE: G_L = D_L, ‖G_L[k, :]‖² = m_L[k]²
    for (int64_t e = 0; e < M * C; ++e) rows[e] = mL ? static_cast<double>(mL[e]) * mL[e] : 1.0;
    reduce_rows(net, rows, h[L], sw.V[L], sw.terms[L], nullptr, 0.0);
  }
  if (L == 1) return sw;

  // ---- G_{L-1} elementwise from W_L: MSE m_L[k] W_L[k, :] D_{L-1};
  //      cross-entropy √p_k (m_L[k] W_L[k, :] - Σ_c p_c m_L[c] W_L[c, :]) D_{L-1}
  const int64_t nb = samples_per_block(net);
  at::Tensor buf[2];
  auto storage = [&](int64_t l) -> at::Tensor {
    if (keep) return at::empty({M * C, net.d[l]}, f.z[L].options());
    const int64_t slot = l % 2, need = M * C * net.d[l];
    if (!buf[slot].defined() || buf[slot].numel() < need) {
      int64_t widest = 0;
      for (int64_t j = 1; j < L; ++j) widest = std::max(widest, net.d[j]);
      buf[slot] = at::empty({M * C * widest}, f.z[L].options());
    }
    return buf[slot].narrow(0, 0, need).view({M * C, net.d[l]});
  };
  {
    const int64_t l = L - 1, n = net.d[l];
    at::Tensor G = storage(l);
    const T* W = net.W[L].data_ptr<T>();
    const T* mk = f.m[l].defined() ? f.m[l].data_ptr<T>() : nullptr;
    at::Tensor r;  // Σ_c p_c m_L[c] W_L[c, :], (M, n)
    if (net.ce) r = at::mm(mL ? sw.p * f.m[L] : sw.p, net.W[L]);
    const T* rp = net.ce ? r.data_ptr<T>() : nullptr;
    T* Gp = G.data_ptr<T>();
    const bool to_u1 = !u1.empty() && l == 1;
    const std::vector<T> ones(n, T(1));  // the mask row where no activation follows layer L-1
    // one row of G_{L-1}: v = spk (mLk w - r) m (cross-entropy) or mLk w m (MSE); stored as v, or as
    // U_1 = c1 v m; branch-free inner loops (the choices are made per row) so that they vectorize
    auto row = [&](T* g, const T* w, const T* ri, const T* m, T spk, T mLk, T c1) -> T {
      T acc = 0;
      if (ri != nullptr && to_u1) {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const T v = spk * (mLk * w[j] - ri[j]) * m[j];
          g[j] = c1 * v * m[j];
          acc += v * v;
        }
      } else if (ri != nullptr) {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const T v = spk * (mLk * w[j] - ri[j]) * m[j];
          g[j] = v;
          acc += v * v;
        }
      } else if (to_u1) {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const T v = mLk * w[j] * m[j];
          g[j] = c1 * v * m[j];
          acc += v * v;
        }
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const T v = mLk * w[j] * m[j];
          g[j] = v;
          acc += v * v;
        }
      }
      return acc;
    };
    at::parallel_for(0, M, std::max<int64_t>(1, kElementGrain / (C * n)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* mi = mk ? mk + i * n : ones.data();
        const T c1 = to_u1 ? static_cast<T>(u1[i]) : T(1);
        const T* ri = net.ce ? rp + i * n : nullptr;
        for (int64_t k = 0; k < C; ++k) {
          const T mLk = mL ? mL[i * C + k] : T(1);
          const T spk = net.ce ? sp[i * C + k] : T(1);
          rows[i * C + k] = static_cast<double>(row(Gp + (i * C + k) * n, W + k * n, ri, mi, spk, mLk, c1));
        }
      }
    });
    reduce_rows(net, rows, h[l], sw.V[l], sw.terms[l], u, coef.empty() ? 0.0 : coef[l]);
    if (keep) sw.G[l] = G;
    // ---- G_l = (G_{l+1} W_{l+1}) D_l for l = L-2 .. 1: a GEMM per block of samples, mask and norms in cache
    at::Tensor above = G;
    for (int64_t l2 = L - 2; l2 >= 1; --l2) {
      const int64_t n2 = net.d[l2];
      at::Tensor Gl = storage(l2);
      const at::Tensor& Wa = net.W[l2 + 1];
      const T* mk2 = f.m[l2].defined() ? f.m[l2].data_ptr<T>() : nullptr;
      T* Glp = Gl.data_ptr<T>();
      const int64_t blocks = (M + nb - 1) / nb;
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        // worker threads do not inherit the caller's below-autograd dispatch state; weights may require grad
        at::AutoDispatchBelowADInplaceOrView below;
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t i0 = blk * nb, i1 = std::min(M, i0 + nb);
          at::Tensor out = Gl.narrow(0, i0 * C, (i1 - i0) * C);
          at::mm_out(out, above.narrow(0, i0 * C, (i1 - i0) * C), Wa);
          mask_and_norms<T>(Glp, n2, C, mk2, i0 * C, i1 * C, rows.data(), l2 == 1 && !u1.empty() ? u1.data() : nullptr);
        }
      });
      reduce_rows(net, rows, h[l2], sw.V[l2], sw.terms[l2], u, coef.empty() ? 0.0 : coef[l2]);
      if (keep) sw.G[l2] = Gl;
      above = Gl;
    }
  }
  return sw;
}

at::Tensor terms_tensor(const Net& net, const Sweep& sw, const at::TensorOptions& opts, bool sum_layers) {
  std::vector<double> t(net.L);
  double total = 0;
  for (int64_t l = 1; l <= net.L; ++l) {
    t[l - 1] = net.s * sw.terms[l];
    total += t[l - 1];
  }
  if (sum_layers) return at::scalar_tensor(total, opts);
  return at::tensor(t, at::TensorOptions().dtype(at::kDouble)).to(opts.dtype_opt().value());
}

// ------------------------------------------------------------------ the reverse sweep

// [∂/∂x (want_x only), ∂/∂W_1 .. ∂/∂W_L, ∂/∂b_1 .. ∂/∂b_L] of Σ_l c_l Σ_i ‖G_l^i‖² h_l^i (c_l: s times
// the cotangent of terms_l); a bias-free layer gets an empty (0,) tensor.
template <typename T>
std::vector<at::Tensor> reverse(const Net& net, const Forward& f, const std::vector<std::vector<double>>& h, Sweep& sw,
                                const std::vector<double>& c, bool want_x) {
  const int64_t L = net.L, M = net.M, C = net.C;
  const auto opts = f.z[L].options();
  std::vector<at::Tensor> gW(L + 1), gb(L + 1);
  for (int64_t l = 1; l <= L; ++l) {
    gW[l] = at::zeros_like(net.W[l]);
    gb[l] = net.b[l].defined() ? at::zeros_like(net.b[l]) : at::empty({0}, opts);
  }
  const int64_t nb = samples_per_block(net);
  const int64_t blocks = (M + nb - 1) / nb;

  // (1) the C-column sweep reversed, in place in the G's: U_l = Ḡ_l D_l
  if (L >= 2) {
    // U_1 = 2 c_1 h_1 G_1 D_1 is in G[1] already: the sweep formed it in its last epilogue
    TORCH_INTERNAL_ASSERT(sw.u1_done, "mlp_hessian_trace: the sweep ran without the gradient's coefficients");
    for (int64_t l = 1; l <= L - 2; ++l) {
      const at::Tensor& U = sw.G[l];  // U_l now
      at::Tensor& Ga = sw.G[l + 1];   // G_{l+1}, becomes U_{l+1}
      gW[l + 1].addmm_(Ga.t(), U);    // Σ_i G_{l+1}^iᵀ U_l^i: one GEMM over all M·C rows
      const int64_t n = net.d[l + 1];
      const at::Tensor Wt = net.W[l + 1].t();
      T* Gp = Ga.data_ptr<T>();
      const T* mk = f.m[l + 1].defined() ? f.m[l + 1].data_ptr<T>() : nullptr;
      const double cl = c[l + 1];
      const std::vector<double>& hl = h[l + 1];
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        at::AutoDispatchBelowADInplaceOrView below;  // as in the forward sweep: a worker thread's own state
        at::Tensor tmp = at::empty({nb * C, n}, opts);  // this block's U_l W_{l+1}ᵀ, in cache
        T* tp = tmp.data_ptr<T>();
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t i0 = blk * nb, i1 = std::min(M, i0 + nb), rows = (i1 - i0) * C;
          at::Tensor t = tmp.narrow(0, 0, rows);
          at::mm_out(t, U.narrow(0, i0 * C, rows), Wt);
          for (int64_t i = i0; i < i1; ++i) {
            const T coef = static_cast<T>(2.0 * cl * hl[i]);
            const T* mi = mk ? mk + i * n : nullptr;
            for (int64_t k = 0; k < C; ++k) {
              T* g = Gp + (i * C + k) * n;
              const T* tr = tp + ((i - i0) * C + k) * n;
              if (mi) {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) g[j] = (tr[j] + coef * g[j]) * mi[j];
              } else {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) g[j] = tr[j] + coef * g[j];
              }
            }
          }
        }
      });
    }
    // the top: ∂/∂W_L = Σ_i G_L^iᵀ U_{L-1}^i
    const at::Tensor& U = sw.G[L - 1];
    if (net.ce) {
      gW[L].addmm_(sw.top.t(), U);
    } else if (f.m[L].defined()) {  // G_L = D_L: row k of ∂/∂W_L is Σ_i m_L[i, k] U^i[k, :]
      gW[L].add_((U.view({M, C, net.d[L - 1]}) * f.m[L].unsqueeze(-1)).sum(0));
    } else {
      gW[L].add_(U.view({M, C, net.d[L - 1]}).sum(0));
    }
  }

  // (2) cross-entropy: S depends on the logits: ∂/∂f = (u - p Σ_k u_k) D_L
  at::Tensor zbar;
  if (net.ce) {
    zbar = at::empty({M, C}, opts);
    const T* p = sw.p.data_ptr<T>();
    const T* mL = f.m[L].defined() ? f.m[L].data_ptr<T>() : nullptr;
    T* zp = zbar.data_ptr<T>();
    for (int64_t i = 0; i < M; ++i) {
      double tot = 0;
      for (int64_t k = 0; k < C; ++k) tot += sw.u[i * C + k];
      for (int64_t k = 0; k < C; ++k) {
        const double v = sw.u[i * C + k] - static_cast<double>(p[i * C + k]) * tot;
        zp[i * C + k] = static_cast<T>(mL ? v * static_cast<double>(mL[i * C + k]) : v);
      }
    }
  }

  // (3) ordinary backprop of ∂/∂f and of the h-terms ∂/∂a_{l-1} = 2 c_l ‖G_l‖² a_{l-1}
  at::Tensor grad_x;
  for (int64_t l = L; l >= 1; --l) {
    const at::Tensor& a = f.a[l - 1];
    if (zbar.defined()) {
      gW[l].addmm_(zbar.t(), a);
      if (net.b[l].defined()) gb[l].add_(zbar.sum(0));
    }
    if (l == 1 && !want_x) break;  // value-and-grad: no gradient in x, so no (M × d_1)·(d_1 × d_0) product for it
    std::vector<T> coef(M);
    for (int64_t i = 0; i < M; ++i) coef[i] = static_cast<T>(2.0 * c[l] * sw.V[l][i]);
    at::Tensor abar = a * at::from_blob(coef.data(), {M, 1}, opts);
    if (zbar.defined()) abar.addmm_(zbar, net.W[l]);
    if (l == 1) {
      grad_x = abar;
      break;
    }
    zbar = f.m[l - 1].defined() ? abar.mul_(f.m[l - 1]) : abar;
  }

  std::vector<at::Tensor> out;
  out.reserve(2 * L + 1);
  if (want_x) out.push_back(grad_x);
  for (int64_t l = 1; l <= L; ++l) out.push_back(gW[l]);
  for (int64_t l = 1; l <= L; ++l) out.push_back(gb[l]);
  return out;
}

// ------------------------------------------------------------------ the op's kernels

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_hessian_trace_cpu(const at::Tensor& x, at::TensorList weights,
                                                                      at::TensorList biases,
                                                                      at::ArrayRef<double> slopes,
                                                                      at::IntArrayRef num_acts, int64_t loss, bool mean,
                                                                      bool sum_layers) {
  const Net net = check(x, weights, biases, slopes, num_acts, loss, mean);
  const at::Tensor xc = x.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_hessian_trace_cpu", [&] {
    Forward f = run_forward<scalar_t>(net, xc);
    const auto h = input_norms<scalar_t>(net, f);
    const Sweep sw = run_sweep<scalar_t>(net, f, h, /*keep=*/false, {});
    std::vector<at::Tensor> saved(f.z.begin() + 1, f.z.end());
    return std::make_tuple(terms_tensor(net, sw, x.options(), sum_layers), saved);
  });
}

// c_l = s · (the cotangent of terms_l)
std::vector<double> coefficients(const Net& net, const at::Tensor& grad_terms, bool sum_layers) {
  std::vector<double> c(net.L + 1, net.s);
  if (sum_layers) {
    TORCH_CHECK(grad_terms.numel() == 1, "mlp_hessian_trace_backward: grad_terms has shape ", shape_str(grad_terms),
                ", need () with sum_layers");
    const double g = grad_terms.item<double>();
    for (int64_t l = 1; l <= net.L; ++l) c[l] = net.s * g;
  } else {
    TORCH_CHECK(grad_terms.dim() == 1 && grad_terms.size(0) == net.L, "mlp_hessian_trace_backward: grad_terms has shape ",
                shape_str(grad_terms), ", need (", net.L, ",)");
    const at::Tensor g = grad_terms.to(at::kDouble).contiguous();
    for (int64_t l = 1; l <= net.L; ++l) c[l] = net.s * g.data_ptr<double>()[l - 1];
  }
  return c;
}

std::vector<at::Tensor> mlp_hessian_trace_backward_cpu(const at::Tensor& x, at::TensorList weights,
                                                       at::TensorList biases, at::ArrayRef<double> slopes,
                                                       at::IntArrayRef num_acts, int64_t loss, bool mean,
                                                       bool sum_layers, at::TensorList saved,
                                                       const at::Tensor& grad_terms) {
  const Net net = check(x, weights, biases, slopes, num_acts, loss, mean);
  const at::Tensor xc = x.contiguous();
  const std::vector<double> c = coefficients(net, grad_terms, sum_layers);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_hessian_trace_backward_cpu", [&] {
    Forward f = from_saved<scalar_t>(net, xc, saved);
    const auto h = input_norms<scalar_t>(net, f);
    Sweep sw = run_sweep<scalar_t>(net, f, h, /*keep=*/true, c);
    return reverse<scalar_t>(net, f, h, sw, c, /*want_x=*/true);
  });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_hessian_trace_and_grad_cpu(const at::Tensor& x,
                                                                               at::TensorList weights,
                                                                               at::TensorList biases,
                                                                               at::ArrayRef<double> slopes,
                                                                               at::IntArrayRef num_acts, int64_t loss,
                                                                               bool mean, bool sum_layers) {
  const Net net = check(x, weights, biases, slopes, num_acts, loss, mean);
  const at::Tensor xc = x.contiguous();
  const std::vector<double> c(net.L + 1, net.s);  // the gradient of Σ_l terms_l
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_hessian_trace_and_grad_cpu", [&] {
    Forward f = run_forward<scalar_t>(net, xc);
    const auto h = input_norms<scalar_t>(net, f);
    Sweep sw = run_sweep<scalar_t>(net, f, h, /*keep=*/true, c);
    at::Tensor terms = terms_tensor(net, sw, x.options(), sum_layers);
    return std::make_tuple(terms, reverse<scalar_t>(net, f, h, sw, c, /*want_x=*/false));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flatkern, CPU, m) {
  m.impl("mlp_hessian_trace", &mlp_hessian_trace_cpu);
  m.impl("mlp_hessian_trace_backward", &mlp_hessian_trace_backward_cpu);
  m.impl("mlp_hessian_trace_and_grad", &mlp_hessian_trace_and_grad_cpu);
}

}  // namespace cpu
}  // namespace flatkern
