// The autograd formula of flatkern::mlp_hessian_trace, once for every device (the
// Python twin, for no extension and the Triton interpreter: flatkern/kernels/autograd.py).
//
// As for flatkern::hessian_trace (hessian_trace.cpp beside this file): registered for the
// Autograd alias key; the forward calls the op below autograd (the dispatcher picks the
// device's kernel) and saves x, the weights, the biases and the kernel's `saved` (the
// pre-activations z_l); the backward calls flatkern::mlp_hessian_trace_backward through
// the dispatcher, so torch.compile traces both directions as opaque ops. A call that
// builds no graph goes straight below autograd. A second derivative meets a clear error
// naming the backend; backend="torch" (plain torch) supports it.
//
// mlp_hessian_trace_and_grad runs below autograd: its outputs never require grad.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace flatkern {
namespace autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops' C++ signatures (schemas: flatkern/kernels/schemas.py).
using MlpSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(const at::Tensor&, at::TensorList, at::TensorList,
                                                               at::ArrayRef<double>, at::IntArrayRef, int64_t, bool,
                                                               bool);
using MlpBackwardSig = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, at::ArrayRef<double>,
                                               at::IntArrayRef, int64_t, bool, bool, at::TensorList, const at::Tensor&);

const c10::TypedOperatorHandle<MlpSig>& mlp_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flatkern::mlp_hessian_trace", "").typed<MlpSig>();
  return op;
}
const c10::TypedOperatorHandle<MlpBackwardSig>& mlp_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flatkern::mlp_hessian_trace_backward", "")
                             .typed<MlpBackwardSig>();
  return op;
}
const c10::TypedOperatorHandle<MlpSig>& mlp_and_grad_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flatkern::mlp_hessian_trace_and_grad", "").typed<MlpSig>();
  return op;
}

std::string backend_of(const at::Tensor& t) {
  if (t.device().is_cpu()) return "cpp";
  if (t.device().is_cuda()) return "triton";
  return c10::DeviceTypeName(t.device().type(), /*lower_case=*/true);
}

// The gradients, as a function of the inputs once more (create_graph=True): first derivatives
// work, a second derivative raises rather than return a wrong (zero) value.
class MlpBackwardFunction : public torch::autograd::Function<MlpBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                               at::ArrayRef<double> slopes, at::IntArrayRef num_acts, int64_t loss, bool mean,
                               bool sum_layers, at::TensorList saved, const at::Tensor& grad_terms) {
    ctx->saved_data["backend"] = backend_of(x);
    at::AutoDispatchBelowADInplaceOrView guard;
    return mlp_backward_op().call(x, weights, biases, slopes, num_acts, loss, mean, sum_layers, saved, grad_terms);
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "flatkern: the \"", ctx->saved_data["backend"].toStringRef(),
                "\" backend computes first derivatives of the trace only: double backward (a second derivative "
                "of the trace) is not supported there; backend=\"torch\" supports second derivatives");
  }
};

class MlpTraceFunction : public torch::autograd::Function<MlpTraceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                               at::ArrayRef<double> slopes, at::IntArrayRef num_acts, int64_t loss, bool mean,
                               bool sum_layers) {
    std::tuple<at::Tensor, std::vector<at::Tensor>> out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = mlp_op().call(x, weights, biases, slopes, num_acts, loss, mean, sum_layers);
    }
    auto& [terms, saved] = out;
    ctx->mark_non_differentiable(saved);
    variable_list to_save{x};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), biases.begin(), biases.end());
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["L"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["slopes"] = c10::IValue(std::vector<double>(slopes.begin(), slopes.end()));
    ctx->saved_data["num_acts"] = c10::IValue(std::vector<int64_t>(num_acts.begin(), num_acts.end()));
    ctx->saved_data["loss"] = loss;
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["sum_layers"] = sum_layers;
    variable_list result{terms};
    result.insert(result.end(), saved.begin(), saved.end());
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list vars = ctx->get_saved_variables();
    const int64_t L = ctx->saved_data["L"].toInt();
    const at::TensorList all(vars);
    const at::Tensor& x = vars[0];
    const at::TensorList weights = all.slice(1, L), biases = all.slice(1 + L, L), saved = all.slice(1 + 2 * L);
    const std::vector<double> slopes = ctx->saved_data["slopes"].toDoubleVector();
    const std::vector<int64_t> num_acts = ctx->saved_data["num_acts"].toIntVector();
    const int64_t loss = ctx->saved_data["loss"].toInt();
    const bool mean = ctx->saved_data["mean"].toBool(), sum_layers = ctx->saved_data["sum_layers"].toBool();
    at::Tensor grad_terms = grads[0];
    if (!grad_terms.defined()) {
      const std::vector<int64_t> shape = sum_layers ? std::vector<int64_t>{} : std::vector<int64_t>{L};
      grad_terms = at::zeros(shape, x.options());
    }
    variable_list g;
    if (at::GradMode::is_enabled()) {  // create_graph: through MlpBackwardFunction's clear second-derivative error
      g = MlpBackwardFunction::apply(x, weights, biases, at::ArrayRef<double>(slopes), at::IntArrayRef(num_acts), loss,
                                     mean, sum_layers, saved, grad_terms.contiguous());
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      g = mlp_backward_op().call(x, weights, biases, slopes, num_acts, loss, mean, sum_layers, saved,
                                 grad_terms.contiguous());
    }
    // one slot per forward input: x, the weights, the biases, slopes, num_acts, loss, mean, sum_layers
    variable_list out(g.begin(), g.begin() + 1 + 2 * L);
    for (int64_t l = 0; l < L; ++l)
      if (biases[l].numel() == 0) out[1 + L + l] = at::Tensor();  // no bias: the placeholder gets no gradient
    out.resize(1 + 2 * L + 5);
    return out;
  }
};

bool records_graph(const at::Tensor& x, at::TensorList weights, at::TensorList biases) {
  if (!at::GradMode::is_enabled()) return false;
  if (x.requires_grad()) return true;
  for (const auto& t : weights)
    if (t.requires_grad()) return true;
  for (const auto& t : biases)
    if (t.requires_grad()) return true;
  return false;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_hessian_trace_autograd(const at::Tensor& x, at::TensorList weights,
                                                                           at::TensorList biases,
                                                                           at::ArrayRef<double> slopes,
                                                                           at::IntArrayRef num_acts, int64_t loss,
                                                                           bool mean, bool sum_layers) {
  if (!records_graph(x, weights, biases)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return mlp_op().call(x, weights, biases, slopes, num_acts, loss, mean, sum_layers);
  }
  variable_list out = MlpTraceFunction::apply(x, weights, biases, slopes, num_acts, loss, mean, sum_layers);
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

std::vector<at::Tensor> mlp_hessian_trace_backward_autograd(const at::Tensor& x, at::TensorList weights,
                                                            at::TensorList biases, at::ArrayRef<double> slopes,
                                                            at::IntArrayRef num_acts, int64_t loss, bool mean,
                                                            bool sum_layers, at::TensorList saved,
                                                            const at::Tensor& grad_terms) {
  if (!records_graph(x, weights, biases) && !(grad_terms.requires_grad() && at::GradMode::is_enabled())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return mlp_backward_op().call(x, weights, biases, slopes, num_acts, loss, mean, sum_layers, saved, grad_terms);
  }
  return MlpBackwardFunction::apply(x, weights, biases, slopes, num_acts, loss, mean, sum_layers, saved, grad_terms);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_hessian_trace_and_grad_autograd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::ArrayRef<double> slopes,
    at::IntArrayRef num_acts, int64_t loss, bool mean, bool sum_layers) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return mlp_and_grad_op().call(x, weights, biases, slopes, num_acts, loss, mean, sum_layers);
}

}  // namespace

TORCH_LIBRARY_IMPL(flatkern, Autograd, m) {
  m.impl("mlp_hessian_trace", &mlp_hessian_trace_autograd);
  m.impl("mlp_hessian_trace_backward", &mlp_hessian_trace_backward_autograd);
  m.impl("mlp_hessian_trace_and_grad", &mlp_hessian_trace_and_grad_autograd);
}

}  // namespace autograd
}  // namespace flatkern
