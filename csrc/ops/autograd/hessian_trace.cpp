// The autograd formula of flatkern::hessian_trace, once for every device.
//
// Registered for the Autograd alias key (AutogradCPU and AutogradCUDA alike):
// the forward calls the op below autograd, where the dispatcher picks the device's
// kernel (C++ on CPU, Triton on CUDA), and saves the weights, the operands and
// whatever that kernel returned as `saved`; the backward calls
// flatkern::hessian_trace_backward through the dispatcher, so that torch.compile
// (AOTAutograd) traces both directions as opaque ops. Written in C++ rather than
// with torch.library.register_autograd: a Python autograd wrapper costs more than
// a whole d = 30 problem. A second derivative meets a clear error naming the
// backend; backend="torch" (plain torch, autograd all the way) supports it.
//
// hessian_trace_and_grad gets an Autograd kernel too: it calls below autograd,
// so its outputs never require grad and no graph is built (issue 13's speed path).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace flatkern {
namespace autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops' C++ signatures (schemas: flatkern/kernels/op.py, OP_SPEC.md).
using TraceSig = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(at::TensorList, int64_t, at::TensorList,
                                                                             bool, double, bool);
using BackwardSig = std::vector<at::Tensor>(at::TensorList, int64_t, at::TensorList, at::TensorList,
                                            const at::Tensor&, const std::optional<at::Tensor>&, double, bool);
using AndGradSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, int64_t, at::TensorList, double,
                                                                   bool);

// Looked up on first use: the schemas are defined by Python before this library loads.
const c10::TypedOperatorHandle<TraceSig>& trace_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flatkern::hessian_trace", "").typed<TraceSig>();
  return op;
}
const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flatkern::hessian_trace_backward", "").typed<BackwardSig>();
  return op;
}
const c10::TypedOperatorHandle<AndGradSig>& and_grad_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flatkern::hessian_trace_and_grad", "").typed<AndGradSig>();
  return op;
}

// The backend a device's kernel belongs to, as flatkern.hessian_trace(backend=...) names it.
std::string backend_name(const at::Tensor& t) {
  if (t.device().is_cpu()) return "cpp";
  if (t.device().is_cuda()) return "triton";
  return c10::DeviceTypeName(t.device().type(), /*lower_case=*/true);
}

// hessian_trace_backward, differentiated once more: not implemented, and says so.
class TraceBackwardFunction : public torch::autograd::Function<TraceBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, int64_t family, at::TensorList operands,
                               at::TensorList saved, const at::Tensor& grad_terms,
                               const std::optional<at::Tensor>& grad_E, double scale, bool sum_layers) {
    ctx->saved_data["backend"] = backend_name(weights[0]);
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward_op().call(weights, family, operands, saved, grad_terms, grad_E, scale, sum_layers);
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "flatkern: the \"", ctx->saved_data["backend"].toStringRef(),
                "\" backend computes first derivatives of the trace only: double backward (a second derivative "
                "of the trace) is not supported there; backend=\"torch\" supports second derivatives");
  }
};

class TraceFunction : public torch::autograd::Function<TraceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, int64_t family, at::TensorList operands,
                               bool with_end_to_end, double scale, bool sum_layers) {
    std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = trace_op().call(weights, family, operands, with_end_to_end, scale, sum_layers);
    }
    auto& [terms, E, saved] = out;
    ctx->mark_non_differentiable(saved);
    // an unused output gets an undefined gradient rather than zeros: no E, no work
    ctx->set_materialize_grads(false);
    variable_list to_save(weights.begin(), weights.end());
    to_save.insert(to_save.end(), operands.begin(), operands.end());
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    // four entries: each is a string-keyed map insert on every call
    ctx->saved_data["counts"] = c10::IValue(c10::List<int64_t>({static_cast<int64_t>(weights.size()),
                                                                static_cast<int64_t>(operands.size()), family}));
    ctx->saved_data["with_end_to_end"] = with_end_to_end;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["sum_layers"] = sum_layers;
    variable_list result{terms, E};
    result.insert(result.end(), saved.begin(), saved.end());
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list vars = ctx->get_saved_variables();
    const auto counts = ctx->saved_data["counts"].toIntList();
    const int64_t L = counts[0], num_operands = counts[1], family = counts[2];
    const at::TensorList all(vars);
    const at::TensorList weights = all.slice(0, L), operands = all.slice(L, num_operands),
                         saved = all.slice(L + num_operands);
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool sum_layers = ctx->saved_data["sum_layers"].toBool();
    at::Tensor grad_terms = grads[0];
    if (!grad_terms.defined()) {  // only E was used
      // sym sizes: under torch.compile the shapes may be symbolic
      const auto sizes = weights[0].sym_sizes();
      std::vector<c10::SymInt> shape(sizes.begin(), sizes.end() - 2);
      if (!sum_layers) shape.emplace_back(L);
      grad_terms = at::zeros_symint(shape, weights[0].options());
    }
    std::optional<at::Tensor> grad_E;
    if (ctx->saved_data["with_end_to_end"].toBool() && grads[1].defined()) grad_E = grads[1].contiguous();
    // with create_graph, through the Autograd key, where a second derivative meets
    // TraceBackwardFunction's clear error; otherwise straight to the device's kernel
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    std::vector<at::Tensor> gW = backward_op().call(weights, family, operands, saved,
                                                    grad_terms.contiguous(), grad_E, scale, sum_layers);
    variable_list out(gW.begin(), gW.end());
    // one slot per forward input: weights, family, operands, with_end_to_end, scale, sum_layers
    out.resize(L + 1 + num_operands + 3);
    return out;
  }
};

// Whether a call can build a graph: grad mode on and some input requires grad. If
// not, the Autograd kernels go straight below autograd, as ATen's generated ones
// do, skipping the node that torch::autograd::Function::apply would make.
bool records_graph(at::TensorList weights, at::TensorList operands) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : weights)
    if (t.requires_grad()) return true;
  for (const auto& t : operands)
    if (t.requires_grad()) return true;
  return false;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> hessian_trace_autograd(at::TensorList weights,
                                                                                   int64_t family,
                                                                                   at::TensorList operands,
                                                                                   bool with_end_to_end,
                                                                                   double scale, bool sum_layers) {
  if (!records_graph(weights, operands)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return trace_op().call(weights, family, operands, with_end_to_end, scale, sum_layers);
  }
  variable_list out = TraceFunction::apply(weights, family, operands, with_end_to_end, scale, sum_layers);
  return {out[0], out[1], std::vector<at::Tensor>(out.begin() + 2, out.end())};
}

std::vector<at::Tensor> hessian_trace_backward_autograd(at::TensorList weights, int64_t family,
                                                        at::TensorList operands, at::TensorList saved,
                                                        const at::Tensor& grad_terms,
                                                        const std::optional<at::Tensor>& grad_E, double scale,
                                                        bool sum_layers) {
  if (!records_graph(weights, operands) && !(grad_terms.requires_grad() && at::GradMode::is_enabled()) &&
      !(grad_E.has_value() && grad_E->defined() && grad_E->requires_grad() && at::GradMode::is_enabled())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward_op().call(weights, family, operands, saved, grad_terms, grad_E, scale, sum_layers);
  }
  return TraceBackwardFunction::apply(weights, family, operands, saved, grad_terms, grad_E, scale, sum_layers);
}

// Not differentiable: below autograd, so the outputs never require grad.
std::tuple<at::Tensor, std::vector<at::Tensor>> hessian_trace_and_grad_autograd(at::TensorList weights,
                                                                                int64_t family,
                                                                                at::TensorList operands,
                                                                                double scale, bool sum_layers) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return and_grad_op().call(weights, family, operands, scale, sum_layers);
}

}  // namespace

TORCH_LIBRARY_IMPL(flatkern, Autograd, m) {
  m.impl("hessian_trace", &hessian_trace_autograd);
  m.impl("hessian_trace_backward", &hessian_trace_backward_autograd);
  m.impl("hessian_trace_and_grad", &hessian_trace_and_grad_autograd);
}

}  // namespace autograd
}  // namespace flatkern
