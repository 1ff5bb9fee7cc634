"""Per-row quantization of the token embedding (and an untied output head).

* 16: fp16, as before.
* 8: symmetric INT8 with one fp16 scale per row (absmax / 127): what torch's
  ``_weight_int8pack_mm`` computes when the tied head multiplies it (8.03 bits/weight at 576).
* 4: symmetric INT4 with one fp16 scale per row and group of 32 columns (the clipped absmax / 7
  of least squared error among a few clipping ratios), two codes per byte (low nibble first),
  stored as ``k + 8``: the CPU int4 kernel's codes (4.5 bits/weight).

:func:`row_layout` is the one size table, read by the packer and the accounting alike.
"""

from __future__ import annotations

import torch

ROW_BITS = (16, 8, 4)
GROUP4 = 32  # columns per scale at 4 bits (the kernel's smallest group)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # 4-bit scale search: absmax times these


def check_row_bits(bits: int, columns: int) -> None:
    if bits not in ROW_BITS:
        raise ValueError(f"embedding bits must be one of {', '.join(map(str, ROW_BITS))}, got {bits}")
    if bits == 4 and columns % GROUP4:
        raise ValueError(f"4-bit embedding rows need a width that is a multiple of {GROUP4} (got {columns}); use 8")


def row_layout(bits: int, rows: int, columns: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Field name -> (dtype, shape) of every tensor stored for a [rows, columns] matrix."""
    check_row_bits(bits, columns)
    if bits == 16:
        return {"weight": (torch.float16, (rows, columns))}
    if bits == 8:
        return {"q8": (torch.int8, (rows, columns)), "scale": (torch.float16, (rows,))}
    return {"q4": (torch.uint8, (rows, columns // 2)), "scale": (torch.float16, (rows, columns // GROUP4))}


def _scales(w: torch.Tensor, levels: int) -> torch.Tensor:
    return (w.abs().amax(dim=-1) / levels).clamp_min(1e-8).half()


def _round4(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (groups / scale.float()[..., None]).round().clamp(-7, 7)


def clip_scales4(groups: torch.Tensor) -> torch.Tensor:
    """fp16 INT4 scale of each group (last dim): the clipped absmax / 7 of least squared error
    among :data:`CLIP_RATIOS`."""
    best, best_err = None, None
    for ratio in CLIP_RATIOS:
        scale = _scales(groups * ratio, 7)
        err = ((_round4(groups, scale) * scale.float()[..., None] - groups) ** 2).sum(-1)
        best = scale if best is None else torch.where(err < best_err, scale, best)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best


def quantize_rows(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Packed tensors of ``w`` [rows, columns] at ``bits`` (exactly :func:`row_layout`)."""
    rows, columns = w.shape
    check_row_bits(bits, columns)
    w = w.detach().float()
    if bits == 16:
        return {"weight": w.half().contiguous()}
    if bits == 8:
        scale = _scales(w, 127)
        return {"q8": (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8), "scale": scale}
    groups = w.view(rows, columns // GROUP4, GROUP4)
    scale = clip_scales4(groups)
    q = (_round4(groups, scale) + 8).to(torch.uint8).view(rows, columns)
    return {"q4": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale}


def unpack_q4(q4: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [rows, columns] from two-per-byte storage [rows, columns / 2]."""
    return torch.stack([q4 & 0xF, q4 >> 4], dim=-1).flatten(-2)


def dequantize_rows(packed: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """fp32 weights of packed rows (any leading subset of rows works: rows are independent)."""
    if bits == 16:
        return packed["weight"].float()
    if bits == 8:
        return packed["q8"].float() * packed["scale"].float()[..., None]
    codes = unpack_q4(packed["q4"]).float() - 8
    scale = packed["scale"].float().repeat_interleave(GROUP4, dim=-1)
    return codes * scale
