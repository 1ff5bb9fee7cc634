"""AWQ-style salient weight protection (paper C.3).

The top ``rate`` fraction of a unit's weights by ``|w| · s_act[col]`` are stored as INT8
(one fp16 scale per unit) in a row-compressed layout: per-row counts (uint8) and column
indices within the unit (uint8 for units up to 256 columns, else uint16). A uint8 count
caps a row at 255 salient weights; the cap only bites when a single row of a >=256-column
unit would be (almost) entirely salient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_PER_ROW = 255


def n_salient(out_features: int, columns: int, rate: float) -> int:
    """How many weights of an ``out × columns`` unit are protected at ``rate``."""
    n = int(round(rate * out_features * columns))
    return min(n, out_features * min(columns, MAX_PER_ROW))


def column_index_dtype(columns: int) -> torch.dtype:
    return torch.uint8 if columns <= 256 else torch.int16


def select(w: torch.Tensor, act_scale: torch.Tensor, rate: float) -> torch.Tensor:
    """Boolean mask [out, g] of the salient positions of unit ``w``.

    ``topk`` on the CPU is deterministic for a given input, so the selection is too.
    """
    out_features, columns = w.shape
    k = n_salient(out_features, columns, rate)
    mask = torch.zeros(w.shape, dtype=torch.bool)
    if k == 0:
        return mask
    score = w.float().abs() * act_scale.float()[None, :]
    if columns > MAX_PER_ROW:
        # Exclude everything below each row's 255th best so no row exceeds the cap.
        kth = score.topk(MAX_PER_ROW, dim=1).values[:, -1:]
        score = torch.where(score >= kth, score, torch.full_like(score, -1.0))
    idx = score.flatten().topk(k).indices
    mask.view(-1)[idx] = True
    return mask


@dataclass
class SalientSet:
    values: torch.Tensor  # int8 [k], row-major order
    columns: torch.Tensor  # uint8 / int16 [k]
    counts: torch.Tensor  # uint8 [out]
    scale: torch.Tensor  # fp16 [1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sal_val": self.values, "sal_col": self.columns, "sal_cnt": self.counts, "sal_scale": self.scale}


def int8_scale(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unit's one fp16 INT8 scale: absmax of its salient weights / 127."""
    vals = w.float()[mask]
    absmax = vals.abs().max() if vals.numel() else torch.tensor(1.0)
    return (absmax / 127.0).clamp_min(1e-8).half()


def int8_round(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (values.float() / scale.float()).round().clamp(-127, 127)


def pack(w: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None = None) -> SalientSet:
    """INT8-quantize the salient weights of ``w`` selected by ``mask`` (with ``scale``, else
    :func:`int8_scale` of them)."""
    vals = w.float()[mask]  # row-major order
    scale = int8_scale(w, mask) if scale is None else scale
    q = int8_round(vals, scale).to(torch.int8)
    cols = mask.nonzero()[:, 1].to(column_index_dtype(w.shape[1]))
    counts = mask.sum(dim=1).to(torch.uint8)
    return SalientSet(values=q, columns=cols, counts=counts, scale=scale.reshape(1))


def scatter(w_hat: torch.Tensor, sal: SalientSet) -> torch.Tensor:
    """Overwrite the salient positions of a dequantized unit with their INT8 values."""
    if sal.values.numel() == 0:
        return w_hat
    rows = torch.repeat_interleave(torch.arange(w_hat.shape[0]), sal.counts.long())
    cols = sal.columns.long() & 0xFFFF if sal.columns.dtype == torch.int16 else sal.columns.long()
    out = w_hat.clone()
    out[rows, cols] = sal.values.float() * sal.scale.float()
    return out
