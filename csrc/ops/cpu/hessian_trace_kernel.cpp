// CPU kernels of flatkern::hessian_trace, flatkern::hessian_trace_backward and
// flatkern::hessian_trace_and_grad (schemas: flatkern/kernels/op.py, OP_SPEC.md).
//
// For weights W_1 ... W_L (W_j of shape (d_j, d_{j-1}), leading dims = independent
// problems) the forward computes, per problem, in one pass over the chain
//
//   prefix products  Q_1 = I, Q_{j+1} = W_j Q_j          (d_{j-1}, d_0)
//   suffix products  P_L = I, P_{j-1} = P_j W_j          (d_L, d_j)
//   layer terms      c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²  (family_contractions.h)
//   optionally       E = W_L Q_L                         (d_L, d_0)
//
// and saves only what the backward needs (Layout, layout.h): the products that
// are not weights themselves (Q_3..Q_L, P_1..P_{L-2}) and a few per-layer
// statistics of the family. The backward is reverse accumulation along both
// chains, about two matrix products per chain step, without re-running the forward.
// hessian_trace_and_grad runs both for one problem back to back, the saved buffer
// a per-thread scratch that never leaves C++.
//
// Each problem runs start to finish on one thread with no dispatcher call and no
// tensor allocation per layer, and problems run in parallel over the batch with
// at::parallel_for. Products whose dimensions are all <= 128 run in the in-cache
// register-tiled loop (small_gemm.h); larger ones call BLAS directly, and a single
// large problem runs alone on the calling thread, where BLAS uses its own threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "family_contractions.h"
#include "layout.h"
#include "small_gemm.h"

namespace flatkern {
namespace cpu {
namespace {

// Problems per thread: small problems are grouped so that a thread gets at
// least ~64k multiply-adds; a large problem runs alone (BLAS threads it).
int64_t grain_size(const Layout& lay) {
  int64_t cost = 1;
  for (int64_t j = 1; j <= lay.L; ++j) cost += lay.d[j] * lay.d[j - 1] * std::max(lay.d[0], lay.d[lay.L]);
  return std::max<int64_t>(1, (int64_t{1} << 16) / cost);
}

// W_j of problem 0, index j = 1..L; problem p's W_j starts lay.w_size(j) * p further on
template <typename T>
std::vector<const T*> layer_bases(at::TensorList weights) {
  std::vector<const T*> W0(weights.size() + 1);
  for (size_t j = 1; j <= weights.size(); ++j) W0[j] = weights[j - 1].data_ptr<T>();
  return W0;
}

// One thread's pointers and buffers for one call (allocated once per thread, not per problem).
template <typename T>
struct Scratch {
  std::vector<const T*> W, Q, P;  // index j = 1..L; nullptr = identity
  std::vector<T*> G;              // gradients of problem p, index j = 1..L
  std::vector<T> g;               // cotangents of c_1..c_L (scale included)
  std::unique_ptr<T[]> work, qbuf, pbuf;
  int64_t qmax = 1, pmax = 1;

  Scratch(const Layout& lay, int64_t work_size, bool backward)
      : W(lay.L + 1), Q(lay.L + 1), P(lay.L + 1), G(lay.L + 1), g(lay.L), work(new T[work_size]) {
    if (!backward) return;
    const int64_t L = lay.L, dL = lay.d[L], d0 = lay.d[0];
    for (int64_t j = 2; j <= L; ++j) qmax = std::max(qmax, lay.d[j - 1] * d0);
    for (int64_t j = 1; j <= L - 1; ++j) pmax = std::max(pmax, dL * lay.d[j]);
    qbuf.reset(new T[2 * qmax]);
    pbuf.reset(new T[2 * pmax]);
  }
  void point_at(const Layout& lay, const std::vector<const T*>& W0, int64_t p) {
    for (int64_t j = 1; j <= lay.L; ++j) W[j] = W0[j] + p * lay.w_size(j);
  }
  void point_grads_at(const Layout& lay, const std::vector<T*>& G0, int64_t p) {
    for (int64_t j = 1; j <= lay.L; ++j) G[j] = G0[j] + p * lay.w_size(j);
  }
};

// ----------------------------------------------------------------- chain walk

// One problem's forward: fills its saved buffer `sv`, its terms (L entries, or one
// with sum_layers) and, if `e` is not null, E.
template <typename T>
void chain_forward(const Meas<T>& m, const Layout& lay, Scratch<T>& s, T* sv, T scale, bool sum_layers, T* terms,
                   T* e) {
  const int64_t L = lay.L, dL = lay.d[L], d0 = lay.d[0];
  auto &W = s.W, &Q = s.Q, &P = s.P;
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
  if (e != nullptr) {
    if (L == 1) std::memcpy(e, W[1], sizeof(T) * dL * d0);
    else mm<T>(false, false, dL, d0, lay.d[L - 1], 1, W[L], Q[L], 0, e);
  }
  T total = 0;
  for (int64_t j = 1; j <= L; ++j) {
    T* st = sv + lay.stat_off + (j - 1) * lay.stat_size;
    const T c = scale * family_forward(m, lay, j, P[j], Q[j], st, s.work.get());
    if (sum_layers) total += c;
    else terms[j - 1] = c;
  }
  if (sum_layers) terms[0] = total;
}

// One problem's backward: s.G[j] = ∂/∂W_j of Σ_j s.g[j] c_j + <gE, E> (gE may be null),
// from the saved buffer `sv` of chain_forward. Writes every gradient entry once
// before accumulating into it: no zero-fill pass.
template <typename T>
void chain_backward(const Meas<T>& m, const Layout& lay, Scratch<T>& s, const T* sv, const T* gE) {
  const int64_t L = lay.L, dL = lay.d[L], d0 = lay.d[0];
  auto &W = s.W, &Q = s.Q, &P = s.P;
  auto& G = s.G;
  const std::vector<T>& g = s.g;
  T* work = s.work.get();
  auto stats = [&](int64_t j) { return sv + lay.stat_off + (j - 1) * lay.stat_size; };
  if (L == 1) {
    // c_1 is a constant (P_1 = Q_1 = I); only E = W_1 carries a gradient
    if (gE) std::memcpy(G[1], gE, sizeof(T) * dL * d0);
    else std::fill(G[1], G[1] + lay.w_size(1), T(0));
    return;
  }
  // Each G_j is first written (beta = 0) by the prefix chain, which reaches every
  // layer but the last, then accumulated by the suffix chain.
  Q[1] = nullptr, Q[2] = W[1];
  for (int64_t j = 3; j <= L; ++j) Q[j] = sv + lay.q_off[j];
  P[L] = nullptr, P[L - 1] = W[L];
  for (int64_t j = 1; j <= L - 2; ++j) P[j] = sv + lay.p_off[j];

  // prefix chain, top down: barQ_j = g_j ∂c_j/∂Q_j + W_jᵀ barQ_{j+1}, and
  // Q_{j+1} = W_j Q_j gives barW_j += barQ_{j+1} Q_jᵀ (Q_1 = I: barW_1 += barQ_2)
  T* cur = s.qbuf.get();
  T* nxt = s.qbuf.get() + s.qmax;
  family_grad_Q(m, lay, L, g[L - 1], Q[L], stats(L), cur, work);
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
    family_grad_Q(m, lay, j, g[j - 1], Q[j], stats(j), nxt, work);
    mm<T>(true, false, lay.d[j - 1], d0, lay.d[j], 1, W[j], cur, 1, nxt);
    std::swap(cur, nxt);
  }
  // suffix chain, bottom up: barP_j = g_j ∂c_j/∂P_j + barP_{j-1} W_jᵀ, and
  // P_{j-1} = P_j W_j gives barW_j += P_jᵀ barP_{j-1} (P_L = I: barW_L += barP_{L-1})
  cur = s.pbuf.get();
  nxt = s.pbuf.get() + s.pmax;
  family_grad_P(m, lay, 1, g[0], P[1], stats(1), cur, work);
  for (int64_t j = 2; j <= L; ++j) {  // cur = barP_{j-1}, (d_L, d_{j-1})
    if (j == L) {
      if (gE) add_into(G[L], cur, lay.w_size(L));
      else scale_into(G[L], T(1), cur, lay.w_size(L));
      break;
    }
    mm<T>(true, false, lay.d[j], lay.d[j - 1], dL, 1, P[j], cur, 1, G[j]);
    family_grad_P(m, lay, j, g[j - 1], P[j], stats(j), nxt, work);
    mm<T>(false, true, dL, lay.d[j], lay.d[j - 1], 1, cur, W[j], 1, nxt);
    std::swap(cur, nxt);
  }
}

// ----------------------------------------------------------------- batch drivers

template <typename T>
void forward_batch(at::TensorList weights, const Meas<T>& m, const Layout& lay, int64_t B, T scale, bool sum_layers,
                   T* terms, T* E, T* saved) {
  const int64_t per_terms = sum_layers ? 1 : lay.L, per_E = lay.d[lay.L] * lay.d[0];
  const int64_t wsize = forward_work_size(m, lay);
  const std::vector<const T*> W0 = layer_bases<T>(weights);
  SequentialBlasIfSmall sequential(lay.dmax(), may_call_blas(m));
  at::parallel_for(0, B, grain_size(lay), [&](int64_t begin, int64_t end) {
    Scratch<T> s(lay, wsize, false);
    for (int64_t p = begin; p < end; ++p) {
      s.point_at(lay, W0, p);
      chain_forward(m.at(p), lay, s, saved + p * lay.size, scale, sum_layers, terms + p * per_terms,
                    E ? E + p * per_E : nullptr);
    }
  });
}

template <typename T>
void backward_batch(at::TensorList weights, const Meas<T>& m, const Layout& lay, int64_t B, const T* saved,
                    const T* grad_terms, T scale, bool sum_layers, const T* grad_E, const std::vector<T*>& G0) {
  const int64_t L = lay.L, per_E = lay.d[L] * lay.d[0];
  const int64_t wsize = backward_work_size(m, lay);
  const std::vector<const T*> W0 = layer_bases<T>(weights);
  SequentialBlasIfSmall sequential(lay.dmax(), may_call_blas(m));
  at::parallel_for(0, B, grain_size(lay), [&](int64_t begin, int64_t end) {
    Scratch<T> s(lay, wsize, true);
    for (int64_t p = begin; p < end; ++p) {
      s.point_at(lay, W0, p);
      s.point_grads_at(lay, G0, p);
      for (int64_t j = 0; j < L; ++j) s.g[j] = scale * (sum_layers ? grad_terms[p] : grad_terms[p * L + j]);
      chain_backward(m.at(p), lay, s, saved + p * lay.size, grad_E ? grad_E + p * per_E : nullptr);
    }
  });
}

// Forward and backward of each problem back to back: the saved buffer is one
// per-thread scratch, reused problem after problem while it is still in cache.
template <typename T>
void value_and_grad_batch(at::TensorList weights, const Meas<T>& m, const Layout& lay, int64_t B, T scale,
                          bool sum_layers, T* terms, const std::vector<T*>& G0) {
  const int64_t per_terms = sum_layers ? 1 : lay.L;
  const int64_t wsize = std::max(forward_work_size(m, lay), backward_work_size(m, lay));
  const std::vector<const T*> W0 = layer_bases<T>(weights);
  SequentialBlasIfSmall sequential(lay.dmax(), may_call_blas(m));
  at::parallel_for(0, B, grain_size(lay), [&](int64_t begin, int64_t end) {
    Scratch<T> s(lay, wsize, true);
    std::fill(s.g.begin(), s.g.end(), scale);  // the gradient of scale · Σ_j c_j
    std::unique_ptr<T[]> sv(new T[lay.size]);
    for (int64_t p = begin; p < end; ++p) {
      s.point_at(lay, W0, p);
      s.point_grads_at(lay, G0, p);
      const Meas<T> mp = m.at(p);
      chain_forward(mp, lay, s, sv.get(), scale, sum_layers, terms + p * per_terms, static_cast<T*>(nullptr));
      chain_backward(mp, lay, s, sv.get(), static_cast<const T*>(nullptr));
    }
  });
}

// ----------------------------------------------------------------- ops

std::vector<int64_t> with_tail(at::IntArrayRef batch, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> s(batch.begin(), batch.end());
  s.insert(s.end(), tail);
  return s;
}

at::IntArrayRef batch_shape(const at::Tensor& w) { return w.sizes().slice(0, w.dim() - 2); }

// Gradient tensors shaped like the weights, uninitialized (every entry is written
// once), and their base pointers indexed j = 1..L.
template <typename T>
std::vector<at::Tensor> empty_like_weights(at::TensorList weights, std::vector<T*>& G0) {
  std::vector<at::Tensor> grads;
  grads.reserve(weights.size());
  G0.assign(weights.size() + 1, nullptr);
  for (size_t j = 1; j <= weights.size(); ++j) {
    grads.push_back(at::empty(weights[j - 1].sizes(), weights[j - 1].options()));
    G0[j] = grads.back().data_ptr<T>();
  }
  return grads;
}

}  // namespace

// (terms (..., L) or (...) with sum_layers, E (..., d_L, d_0) or an empty (0,)
// tensor, saved [one tensor (..., S)], S = hessian_trace_saved_size(...)).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> hessian_trace_cpu(at::TensorList weights, int64_t family,
                                                                              at::TensorList operands,
                                                                              bool with_end_to_end, double scale,
                                                                              bool sum_layers) {
  check_chain(weights);  // before dispatching on the dtype: an integer chain gets the clear message
  bool batched = false;
  const Layout lay(chain_widths(weights), family, check_trace_inputs(weights, family, operands, &batched));
  const auto opts = weights[0].options();
  const auto batch = batch_shape(weights[0]);
  const int64_t B = c10::multiply_integers(batch);
  at::Tensor terms = sum_layers ? at::empty(batch, opts) : at::empty(with_tail(batch, {lay.L}), opts);
  at::Tensor saved = at::empty(with_tail(batch, {lay.size}), opts);
  at::Tensor E = with_end_to_end ? at::empty(with_tail(batch, {lay.d[lay.L], lay.d[0]}), opts) : at::empty({0}, opts);
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "hessian_trace_cpu", [&] {
      at::Tensor S;
      const Meas<scalar_t> m = bind_operands<scalar_t>(family, lay, operands, S, batched);
      forward_batch<scalar_t>(weights, m, lay, B, static_cast<scalar_t>(scale), sum_layers,
                              terms.data_ptr<scalar_t>(), with_end_to_end ? E.data_ptr<scalar_t>() : nullptr,
                              saved.data_ptr<scalar_t>());
    });
  }
  return {terms, E, {saved}};
}

// Gradients of <grad_terms, terms> + <grad_E, E> with respect to each W_j.
std::vector<at::Tensor> hessian_trace_backward_cpu(at::TensorList weights, int64_t family, at::TensorList operands,
                                                   at::TensorList saved, const at::Tensor& grad_terms,
                                                   const std::optional<at::Tensor>& grad_E, double scale,
                                                   bool sum_layers) {
  check_chain(weights);
  bool batched = false;
  const Layout lay(chain_widths(weights), family, check_trace_inputs(weights, family, operands, &batched));
  const auto dtype = weights[0].scalar_type();
  const auto batch = batch_shape(weights[0]);
  const int64_t B = c10::multiply_integers(batch);
  TORCH_CHECK(saved.size() == 1, "flatkern: the C++ backward takes saved = [one tensor] from the C++ forward, got ",
              saved.size(), " tensors");
  check_operand(saved[0], "saved[0]", dtype, with_tail(batch, {lay.size}));
  check_operand(grad_terms, "grad_terms", dtype, sum_layers ? batch.vec() : with_tail(batch, {lay.L}));
  const bool has_gE = grad_E.has_value() && grad_E->defined();
  if (has_gE) check_operand(*grad_E, "grad_E", dtype, with_tail(batch, {lay.d[lay.L], lay.d[0]}));
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(dtype, "hessian_trace_backward_cpu", [&] {
    std::vector<scalar_t*> G0;
    grads = empty_like_weights<scalar_t>(weights, G0);
    if (B == 0) return;
    at::Tensor S;
    const Meas<scalar_t> m = bind_operands<scalar_t>(family, lay, operands, S, batched);
    backward_batch<scalar_t>(weights, m, lay, B, saved[0].data_ptr<scalar_t>(), grad_terms.data_ptr<scalar_t>(),
                             static_cast<scalar_t>(scale), sum_layers,
                             has_gE ? grad_E->data_ptr<scalar_t>() : nullptr, G0);
  });
  return grads;
}

// (terms as hessian_trace's, the gradient of scale · Σ_j c_j with respect to each
// W_j, per problem): forward and backward in one call, nothing saved.
std::tuple<at::Tensor, std::vector<at::Tensor>> hessian_trace_and_grad_cpu(at::TensorList weights, int64_t family,
                                                                           at::TensorList operands, double scale,
                                                                           bool sum_layers) {
  check_chain(weights);
  bool batched = false;
  const Layout lay(chain_widths(weights), family, check_trace_inputs(weights, family, operands, &batched));
  const auto opts = weights[0].options();
  const auto batch = batch_shape(weights[0]);
  const int64_t B = c10::multiply_integers(batch);
  at::Tensor terms = sum_layers ? at::empty(batch, opts) : at::empty(with_tail(batch, {lay.L}), opts);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "hessian_trace_and_grad_cpu", [&] {
    std::vector<scalar_t*> G0;
    grads = empty_like_weights<scalar_t>(weights, G0);
    if (B == 0) return;
    at::Tensor S;
    const Meas<scalar_t> m = bind_operands<scalar_t>(family, lay, operands, S, batched);
    value_and_grad_batch<scalar_t>(weights, m, lay, B, static_cast<scalar_t>(scale), sum_layers,
                                   terms.data_ptr<scalar_t>(), G0);
  });
  return {terms, grads};
}

TORCH_LIBRARY_IMPL(flatkern, CPU, m) {
  m.impl("hessian_trace", &hessian_trace_cpu);
  m.impl("hessian_trace_backward", &hessian_trace_backward_cpu);
  m.impl("hessian_trace_and_grad", &hessian_trace_and_grad_cpu);
}

}  // namespace cpu
}  // namespace flatkern
