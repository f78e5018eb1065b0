// CPU kernel of flatkern::end_to_end: the product of the layer chain.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace flatkern {

// Checks shared by the CPU kernels: the Python wrappers validate first, but the
// compiled code never trusts its caller (a bad call must be an error, not a crash).
void check_chain_cpu(const at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), "flatkern: weights is empty; need at least one layer");
  const auto& first = weights[0];
  for (size_t j = 0; j < weights.size(); ++j) {
    const auto& w = weights[j];
    TORCH_CHECK(w.device().is_cpu(), "flatkern: weights[", j, "] must be a CPU tensor, got ", w.device());
    TORCH_CHECK(w.dim() >= 2, "flatkern: weights[", j, "] must have shape (..., d_j, d_{j-1}), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == first.scalar_type(), "flatkern: weights[", j, "] has dtype ", w.scalar_type(),
                " but weights[0] has ", first.scalar_type());
    TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
                "flatkern: weights must be float32 or float64, got ", w.scalar_type());
    TORCH_CHECK(w.sizes().slice(0, w.dim() - 2) == first.sizes().slice(0, first.dim() - 2),
                "flatkern: weights[", j, "] batch shape ", w.sizes().slice(0, w.dim() - 2),
                " differs from weights[0] batch shape ", first.sizes().slice(0, first.dim() - 2));
    if (j > 0) {
      TORCH_CHECK(w.size(-1) == weights[j - 1].size(-2), "flatkern: layers do not chain at layer ", j + 1,
                  ": weights[", j, "] has shape ", w.sizes(), " but weights[", j - 1, "] has shape ",
                  weights[j - 1].sizes());
    }
  }
}

at::Tensor end_to_end_cpu(at::TensorList weights) {
  check_chain_cpu(weights);
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

}  // namespace flatkern
