"""The WINDQuant reinforcement-learning allocator (paper §3.2-3.4): gymnasium env + PPO."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from windquant.alloc.ppo.config import PPOConfig
from windquant.alloc.ppo.train import PPOResult, train_ppo
from windquant.alloc.problem import AllocationProblem
from windquant.errors import WindquantError


def allocate_ppo(
    problem: AllocationProblem,
    proxy: Callable[[list[float]], float] | None = None,
    ppl_ref: float | None = None,
    config: PPOConfig | None = None,
    work_dir: str | Path | None = None,
    seed: int = 0,
    resume: bool = False,
    policy: str | Path | None = None,
    progress: bool = True,
    info: dict | None = None,
) -> list[float]:
    """Requested action per unit from a PPO run; ``info`` receives the run's summary."""
    if proxy is None or ppl_ref is None or work_dir is None:
        raise WindquantError("the ppo allocator needs a proxy evaluator; run it through windquant.pipeline")
    result = train_ppo(problem, proxy, ppl_ref, config or PPOConfig(), Path(work_dir), seed, resume, policy, progress)
    if info is not None:
        info.update(result.info)
    return result.requested


__all__ = ["PPOConfig", "PPOResult", "allocate_ppo", "train_ppo"]
