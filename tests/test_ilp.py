import itertools

import numpy as np
import pytest
import torch

from windquant.alloc.ilp import lagrangian, solve
from windquant.errors import WindquantError


def random_instance(n, k, seed):
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.integers(1, 20, size=(n, k)), axis=1)[:, ::-1].astype(float)  # col 0 most bits
    cost = np.sort(rng.random((n, k)), axis=1)  # col 0 cheapest
    cost[rng.random((n, k)) < 0.2] += rng.random()  # break monotonicity sometimes
    return torch.tensor(cost), torch.tensor(bits.copy())


def brute_force(cost, bits, budget, allowed=None):
    n, k = cost.shape
    best = None
    for choice in itertools.product(range(k), repeat=n):
        if allowed is not None and not all(allowed[i, a] for i, a in enumerate(choice)):
            continue
        b = sum(float(bits[i, a]) for i, a in enumerate(choice))
        if b <= budget:
            c = sum(float(cost[i, a]) for i, a in enumerate(choice))
            best = c if best is None or c < best else best
    return best


@pytest.mark.parametrize("seed", range(15))
def test_solver_matches_brute_force_and_respects_budget(seed):
    cost, bits = random_instance(5, 4, seed)
    lo, hi = float(bits.min(1).values.sum()), float(bits.max(1).values.sum())
    budget = lo + (hi - lo) * np.random.default_rng(seed).random()
    allowed = torch.ones_like(cost, dtype=torch.bool)
    allowed[0, -1] = False  # a clamp: unit 0 may not take its cheapest action
    if float(bits[0, :-1].min()) + float(bits[1:].min(1).values.sum()) > budget:
        budget = float(bits[0, :-1].min()) + float(bits[1:].min(1).values.sum())
    sol = solve(cost, bits, budget, allowed)
    assert sol.bits <= budget + 1e-9
    assert allowed[torch.arange(5), torch.tensor(sol.choice)].all()
    assert sol.cost == pytest.approx(brute_force(cost, bits, budget, allowed), abs=1e-9)


def test_lagrangian_is_feasible_and_never_better_than_exact():
    cost, bits = random_instance(6, 5, 99)
    budget = float(bits.float().mean(1).sum())
    ok = np.ones(cost.shape, dtype=bool)
    warm = lagrangian(cost.numpy(), bits.numpy(), ok, budget)
    exact = solve(cost, bits, budget)
    assert warm.bits <= budget and exact.cost <= warm.cost + 1e-12


def test_infeasible_budget_is_a_clear_error():
    cost, bits = random_instance(3, 3, 0)
    with pytest.raises(WindquantError, match="below the cheapest"):
        solve(cost, bits, float(bits.min(1).values.sum()) - 1)
