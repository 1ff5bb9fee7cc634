"""Uniform allocation: one action everywhere (the RTN-style baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from windquant.actions import ACTIONS, bits_name, canonical_action, fmt_action
from windquant.alloc.base import Allocation, AllocationContext, register_allocator
from windquant.config import setting
from windquant.errors import WindquantError

if TYPE_CHECKING:
    from windquant.alloc.problem import AllocationProblem


@dataclass
class UniformConfig:
    action: float | None = setting(
        None,
        f"this action everywhere: one of {', '.join(map(fmt_action, ACTIONS))}",
        flag="--uniform-action",
        shown="the highest that fits --target-bits",
        metavar="BITS",
    )

    @property
    def fixes_plan(self) -> bool:
        """A fixed action needs no budget: without a target every plan fits."""
        return self.action is not None

    def validate(self) -> UniformConfig:
        if self.action is not None:
            try:
                self.action = canonical_action(self.action)
            except ValueError as exc:
                raise WindquantError(f"uniform action: {exc}", setting="action") from None
        return self


@register_allocator("uniform", UniformConfig, help="one action everywhere")
def allocate(problem: AllocationProblem, config: UniformConfig, ctx: AllocationContext) -> Allocation:
    """``config.action`` everywhere, or the highest single action that fits the budget."""
    n = len(problem.units)
    if config.action is not None:
        actions = [config.action] * n
        if not problem.fits(problem.total_bits(actions)):
            raise WindquantError(
                f"uniform {fmt_action(config.action)} bit needs {problem.average_bits(actions):.3f} {bits_name(problem.accounting)} bits, "
                f"above target_bits {problem.target_bits:g}; raise the target or pick a lower action",
                setting="target_bits",
            )
        return Allocation(actions)
    for a in ACTIONS:  # highest precision first
        if problem.fits(problem.total_bits([a] * n)):
            return Allocation([a] * n)
    raise WindquantError(
        f"no single action fits target_bits {problem.target_bits:g} ({bits_name(problem.accounting)} bits); "
        "raise the target or use the heuristic allocator",
        setting="target_bits",
    )
