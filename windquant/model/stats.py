"""Static per-unit statistics handed to allocators (which never see the model)."""

from __future__ import annotations

import torch
from torch import nn

from windquant.model.units import Unit


@torch.no_grad()
def unit_saliency(model: nn.Module, units: list[Unit], act_scales: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean ``|w| · s_act`` of each unit (paper B.3 saliency score), float64 [N]."""
    modules = dict(model.named_modules())
    out = []
    for u in units:
        w = modules[u.module].weight[:, u.col0 : u.col1].float().abs()
        out.append(float((w * act_scales[u.module][u.col0 : u.col1][None, :]).mean()))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def unit_features(model: nn.Module, units: list[Unit], act_scales: dict[str, torch.Tensor]) -> torch.Tensor:
    """Raw static statistics of each unit (paper Table 1, dims 0-4 and 9-11), float64 [N, 8].

    Weight statistics use the paper's formulas: sparsity = share of ``|w| < 1e-6``,
    outlier_frac = share of ``|w| > 0.5 · P99(|w|)``; calibration statistics are the mean,
    std and max of the unit's input-channel activation scales.
    """
    modules = dict(model.named_modules())
    rows = []
    for u in units:
        w = modules[u.module].weight[:, u.col0 : u.col1].float().reshape(-1)
        a = w.abs()
        k = max(1, min(a.numel(), round(0.99 * a.numel())))
        p99 = a.kthvalue(k).values
        s = act_scales[u.module][u.col0 : u.col1].float()
        rows.append(
            [
                float(w.mean()),
                float(w.std()) if w.numel() > 1 else 0.0,
                float(a.mean()),
                float((a < 1e-6).float().mean()),
                float((a > 0.5 * p99).float().mean()),
                float(s.mean()),
                float(s.std()) if s.numel() > 1 else 0.0,
                float(s.max()),
            ]
        )
    return torch.tensor(rows, dtype=torch.float64)
