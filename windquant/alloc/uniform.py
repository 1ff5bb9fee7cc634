"""Uniform allocation: one action everywhere (the RTN-style baseline)."""

from __future__ import annotations

from windquant.alloc.problem import AllocationProblem
from windquant.errors import WindquantError
from windquant.quant.accounting import ACTIONS, canonical_action, fmt_action


def allocate_uniform(problem: AllocationProblem, action: float | None = None) -> list[float]:
    """``action`` everywhere, or the highest single action that fits the budget."""
    n = len(problem.units)
    if action is not None:
        actions = [canonical_action(action)] * n
        if problem.total_bits(actions) > problem.budget + 1e-6:
            raise WindquantError(
                f"uniform {fmt_action(action)} bit needs {problem.average_bits(actions):.3f} {problem.accounting} bits, "
                f"above --target-bits {problem.target_bits:g}; raise the target or pick a lower action"
            )
        return actions
    for a in ACTIONS:  # highest precision first
        if problem.total_bits([a] * n) <= problem.budget + 1e-6:
            return [a] * n
    raise WindquantError(
        f"no single action fits --target-bits {problem.target_bits:g} ({problem.accounting} bits); "
        "raise the target or use --allocator heuristic"
    )
