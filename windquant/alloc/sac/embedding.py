"""Layers of an allocation problem and their 11-dimensional embedding (RAMP's layer state).

A *layer* is one linear of one decoder block; all its units (column chunks) take the layer's
action. The embedding is built from the per-unit statistics the pipeline already hands every
allocator (``problem.features``, ``problem.costs``), never from the model. Every statistic
that has a scale is z-scored over the model's layers (after a log where it is a magnitude), so
a policy reads "more sensitive / larger / heavier-tailed than this model's other layers",
which carries over to a model of another size or family.

====  ==================  ==============================================================
dim   name                formula (w: the layer's weights; a: its input-channel RMS scales)
====  ==================  ==============================================================
0     relative_depth      block index / (blocks - 1)
1     is_attention        1 for attention projections, 0 otherwise
2     log_size            z(log #w)
3     weight_std          z(log std(w)), the pooled std over the layer's units
4     weight_spread       z(log(std(w) / mean|w|)), a tail-weight (kurtosis-like) measure
5     weight_outliers     z(share of |w| > 0.5 · P99|w|, unit-weighted mean)
6     act_mean            z(log mean(a))
7     act_outliers        z(log(max(a) / mean(a)))
8     sensitivity         z(log(predicted loss of the layer at 2 bit / #w)), ilp's costs
9     budget_slack        (bits left / weights left) / target - 1, clipped to [-2, 2]
10    progress            weights already decided / all weights
====  ==================  ==============================================================

``z(x) = (x - mean) / std`` over the model's layers, clipped to [-5, 5].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from windquant.actions import ACTIONS
from windquant.alloc.problem import AllocationProblem
from windquant.errors import WindquantError

LAYER_DIM = 11
STATIC_DIM = 9
NAMES = (
    "relative_depth",
    "is_attention",
    "log_size",
    "weight_std",
    "weight_spread",
    "weight_outliers",
    "act_mean",
    "act_outliers",
    "sensitivity",
    "budget_slack",
    "progress",
)
SENSITIVITY_ACTION = 2.0
Z_CLIP = 5.0
SLACK_CLIP = 2.0
TINY = 1e-30


@dataclass
class Layers:
    """The problem's units grouped by linear layer (model order), with summed tables."""

    modules: list[str]
    units: list[np.ndarray]  # unit indices of each layer
    cost: np.ndarray  # [L, A] Σ of the units' predicted losses
    bits: np.ndarray  # [L, A] Σ of the units' bits
    weights: np.ndarray  # [L] weights per layer
    static: np.ndarray  # [L, STATIC_DIM] dims 0-8 of the embedding

    def unit_columns(self, choice: np.ndarray) -> np.ndarray:
        """Per unit (model order): its layer's column of ACTIONS (``choice``: one per layer)."""
        cols = np.empty(sum(len(idx) for idx in self.units), dtype=np.int64)
        for layer, idx in enumerate(self.units):
            cols[idx] = choice[layer]
        return cols

    def unit_actions(self, choice: np.ndarray) -> list[float]:
        """Per unit (model order): its layer's action."""
        return [ACTIONS[c] for c in self.unit_columns(choice)]


def zscore(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return np.clip((x - x.mean()) / std, -Z_CLIP, Z_CLIP) if std > 1e-12 else np.zeros_like(x)


def layer_statistics(problem: AllocationProblem, units: list[np.ndarray]) -> np.ndarray:
    """[L, 7] raw statistics per layer, pooled from the units' features (``unit_features``
    columns: w mean, w std, |w| mean, sparsity, outlier share, a mean, a std, a max): weight std,
    mean |w|, outlier share, mean a, max a, #w and a 0/1 attention flag."""
    f = problem.features.double().numpy()
    n = np.array([u.n_weights for u in problem.units], dtype=np.float64)
    cols = np.array([u.columns for u in problem.units], dtype=np.float64)
    rows = []
    for idx in units:
        w, c = n[idx], cols[idx]
        mean = np.average(f[idx, 0], weights=w)
        # Pooled variance from per-unit moments (unit std is the unbiased one): E[w²] - E[w]².
        second = np.average(f[idx, 1] ** 2 * (w - 1) / w + f[idx, 0] ** 2, weights=w)
        std = np.sqrt(max(second - mean**2, 0.0))
        rows.append(
            [
                std,
                np.average(f[idx, 2], weights=w),
                np.average(f[idx, 4], weights=w),
                np.average(f[idx, 5], weights=c),  # a: one scale per input column
                f[idx, 7].max(),
                w.sum(),
                float(problem.units[int(idx[0])].kind == "attention"),
            ]
        )
    return np.array(rows, dtype=np.float64)


def group_layers(problem: AllocationProblem) -> Layers:
    """Group units by module (model order) and build dims 0-8 of every layer's embedding."""
    if problem.costs is None or problem.features is None:
        raise WindquantError("the sac allocator needs sensitivity scores and unit features (needs 'scores', 'features')")
    modules: list[str] = []
    members: dict[str, list[int]] = {}
    for u in problem.units:
        if u.module not in members:
            modules.append(u.module)
            members[u.module] = []
        members[u.module].append(u.index)
    units = [np.array(members[m]) for m in modules]
    costs = problem.costs.double().numpy()
    bits = problem.bits.double().numpy()
    cost = np.stack([costs[idx].sum(0) for idx in units])
    table = np.stack([bits[idx].sum(0) for idx in units])
    stats = layer_statistics(problem, units)
    std, absmean, outliers, act_mean, act_max, size, attention = stats.T
    blocks = [problem.units[int(idx[0])].layer for idx in units]
    depth = np.array(blocks, dtype=np.float64) / max(1, max(blocks))
    sens = cost[:, ACTIONS.index(SENSITIVITY_ACTION)] / size
    static = np.stack(
        [
            depth,
            attention,
            zscore(np.log(size)),
            zscore(np.log(std + TINY)),
            zscore(np.log((std + TINY) / (absmean + TINY))),
            zscore(outliers),
            zscore(np.log(act_mean + TINY)),
            zscore(np.log((act_max + TINY) / (act_mean + TINY))),
            zscore(np.log(np.maximum(sens, TINY))),
        ],
        axis=1,
    )
    return Layers(modules, units, cost, table, size, static)


def embedding(
    static: np.ndarray, budget_left: float, weights_left: float, weights_total: float, target_bits: float
) -> np.ndarray:
    """The full 11-dim state of one layer: its static dims and the budget state before it is decided."""
    slack = np.clip(budget_left / max(weights_left, 1.0) / target_bits - 1.0, -SLACK_CLIP, SLACK_CLIP)
    progress = 1.0 - weights_left / weights_total
    return np.concatenate([static, [slack, progress]]).astype(np.float32)
