"""The Triton backend: the CUDA kernels of ``flatkern::hessian_trace`` and its backward.

Imported only when a CUDA tensor (or ``backend="triton"`` under ``TRITON_INTERPRET=1``)
needs it: ``flatkern/kernels/schemas.py`` registers thin CUDA entries that import
``hessian_trace.py`` on their first call, and ``flatkern/kernels/routing.py`` imports it to
tell whether Triton is installed.  ``import flatkern`` never imports triton.

Computes, for a chain ``W_1 … W_L`` (``W_j``: ``(..., d_j, d_{j-1})``) and a
measurement family, the per-layer contractions of ``docs/MATH.md``

    c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²,     shape (..., L)

(``P_j = W_L ⋯ W_{j+1}``, ``Q_j = W_{j-1} ⋯ W_1``), optionally ``E = W_L ⋯ W_1``,
and their gradient with respect to the weights.  Both go through the Gram
form: ``c_j`` depends on ``P_j`` only through ``G_j = P_j P_jᵀ`` and on ``Q_j``
only through ``H_j = Q_jᵀ Q_j``, so with ``S_j = ∂c_j/∂G_j``, ``T_j = ∂c_j/∂H_j``

    ∂c_j/∂P_j = 2 S_j P_j          ∂c_j/∂Q_j = 2 Q_j T_j

and the weight gradient follows by reverse accumulation along both chains
(``P_{j-1} = P_j W_j``: ``∂W_j += P_jᵀ P̄acc_{j-1}``; ``Q_{j+1} = W_j Q_j``:
``∂W_j += Q̄acc_{j+1} Q_jᵀ``), about four GEMMs per layer; an end-to-end
gradient ``G`` enters as ``P̄acc_1 += G W_1ᵀ``, ``∂W_1 += P_1ᵀ G``.

The package, one seam per module:

    small.py          one program per problem: the whole chain in one launch (widths <= 128, any depth)
    large.py          tiled GEMMs with the family's norms in their epilogues (any width)
    hessian_trace.py  the op-level launchers (the CUDA kernels), ``saved_specs``, and the
                      interpreter's entries
"""
