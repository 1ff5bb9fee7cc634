"""The paper's heuristic sensitivity allocator (appendix B.3).

Units are ranked by saliency (mean ``|w| · s_act``). Everything starts at 2 bit; while the
plan is over budget the least salient units are pushed down to 1.58 bit, then to 1 bit;
with budget left, the most salient units are promoted to 3 then 4 bit (and on to 8 and
16 for generous targets) while each promotion still fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from windquant.actions import ACTIONS, below_floor_error
from windquant.alloc.base import Allocation, AllocationContext, register_allocator

if TYPE_CHECKING:
    from windquant.alloc.problem import AllocationProblem

START = 2.0
DEMOTIONS = (1.58, 1.0)
PROMOTIONS = (3.0, 4.0, 8.0, 16.0)


@dataclass
class HeuristicConfig:
    """The paper's rule has no free parameters (B.3)."""


@register_allocator("heuristic", HeuristicConfig, help="paper B.3: rank units by saliency, demote the least, promote the most")
def allocate(problem: AllocationProblem, config: HeuristicConfig, ctx: AllocationContext) -> Allocation:
    import torch

    bits = problem.bits
    col = {a: ACTIONS.index(a) for a in ACTIONS}
    actions = [START] * len(problem.units)
    total = problem.total_bits(actions)
    ascending = torch.argsort(problem.saliency, stable=True).tolist()
    for level in DEMOTIONS:
        for i in ascending:
            if problem.fits(total):
                break
            if actions[i] > level:
                total += float(bits[i, col[level]] - bits[i, col[actions[i]]])
                actions[i] = level
    if not problem.fits(total):
        raise below_floor_error(
            problem.target_bits, problem.average_bits(actions), problem.accounting, "the heuristic's all-1-bit plan"
        )
    for level in PROMOTIONS:
        for i in reversed(ascending):
            if actions[i] < level:
                delta = float(bits[i, col[level]] - bits[i, col[actions[i]]])
                if problem.fits(total + delta):
                    total += delta
                    actions[i] = level
    return Allocation(actions)
