// The ops called from Python without boxing their arguments (unboxed_calls.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace flatkern {

// flatkern::hessian_trace(weights, family, operands, with_end_to_end, scale, sum_layers)
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> call_hessian_trace(
    const std::vector<at::Tensor>& weights, int64_t family, const std::vector<at::Tensor>& operands,
    bool with_end_to_end, double scale, bool sum_layers);

// flatkern::hessian_trace_and_grad(weights, family, operands, scale, sum_layers) -> (terms, grads), on
// contiguous copies of weights that are not contiguous; with `into`: into[j] += alpha * grads[j] in
// place, and grads comes back empty.
std::tuple<at::Tensor, std::vector<at::Tensor>> call_hessian_trace_and_grad(
    const std::vector<at::Tensor>& weights, int64_t family, const std::vector<at::Tensor>& operands, double scale,
    bool sum_layers, const std::optional<std::vector<at::Tensor>>& into, double alpha);

}  // namespace flatkern
