"""Quantize one unit to its packed tensors, and back (the engine's pure core)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from windquant.actions import SKIP, canonical_action
from windquant.quant import salient
from windquant.quant.accounting import unit_layout
from windquant.quant.codes import pack_codes, unpack_codes
from windquant.quant.feedback import error_feedback
from windquant.quant.ops import FitResult, Grid, decode, encode, fit, grid_for
from windquant.quant.rotation import pack_signs, random_signs, rotates, rotation, unpack_signs, unrotate


@dataclass(frozen=True)
class FitSettings:
    """How every unit is fitted (part of the candidate-cache fingerprint)."""

    salient_rate: float = 0.03
    steps: int = 10
    lr: float = 0.02
    feedback: bool = False  # OBQ/GPTQ error feedback along the unit's columns (needs H)
    rotate: bool = False  # incoherence rotation of power-of-two-wide units (needs H; no salient weights)

    @property
    def needs_moments(self) -> bool:
        return self.feedback or self.rotate

    def fingerprint_fields(self) -> dict:
        """What the candidate-cache fingerprint hashes: fields added after cache v1 only when
        set, so caches written before them stay valid."""
        d = {"salient_rate": self.salient_rate, "steps": self.steps, "lr": self.lr}
        return d | {k: True for k in ("feedback", "rotate") if getattr(self, k)}


@dataclass
class UnitQuantizer:
    """One unit's fitted quantizer, in the basis its codes live in (rotated or not)."""

    action: float
    grid: Grid
    res: FitResult
    mask: torch.Tensor  # salient positions [out, g]
    sal_scale: torch.Tensor
    signs: torch.Tensor | None  # rotation signs, None when the unit is stored unrotated

    def __post_init__(self) -> None:
        # Per-column quantization is the inner loop of error feedback: convert once. The
        # arithmetic below is encode() then decode(), operation for operation.
        self._step = self.res.scale.float() * self.grid.step
        self._shift = self.res.shift.float()
        self._salient_columns = self.mask.any(dim=0).tolist()

    def column(self, col: torch.Tensor, j: int) -> torch.Tensor:
        """Column ``j`` on the fitted grid, INT8 (on the unit's one scale) at salient positions."""
        g = self.grid
        code = ((col - self._shift) / self._step + g.center).round_().clamp_(0, g.levels - 1)
        q = self._step * (code - g.center) + self._shift
        if self._salient_columns[j]:
            sal = self.mask[:, j]
            q[sal] = salient.int8_round(col[sal], self.sal_scale) * self.sal_scale.float()
        return q

    def pack(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Packed tensors of ``w`` (this basis) rounded to this quantizer."""
        codes = encode(w, self.res.scale.float(), self.res.shift.float(), self.grid)
        packed = {"codes": pack_codes(codes[~self.mask], self.grid.levels), "scale": self.res.scale}
        if self.grid.learn_shift:
            packed["shift"] = self.res.shift
        if self.signs is not None:
            packed["rot_signs"] = pack_signs(self.signs)
        if self.mask.any():
            packed |= salient.pack(w, self.mask, self.sal_scale).tensors()
        return packed


def salient_rate(action: float, settings: FitSettings, rotated: bool) -> float:
    """The fraction of a unit's weights kept as INT8 at ``action`` (none in a rotated basis)."""
    return settings.salient_rate if grid_for(action).protect and not rotated else 0.0


def fit_quantizer(
    w: torch.Tensor,
    act_scale: torch.Tensor,
    action: float,
    settings: FitSettings,
    signs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> UnitQuantizer:
    """Fit ``action``'s grid to ``w`` [out, g] (already rotated when ``signs`` is given); ``mask``:
    the salient positions when the caller already selected them at this action's rate."""
    grid = grid_for(action)
    if mask is None:
        mask = salient.select(w, act_scale, salient_rate(action, settings, signs is not None))
    res = fit(w, act_scale.float() ** 2, grid, keep=~mask, steps=settings.steps, lr=settings.lr)
    return UnitQuantizer(action, grid, res, mask, salient.int8_scale(w, mask), signs)


class StackedColumns:
    """The column quantizers of several fits of one unit, stacked row-wise (``[k·out]``), so error
    feedback runs once for all of a unit's actions: every action shares the unit's ``H`` and
    basis, and one pass over stacked rows costs a sixth of the small per-column operations of six
    passes. Each row's arithmetic is :meth:`UnitQuantizer.column`'s, operation for operation."""

    def __init__(self, quantizers: list[UnitQuantizer]):
        self.quantizers = quantizers
        rows = [q._step.numel() for q in quantizers]
        self._step = torch.cat([q._step for q in quantizers])
        self._shift = torch.cat([q._shift for q in quantizers])
        self._center = torch.cat([torch.full((n,), q.grid.center) for q, n in zip(quantizers, rows)])
        self._top = torch.cat([torch.full((n,), float(q.grid.levels - 1)) for q, n in zip(quantizers, rows)])
        self._slices = [slice(sum(rows[:i]), sum(rows[: i + 1])) for i in range(len(rows))]

    def column(self, col: torch.Tensor, j: int) -> torch.Tensor:
        code = torch.minimum(((col - self._shift) / self._step + self._center).round_().clamp_(min=0), self._top)
        q = self._step * (code - self._center) + self._shift
        for quantizer, rows in zip(self.quantizers, self._slices):
            if quantizer._salient_columns[j]:
                sal = quantizer.mask[:, j]
                part = q[rows]
                part[sal] = salient.int8_round(col[rows][sal], quantizer.sal_scale) * quantizer.sal_scale.float()
        return q


def quantize_unit(
    w: torch.Tensor,
    act_scale: torch.Tensor,
    action: float,
    settings: FitSettings,
    h: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Packed tensors of unit ``w`` [out, g] at ``action``, exactly as :func:`unit_layout` says.

    ``h`` [g, g] is the unit's block of ``E[x xᵀ]``: error feedback and rotation need it.
    ``seed`` draws the rotation's signs. The layout, hence the bits, never depend on ``h``.
    """
    return quantize_unit_actions(w, act_scale, [action], settings, h, seed)[0]


def quantize_unit_actions(
    w: torch.Tensor,
    act_scale: torch.Tensor,
    actions: list[float],
    settings: FitSettings,
    h: torch.Tensor | None = None,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """:func:`quantize_unit` at each of ``actions``, the shared work done once: the rotation
    (its signs depend on the unit, not the action), the factorisation of ``H`` and one
    error-feedback pass over all fits stacked (:class:`StackedColumns`)."""
    actions = [canonical_action(a) for a in actions]
    out_features, columns = w.shape
    packed: dict[float, dict[str, torch.Tensor]] = {}
    if SKIP in actions:
        packed[SKIP] = {"weight": w.detach().to(torch.float16).contiguous()}
    low = [a for a in dict.fromkeys(actions) if a != SKIP]
    if low:
        w = w.float()
        if settings.needs_moments and h is None:
            raise ValueError("error feedback and rotation need the unit's input second moment h")
        # Every low-bit action of a unit is stored in the same basis (rotates() depends only on the width).
        signs = random_signs(columns, seed) if rotates(low[0], columns, settings.rotate) else None
        if signs is not None:
            r = rotation(signs)
            w, h = w @ r, r.T @ h.float() @ r
            act_scale = h.diagonal().clamp_min(0).sqrt()
        # The salient positions depend on the rate only: selected once for all protected actions.
        rates = [salient_rate(a, settings, signs is not None) for a in low]
        masks = {rate: salient.select(w, act_scale, rate) for rate in set(rates)}
        quantizers = [fit_quantizer(w, act_scale, a, settings, signs, masks[rate]) for a, rate in zip(low, rates)]
        if settings.feedback:
            stacked = StackedColumns(quantizers)
            q = error_feedback(w.repeat(len(low), 1), h, [(0, columns)], lambda _k, _w: stacked.column)
            fitted = q.split(out_features)
        else:
            fitted = [w] * len(low)
        packed |= {a: quantizer.pack(wq) for a, quantizer, wq in zip(low, quantizers, fitted)}
    result = []
    for action in actions:
        layout = unit_layout(action, out_features, columns, settings.salient_rate, settings.rotate)
        assert set(packed[action]) == set(layout), (sorted(packed[action]), sorted(layout))
        for field, (dtype, shape) in layout.items():
            assert packed[action][field].dtype == dtype and tuple(packed[action][field].shape) == shape, field
        result.append(packed[action])
    return result


def quantize_linear(
    w: torch.Tensor, h: torch.Tensor, chunks: list[tuple[int, int, float, int, bool]], settings: FitSettings
) -> list[dict[str, torch.Tensor]]:
    """Packed tensors of every chunk (col0, col1, action, seed, rotate) of one linear ``w`` [out, in],
    quantized left to right with each chunk's error carried into all later columns (full-layer
    ``h`` [in, in]); each chunk's grid is fitted when it is reached. Same layout as
    :func:`quantize_unit` chunk by chunk (with ``settings.rotate`` replaced by each chunk's own
    setting); a skipped chunk stores its compensated weights."""
    basis = torch.eye(w.shape[1])
    signs = []
    for col0, col1, action, seed, rotate in chunks:
        s = random_signs(col1 - col0, seed) if rotates(action, col1 - col0, rotate) else None
        if s is not None:
            basis[col0:col1, col0:col1] = rotation(s)
        signs.append(s)
    w, h = w.float(), h.float()
    if any(s is not None for s in signs):
        w, h = w @ basis, basis.T @ h @ basis
    rms = h.diagonal().clamp_min(0).sqrt()
    quantizers: dict[int, UnitQuantizer] = {}

    def start(k: int, wk: torch.Tensor):
        col0, col1, action, _seed, _rotate = chunks[k]
        if canonical_action(action) == SKIP:
            return lambda col, _j: col.half().float()
        quantizers[k] = fit_quantizer(wk, rms[col0:col1], canonical_action(action), settings, signs[k])
        return quantizers[k].column

    q = error_feedback(w, h, [(c[0], c[1]) for c in chunks], start)
    return [
        quantizers[k].pack(q[:, col0:col1]) if k in quantizers else {"weight": q[:, col0:col1].half().contiguous()}
        for k, (col0, col1, *_rest) in enumerate(chunks)
    ]


def _unpacked(packed: dict[str, torch.Tensor], grid: Grid, out_features: int, columns: int):
    """Codes [out, g] and, when the unit stores them, the salient mask and :class:`SalientSet`."""
    n = out_features * columns
    if "sal_val" not in packed:  # every position holds a code (rotated, 8-bit or salient-free units)
        codes = unpack_codes(packed["codes"], grid.levels, n).view(out_features, columns)
        return codes, torch.zeros(out_features, columns, dtype=torch.bool), None
    sal = salient.SalientSet(packed["sal_val"], packed["sal_col"], packed["sal_cnt"], packed["sal_scale"])
    rows = torch.repeat_interleave(torch.arange(out_features), sal.counts.long())
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows * columns + (sal.columns.long() & 0xFFFF)] = True
    codes = torch.zeros(n, dtype=torch.long)
    codes[~mask] = unpack_codes(packed["codes"], grid.levels, int((~mask).sum()))
    return codes.view(out_features, columns), mask.view(out_features, columns), sal


def dequantize_unit(packed: dict[str, torch.Tensor], action: float, out_features: int, columns: int) -> torch.Tensor:
    """Dense fp32 weights (holding fp16-representable values) of a packed unit."""
    action = canonical_action(action)
    if action == SKIP:
        return packed["weight"].float()
    grid = grid_for(action)
    codes, _mask, sal = _unpacked(packed, grid, out_features, columns)
    scale = packed["scale"]
    shift = packed.get("shift", torch.zeros_like(scale))
    w_hat = decode(codes, scale, shift, grid)
    if sal is not None:
        w_hat = salient.scatter(w_hat, sal)
    if "rot_signs" in packed:
        w_hat = unrotate(w_hat, unpack_signs(packed["rot_signs"], columns))
    # Values are those an fp16 kernel would see, whichever path built them.
    return w_hat.half().float()


@dataclass
class AffineUnit:
    """A packed unit's weights as an affine function of its per-row scale and shift, with the
    codes, salient values and rotation frozen::

        w_hat(scale, shift) = where(fixed_mask, fixed, scale ⊙ base + shift ⊙ offset)

    (rotation already folded into ``base`` and ``offset``; a rotated unit has no fixed part).
    This is what end-to-end scale tuning differentiates through.
    """

    base: torch.Tensor  # [out, g]
    offset: torch.Tensor  # [g], broadcast over rows (ones, rotated when the unit is)
    fixed_mask: torch.Tensor | None  # [out, g] salient positions
    fixed: torch.Tensor | None  # [out, g] their INT8 values (zero elsewhere)

    def weight(self, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        w = scale[:, None] * self.base
        if shift is not None:
            w = w + shift[:, None] * self.offset
        return w if self.fixed_mask is None else torch.where(self.fixed_mask, self.fixed, w)

    def output(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """``x @ weight(scale, shift).T`` without forming the weight, so that the gradient in
        ``scale`` and ``shift`` needs no weight-sized product and no weight is kept for backward
        (``base`` is zero at the fixed positions)."""
        y = F.linear(x, self.base) * scale
        if self.fixed_mask is not None:
            y = y + F.linear(x, self.fixed)
        if shift is not None and self.fixed_mask is None:
            y = y + (x @ self.offset)[..., None] * shift
        elif shift is not None:  # the offset only where the weight is not fixed: one row each
            y = y + F.linear(x, self.offset * ~self.fixed_mask) * shift
        return y


def affine_unit(packed: dict[str, torch.Tensor], action: float, out_features: int, columns: int) -> AffineUnit:
    """The :class:`AffineUnit` of a quantized (non-skip) packed unit; with its stored scale and
    shift, ``weight`` equals :func:`dequantize_unit` up to float rounding."""
    grid = grid_for(canonical_action(action))
    codes, mask, sal = _unpacked(packed, grid, out_features, columns)
    base = grid.step * (codes.float() - grid.center)
    offset = torch.ones(columns)
    fixed_mask = fixed = None
    if sal is not None:
        fixed_mask = mask
        fixed = salient.scatter(torch.zeros(out_features, columns), sal)
    if "rot_signs" in packed:
        signs = unpack_signs(packed["rot_signs"], columns)
        base, offset = unrotate(base, signs), unrotate(offset, signs)
    if fixed_mask is not None:
        base = base.masked_fill(fixed_mask, 0.0)  # weight() overwrites these; output() must not count them
    return AffineUnit(base, offset, fixed_mask, fixed)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, act_scale: torch.Tensor) -> float:
    """Activation-weighted relative reconstruction error ``‖(W−Ŵ)s‖² / ‖Ws‖²``."""
    d = act_scale.float()[None, :] ** 2
    num = (((w.float() - w_hat.float()) ** 2) * d).sum()
    den = ((w.float() ** 2) * d).sum().clamp_min(1e-20)
    return float(num / den)
