import random

import pytest
import torch

from windquant.alloc import AllocationProblem, get_allocator
from windquant.alloc.heuristic import allocate_heuristic
from windquant.alloc.uniform import allocate_uniform
from windquant.errors import WindquantError
from windquant.model.units import Unit
from windquant.quant.accounting import ACTIONS, unit_bits


def problem(target, n=40, accounting="true", seed=0):
    rng = random.Random(seed)
    units = [Unit(i, i // 4, f"m{i // 2}", "mlp.up_proj", "mlp", 0, 32, rng.choice([16, 48])) for i in range(n)]
    bits = torch.tensor([[unit_bits(a, *u.shape, 0.03, accounting) for a in ACTIONS] for u in units], dtype=torch.float64)
    saliency = torch.tensor([rng.random() for _ in units], dtype=torch.float64)
    return AllocationProblem(units, bits, saliency, target, accounting)


def test_uniform_picks_highest_action_that_fits():
    p = problem(3.0)
    actions = allocate_uniform(p)
    (chosen,) = set(actions)
    assert p.average_bits(actions) <= 3.0
    higher = ACTIONS[ACTIONS.index(chosen) - 1]
    assert p.average_bits([higher] * 40) > 3.0  # the next action up would not fit
    assert allocate_uniform(problem(16.0)) == [16.0] * 40


def test_uniform_forced_action_over_budget_is_an_error():
    with pytest.raises(WindquantError, match="above --target-bits"):
        allocate_uniform(problem(2.0), action=4.0)


@pytest.mark.parametrize("seed", range(20))
def test_heuristic_never_exceeds_budget(seed):
    p0 = problem(1.0, seed=seed)
    lo = p0.cheapest_average()
    target = random.Random(seed).uniform(lo, 9.0)
    p = problem(target, seed=seed)
    actions = allocate_heuristic(p)
    assert p.average_bits(actions) <= target + 1e-9


def test_heuristic_demotes_least_salient_first():
    p = problem(1.0)
    p.target_bits = (p.total_bits([2.0] * 40) - 1) / p.n_weights  # a hair under all-2-bit
    actions = allocate_heuristic(p)
    least = int(torch.argmin(p.saliency))
    assert actions[least] == 1.58
    assert sum(a < 2.0 for a in actions) == 1


def test_heuristic_promotes_most_salient_first():
    p = problem(1.0)
    p.target_bits = p.average_bits([2.0] * 40) + 1e-3
    top = int(torch.argmax(p.saliency))
    small = [u.index for u in p.units if u.out_features == 16]
    p.target_bits += (float(p.bits[top, ACTIONS.index(3.0)] - p.bits[top, ACTIONS.index(2.0)])) / p.n_weights
    actions = allocate_heuristic(p)
    assert actions[top] == 3.0
    assert p.average_bits(actions) <= p.target_bits
    assert small  # the fixture mixes unit sizes


@pytest.mark.parametrize("target", [0.5, 17.0])
def test_infeasible_targets_are_clear_errors(target):
    with pytest.raises(WindquantError, match="target-bits"):
        problem(target).check_feasible()


def test_unknown_allocator():
    with pytest.raises(WindquantError, match="unknown allocator 'nope'; choose one of"):
        get_allocator("nope")
