"""Quantize one unit to its packed tensors, and back (the engine's pure core)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from windquant.actions import SKIP, canonical_action
from windquant.quant import salient
from windquant.quant.accounting import unit_layout
from windquant.quant.codes import pack_codes, unpack_codes
from windquant.quant.feedback import error_feedback
from windquant.quant.ops import FitResult, decode, encode, fit, grid_for


@dataclass(frozen=True)
class FitSettings:
    """How every unit is fitted (part of the candidate-cache fingerprint)."""

    salient_rate: float = 0.03
    steps: int = 10
    lr: float = 0.02
    feedback: bool = False  # OBQ/GPTQ error feedback along the unit's columns (needs H)

    def fingerprint_fields(self) -> dict:
        """What the candidate-cache fingerprint hashes: fields added after cache v1 only when
        set, so caches written before them stay valid."""
        d = {"salient_rate": self.salient_rate, "steps": self.steps, "lr": self.lr}
        return d | ({"feedback": True} if self.feedback else {})


def quantize_unit(
    w: torch.Tensor, act_scale: torch.Tensor, action: float, settings: FitSettings, h: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Packed tensors of unit ``w`` [out, g] at ``action``, exactly as :func:`unit_layout` says.

    With ``settings.feedback``, ``h`` [g, g] (the unit's block of ``E[x xᵀ]``) drives error
    feedback on the fitted grid; the layout, hence the bits, are the same either way.
    """
    action = canonical_action(action)
    out_features, columns = w.shape
    if action == SKIP:
        packed = {"weight": w.detach().to(torch.float16).contiguous()}
    else:
        grid = grid_for(action)
        rate = settings.salient_rate if grid.protect else 0.0
        mask = salient.select(w, act_scale, rate)
        res = fit(w, act_scale.float() ** 2, grid, keep=~mask, steps=settings.steps, lr=settings.lr)
        sal_scale = salient.int8_scale(w, mask)
        if settings.feedback:
            if h is None:
                raise ValueError("error feedback needs the unit's input second moment h")
            w = feedback_weights(w, h, mask, grid, res, sal_scale)
            res.codes = encode(w, res.scale.float(), res.shift.float(), grid)
        packed = {"codes": pack_codes(res.codes[~mask], grid.levels), "scale": res.scale}
        if grid.learn_shift:
            packed["shift"] = res.shift
        if mask.any():
            packed |= salient.pack(w, mask, sal_scale).tensors()
    layout = unit_layout(action, out_features, columns, settings.salient_rate)
    assert set(packed) == set(layout), (sorted(packed), sorted(layout))
    for field, (dtype, shape) in layout.items():
        assert packed[field].dtype == dtype and tuple(packed[field].shape) == shape, field
    return packed


def feedback_weights(
    w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, grid, res: FitResult, sal_scale: torch.Tensor
) -> torch.Tensor:
    """``w`` quantized column by column with error feedback: grid values on the fitted per-row
    scale/shift, INT8 values at the salient positions (the unit's fixed INT8 scale)."""
    scale, shift = res.scale.float(), res.shift.float()

    def quantize_column(col: torch.Tensor, j: int) -> torch.Tensor:
        q = decode(encode(col[:, None], scale, shift, grid), scale, shift, grid)[:, 0]
        sal = mask[:, j]
        if sal.any():
            q[sal] = salient.int8_round(col[sal], sal_scale) * sal_scale.float()
        return q

    return error_feedback(w.float(), h.float(), quantize_column)


def dequantize_unit(packed: dict[str, torch.Tensor], action: float, out_features: int, columns: int) -> torch.Tensor:
    """Dense fp32 weights (holding fp16-representable values) of a packed unit."""
    action = canonical_action(action)
    if action == SKIP:
        return packed["weight"].float()
    grid = grid_for(action)
    n = out_features * columns
    mask = torch.zeros(n, dtype=torch.bool)
    sal = None
    if "sal_val" in packed:
        sal = salient.SalientSet(packed["sal_val"], packed["sal_col"], packed["sal_cnt"], packed["sal_scale"])
        rows = torch.repeat_interleave(torch.arange(out_features), sal.counts.long())
        cols = sal.columns.long() & 0xFFFF
        mask[rows * columns + cols] = True
    codes = torch.zeros(n, dtype=torch.long)
    codes[~mask] = unpack_codes(packed["codes"], grid.levels, int((~mask).sum()))
    scale = packed["scale"]
    shift = packed.get("shift", torch.zeros_like(scale))
    w_hat = decode(codes.view(out_features, columns), scale, shift, grid)
    if sal is not None:
        w_hat = salient.scatter(w_hat, sal)
    # Values are those an fp16 kernel would see, whichever path built them.
    return w_hat.half().float()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, act_scale: torch.Tensor) -> float:
    """Activation-weighted relative reconstruction error ``‖(W−Ŵ)s‖² / ‖Ws‖²``."""
    d = act_scale.float()[None, :] ** 2
    num = (((w.float() - w_hat.float()) ** 2) * d).sum()
    den = ((w.float() ** 2) * d).sum().clamp_min(1e-20)
    return float(num / den)
