// flatkern._C.call_hessian_trace and flatkern._C.call_hessian_trace_and_grad:
// the ops flatkern::hessian_trace and flatkern::hessian_trace_and_grad, called
// from Python through the dispatcher's typed (unboxed) entry.
//
// Why: calling an op from Python (torch.ops.flatkern.X.default) first converts
// every argument to an IValue against the schema, lists of tensors included;
// for a d = 30 problem that is ~1.5 µs of a ~10 µs call, and these ops run on
// every optimizer step. pybind11 converts the same arguments to the C++ types
// directly, and the typed call then goes through the dispatcher exactly as the
// boxed one does (Autograd, the device's kernel, Python dispatch keys, modes and
// tensor subclasses all still see the op). Only a torch.compile trace must see
// the Python op object itself: flatkern/ops.py calls these when not compiling.
//
// call_hessian_trace_and_grad(..., into, alpha) also adds alpha times the
// gradient into the tensors `into` (what an optimizer does with it: p.grad +=
// lam * grad), in place, without handing the gradients back to Python.
//
// hessian_trace_and_grad builds no graph, so for plain dense CPU tensors, with no
// dispatch key switched on for the thread (torch.func, tracing, a Python mode),
// the dispatcher would do nothing but reach the C++ CPU kernel: that call skips
// it and runs the kernel itself (another ~5 µs of an optimizer step, measured
// inside a training loop, where every extra layer of code runs cache-cold).
// Anything else (a subclass, a fake tensor, a mode, a CUDA tensor) goes through
// the dispatcher.
#include "unboxed_calls.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/variable.h>

#include <string>

namespace flatkern {
namespace cpu {
// the CPU kernel of flatkern::hessian_trace_and_grad (cpu/hessian_trace_kernel.cpp)
std::tuple<at::Tensor, std::vector<at::Tensor>> hessian_trace_and_grad_cpu(at::TensorList weights, int64_t family,
                                                                           at::TensorList operands, double scale,
                                                                           bool sum_layers);
}  // namespace cpu

namespace {

// The keys of a plain dense CPU tensor: anything beyond them (Python, functorch,
// conjugate/negative views, sparse, another device) is the dispatcher's to handle.
bool plain_cpu_keys(const at::Tensor& t) {
  static const c10::DispatchKeySet plain = c10::DispatchKeySet(c10::DispatchKey::CPU) |
                                           c10::DispatchKeySet(c10::DispatchKey::AutogradCPU) |
                                           c10::DispatchKeySet(c10::DispatchKey::ADInplaceOrView) |
                                           c10::DispatchKeySet(c10::DispatchKey::AutocastCPU);
  return t.defined() && (t.key_set() - plain).empty();
}

// Whether the dispatcher would send these inputs straight to the C++ CPU kernel.
bool dispatcher_adds_nothing(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& operands) {
  if (!c10::impl::tls_local_dispatch_key_set().included_.empty() || c10::impl::TorchDispatchModeTLS::stack_len() > 0)
    return false;
  for (const at::Tensor& t : weights)
    if (!plain_cpu_keys(t)) return false;
  for (const at::Tensor& t : operands)
    if (!plain_cpu_keys(t)) return false;
  return true;
}

using TraceSig = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(at::TensorList, int64_t, at::TensorList,
                                                                             bool, double, bool);
using AndGradSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, int64_t, at::TensorList, double,
                                                                   bool);

const c10::TypedOperatorHandle<TraceSig>& trace_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flatkern::hessian_trace", "").typed<TraceSig>();
  return op;
}
const c10::TypedOperatorHandle<AndGradSig>& and_grad_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flatkern::hessian_trace_and_grad", "").typed<AndGradSig>();
  return op;
}

// A dense CPU tensor with no Python key (no subclass or fake tensor) that can be
// written through its pointer.
bool plain_cpu(const at::Tensor& t) {
  return t.is_cpu() && t.layout() == at::kStrided && t.is_contiguous() && !t.is_conj() && !t.is_neg() &&
         !t.key_set().has(c10::DispatchKey::Python) &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

template <typename T>
void axpy(T* y, const T* x, int64_t size, T alpha) {
  for (int64_t i = 0; i < size; ++i) y[i] += alpha * x[i];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> call_hessian_trace(
    const std::vector<at::Tensor>& weights, int64_t family, const std::vector<at::Tensor>& operands,
    bool with_end_to_end, double scale, bool sum_layers) {
  return trace_op().call(weights, family, operands, with_end_to_end, scale, sum_layers);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> call_hessian_trace_and_grad(
    const std::vector<at::Tensor>& given, int64_t family, const std::vector<at::Tensor>& operands, double scale,
    bool sum_layers, const std::optional<std::vector<at::Tensor>>& into, double alpha) {
  // the kernels take contiguous weights; contiguous() is free for the usual ones
  std::vector<at::Tensor> weights;
  weights.reserve(given.size());
  for (const at::Tensor& w : given) weights.push_back(w.contiguous());
  if (into.has_value()) {
    // checked before the op runs: a bad `into` changes nothing
    TORCH_CHECK(into->size() == weights.size(), "flatkern: into has ", into->size(), " tensors but weights has ",
                weights.size(), " layers");
    for (size_t j = 0; j < weights.size(); ++j) {
      const at::Tensor& g = (*into)[j];
      const at::Tensor& w = weights[j];
      TORCH_CHECK(g.defined() && g.sizes() == w.sizes() && g.scalar_type() == w.scalar_type() &&
                      g.device() == w.device(),
                  "flatkern: into[", j, "] must match weights[", j, "] (shape ", w.sizes(), ", ", w.scalar_type(),
                  ", ", w.device(), "), got ",
                  g.defined() ? "shape " + c10::str(g.sizes()) + ", " + c10::toString(g.scalar_type()) + ", " +
                                    c10::str(g.device())
                              : std::string("an undefined tensor"));
      TORCH_CHECK(!g.requires_grad(), "flatkern: into[", j,
                  "] requires grad; add the gradient to it through autograd instead");
    }
  }
  at::Tensor terms;
  std::vector<at::Tensor> grads;
  if (dispatcher_adds_nothing(weights, operands)) {
    RECORD_FUNCTION("flatkern::hessian_trace_and_grad", c10::ArrayRef<const c10::IValue>{});
    std::tie(terms, grads) = cpu::hessian_trace_and_grad_cpu(weights, family, operands, scale, sum_layers);
  } else {
    std::tie(terms, grads) = and_grad_op().call(weights, family, operands, scale, sum_layers);
  }
  if (!into.has_value()) return {terms, grads};
  for (size_t j = 0; j < grads.size(); ++j) {
    at::Tensor g = (*into)[j];
    if (plain_cpu(g) && plain_cpu_keys(g) && plain_cpu(grads[j]) && grads[j].scalar_type() == g.scalar_type()) {
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "call_hessian_trace_and_grad", [&] {
        axpy<scalar_t>(g.data_ptr<scalar_t>(), grads[j].const_data_ptr<scalar_t>(), g.numel(),
                       static_cast<scalar_t>(alpha));
      });
      torch::autograd::impl::bump_version(g);  // as an in-place add_ would: autograd sees the change
    } else {
      g.add_(grads[j], alpha);  // through the dispatcher: any device, subclass or mode
    }
  }
  return {terms, {}};
}

}  // namespace flatkern
