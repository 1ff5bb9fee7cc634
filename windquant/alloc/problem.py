"""What an allocator sees: per-unit costs and statistics, never the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from windquant.actions import ACTIONS, below_floor_error, within_budget
from windquant.errors import WindquantError
from windquant.model.units import Unit


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

    def fits(self, total_bits: float) -> bool:
        return within_budget(total_bits, self.budget)

    def cheapest_average(self) -> float:
        return float(self.bits.min(dim=1).values.sum()) / self.n_weights

    def check_plan(self, requested: list[float], allocator: str) -> None:
        """Every allocator's answer passes here: one valid action per unit, within the budget."""
        if len(requested) != len(self.units) or any(a not in ACTIONS for a in requested):
            raise WindquantError(f"the {allocator} allocator returned {len(requested)} actions for {len(self.units)} units (or unknown actions)")
        if not self.fits(self.total_bits(requested)):
            raise WindquantError(
                f"the {allocator} allocator's plan needs {self.average_bits(requested):.3f} {self.accounting} bits per weight, "
                f"above target_bits {self.target_bits:g}",
                setting="target_bits",
            )

    def check_feasible(self) -> None:
        lo = self.cheapest_average()
        if not self.fits(lo * self.n_weights):
            raise below_floor_error(self.target_bits, lo, self.accounting, "the cheapest possible plan at this chunk and salient rate")
