"""Per-unit, per-action sensitivity scores c[i, a] (after GAMMA / HAWQ-style estimates).

``c[i, a] = F_layer · tr(ΔW H ΔWᵀ)`` with ``ΔW = W_unit − Ŵ_unit(a)`` from the candidate cache,
``H`` the unit's block of the layer's input second moment ``E[x xᵀ]`` (calibration
activations), and ``F_layer`` the mean squared gradient of the calibration loss w.r.t. that
layer's output (one backward pass). Under a second-order expansion with a diagonal,
row-constant output Fisher, ``½ c[i, a] · tokens`` is the loss increase from quantizing unit
``i`` alone with action ``a``. One table serves every budget; ``H`` and ``F`` come from
``calib.statistics.second_moments_and_fisher``.
"""

from __future__ import annotations

import torch
from torch import nn

from windquant.actions import ACTIONS
from windquant.model.units import Unit
from windquant.quant.cache import CandidateCache


@torch.no_grad()
def sensitivity_scores(
    model: nn.Module,
    units: list[Unit],
    cache: CandidateCache,
    moments: dict[str, torch.Tensor],
    fisher: dict[str, float],
) -> torch.Tensor:
    """[N, len(ACTIONS)] estimated loss increase of each unit at each action (float64)."""
    modules = dict(model.named_modules())
    scores = torch.zeros(len(units), len(ACTIONS), dtype=torch.float64)
    for u in units:
        w = modules[u.module].weight[:, u.col0 : u.col1].float()
        h = moments[u.module][u.col0 : u.col1, u.col0 : u.col1]
        for j, a in enumerate(ACTIONS):
            delta = w - cache.weight(u.index, a).float()
            scores[u.index, j] = fisher[u.module] * float(((delta @ h) * delta).sum())
    return scores
