"""Per-unit, per-action sensitivity scores c[i, a] (after GAMMA / HAWQ-style estimates).

``c[i, a] = F_layer · tr(ΔW H ΔWᵀ)`` with ``ΔW = W_unit − Ŵ_unit(a)`` from the candidate cache,
``H`` the unit's block of the layer's input second moment ``E[x xᵀ]`` (calibration
activations), and ``F_layer`` the mean squared gradient of the calibration loss w.r.t. that
layer's output (one backward pass). Under a second-order expansion with a diagonal,
row-constant output Fisher, ``½ c[i, a] · tokens`` is the loss increase from quantizing unit
``i`` alone with action ``a``. One table serves every budget. The traces are computed while the
candidates are fitted (``CandidateCache.traces_table``), ``F`` by
``calib.statistics.layer_fisher``.
"""

from __future__ import annotations

import torch

from windquant.model.units import Unit


def sensitivity_scores(units: list[Unit], traces: torch.Tensor, fisher: dict[str, float]) -> torch.Tensor:
    """[N, A] estimated loss increase of each unit at each action (float64) from the
    candidates' traces [N, A] and each linear's Fisher."""
    layer_fisher = torch.tensor([fisher[u.module] for u in units], dtype=torch.float64)
    return layer_fisher[:, None] * traces.double()
