"""The one encoding of the measurement families, shared by Python, C++ and Triton.

Every measurement object carries ``family`` (one of these codes) and
``operands`` (the tensors the kernels read), made once at construction:

    code  family         operands
    0     ISOTROPIC      ()
    1     ENTRIES        rows (n,) int64, cols (n,) int64, density (d_L, d_0) float64 = counts / n
    2     RANK_ONE       u (n, d_L), v (n, d_0)
    3     DENSE          Ap (d_L, n, d_0) = A.permute(1, 0, 2), contiguous
    4     DENSE_KERNEL   Ap, Kp (d_L, d_L, d_0, d_0), Kp[a, c, b, d] = (1/n) Σ_i A_i[a, b] A_i[c, d]
    5     INPUTS         x (N, d_0)

The C++ kernels name the same codes in ``csrc/ops/cpu/layout.h`` and the Triton
kernels import them from here; ``tests/test_families.py`` checks that they agree.
A kernel reads only the operands it needs (C++ ignores Entries' density and
DENSE_KERNEL's ``Ap``; Triton reads ``Ap`` for both Dense codes).
"""

ISOTROPIC = 0
ENTRIES = 1
RANK_ONE = 2
DENSE = 3
DENSE_KERNEL = 4
INPUTS = 5

NAMES = {ISOTROPIC: "Isotropic", ENTRIES: "Entries", RANK_ONE: "RankOne", DENSE: "Dense",
         DENSE_KERNEL: "Dense (kernel K)", INPUTS: "Inputs"}


def measurement_count(family: int, operand_shapes) -> int:
    """``n`` as the kernels read it from the operand shapes (0 where the family has none)."""
    if family in (ENTRIES, RANK_ONE):
        return int(operand_shapes[0][0])
    if family in (DENSE, DENSE_KERNEL):
        return int(operand_shapes[0][1])
    if family == INPUTS:
        return int(operand_shapes[0][0])
    return 0
