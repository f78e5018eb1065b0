// CPU kernel of flatkern::end_to_end: E = W_L ⋯ W_1, the product of the layer chain.
// (Its schema and autograd formula are defined in Python: flatkern/kernels/op.py.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "layout.h"

namespace flatkern {
namespace cpu {

at::Tensor end_to_end_cpu(at::TensorList weights) {
  check_chain(weights);
  // Multiply from the narrow end: the same cost model as the reference
  // (right to left), one BLAS call per layer, batched over leading dims.
  // clone: an op's output must never alias its input
  at::Tensor E = weights[0].clone(at::MemoryFormat::Contiguous);
  for (size_t j = 1; j < weights.size(); ++j) {
    E = at::matmul(weights[j], E);
  }
  return E.contiguous();
}

TORCH_LIBRARY_IMPL(flatkern, CPU, m) { m.impl("end_to_end", &end_to_end_cpu); }

}  // namespace cpu
}  // namespace flatkern
