"""Allocators: AllocationProblem -> requested action per unit. They never touch the model."""

from __future__ import annotations

from collections.abc import Callable

from windquant.alloc.heuristic import allocate_heuristic
from windquant.alloc.ilp import allocate_ilp
from windquant.alloc.ppo import allocate_ppo
from windquant.alloc.problem import AllocationProblem
from windquant.alloc.uniform import allocate_uniform
from windquant.errors import WindquantError

ALLOCATORS: dict[str, Callable[..., list[float]]] = {
    "uniform": allocate_uniform,
    "heuristic": allocate_heuristic,
    "ilp": allocate_ilp,
    "ppo": allocate_ppo,
}


def get_allocator(name: str) -> Callable[..., list[float]]:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise WindquantError(f"unknown allocator {name!r}; choose one of: {', '.join(ALLOCATORS)}") from None


__all__ = ["ALLOCATORS", "AllocationProblem", "get_allocator"]
