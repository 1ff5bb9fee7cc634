"""What an allocator sees: per-unit costs and statistics, never the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from windquant.errors import WindquantError
from windquant.model.units import Unit
from windquant.quant.accounting import ACTIONS

MAX_TARGET = 16.0


@dataclass
class AllocationProblem:
    units: list[Unit]
    bits: torch.Tensor  # [N, A] bits of unit i at requested ACTIONS[a] (after fallback)
    saliency: torch.Tensor  # [N] mean |w|·s_act
    target_bits: float  # average bits per weight on ``accounting``
    accounting: str
    costs: torch.Tensor | None = None  # [N, A] sensitivity of unit i at requested ACTIONS[a]
    applied: torch.Tensor | None = None  # [N, A] action the engine applies for requested ACTIONS[a]
    features: torch.Tensor | None = None  # [N, 8] static unit statistics (model.stats.unit_features)
    all_bits: dict[str, torch.Tensor] | None = None  # accounting -> [N, A] bits table (for reports)

    @property
    def n_weights(self) -> int:
        return sum(u.n_weights for u in self.units)

    @property
    def budget(self) -> float:
        """Total bits allowed."""
        return self.target_bits * self.n_weights

    def total_bits(self, actions: list[float]) -> float:
        idx = torch.tensor([ACTIONS.index(a) for a in actions])
        return float(self.bits.gather(1, idx[:, None]).sum())

    def average_bits(self, actions: list[float]) -> float:
        return self.total_bits(actions) / self.n_weights

    def cheapest_average(self) -> float:
        return float(self.bits.min(dim=1).values.sum()) / self.n_weights

    def check_feasible(self) -> None:
        lo = self.cheapest_average()
        if not (0 < self.target_bits <= MAX_TARGET):
            raise WindquantError(
                f"--target-bits {self.target_bits:g} is out of range; give a value between {lo:.3f} and {MAX_TARGET:g}"
            )
        if self.target_bits < lo - 1e-9:
            raise WindquantError(
                f"--target-bits {self.target_bits:g} is below the cheapest possible plan ({lo:.3f} {self.accounting} bits "
                f"per weight at this chunk and salient rate); raise it to at least {lo:.3f}"
            )
