"""Per-unit, per-action sensitivity scores c[i, a] (after GAMMA / HAWQ-style estimates).

``c[i, a] = F_layer · tr(ΔW H ΔWᵀ)`` with ``ΔW = W_unit − Ŵ_unit(a)`` from the candidate cache,
``H`` the unit's block of the layer's input second moment ``E[x xᵀ]`` (calibration
activations), and ``F_layer`` the mean squared gradient of the calibration loss w.r.t. that
layer's output (one backward pass). Under a second-order expansion with a diagonal,
row-constant output Fisher, ``½ c[i, a] · tokens`` is the loss increase from quantizing unit
``i`` alone with action ``a``. One table serves every budget. The traces are computed while the
candidates are fitted (``CandidateCache.traces_table``), ``F`` by
``calib.statistics.layer_fisher``.

The diagonal Fisher misjudges a linear whose output is normalised before it reaches the residual
stream (Gemma-3's q/k norms and post-attention / post-feedforward norms): an error along the
output direction is divided away, yet the Fisher charges it in full, so some linears are
predicted 10-100x more sensitive than they measure. ``scores="block"`` (:func:`block_measured`)
keeps each unit's share within its linear but sets each linear's total at each action to its
measured teacher-forced block error (``quant.reconstruction``), which runs the block, norms
included, for real.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from windquant.actions import ACTIONS, INT8
from windquant.model.units import Unit
from windquant.quant.reconstruction import BlockReconstruction


def sensitivity_scores(units: list[Unit], traces: torch.Tensor, fisher: dict[str, float]) -> torch.Tensor:
    """[N, A] estimated loss increase of each unit at each action (float64) from the
    candidates' traces [N, A] and each linear's Fisher."""
    layer_fisher = torch.tensor([fisher[u.module] for u in units], dtype=torch.float64)
    return layer_fisher[:, None] * traces.double()


def block_measured(scores: torch.Tensor, reconstruction: BlockReconstruction, progress: bool = True) -> torch.Tensor:
    """``scores`` [N, A] with every linear's column sums replaced by its measured block errors
    (``TeacherForcedBlock.linear_errors``); each unit keeps its share of its linear's total.
    ``reconstruction`` must hold the raw candidates (built with no fallback threshold).

    The 8-bit column is not measured: a grid 16x finer has ~256x less squared error than the
    4-bit one, so little that the knapsack never weighs it against anything but 16 bit; it gets
    the 4-bit column's measured/predicted factor instead (one block pass per linear saved, a
    seventh of the stage)."""
    out = scores.clone()
    eight, four = ACTIONS.index(INT8), ACTIONS.index(4.0)
    for layer in tqdm(range(reconstruction.layers), desc="block scores", disable=not progress, unit="block"):
        task = reconstruction.block(layer)
        for name, measured in task.linear_errors(unmeasured=(INT8,)).items():
            idx = [task.units[k] for k in task.columns[name]]
            predicted = scores[idx].sum(0)
            scale = torch.where(predicted > 0, measured / predicted.clamp_min(1e-300), torch.zeros_like(predicted))
            scale[eight] = scale[four]
            out[idx] = scores[idx] * scale
    return out
