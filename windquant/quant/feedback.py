"""Error feedback inside a unit (OBQ / GPTQ): quantize columns left to right and push each
column's rounding error onto the columns not quantized yet.

With ``H`` the unit's block of the layer's input second moment ``E[x xᵀ]``, the output error of
a unit is ``tr(ΔW H ΔWᵀ)``; quantizing column ``j`` and updating the later columns by
``−(w_j − q_j) [H⁻¹]_{j,>j} / [H⁻¹]_{jj}`` (the OBQ step, with ``H⁻¹`` of the columns still
free) is the optimal compensation for that one rounding. GPTQ's trick, used here: the rows of
the upper Cholesky factor of ``H⁻¹`` hold exactly those updates for every step, so one
factorisation serves the whole unit. The quantizer of a column is passed in, so the grid, the
per-row scales and the salient positions are those the unit was fitted with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DAMP = 0.01  # GPTQ's default: λ = 1 % of the mean diagonal, added to H


def damped(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``H`` with dead inputs (zero diagonal) made harmless and ``damp`` × mean(diag) added."""
    h = h.clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    return h


def error_feedback(
    w: torch.Tensor, h: torch.Tensor, quantize_column: Callable[[torch.Tensor, int], torch.Tensor], damp: float = DAMP
) -> torch.Tensor:
    """Quantized ``w`` [out, g]: column ``j`` is ``quantize_column(w'_j, j)`` where ``w'`` carries
    the compensation of every earlier column's error. Computed in ``w``'s float dtype."""
    w = w.clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped(h.to(w.dtype), damp)))
    u = torch.linalg.cholesky(hinv, upper=True)
    q = torch.empty_like(w)
    for j in range(w.shape[1]):
        q[:, j] = quantize_column(w[:, j], j)
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j + 1 :] -= err[:, None] * u[j, j + 1 :][None, :]
    return q
