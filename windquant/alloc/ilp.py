"""Exact budgeted allocation: a multiple-choice knapsack solved with HiGHS (``scipy.optimize.milp``).

minimise ``Σ_i c[i, a_i]`` subject to ``Σ_i bits[i, a_i] ≤ budget``, one action per unit,
disallowed (clamped) actions excluded. A Lagrangian relaxation gives a feasible plan first
(bisection on the bit price λ, then a greedy fill of the leftover budget); it is the answer
whenever HiGHS hits its time limit without a better feasible solution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from windquant.actions import ACTIONS, within_budget
from windquant.alloc.base import Allocation, AllocationContext, register_allocator
from windquant.config import setting
from windquant.errors import WindquantError

if TYPE_CHECKING:
    import torch

    from windquant.alloc.problem import AllocationProblem


@dataclass
class Solution:
    choice: np.ndarray  # [N] column index per unit
    cost: float
    bits: float
    method: str  # "milp-optimal" | "milp-time-limit" | "lagrangian"


def _pick(cost: np.ndarray, bits: np.ndarray, allowed: np.ndarray, price: float) -> np.ndarray:
    return np.where(allowed, cost + price * bits, np.inf).argmin(axis=1)


def bit_price(cost: np.ndarray, bits: np.ndarray, allowed: np.ndarray, budget: float) -> float:
    """The Lagrange price of a bit: the smallest one whose per-unit argmin of ``cost + price·bits`` fits."""
    rows = np.arange(len(cost))
    lo, hi = 0.0, 1.0
    while bits[rows, _pick(cost, bits, allowed, hi)].sum() > budget and hi < 1e30:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if bits[rows, _pick(cost, bits, allowed, mid)].sum() > budget:
            lo = mid
        else:
            hi = mid
    return hi


def greedy_fill(cost: np.ndarray, bits: np.ndarray, allowed: np.ndarray, choice: np.ndarray, budget: float) -> np.ndarray:
    """Spend leftover budget: repeatedly take the best cost decrease per extra bit that still fits."""
    rows = np.arange(len(cost))
    choice = choice.copy()
    total = bits[rows, choice].sum()
    while True:
        gain = cost[rows, choice][:, None] - cost
        extra = bits - bits[rows, choice][:, None]
        ok = allowed & (gain > 0) & within_budget(total + extra, budget)
        if not ok.any():
            return choice
        ratio = np.where(ok, gain / np.maximum(extra, 1e-9), -np.inf)
        i, a = np.unravel_index(ratio.argmax(), ratio.shape)
        total += extra[i, a]
        choice[i] = a


def greedy_trim(cost: np.ndarray, bits: np.ndarray, allowed: np.ndarray, choice: np.ndarray, budget: float) -> np.ndarray:
    """Meet the budget: repeatedly take the smallest cost increase per bit saved."""
    rows = np.arange(len(cost))
    choice = choice.copy()
    total = bits[rows, choice].sum()
    while not within_budget(total, budget):
        saved = bits[rows, choice][:, None] - bits
        ok = allowed & (saved > 0)
        if not ok.any():
            raise WindquantError(f"budget {budget:.0f} bits is below the cheapest allowed plan")
        ratio = np.where(ok, (cost - cost[rows, choice][:, None]) / np.maximum(saved, 1e-9), np.inf)
        i, a = np.unravel_index(ratio.argmin(), ratio.shape)
        total -= saved[i, a]
        choice[i] = a
    return choice


def lagrangian(cost: np.ndarray, bits: np.ndarray, allowed: np.ndarray, budget: float) -> Solution:
    """Feasible plan by bisection on the price of a bit, then greedy use of leftover bits."""
    rows = np.arange(len(cost))
    cheapest = np.where(allowed, bits, np.inf).min(axis=1)
    if not within_budget(cheapest.sum(), budget):
        raise WindquantError(f"budget {budget:.0f} bits is below the cheapest allowed plan ({cheapest.sum():.0f} bits)")
    choice = _pick(cost, bits, allowed, bit_price(cost, bits, allowed, budget))
    if not within_budget(bits[rows, choice].sum(), budget):  # price so high that ties remain: take cheapest
        choice = np.where(allowed, bits, np.inf).argmin(axis=1)
    choice = greedy_fill(cost, bits, allowed, choice, budget)
    return Solution(choice, float(cost[rows, choice].sum()), float(bits[rows, choice].sum()), "lagrangian")


def solve(
    cost: torch.Tensor, bits: torch.Tensor, budget: float, allowed: torch.Tensor | None = None, time_limit: float = 30.0
) -> Solution:
    """Minimum-cost choice of one column per row with total bits ≤ ``budget``."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # deferred: scipy.optimize is slow to import
    from scipy.sparse import csr_matrix

    c = cost.double().numpy()
    b = bits.double().numpy()
    ok = np.ones_like(c, dtype=bool) if allowed is None else allowed.numpy().astype(bool)
    n, k = c.shape
    warm = lagrangian(c, b, ok, budget)
    # Scale costs to O(1): HiGHS tolerances are absolute.
    scale = max(float(np.abs(c[ok]).max()), 1e-30)
    one_per_row = csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), np.arange(n * k))), shape=(n, n * k))
    constraints = [
        LinearConstraint(one_per_row, 1, 1),
        LinearConstraint(csr_matrix(b.reshape(1, -1)), -np.inf, budget),
    ]
    res = milp(
        c.reshape(-1) / scale,
        integrality=np.ones(n * k),
        bounds=Bounds(0, ok.reshape(-1).astype(float)),
        constraints=constraints,
        options={"time_limit": time_limit, "disp": False},
    )
    if res.x is None:
        return warm
    choice = res.x.reshape(n, k).argmax(axis=1)
    rows = np.arange(n)
    sol_bits = float(b[rows, choice].sum())
    sol_cost = float(c[rows, choice].sum())
    if not within_budget(sol_bits, budget) or sol_cost > warm.cost:
        return warm
    return Solution(choice, sol_cost, sol_bits, "milp-optimal" if res.status == 0 else "milp-time-limit")


@dataclass
class ILPConfig:
    time_limit: float = setting(
        30.0,
        "seconds HiGHS may search before the Lagrangian plan is used",
        flag=("--ilp-time-limit", "--time-limit"),
        metavar="SECONDS",
    )


@register_allocator("ilp", ILPConfig, needs=("scores",), help="exact knapsack on per-unit sensitivity scores (the default)")
def allocate(problem: AllocationProblem, config: ILPConfig, ctx: AllocationContext) -> Allocation:
    """Minimum total sensitivity under the bit budget."""
    if problem.costs is None:
        raise WindquantError("the ilp allocator needs sensitivity scores: build the problem after prepare(..., needs={'scores'})")
    v = problem.variant
    if v is None or v.costs is None:
        sol = solve(problem.costs, problem.bits, problem.budget, time_limit=config.time_limit)
        return Allocation([ACTIONS[j] for j in sol.choice], {"method": sol.method})
    import torch  # deferred: the CLI imports this module to build its flags

    # Each unit chooses among both storages: columns [default actions | variant actions].
    k = len(ACTIONS)
    sol = solve(
        torch.cat([problem.costs, v.costs], 1), torch.cat([problem.bits, v.bits], 1), problem.budget, time_limit=config.time_limit
    )
    variant = [bool(j >= k) for j in sol.choice]
    info = {"method": sol.method, "variant_units": sum(variant), "variant_rotate": v.rotate}
    return Allocation([ACTIONS[j % k] for j in sol.choice], info, variant=variant)
