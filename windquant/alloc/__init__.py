"""Allocators: AllocationProblem -> requested action per unit. They never touch the model."""

# The built-in allocators register themselves on import (one line per allocator).
from windquant.alloc import (
    gamma,  # noqa: E402, F401
    heuristic,  # noqa: E402, F401
    ilp,  # noqa: E402, F401
    ppo,  # noqa: E402, F401
    sac,  # noqa: E402, F401
    uniform,  # noqa: E402, F401, I001
)
from windquant.alloc.base import ALLOCATORS, Allocation, AllocationContext, AllocatorSpec, get_allocator, register_allocator

__all__ = ["ALLOCATORS", "Allocation", "AllocationContext", "AllocatorSpec", "get_allocator", "register_allocator"]
