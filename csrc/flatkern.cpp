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
}

// An importable module with no Python functions: importing flatkern._C runs
// the static registrations above.
static struct PyModuleDef flatkern_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&flatkern_module); }
