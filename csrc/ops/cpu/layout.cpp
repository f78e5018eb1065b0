// Family codes, input checks and the saved-buffer Layout (layout.h).
#include "layout.h"

#include <c10/util/SmallVector.h>

#include <climits>
#include <string>
#include <utility>

namespace flatkern {

namespace {

// Operand names, in order, for the messages (OP_SPEC.md's table).
constexpr const char* kOperandNames[kNumFamilies][3] = {
    {nullptr, nullptr, nullptr},   // Isotropic
    {"rows", "cols", nullptr},     // Entries
    {"u", "v", nullptr},           // RankOne
    {"Ap", nullptr, nullptr},      // Dense
    {"Ap", "Kp", nullptr},         // Dense (kernel K)
    {"x", nullptr, nullptr},       // Inputs
};
constexpr int64_t kOperandCounts[kNumFamilies] = {0, 2, 2, 1, 2, 1};
// Each operand's rank without a per-problem batch (flatkern/kernels/families.py's `ranks`).
constexpr int64_t kOperandRanks[kNumFamilies][3] = {{0, 0, 0}, {1, 1, 0}, {2, 2, 0}, {3, 0, 0}, {3, 4, 0}, {2, 0, 0}};

// "(rows, cols)"
std::string operand_list(int64_t family) {
  std::string s = "(";
  for (int64_t k = 0; k < kOperandCounts[family]; ++k) s += (k ? ", " : "") + std::string(kOperandNames[family][k]);
  return s + ")";
}

}  // namespace

const char* family_name(int64_t family) {
  static constexpr const char* names[kNumFamilies] = {"Isotropic", "Entries", "RankOne",
                                                      "Dense",     "Dense (kernel K)", "Inputs"};
  return family >= 0 && family < kNumFamilies ? names[family] : "unknown";
}

int64_t measurement_count(int64_t family, c10::ArrayRef<c10::IntArrayRef> shapes) {
  TORCH_CHECK(family >= 0 && family < kNumFamilies, "flatkern: unknown measurement family ", family,
              " (expected 0..5: Isotropic, Entries, RankOne, Dense, Dense (kernel K), Inputs)");
  const int64_t count = kOperandCounts[family];
  if (count == 0) {
    TORCH_CHECK(shapes.empty(), "flatkern: ", family_name(family), " takes no operands, got ", shapes.size());
    return 0;
  }
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == count, "flatkern: ", family_name(family), " takes ", count,
              " operands ", operand_list(family), ", got ", shapes.size());
  // the operand that carries n, its rank without a batch, and the axis of n counted from the end
  // (leading dims are a per-problem batch, checked against the weights by check_trace_inputs)
  const int64_t rank = kOperandRanks[family][0];
  const int64_t from_end = family == ENTRIES ? 1 : 2;
  const auto& s = shapes[0];
  TORCH_CHECK(static_cast<int64_t>(s.size()) >= rank, "flatkern: ", family_name(family), " operand ",
              kOperandNames[family][0], " must have ", rank,
              " dimensions (or more: a per-problem batch first), got shape ", s);
  const int64_t n = s[s.size() - from_end];
  TORCH_CHECK(n >= 1 && n < INT_MAX, "flatkern: ", family_name(family), " operand ", kOperandNames[family][0],
              " has shape ", s, ": the number of measurements must lie in [1, 2^31 - 1)");
  return n;
}

Layout::Layout(std::vector<int64_t> widths, int64_t family, int64_t n_)
    : L(static_cast<int64_t>(widths.size()) - 1), n(n_), d(std::move(widths)) {
  q_off.assign(L + 1, -1);
  p_off.assign(L + 1, -1);
  int64_t off = 0;
  for (int64_t j = 3; j <= L; ++j) q_off[j] = off, off += d[j - 1] * d[0];
  for (int64_t j = 1; j <= L - 2; ++j) p_off[j] = off, off += d[L] * d[j];
  stat_off = off;
  switch (family) {
    case ISOTROPIC: case INPUTS: stat_size = 2; break;        // ‖P_j‖², ‖Q_j‖² (or ‖Q_j xᵀ‖²)
    case ENTRIES: stat_size = d[L] + d[0]; break;             // row norms of P_j, column norms of Q_j
    case RANK_ONE: stat_size = 2 * n; break;                  // ‖P_jᵀ u_i‖², ‖Q_j v_i‖²
    default: stat_size = 2 * d[L] * d[L]; break;              // Dense: G_P and H
  }
  size = off + L * stat_size;
}

std::vector<int64_t> chain_widths(at::TensorList weights) {
  std::vector<int64_t> d(weights.size() + 1);
  d[0] = weights[0].size(-1);
  for (size_t j = 1; j <= weights.size(); ++j) d[j] = weights[j - 1].size(-2);
  return d;
}

void check_chain(at::TensorList weights) {
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

void check_operand(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "flatkern: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "flatkern: ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "flatkern: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "flatkern: ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
}

namespace {

// check_operand for operand k of a family; the message ("Entries operand rows ...") is
// only formatted when a check fails: these checks run on every call
void check_family_operand(const at::Tensor& t, int64_t family, int64_t k, at::ScalarType dtype,
                          at::IntArrayRef shape) {
  const char* op = kOperandNames[family][k];
  const char* fam = family_name(family);
  TORCH_CHECK(t.device().is_cpu(), "flatkern: ", fam, " operand ", op, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "flatkern: ", fam, " operand ", op, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "flatkern: ", fam, " operand ", op, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "flatkern: ", fam, " operand ", op, " must be contiguous (shape ", t.sizes(),
              ", strides ", t.strides(), ")");
}

}  // namespace

int64_t check_trace_inputs(at::TensorList weights, int64_t family, at::TensorList operands, bool* batched) {
  // the callers have run check_chain (before dispatching on the dtype)
  for (size_t j = 0; j < weights.size(); ++j) {
    TORCH_CHECK(weights[j].is_contiguous(), "flatkern: weights[", j, "] must be contiguous (shape ",
                weights[j].sizes(), ", strides ", weights[j].strides(), ")");
    for (int64_t s : weights[j].sizes().slice(weights[j].dim() - 2)) {
      TORCH_CHECK(s >= 1 && s < kMaxWidth, "flatkern: weights[", j, "] has shape ", weights[j].sizes(),
                  "; layer widths must lie in [1, 2^20)");
    }
  }
  c10::SmallVector<c10::IntArrayRef, 4> shapes;
  for (const auto& t : operands) shapes.push_back(t.sizes());
  const int64_t n = measurement_count(family, shapes);
  const int64_t d_L = weights.back().size(-2), d_0 = weights[0].size(-1);
  const auto dtype = weights[0].scalar_type();
  // A per-problem batch: operands[0] has more dims than its rank, and the extra leading ones must be
  // the weights' batch shape; every operand's expected shape below then starts with that batch.
  const at::IntArrayRef wbatch = weights[0].sizes().slice(0, weights[0].dim() - 2);
  bool has_batch = false;
  if (family != ISOTROPIC) {
    const int64_t extra = operands[0].dim() - kOperandRanks[family][0];
    has_batch = extra > 0;
    TORCH_CHECK(!has_batch || operands[0].sizes().slice(0, extra) == wbatch, "flatkern: ", family_name(family),
                " operand ", kOperandNames[family][0], " has shape ", operands[0].sizes(), ": its per-problem batch ",
                operands[0].sizes().slice(0, extra), " must equal the weights' batch shape ", wbatch,
                " (or be absent: one set shared by every problem)");
  }
  if (batched) *batched = has_batch;
  // the expected shape of an operand: the weights' batch (if per-problem), then `tail`
  auto shape = [&](std::initializer_list<int64_t> tail) {
    c10::SmallVector<int64_t, 8> s;
    if (has_batch) s.append(wbatch.begin(), wbatch.end());
    s.append(tail.begin(), tail.end());
    return s;
  };
  const int64_t B = has_batch ? c10::multiply_integers(wbatch) : 1;
  switch (family) {
    case ENTRIES: {
      check_family_operand(operands[0], family, 0, at::kLong, shape({n}));
      check_family_operand(operands[1], family, 1, at::kLong, shape({n}));
      // the kernels gather with these indices: an out-of-range one must be an error (every problem's)
      const int64_t* rows = operands[0].data_ptr<int64_t>();
      const int64_t* cols = operands[1].data_ptr<int64_t>();
      for (int64_t k = 0; k < B * n; ++k) {
        TORCH_CHECK(rows[k] >= 0 && rows[k] < d_L, "flatkern: Entries operand rows", has_batch ? " of problem " : "",
                    has_batch ? std::to_string(k / n) : std::string(), "[", k % n, "] = ", rows[k],
                    " is out of range for E with ", d_L, " rows");
        TORCH_CHECK(cols[k] >= 0 && cols[k] < d_0, "flatkern: Entries operand cols", has_batch ? " of problem " : "",
                    has_batch ? std::to_string(k / n) : std::string(), "[", k % n, "] = ", cols[k],
                    " is out of range for E with ", d_0, " columns");
      }
      break;
    }
    case RANK_ONE:
      check_family_operand(operands[0], family, 0, dtype, shape({n, d_L}));
      check_family_operand(operands[1], family, 1, dtype, shape({n, d_0}));
      break;
    case DENSE:
      TORCH_CHECK(n * d_L < INT_MAX && n * d_0 < INT_MAX, "flatkern: Dense has too many measurements (n = ", n,
                  ") for one BLAS call");
      check_family_operand(operands[0], family, 0, dtype, shape({d_L, n, d_0}));
      break;
    case DENSE_KERNEL:
      TORCH_CHECK(d_L * d_L < INT_MAX && d_0 * d_0 < INT_MAX, "flatkern: E of shape (", d_L, ", ", d_0,
                  ") is too large for the Dense kernel K");
      // Ap is not read here (the Triton kernels read it); its shape is still part of the contract
      TORCH_CHECK(operands[0].sizes() == at::IntArrayRef(shape({d_L, n, d_0})), "flatkern: Dense (kernel K) operand Ap "
                  "must have shape ", at::IntArrayRef(shape({d_L, n, d_0})), ", got ", operands[0].sizes());
      check_family_operand(operands[1], family, 1, dtype, shape({d_L, d_L, d_0, d_0}));
      break;
    case INPUTS:
      check_family_operand(operands[0], family, 0, dtype, shape({n, d_0}));
      break;
  }
  return n;
}

int64_t hessian_trace_saved_size(const std::vector<int64_t>& widths, int64_t family,
                                 const std::vector<std::vector<int64_t>>& operand_shapes) {
  TORCH_CHECK(widths.size() >= 2, "flatkern: widths must be [d_0, ..., d_L] with L >= 1, got ", c10::IntArrayRef(widths));
  for (int64_t w : widths)
    TORCH_CHECK(w >= 1 && w < kMaxWidth, "flatkern: widths ", c10::IntArrayRef(widths), ": layer widths must lie in [1, 2^20)");
  std::vector<c10::IntArrayRef> shapes(operand_shapes.begin(), operand_shapes.end());
  return Layout(widths, family, measurement_count(family, shapes)).size;
}

}  // namespace flatkern
