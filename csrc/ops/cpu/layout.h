// The shared vocabulary of the CPU kernels: the family codes, the operand
// checks, and the Layout of one problem's saved buffer.
//
// Layout is the single definition of the saved buffer's size: the forward and
// backward kernels index it, and flatkern._C.hessian_trace_saved_size (which the
// fake kernel in flatkern/kernels/op.py asks) returns its `size`, computed from
// the same widths and the same `measurement_count` the kernels' checks use.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace flatkern {

// The measurement families: the same codes as flatkern/kernels/families.py
// (a test reads both). Operands, in order (OP_SPEC.md):
enum Family : int64_t {
  ISOTROPIC = 0,     // ()
  ENTRIES = 1,       // (rows int64 (n,), cols int64 (n,)): memory O(n), never O(d_L d_0)
  RANK_ONE = 2,      // (u (n, d_L), v (n, d_0))
  DENSE = 3,         // (Ap (d_L, n, d_0),)  Ap = A.permute(1, 0, 2), contiguous
  DENSE_KERNEL = 4,  // (Ap, Kp (d_L, d_L, d_0, d_0)); only Kp is read here
  INPUTS = 5,        // (x (N, d_0),)
};
constexpr int64_t kNumFamilies = 6;

// "Isotropic", "Entries", ...: flatkern.kernels.families.NAMES
const char* family_name(int64_t family);

// n as the kernels read it from the operand shapes (0 for Isotropic). Checks the
// family code, the operand count and the first operand's rank first (leading
// batch dims allowed: n is read counting from the end), so that a bad call is an
// error, never an out-of-range read. Shared by the kernels' checks and
// hessian_trace_saved_size.
int64_t measurement_count(int64_t family, c10::ArrayRef<c10::IntArrayRef> operand_shapes);

// Widths of one layer are limited so that every index fits the BLAS int.
constexpr int64_t kMaxWidth = int64_t{1} << 20;

// Layout of one problem's saved buffer, shared by forward and backward:
//   Q_3 .. Q_L (the prefix products that are not weights), then
//   P_1 .. P_{L-2} (the suffix products that are not weights), then
//   L blocks of per-layer statistics of the family (norms, Grams).
struct Layout {
  int64_t L = 0;
  int64_t n = 0;               // measurements (Entries, RankOne, Dense)
  std::vector<int64_t> d;      // widths d_0 .. d_L
  std::vector<int64_t> q_off;  // offset of Q_j (j = 3..L), index j
  std::vector<int64_t> p_off;  // offset of P_j (j = 1..L-2), index j
  int64_t stat_off = 0, stat_size = 0, size = 0;

  Layout(std::vector<int64_t> widths, int64_t family, int64_t n);
  int64_t dmax() const { return *std::max_element(d.begin(), d.end()); }
  int64_t w_size(int64_t j) const { return d[j] * d[j - 1]; }  // entries of one problem's W_j
};

// [d_0, d_1, ..., d_L] of a chain that passed check_chain.
std::vector<int64_t> chain_widths(at::TensorList weights);

// The chain: CPU, float32/float64, one dtype, one batch shape, consecutive layers
// chain. Run before dispatching on the dtype, so an integer chain gets a clear message.
void check_chain(at::TensorList weights);

// What the trace kernels add to check_chain: contiguous weights with widths in
// [1, 2^20), and the family's operands (count, dtype, shape, contiguity, Entries
// index bounds of every problem). Operands may carry a per-problem batch: leading
// dims equal to the weights' batch shape, before the shapes of OP_SPEC.md's table;
// `*batched` (if given) says whether they do. Returns n.
int64_t check_trace_inputs(at::TensorList weights, int64_t family, at::TensorList operands,
                           bool* batched = nullptr);

// `t` is a contiguous CPU tensor of `dtype` and `shape`; `name` names it in the message.
void check_operand(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape);

// Size of one problem's saved buffer for widths [d_0, ..., d_L] and these operand
// shapes: flatkern._C.hessian_trace_saved_size.
int64_t hessian_trace_saved_size(const std::vector<int64_t>& widths, int64_t family,
                                 const std::vector<std::vector<int64_t>>& operand_shapes);

}  // namespace flatkern
