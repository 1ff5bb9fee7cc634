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
BLOCK = 64  # columns per lazy update (same result as per-column updates, up to float rounding)


def damped(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``H`` with dead inputs (zero diagonal) made harmless and ``damp`` × mean(diag) added."""
    h = h.clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    return h


ColumnQuantizer = Callable[[torch.Tensor, int], torch.Tensor]  # (column, index in its chunk) -> quantized


def error_feedback(
    w: torch.Tensor,
    h: torch.Tensor,
    chunks: list[tuple[int, int]],
    start: Callable[[int, torch.Tensor], ColumnQuantizer],
    damp: float = DAMP,
) -> torch.Tensor:
    """Quantized ``w`` [out, n], columns left to right, each column's error pushed onto every
    later column of ``w`` (not only its own chunk's).

    ``chunks`` [(col0, col1)] cover ``w`` in order; ``start(k, w_k)`` is called when chunk ``k``
    begins, with its columns as they are then (carrying the compensation of every earlier
    chunk), and returns that chunk's column quantizer, so a chunk's grid is fitted to what it
    will really quantize. One chunk spanning ``w`` is GPTQ on one unit. Computed in float32
    (float64 if ``w`` is).
    """
    # Worked on the transpose: a column of ``w`` is then a contiguous row, and every update below
    # touches contiguous memory (column slices of a row-major ``w`` made this loop 5x slower).
    wt = w.to(torch.promote_types(w.dtype, torch.float32)).T.contiguous()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped(h.to(wt.dtype), damp)))
    u = torch.linalg.cholesky(hinv, upper=True)
    qt = torch.empty_like(wt)
    for k, (col0, col1) in enumerate(chunks):
        quantize_column = start(k, wt[col0:col1].T)
        # GPTQ's lazy batch: updates inside a block column by column, the rest of w once per block.
        for b0 in range(col0, col1, BLOCK):
            b1 = min(b0 + BLOCK, col1)
            errs = torch.empty(b1 - b0, wt.shape[1], dtype=wt.dtype)
            for j in range(b0, b1):
                qt[j] = quantize_column(wt[j], j - col0)
                err = errs[j - b0]
                torch.sub(wt[j], qt[j], out=err).div_(u[j, j])
                wt[j + 1 : b1].addr_(u[j, j + 1 : b1], err, alpha=-1)
            wt[b1:].addmm_(u[b0:b1, b1:].T, errs, alpha=-1)
    return qt.T.contiguous()
