"""Per-unit, per-action sensitivity scores c[i, a] (after GAMMA / HAWQ-style estimates).

``c[i, a] = F_layer · tr(ΔW H ΔWᵀ)`` with ``ΔW = W_unit − Ŵ_unit(a)`` from the candidate cache,
``H`` the unit's block of the layer's input second moment ``E[x xᵀ]`` (calibration
activations), and ``F_layer`` the mean squared gradient of the calibration loss w.r.t. that
layer's output (one backward pass). Under a second-order expansion with a diagonal,
row-constant output Fisher, ``½ c[i, a] · tokens`` is the loss increase from quantizing unit
``i`` alone with action ``a``. One table serves every budget.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from windquant.model.units import Unit, block_linears
from windquant.quant.accounting import ACTIONS
from windquant.quant.cache import CandidateCache


def second_moments_and_fisher(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``E[x xᵀ]`` of every block linear's input and mean squared output gradient."""
    moments: dict[str, torch.Tensor] = {}
    fisher: dict[str, float] = {}
    rows: dict[str, int] = {}
    hooks = []

    def fwd(name):
        def fn(_m, inputs, _out):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            moments[name] = moments.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return fn

    def bwd(name):
        def fn(_m, _gin, gout):
            g = gout[0].detach().float()
            fisher[name] = fisher.get(name, 0.0) + float((g * g).sum()) / g.shape[-1]

        return fn

    linears = block_linears(model)
    for _layer, name, _proj, mod in linears:
        hooks += [mod.register_forward_hook(fwd(name)), mod.register_full_backward_hook(bwd(name))]
    was_training = model.training
    try:
        model.eval()
        for i in tqdm(range(0, len(windows), batch_size), desc="sensitivity", disable=not progress, unit="batch"):
            batch = windows[i : i + batch_size]
            model.zero_grad(set_to_none=True)
            # Sum (not mean) over tokens: each token's gradient is then its own loss's.
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss * batch[:, 1:].numel()
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return (
        {n: moments[n] / rows[n] for n in moments},
        {n: fisher[n] / rows[n] for n in fisher},
    )


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
            delta = w - cache.dense[(u.index, a)].float()
            scores[u.index, j] = fisher[u.module] * float(((delta @ h) * delta).sum())
    return scores
