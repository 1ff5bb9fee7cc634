"""The paper's heuristic sensitivity allocator (appendix B.3).

Units are ranked by saliency (mean ``|w| · s_act``). Everything starts at 2 bit; while the
plan is over budget the least salient units are pushed down to 1.58 bit, then to 1 bit;
with budget left, the most salient units are promoted to 3 then 4 bit (and on to 8 and
16 for generous targets) while each promotion still fits.
"""

from __future__ import annotations

import torch

from windquant.alloc.problem import AllocationProblem
from windquant.errors import WindquantError
from windquant.quant.accounting import ACTIONS

START = 2.0
DEMOTIONS = (1.58, 1.0)
PROMOTIONS = (3.0, 4.0, 8.0, 16.0)


def allocate_heuristic(problem: AllocationProblem) -> list[float]:
    bits = problem.bits
    col = {a: ACTIONS.index(a) for a in ACTIONS}
    actions = [START] * len(problem.units)
    total = problem.total_bits(actions)
    budget = problem.budget + 1e-6
    ascending = torch.argsort(problem.saliency, stable=True).tolist()
    for level in DEMOTIONS:
        for i in ascending:
            if total <= budget:
                break
            if actions[i] > level:
                total += float(bits[i, col[level]] - bits[i, col[actions[i]]])
                actions[i] = level
    if total > budget:
        raise WindquantError(
            f"the heuristic cannot reach --target-bits {problem.target_bits:g} even with every unit at 1 bit "
            f"({problem.average_bits(actions):.3f} {problem.accounting} bits); raise the target"
        )
    for level in PROMOTIONS:
        for i in reversed(ascending):
            if actions[i] < level:
                delta = float(bits[i, col[level]] - bits[i, col[actions[i]]])
                if total + delta <= budget:
                    total += delta
                    actions[i] = level
    return actions
