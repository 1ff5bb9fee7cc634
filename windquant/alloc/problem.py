"""What an allocator sees: per-unit costs and statistics, never the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from windquant.actions import ACTIONS, below_floor_error, bits_name, canonical_accounting, within_budget
from windquant.errors import WindquantError
from windquant.model.units import Unit


@dataclass
class StorageVariant:
    """Every unit's other outlier storage (``FitConfig.storage_variants``): the same tables as the
    problem's for units stored with rotate setting ``rotate``. An allocator that can weigh it
    (ilp) chooses per unit; the others ignore it and every unit keeps the default storage."""

    rotate: bool
    bits: torch.Tensor  # [N, A] on the problem's accounting
    costs: torch.Tensor | None  # [N, A], present when the problem's costs are


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
    variant: StorageVariant | None = None  # the other outlier storage, when it was fitted

    def __post_init__(self):
        self.accounting = canonical_accounting(self.accounting)  # "true": the old name of "stored"

    @property
    def n_weights(self) -> int:
        return sum(u.n_weights for u in self.units)

    @property
    def budget(self) -> float:
        """Total bits allowed."""
        return self.target_bits * self.n_weights

    def total_bits(self, actions: list[float], variant: list[bool] | None = None) -> float:
        """Bits of a plan; ``variant[i]`` marks the units stored the other way (``self.variant``)."""
        idx = torch.tensor([ACTIONS.index(a) for a in actions])[:, None]
        bits = self.bits.gather(1, idx)[:, 0]
        if variant is not None and any(variant):
            bits = torch.where(torch.tensor(variant), self.variant.bits.gather(1, idx)[:, 0], bits)
        return float(bits.sum())

    def average_bits(self, actions: list[float], variant: list[bool] | None = None) -> float:
        return self.total_bits(actions, variant) / self.n_weights

    def fits(self, total_bits: float) -> bool:
        return within_budget(total_bits, self.budget)

    def cheapest_average(self) -> float:
        return float(self.bits.min(dim=1).values.sum()) / self.n_weights

    def check_plan(self, requested: list[float], allocator: str, variant: list[bool] | None = None) -> None:
        """Every allocator's answer passes here: one valid action per unit, within the budget."""
        if len(requested) != len(self.units) or any(a not in ACTIONS for a in requested):
            raise WindquantError(
                f"the {allocator} allocator returned {len(requested)} actions for {len(self.units)} units (or unknown actions)"
            )
        if variant is not None and (self.variant is None or len(variant) != len(self.units)):
            raise WindquantError(
                f"the {allocator} allocator chose storage variants, but none were fitted for these {len(self.units)} units"
            )
        if not self.fits(self.total_bits(requested, variant)):
            raise WindquantError(
                f"the {allocator} allocator's plan needs {self.average_bits(requested, variant):.3f} {bits_name(self.accounting)} bits per weight, "
                f"above target_bits {self.target_bits:g}",
                setting="target_bits",
            )

    def check_feasible(self) -> None:
        lo = self.cheapest_average()
        if not self.fits(lo * self.n_weights):
            raise below_floor_error(
                self.target_bits, lo, self.accounting, "the cheapest possible plan at this chunk and salient rate"
            )
