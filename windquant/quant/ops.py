"""Per-unit quantization operators: pure functions on tensors.

Every low-bit operator of the engine is a *uniform grid* of ``K`` levels applied per
output row of a unit::

    code  = clamp(round((w - shift) / (scale * step) + center), 0, K - 1)
    w_hat = scale * step * (code - center) + shift

and the named operators of the paper (after ParetoQ) differ only in their grid, in
whether the row shift is learned, and in how the scale is initialised:

* ``1``    elastic binarization ``α·sign(w − μ) + μ``: K=2, levels ±1, learned α and μ.
* ``1.58`` SEQ ternary ``v·{−1, 0, +1}``: K=3. SEQ's ``round(1.5·clip(w/α))`` puts the
  zero band at |w| < α/3; we store the level value ``v = 2α/3`` directly, which is the
  same operator with nearest-level rounding.
* ``2``    SEQ four levels without zero ``α·{±1/4, ±3/4}``: K=4, step ½, center 1.5.
* ``3/4/8`` LSQ: signed integer grid ``[−2^(b−1), 2^(b−1) − 1]`` times a learned step.

Scales are fitted locally: a grid search over clipping ratios (the best ratio per row)
followed by a few Adam steps on the activation-weighted reconstruction loss
``Σ_j d_j (w_ij − ŵ_ij)²`` with straight-through rounding (LSQ-style gradient for the
step). The best scale seen per row is kept, so fitting never ends worse than its init.
No model-wide backward pass is involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """A uniform code grid: level(code) = step * (code - center)."""

    name: str
    bits: float  # nominal bit-width (the paper's b_i)
    levels: int  # K
    center: float
    step: float
    learn_shift: bool  # elastic row offset μ (stored, counted)
    protect: bool  # salient weights kept in INT8 for this action

    def max_level(self) -> float:
        return self.step * (self.levels - 1 - self.center)


def _lsq(bits: int, protect: bool) -> Grid:
    return Grid(f"lsq{bits}", float(bits), 2**bits, float(2 ** (bits - 1)), 1.0, False, protect)


# One operator per action. 8 bit needs no INT8 salient protection (it *is* INT8).
GRIDS: dict[float, Grid] = {
    8.0: _lsq(8, protect=False),
    4.0: _lsq(4, protect=True),
    3.0: _lsq(3, protect=True),
    2.0: Grid("seq2", 2.0, 4, 1.5, 0.5, False, True),
    1.58: Grid("seq_ternary", 1.58, 3, 1.0, 1.0, False, True),
    1.0: Grid("elastic_binary", 1.0, 2, 0.5, 2.0, True, True),
}


def grid_for(action: float) -> Grid:
    try:
        return GRIDS[float(action)]
    except KeyError:
        raise ValueError(f"no quantization operator for action {action!r}") from None


def encode(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Nearest-level codes (int64, 0..K-1) for rows of ``w`` given per-row scale/shift."""
    x = (w - shift[:, None]) / (scale[:, None] * grid.step) + grid.center
    return x.round().clamp_(0, grid.levels - 1).long()


def decode(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Dequantize codes; scale/shift are per row. Computed in fp32."""
    scale = scale.float()[:, None]
    shift = shift.float()[:, None]
    return scale * grid.step * (codes.float() - grid.center) + shift


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Differentiable quantize-dequantize with straight-through rounding (LSQ)."""
    x = (w - shift[:, None]) / (scale[:, None] * grid.step) + grid.center
    x = x.clamp(0, grid.levels - 1)
    x = x + (x.round() - x).detach()
    return scale[:, None] * grid.step * (x - grid.center) + shift[:, None]


def weighted_row_error(w: torch.Tensor, w_hat: torch.Tensor, d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row Σ_j d_j (w − ŵ)² over the positions in ``keep``."""
    return (((w - w_hat) ** 2) * d[None, :] * keep).sum(dim=1)


@dataclass
class FitResult:
    codes: torch.Tensor  # int64 [out, g], 0..K-1
    scale: torch.Tensor  # fp16 [out]
    shift: torch.Tensor  # fp16 [out] (zeros unless the grid learns a shift)


def fit(
    w: torch.Tensor,
    d: torch.Tensor,
    grid: Grid,
    keep: torch.Tensor | None = None,
    steps: int = 10,
    lr: float = 0.02,
    ratios: int = 16,
) -> FitResult:
    """Fit per-row scale (and shift) of ``grid`` to unit ``w`` [out, g].

    ``d`` [g] are the per-input-column loss weights (activation second moments),
    ``keep`` [out, g] marks the positions that this operator must represent (salient
    positions are stored separately and are excluded). Deterministic.
    """
    w = w.float()
    d = d.float().clamp_min(1e-12)
    keep_f = torch.ones_like(w) if keep is None else keep.float()
    dk = d[None, :] * keep_f
    if grid.learn_shift:
        shift0 = (w * dk).sum(1) / dk.sum(1).clamp_min(1e-12)
    else:
        shift0 = torch.zeros(w.shape[0], dtype=w.dtype)
    centred = (w - shift0[:, None]).abs() * keep_f
    absmax = centred.amax(dim=1).clamp_min(1e-8)
    # Grid search over clipping ratios: scale so that the top level sits at ratio·absmax.
    best_scale = absmax / grid.max_level()
    best_err = torch.full_like(absmax, float("inf"))
    for ratio in torch.linspace(1.0, 1.0 / ratios, ratios):
        scale = absmax * ratio / grid.max_level()
        err = weighted_row_error(w, _fake_quant(w, scale, shift0, grid), d, keep_f)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    best_shift = shift0.clone()
    # Callers may hold no_grad (re-quantizing while a plan is scored): the fit needs autograd.
    if steps > 0:
        with torch.enable_grad():
            log_scale = torch.zeros_like(best_scale, requires_grad=True)
            shift_delta = torch.zeros_like(best_scale, requires_grad=grid.learn_shift)
            params = [log_scale] + ([shift_delta] if grid.learn_shift else [])
            opt = torch.optim.Adam(params, lr=lr)
            scale0, unit_shift = best_scale.clone(), best_scale.clone()
            # Normalise by the row's weighted energy so the lr is scale-free.
            norm = ((w**2) * dk).sum(1).clamp_min(1e-12)
            for _ in range(steps):
                scale = scale0 * log_scale.exp()
                shift = shift0 + unit_shift * shift_delta
                row_err = weighted_row_error(w, _fake_quant(w, scale, shift, grid), d, keep_f)
                with torch.no_grad():
                    better = row_err < best_err
                    best_err = torch.where(better, row_err, best_err)
                    best_scale = torch.where(better, scale, best_scale)
                    best_shift = torch.where(better, shift, best_shift)
                opt.zero_grad()
                (row_err / norm).sum().backward()
                opt.step()
    scale = best_scale.detach().half()
    shift = best_shift.detach().half()
    # Codes are taken with the fp16 scale/shift that are actually stored.
    codes = encode(w, scale.float(), shift.float(), grid)
    return FitResult(codes=codes, scale=scale, shift=shift)
