"""The one registry of the measurement families, shared by Python, C++ and Triton.

Every measurement object carries ``family`` (one of these codes) and
``operands`` (the tensors the kernels read), made once at construction.  One
row per code:

    code  name            class       operands                                   norms (rows of P, cols of Q)
    0     Isotropic       Isotropic   ()                                          both (their sums)
    1     Entries         Entries     rows (n,) int64, cols (n,) int64            both
    2     RankOne         RankOne     u (n, d_L), v (n, d_0)                      neither
    3     Dense           Dense       Ap (d_L, n, d_0) = A.transpose(-3, -2)      neither
    4     Dense (kernel)  Dense       Ap, Kp (d_L, d_L, d_0, d_0),                neither
                                      Kp[a, c, b, d] = (1/n) Σ_i A_i[a, b] A_i[c, d]
    5     Inputs          Inputs      x (N, d_0)                                  rows (their sum)

Per-problem measurements.  Every operand may carry leading batch dimensions ``(...)``, the
same for all operands of a set and equal to the weights' batch shape: problem ``p`` of the
batch then reads its own slice (``rows (..., n)``, ``u (..., n, d_L)``, ``Ap (..., d_L, n, d_0)``,
``Kp (..., d_L, d_L, d_0, d_0)``, ``x (..., N, d_0)``).  Operands of exactly the row's ``ranks``
are one set shared by every problem (broadcast), as before.  ``n`` is read at a dimension counted
from the end (``count_from``), so it is the same with and without the batch; ``batch_shape``
reads the batch off the first operand's rank.  Isotropic has no operand, hence no batch.

``DENSE_KERNEL`` is ``DENSE`` with the precomputed kernel ``K`` as an extra
operand (``Dense`` picks it when ``n > d_0 d_L``, the cost model's break-even):
its row says so (``base=DENSE``), and a kernel that has no ``K`` path (Triton)
reads it as its base family.

The C++ kernels name the same codes in ``csrc/ops/cpu/layout.h`` and the Triton
kernels import them from here; ``tests/test_families.py`` checks that every row
is complete and that C++ and Triton agree with it.

This module imports nothing from flatkern: kernels, the reference and the
measurement classes all read it, and it reads none of them.  How a code is
decoded back into a measurement object (``decode``) is bound by
``flatkern.measurements`` when that module is imported (``bind_class``), so
that the arrow points down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ISOTROPIC = 0
ENTRIES = 1
RANK_ONE = 2
DENSE = 3
DENSE_KERNEL = 4
INPUTS = 5


@dataclass
class Family:
    """One measurement family's row: what every layer of flatkern needs to know about it."""

    code: int
    name: str                      # as messages and tables print it
    class_name: str                # the public class in flatkern.measurements
    operands: tuple[str, ...]      # operand names, in order
    index_operands: int            # how many leading operands are int64 indices
    ranks: tuple[int, ...]         # each operand's number of dims without a batch (one shared set)
    count_from: tuple[int, int] | None  # (operand, dim from the end) whose size is n; None: no n (Isotropic)
    norms: tuple[bool, bool]       # whether it reads the squared row norms of P_j, column norms of Q_j
    base: int | None = None        # the family this one is, with extra operands
    cls: type | None = field(default=None, repr=False)  # bound by flatkern.measurements

    def measurement_count(self, operand_shapes) -> int:
        """``n`` as the kernels read it from the operand shapes (0 where the family has none)."""
        if self.count_from is None:
            return 0
        i, dim = self.count_from
        return int(operand_shapes[i][dim])

    def batch_shape(self, operand_shapes) -> tuple[int, ...]:
        """The per-problem batch ``(...)`` of operands of these shapes; ``()`` for one shared set."""
        if not self.ranks:
            return ()
        shape = tuple(operand_shapes[0])
        return shape[: len(shape) - self.ranks[0]]

    def decode(self, operands):
        """The measurement object these operands encode, sharing them (no copy, no checks)."""
        if self.cls is None:  # pragma: no cover - flatkern.measurements binds every row on import
            raise RuntimeError(f"flatkern: family {self.name} has no class bound (import flatkern.measurements)")
        return self.cls._from_operands(self.code, tuple(operands))


FAMILIES: dict[int, Family] = {f.code: f for f in (
    Family(ISOTROPIC, "Isotropic", "Isotropic", (), 0, (), None, (True, True)),
    Family(ENTRIES, "Entries", "Entries", ("rows", "cols"), 2, (1, 1), (0, -1), (True, True)),
    Family(RANK_ONE, "RankOne", "RankOne", ("u", "v"), 0, (2, 2), (0, -2), (False, False)),
    Family(DENSE, "Dense", "Dense", ("Ap",), 0, (3,), (0, -2), (False, False)),
    Family(DENSE_KERNEL, "Dense (kernel K)", "Dense", ("Ap", "Kp"), 0, (3, 4), (0, -2), (False, False), base=DENSE),
    Family(INPUTS, "Inputs", "Inputs", ("x",), 0, (2,), (0, -2), (True, False)),
)}

#: code -> name, for messages
NAMES = {code: f.name for code, f in FAMILIES.items()}
#: the public classes, in registry order, for messages ("Isotropic, Entries, RankOne, Dense, Inputs")
CLASS_NAMES = tuple(dict.fromkeys(f.class_name for f in FAMILIES.values()))


def get(code: int) -> Family:
    """The row of ``code``; a ValueError naming the known codes otherwise."""
    try:
        return FAMILIES[code]
    except (KeyError, TypeError):
        raise ValueError(f"unknown measurement family code {code!r}; known: "
                         f"{', '.join(f'{c} ({f.name})' for c, f in FAMILIES.items())}") from None


def base_code(code: int) -> int:
    """The family whose formula ``code`` uses when its extra operands are ignored."""
    row = get(code)
    return row.code if row.base is None else row.base


def bind_class(cls, *codes: int) -> None:
    """Bind the measurement class that encodes ``codes`` (called by ``flatkern.measurements``)."""
    for code in codes:
        FAMILIES[code].cls = cls


def families_message() -> str:
    """``"Isotropic, Entries, RankOne, Dense, Inputs"``: the families, as an error message lists them."""
    return ", ".join(CLASS_NAMES)
