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


@dataclass
class FitResult:
    codes: torch.Tensor  # int64 [out, g], 0..K-1
    scale: torch.Tensor  # fp16 [out]
    shift: torch.Tensor  # fp16 [out] (zeros unless the grid learns a shift)


# Adam's constants (torch.optim.Adam's defaults): the fit below runs its update by hand.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _grid_error(wc: torch.Tensor, scale: torch.Tensor, d: torch.Tensor, keep: torch.Tensor | None, grid: Grid, buf: torch.Tensor):
    """Per-row ``Σ_j d_j keep (w − ŵ)²`` of ``wc = w − shift`` at ``scale``, computed in place in ``buf``
    (the grid search runs it 16 times per candidate: no temporaries, one matmul for the sum)."""
    s = (scale * grid.step)[:, None]
    torch.div(wc, s, out=buf)
    buf.add_(grid.center).clamp_(0, grid.levels - 1).round_().sub_(grid.center).mul_(s).sub_(wc).square_()
    if keep is not None:
        buf.mul_(keep)
    return buf @ d


def _lsq_step(wc: torch.Tensor, scale: torch.Tensor, dk: torch.Tensor, grid: Grid):
    """Per-row error and its gradients w.r.t. ``log(scale)`` and the row shift at ``scale``.

    The straight-through (LSQ) derivative of ``ŵ = S·(round(clamp(x)) − c) + shift`` with
    ``S = scale·step`` and ``x = (w − shift)/S + c`` is ``(round(x̃) − c) − 1[in]·(x − c)`` w.r.t. ``S``
    and ``1[out]`` w.r.t. the shift (``in``: ``x`` inside the grid's range). Written out instead of
    taken by autograd because the fit runs once per unit and action and autograd tripled its cost
    (tested against the autograd form in ``tests/test_ops.py``)."""
    s = (scale * grid.step)[:, None]
    x = wc / s  # x − c
    clamped = (x + grid.center).clamp_(0, grid.levels - 1)
    inside = clamped == x + grid.center
    r = clamped.round_().sub_(grid.center)  # round(x̃) − c
    resid = wc - s * r  # w − ŵ
    weighted = resid * dk
    row_err = torch.linalg.vecdot(weighted, resid, dim=1)  # one pass, not a product and a sum
    # dL/dŵ = −2 d k (w − ŵ); dŵ/dlog(scale) = S · dŵ/dS.
    d_s = r.sub_(x.mul_(inside))
    grad_log = -2.0 * torch.linalg.vecdot(weighted, d_s, dim=1) * s[:, 0]
    grad_shift = -2.0 * (weighted * ~inside).sum(1) if grid.learn_shift else None
    return row_err, grad_log, grad_shift


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
    keep_f = None if keep is None or bool(keep.all()) else keep.float()
    dk = d[None, :] if keep_f is None else d[None, :] * keep_f
    if grid.learn_shift:
        shift0 = (w * dk).sum(1) / dk.expand_as(w).sum(1).clamp_min(1e-12)
    else:
        shift0 = torch.zeros(w.shape[0], dtype=w.dtype)
    wc = w - shift0[:, None]
    centred = wc.abs() if keep_f is None else wc.abs() * keep_f
    absmax = centred.amax(dim=1).clamp_min(1e-8)
    # Grid search over clipping ratios: scale so that the top level sits at ratio·absmax.
    best_scale = absmax / grid.max_level()
    best_err = torch.full_like(absmax, float("inf"))
    buf = torch.empty_like(w)
    for ratio in torch.linspace(1.0, 1.0 / ratios, ratios):
        scale = absmax * ratio / grid.max_level()
        err = _grid_error(wc, scale, d, keep_f, grid, buf)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    best_shift = shift0.clone()
    if steps > 0:
        # Adam on log(scale) (and the shift in units of the initial scale), loss normalised by
        # each row's weighted energy so the lr is scale-free.
        beta1, beta2 = ADAM_BETAS
        scale0, unit_shift = best_scale.clone(), best_scale.clone()
        norm = ((w**2) * dk).sum(1).clamp_min(1e-12)
        params = [torch.zeros_like(best_scale)] + ([torch.zeros_like(best_scale)] if grid.learn_shift else [])
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        for t in range(1, steps + 1):
            scale = scale0 * params[0].exp()
            shift = shift0 + unit_shift * params[1] if grid.learn_shift else shift0
            row_err, grad_log, grad_shift = _lsq_step(w - shift[:, None], scale, dk, grid)
            better = row_err < best_err
            best_err = torch.where(better, row_err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_shift = torch.where(better, shift, best_shift)
            grads = [grad_log / norm] + ([grad_shift * unit_shift / norm] if grid.learn_shift else [])
            for p, g, (m, v) in zip(params, grads, moments):
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(ADAM_EPS)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
    scale = best_scale.detach().half()
    shift = best_shift.detach().half()
    # Codes are taken with the fp16 scale/shift that are actually stored.
    codes = encode(w, scale.float(), shift.float(), grid)
    return FitResult(codes=codes, scale=scale, shift=shift)
