// Op schemas of flatkern and the Python module entry.
//
// Schemas are declared once here with TORCH_LIBRARY; each backend registers
// its kernels with TORCH_LIBRARY_IMPL in its own file (cpu/<op>_cpu.cpp), so
// torch.compile and torch.library.opcheck see ordinary torch ops.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(flatkern, m) {
  // E = W_L ... W_1 for weights [W_1, ..., W_L], W_j of shape (..., d_j, d_{j-1}).
  m.def("end_to_end(Tensor[] weights) -> Tensor");
  // Per-layer trace terms scale · c_j, c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F² (..., L), or their sum
  // (...) with sum_layers; optionally E (..., d_L, d_0) (else an empty (0,) tensor); and the buffer
  // (..., S) its backward needs. `family` encodes the measurement family and a, b its operands
  // (csrc/cpu/hessian_trace_cpu.cpp, flatkern/kernels/cpp.py). scale and sum_layers let
  // flatkern.hessian_trace be this one op: a small problem cannot afford two more autograd nodes.
  m.def("hessian_layer_terms(Tensor[] weights, int family, Tensor? a, Tensor? b, bool with_end_to_end, "
        "float scale=1., bool sum_layers=False) -> (Tensor, Tensor, Tensor)");
  // Gradients of <grad_terms, terms> + <grad_E, E> with respect to each weight (terms as above).
  m.def("hessian_layer_terms_backward(Tensor[] weights, int family, Tensor? a, Tensor? b, Tensor saved, "
        "Tensor grad_terms, Tensor? grad_E, float scale=1., bool sum_layers=False) -> Tensor[]");
}

// An importable module with no Python functions: importing flatkern._C runs
// the static registrations above.
static struct PyModuleDef flatkern_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&flatkern_module); }
