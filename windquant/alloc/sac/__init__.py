"""RAMP-style allocator: discrete Soft Actor-Critic choosing one precision per linear layer from
an 11-dim layer embedding, with zero-shot transfer of a trained policy to another model.

Registered here; the training stack (torch) is imported only when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from windquant.alloc.base import Allocation, AllocationContext, register_allocator
from windquant.alloc.sac.config import SACConfig

if TYPE_CHECKING:
    from windquant.alloc.problem import AllocationProblem


@register_allocator(
    "sac",
    SACConfig,
    needs=("features", "proxy", "scores"),
    help="RAMP: SAC picks one precision per linear layer from an 11-dim layer embedding; --sac-policy transfers zero-shot",
)
def allocate(problem: AllocationProblem, config: SACConfig, ctx: AllocationContext) -> Allocation:
    from windquant.alloc.sac.train import train_sac

    proxy = ctx.proxy(config.proxy_samples, config.proxy_len, False, False)
    work_dir = Path(config.work_dir) if config.work_dir else ctx.work_dir
    return train_sac(problem, proxy, config, work_dir, ctx.seed, ctx.progress)


__all__ = ["SACConfig", "allocate"]
