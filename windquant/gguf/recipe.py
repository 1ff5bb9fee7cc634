"""A GGUF recipe: one tensor type per block linear, the exact multiple-choice knapsack on our
sensitivity costs under a bits-per-weight target.

The cost of storing linear ``t`` as type ``τ`` is the sensitivity score of :mod:`windquant.quant.
sensitivity` applied to the whole tensor: ``F_t · tr(ΔW M ΔWᵀ)``, with ``ΔW`` the difference between
the reference weights and the type's real round trip (llama.cpp's quantizer with our importance
matrix, or gguf-py's), ``M = E[x xᵀ]`` the layer input's second moment and ``F_t`` the mean squared
gradient at the layer's output. Sizes are the types' real bytes (:mod:`.types`), so the target
counts scales as llama.cpp does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType

from windquant.errors import WindquantError
from windquant.gguf.types import bits_per_weight, tensor_bytes

ALL_TYPES = "all types"
NO_COARSE = "no coarse types"


def trace_cost(weights: np.ndarray, approx: np.ndarray, moment: torch.Tensor) -> float:
    """``tr(ΔW M ΔWᵀ)`` with ``ΔW = weights − approx`` ([rows, cols]) and ``M`` [cols, cols]."""
    delta = torch.from_numpy(np.asarray(weights, dtype=np.float64) - np.asarray(approx, dtype=np.float64))
    return float(((delta @ moment.double()) * delta).sum())


@dataclass
class TensorOptions:
    """One block linear and the types it may take, each with its cost."""

    name: str
    rows: int
    cols: int
    costs: dict[GGMLQuantizationType, float] = field(default_factory=dict)

    def size(self, qtype: GGMLQuantizationType) -> int:
        return tensor_bytes(qtype, self.rows, self.cols)

    def only(self, keep: Callable[[GGMLQuantizationType, float], bool]) -> TensorOptions:
        """The same tensor with only the (type, cost) options ``keep`` accepts."""
        return TensorOptions(self.name, self.rows, self.cols, {t: c for t, c in self.costs.items() if keep(t, c)})


def choose(costs: list[list[float]], sizes: list[list[int]], budget: int) -> list[int]:
    """The exact multiple-choice knapsack: one option per item, total size ≤ ``budget``, least
    total cost. Returns each item's option index; solved as a 0/1 integer program by HiGHS."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if sum(min(s) for s in sizes) > budget:
        raise WindquantError("the budget is below the cheapest choice")
    n = sum(len(c) for c in costs)
    scale = max((abs(x) for row in costs for x in row), default=1.0) or 1.0
    c = np.array([x / scale for row in costs for x in row])
    one_each = np.zeros((len(costs), n))
    start = 0
    for i, row in enumerate(costs):
        one_each[i, start : start + len(row)] = 1
        start += len(row)
    size_row = np.array([float(x) for row in sizes for x in row])[None, :]
    res = milp(
        c,
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(size_row, -np.inf, budget)],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if res.x is None:
        raise WindquantError(f"the type knapsack found no solution: {res.message}")
    picks, start = [], 0
    for row in costs:
        picks.append(int(np.argmax(res.x[start : start + len(row)])))
        start += len(row)
    return picks


@dataclass
class Recipe:
    """The chosen type of every block linear and what it adds up to."""

    types: dict[str, GGMLQuantizationType]
    linear_bytes: int
    linear_weights: int
    cost: float
    target_bpw: float

    @property
    def bpw(self) -> float:
        """Bits per weight of the block linears, scales included."""
        return 8 * self.linear_bytes / self.linear_weights

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        return dict(sorted(counts.items()))

    def tensor_type_lines(self) -> str:
        """llama-quantize's ``--tensor-type-file``: one exact-name pattern per tensor."""
        return "".join(f"^{name.replace('.', chr(92) + '.')}$={t.name.lower()}\n" for name, t in self.types.items())

    def to_json(self) -> dict:
        return {
            "target_bpw": self.target_bpw,
            "linear_bpw": self.bpw,
            "linear_bytes": self.linear_bytes,
            "linear_weights": self.linear_weights,
            "predicted_cost": self.cost,
            "type_counts": self.type_counts(),
            "types": {name: t.name for name, t in self.types.items()},
        }


def floor_bpw(options: list[TensorOptions]) -> float:
    """Bits per weight of the block linears with every tensor at its smallest option."""
    return sum(min(o.size(t) for t in o.costs) for o in options) * 8 / sum(o.rows * o.cols for o in options)


def make_recipe(options: list[TensorOptions], target_bpw: float) -> Recipe:
    """The least-cost type per tensor with the block linears' bits per weight ≤ ``target_bpw``."""
    weights = sum(o.rows * o.cols for o in options)
    floor = floor_bpw(options)
    if target_bpw + 1e-9 < floor:
        raise WindquantError(
            f"--target-bits {target_bpw:g} is below the cheapest valid types ({floor:.4f} bits per weight); "
            f"give at least {math.ceil(floor * 1000) / 1000:g} or allow cheaper --types"
        )
    chosen = knapsack_types(options, lambda o, t: o.costs[t], int(math.floor(target_bpw * weights / 8 + 1e-6)))
    return recipe_of(options, chosen, target_bpw)


def without_source_grids(options: list[TensorOptions]) -> tuple[list[TensorOptions], int]:
    """``options`` without the types that reproduce the source file's own quantization, and how
    many (tensor, type) options that removed. A source GGUF stored as Q4_1 (as SmolLM2's package
    ships) round-trips through Q4_1 on the same blocks almost exactly, so the knapsack would take
    such tensors for free; a model converted from 16-bit weights offers no such type. The test is
    per tensor: a type of fewer bits than Q8_0 that costs no more than Q8_0 can only be
    re-finding the grid the tensor was stored on. Tensors without a Q8_0 cost are kept as they are."""
    q8_bits = bits_per_weight(GGMLQuantizationType.Q8_0)
    kept = []
    for o in options:
        q8 = o.costs.get(GGMLQuantizationType.Q8_0)
        kept.append(o.only(lambda t, c, q8=q8: q8 is None or bits_per_weight(t) >= q8_bits or c > q8))
    return kept, sum(len(o.costs) for o in options) - sum(len(o.costs) for o in kept)


def candidate_recipes(options: list[TensorOptions], target_bpw: float, coarse_bpw: float) -> dict[str, Recipe]:
    """The knapsack's recipe over every option (:data:`ALL_TYPES`) and, when it uses a type under
    ``coarse_bpw`` bits per weight and the target can be met without such types, the knapsack's
    recipe without them (:data:`NO_COARSE`). The costs add tensor by tensor, so they underrate
    several coarse tensors together: on SmolLM2 at IQ3_XXS's 4.14 bpw the first recipe (8 tensors
    at 2-bit types) scored worse on held-out text than the second (benchmarks/HISTORY.md). Which
    one to keep is for a measurement to decide (:func:`windquant.gguf.build.check_recipes`)."""
    plans = {ALL_TYPES: make_recipe(options, target_bpw)}
    if all(bits_per_weight(t) >= coarse_bpw for t in plans[ALL_TYPES].types.values()):
        return plans
    fine = [o.only(lambda t, _c: bits_per_weight(t) >= coarse_bpw) for o in options]
    if all(o.costs for o in fine) and floor_bpw(fine) <= target_bpw + 1e-9:
        plans[NO_COARSE] = make_recipe(fine, target_bpw)
    return plans


def knapsack_types(
    options: list[TensorOptions], cost: Callable[[TensorOptions, GGMLQuantizationType], float], budget_bytes: int
) -> dict[str, GGMLQuantizationType]:
    """The least-``cost`` type per tensor (among its options) with total bytes ≤ ``budget_bytes``."""
    kinds = [list(o.costs) for o in options]
    picks = choose(
        [[cost(o, t) for t in k] for o, k in zip(options, kinds, strict=True)],
        [[o.size(t) for t in k] for o, k in zip(options, kinds, strict=True)],
        budget_bytes,
    )
    return {o.name: k[p] for o, k, p in zip(options, kinds, picks, strict=True)}


def recipe_of(options: list[TensorOptions], types: dict[str, GGMLQuantizationType], target_bpw: float) -> Recipe:
    """The recipe of one type per tensor: its bytes, weights and summed cost."""
    return Recipe(
        types=types,
        linear_bytes=sum(o.size(types[o.name]) for o in options),
        linear_weights=sum(o.rows * o.cols for o in options),
        cost=sum(o.costs[types[o.name]] for o in options),
        target_bpw=target_bpw,
    )
