// The Python module flatkern._C: importing it registers the compiled kernels.
//
// The op schemas (flatkern::end_to_end, hessian_trace, hessian_trace_backward,
// hessian_trace_and_grad) are NOT declared here: they are defined once, in Python,
// in flatkern/kernels/op.py, so that the ops exist without this extension (their
// CPU kernel is then the plain-torch reference). op.py defines them and then
// imports this module, whose static TORCH_LIBRARY_IMPL blocks register
//   cpu/hessian_trace_kernel.cpp   CPU kernels of the trace ops
//   cpu/end_to_end_kernel.cpp      CPU kernel of end_to_end
//   autograd/hessian_trace.cpp     the autograd formula (every device) and the
//                                  not-differentiable value-and-grad
// The module itself exposes what the Python side must agree with:
//   hessian_trace_saved_size(widths, family, operand_shapes) -> int
//       per-problem length of the C++ forward's saved tensor (the fake kernel's
//       output size), from the same Layout and operand checks the kernels use
//   FAMILIES  {"ISOTROPIC": 0, ...}, the family codes compiled into the kernels
// and two ops called without boxing their arguments (unboxed_calls.cpp says why):
//   call_hessian_trace(weights, family, operands, with_end_to_end, scale, sum_layers)
//   call_hessian_trace_and_grad(weights, family, operands, scale, sum_layers, into=None, alpha=1.)
#include <torch/extension.h>

#include <c10/util/Exception.h>

#include "cpu/layout.h"
#include "unboxed_calls.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flatkern's compiled CPU kernels (registered with the dispatcher on import)";
  // a failed TORCH_CHECK reads as a plain RuntimeError with its message, no C++ backtrace
  pybind11::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("hessian_trace_saved_size", &flatkern::hessian_trace_saved_size, pybind11::arg("widths"),
        pybind11::arg("family"), pybind11::arg("operand_shapes"),
        "Per-problem length S of the C++ hessian_trace's saved tensor (..., S) for widths [d_0, ..., d_L], a "
        "family code and the operands' shapes; raises on what the kernel would reject.");
  m.def(
      "call_hessian_trace",
      [](const std::vector<at::Tensor>& weights, int64_t family, const std::vector<at::Tensor>& operands,
         bool with_end_to_end, double scale, bool sum_layers) {
        pybind11::gil_scoped_release no_gil;  // as torch's own op bindings do
        return flatkern::call_hessian_trace(weights, family, operands, with_end_to_end, scale, sum_layers);
      },
      "flatkern::hessian_trace through the dispatcher's typed entry (not for torch.compile traces)");
  m.def(
      "call_hessian_trace_and_grad",
      [](const std::vector<at::Tensor>& weights, int64_t family, const std::vector<at::Tensor>& operands,
         double scale, bool sum_layers, const std::optional<std::vector<at::Tensor>>& into, double alpha) {
        pybind11::gil_scoped_release no_gil;
        return flatkern::call_hessian_trace_and_grad(weights, family, operands, scale, sum_layers, into, alpha);
      },
      pybind11::arg("weights"), pybind11::arg("family"), pybind11::arg("operands"), pybind11::arg("scale"),
      pybind11::arg("sum_layers"), pybind11::arg("into") = pybind11::none(), pybind11::arg("alpha") = 1.0,
      "flatkern::hessian_trace_and_grad through the dispatcher's typed entry: (terms, grads); with into, "
      "into[j] += alpha * grads[j] in place and grads is empty (not for torch.compile traces)");
  pybind11::dict families;
  families["ISOTROPIC"] = static_cast<int64_t>(flatkern::ISOTROPIC);
  families["ENTRIES"] = static_cast<int64_t>(flatkern::ENTRIES);
  families["RANK_ONE"] = static_cast<int64_t>(flatkern::RANK_ONE);
  families["DENSE"] = static_cast<int64_t>(flatkern::DENSE);
  families["DENSE_KERNEL"] = static_cast<int64_t>(flatkern::DENSE_KERNEL);
  families["INPUTS"] = static_cast<int64_t>(flatkern::INPUTS);
  m.attr("FAMILIES") = families;
}
