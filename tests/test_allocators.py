import random

import pytest
import torch
from conftest import run_allocator

from windquant.actions import ACTIONS
from windquant.alloc import get_allocator
from windquant.alloc.problem import AllocationProblem
from windquant.config import PlanConfig
from windquant.errors import WindquantError
from windquant.model.units import Unit
from windquant.quant.accounting import unit_bits


def problem(target, n=40, accounting="true", seed=0):
    rng = random.Random(seed)
    units = [Unit(i, i // 4, f"m{i // 2}", "mlp.up_proj", "mlp", 0, 32, rng.choice([16, 48])) for i in range(n)]
    bits = torch.tensor([[unit_bits(a, *u.shape, 0.03, accounting) for a in ACTIONS] for u in units], dtype=torch.float64)
    saliency = torch.tensor([rng.random() for _ in units], dtype=torch.float64)
    return AllocationProblem(units, bits, saliency, target, accounting)


def test_uniform_picks_highest_action_that_fits():
    p = problem(3.0)
    actions = run_allocator("uniform", p)
    (chosen,) = set(actions)
    assert p.average_bits(actions) <= 3.0
    higher = ACTIONS[ACTIONS.index(chosen) - 1]
    assert p.average_bits([higher] * 40) > 3.0  # the next action up would not fit
    assert run_allocator("uniform", problem(16.0)) == [16.0] * 40


def test_uniform_forced_action_over_budget_is_an_error():
    with pytest.raises(WindquantError, match="above target_bits"):
        run_allocator("uniform", problem(2.0), action=4.0)


@pytest.mark.parametrize("seed", range(20))
def test_heuristic_never_exceeds_budget(seed):
    p0 = problem(1.0, seed=seed)
    lo = p0.cheapest_average()
    target = random.Random(seed).uniform(lo, 9.0)
    p = problem(target, seed=seed)
    actions = run_allocator("heuristic", p)
    assert p.average_bits(actions) <= target + 1e-9


def test_heuristic_demotes_least_salient_first():
    p = problem(1.0)
    p.target_bits = (p.total_bits([2.0] * 40) - 1) / p.n_weights  # a hair under all-2-bit
    actions = run_allocator("heuristic", p)
    least = int(torch.argmin(p.saliency))
    assert actions[least] == 1.58
    assert sum(a < 2.0 for a in actions) == 1


def test_heuristic_promotes_most_salient_first():
    p = problem(1.0)
    p.target_bits = p.average_bits([2.0] * 40) + 1e-3
    top = int(torch.argmax(p.saliency))
    small = [u.index for u in p.units if u.out_features == 16]
    p.target_bits += (float(p.bits[top, ACTIONS.index(3.0)] - p.bits[top, ACTIONS.index(2.0)])) / p.n_weights
    actions = run_allocator("heuristic", p)
    assert actions[top] == 3.0
    assert p.average_bits(actions) <= p.target_bits
    assert small  # the fixture mixes unit sizes


def test_infeasible_targets_are_clear_errors():
    with pytest.raises(WindquantError, match="target_bits 0.5 is below the cheapest possible plan") as err:
        problem(0.5).check_feasible()
    assert err.value.setting == "target_bits"
    with pytest.raises(WindquantError, match=r"target_bits must be in \(0, 16\]"):
        PlanConfig(target_bits=17.0).validate()


def test_unknown_allocator():
    with pytest.raises(WindquantError, match="unknown allocator 'nope'; choose one of"):
        get_allocator("nope")


def test_every_plan_is_checked_against_the_budget():
    p = problem(4.0)
    p.check_plan([2.0] * 40, "toy")
    with pytest.raises(WindquantError, match="the toy allocator's plan needs .* above target_bits 4"):
        p.check_plan([8.0] * 40, "toy")
    with pytest.raises(WindquantError, match="returned 39 actions for 40 units"):
        p.check_plan([2.0] * 39, "toy")


def test_ilp_without_scores_is_a_clear_error():
    with pytest.raises(WindquantError, match="needs sensitivity scores"):
        run_allocator("ilp", problem(3.0))
