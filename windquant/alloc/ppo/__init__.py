"""The WINDQuant reinforcement-learning allocator (paper §3.2-3.4): gymnasium env + PPO, and a
refinement mode (``mode="refine"``: PPO over budget-neutral changes to ilp's plan).

Registered here; the training stack (torch, gymnasium) is imported only when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from windquant.alloc.base import Allocation, AllocationContext, register_allocator
from windquant.alloc.ppo.config import PPOConfig

if TYPE_CHECKING:
    from windquant.alloc.problem import AllocationProblem


@register_allocator(
    "ppo",
    PPOConfig,
    needs=("features", "proxy", "scores"),
    help="the paper's PPO controller (§3.2-3.4), or PPO refining ilp's plan on the real proxy",
)
def allocate(problem: AllocationProblem, config: PPOConfig, ctx: AllocationContext) -> Allocation:
    """Train (or reuse ``config.policy``) and return the best budget-meeting plan."""
    from windquant.alloc.ppo.refine import refine_ppo
    from windquant.alloc.ppo.train import train_ppo

    refine = config.validate().mode == "refine"
    stored, heldout = refine and config.refine_proxy == "stored", config.proxy_windows == "heldout"
    proxy = ctx.proxy(config.proxy_samples, config.proxy_len, stored, heldout)
    work_dir = Path(config.work_dir) if config.work_dir else ctx.work_dir
    if not refine:
        return train_ppo(problem, proxy, config, work_dir, ctx.seed, ctx.progress)
    # the validation windows come after the proxy's: no window is in both
    validation = (
        ctx.proxy(config.refine_validate, config.proxy_len, stored, heldout, config.proxy_samples)
        if config.refine_validate
        else None
    )
    return refine_ppo(problem, proxy, config, work_dir, ctx.seed, ctx.progress, validation)


__all__ = ["PPOConfig", "allocate"]
