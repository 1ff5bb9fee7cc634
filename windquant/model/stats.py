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
