"""Every packed unit of up to 4 bits as int4 codes with one scale and zero per row.

torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) computes each weight as
``fma(q - 8, scale, zero)`` with ``q`` in 0..15 (measured on torch 2.13; the fp32 path is that
fma exactly). Every windquant grid ``level = scale·step·(code − center) + shift`` maps onto it
with ``q = m·(code − center) + 8``, ``scale' = scale·step/m`` and ``zero = shift``, where
``m = 2`` for the half-integer centers (SEQ 2-bit: q ∈ {5, 7, 9, 11}; elastic binary:
q ∈ {7, 9}) and 1 otherwise (LSQ 3/4-bit: q = k + 8; ternary: q ∈ {7, 8, 9}). ``step/m`` is a
power of two and the stored scales are fp16, so ``(q − 8)·scale'`` is exact in fp32 and the
kernel's weight equals :func:`windquant.quant.ops.decode` bit for bit; :func:`dequantize_unit`
additionally rounds its result to fp16, which the runtime does not (≤ 2⁻¹² relative per weight).

Salient INT8 weights (units stored unrotated) sit at code 8, which contributes ``zero``; the
difference ``value − zero`` is a sparse correction added after the matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from windquant.actions import SKIP, canonical_action
from windquant.quant.ops import grid_for
from windquant.quant.rotation import unpack_signs
from windquant.quant.unit import _unpacked

ZERO_CODE = 8  # the kernel's q - 8 offset


@dataclass
class Int4Unit:
    """One unit [out, g] in the kernel's terms (rotation and salient values kept beside)."""

    codes: torch.Tensor  # uint8 [out, g], 0..15
    scale: torch.Tensor  # fp32 [out]
    zero: torch.Tensor  # fp32 [out]
    signs: torch.Tensor | None  # fp32 [g]: the unit computes Q · Had · (signs ⊙ x)
    sal_rows: torch.Tensor  # long [k]
    sal_cols: torch.Tensor  # long [k], within the unit
    sal_delta: torch.Tensor  # fp32 [k]: salient value − zero of its row


def fits_int4(action: float) -> bool:
    action = canonical_action(action)
    return action != SKIP and grid_for(action).levels <= 16


def int4_unit(packed: dict[str, torch.Tensor], action: float, out_features: int, columns: int) -> Int4Unit:
    """The int4 form of a packed unit of up to 4 bits (see the module docstring)."""
    grid = grid_for(canonical_action(action))
    if grid.levels > 16:
        raise ValueError(f"action {action:g} has {grid.levels} levels; int4 holds at most 16")
    m = 1 if float(grid.center).is_integer() else 2
    codes, mask, sal = _unpacked(packed, grid, out_features, columns)
    q = (codes.float() - grid.center) * m + ZERO_CODE
    q[mask] = ZERO_CODE
    assert q.min() >= 0 and q.max() <= 15, "grid does not fit int4"
    scale = packed["scale"].float() * (grid.step / m)
    zero = packed["shift"].float() if "shift" in packed else torch.zeros(out_features)
    signs = unpack_signs(packed["rot_signs"], columns) if "rot_signs" in packed else None
    rows, cols = mask.nonzero(as_tuple=True)
    delta = torch.zeros(0)
    if sal is not None:
        # mask.nonzero() is row-major, the order the salient values are stored in.
        delta = sal.values.float() * sal.scale.float() - zero[rows]
    return Int4Unit(q.to(torch.uint8), scale, zero, signs, rows, cols, delta)


def int4_weight(unit: Int4Unit) -> torch.Tensor:
    """The weights the kernel computes from ``unit`` [out, g] in fp32, in the unit's stored
    (possibly rotated) basis and without the salient correction: the slow, obvious formula."""
    return torch.addcmul(unit.zero[:, None], unit.codes.float() - ZERO_CODE, unit.scale[:, None])


def int8_unit(packed: dict[str, torch.Tensor], action: float, out_features: int, columns: int):
    """(int8 values [out, g], fp32 scale [out], signs or None) of an 8-bit unit: LSQ-8 is
    ``scale·(code − 128)``, exactly what ``_weight_int8pack_mm`` computes per output row."""
    grid = grid_for(canonical_action(action))
    codes, _mask, _sal = _unpacked(packed, grid, out_features, columns)
    values = (codes - int(grid.center)).to(torch.int8)
    signs = unpack_signs(packed["rot_signs"], columns) if "rot_signs" in packed else None
    return values, packed["scale"].float() * grid.step, signs
