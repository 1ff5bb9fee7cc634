"""The allocator protocol: one module per allocator, one config, one signature, declared needs.

An allocator is a function registered with its config dataclass and what it needs::

    @register_allocator("heuristic", HeuristicConfig, help="...")
    def allocate(problem: AllocationProblem, config: HeuristicConfig, ctx: AllocationContext) -> Allocation:
        ...

``needs`` names what the pipeline must provide beyond bits and saliency: ``"scores"``
(``problem.costs``, the per-unit sensitivity table), ``"features"`` (``problem.features``, static
unit statistics), ``"proxy"`` (``ctx.proxy``, a callable scoring a plan on the real model) and
``"reconstruction"`` (``ctx.reconstruction``: each decoder block's output error on its
teacher-forced inputs for any weights of its units).
The pipeline reads ``needs`` and never switches on an allocator's name; an allocator never sees
the model. Adding one = one module + one import line in ``alloc/__init__.py`` + its tests.

This module imports nothing heavy: the CLI reads the registry to build its flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from windquant.errors import WindquantError

if TYPE_CHECKING:
    import torch

    from windquant.alloc.problem import AllocationProblem

NEEDS = frozenset({"scores", "features", "proxy", "reconstruction"})


@dataclass
class Allocation:
    """What an allocator returns."""

    requested: list[float]  # one action per unit, in model order
    info: dict = field(default_factory=dict)  # run summary, stored in plan.json under the allocator's name
    files: list[Path] = field(default_factory=list)  # files it wrote that belong in the checkpoint
    variant: list[bool] | None = None  # per unit: stored the other way (``problem.variant``); None: all default


class Proxy(Protocol):
    """Scores a plan on the real model (built by the pipeline from the candidate cache)."""

    reference: float  # perplexity of the unquantized model on the same tokens

    def __call__(self, requested: list[float]) -> float:  # requested actions -> perplexity
        ...


class BlockTask(Protocol):
    """One decoder block, teacher-forced: its units' candidates and its output error."""

    units: list[int]  # indices of the block's units, in model order
    candidates: list[torch.Tensor]  # per unit: [A, out, cols] float32 weights applied for each requested action
    columns: dict[str, list[int]]  # per linear (weight name inside the block): its units' positions in ``units``, column order
    batches: int  # calibration batches ``loss`` can be asked for

    def loss(self, weights: list[torch.Tensor], batch: int) -> torch.Tensor:
        """Differentiable error of the block's output when its units have ``weights`` (one per
        unit), against the unquantized block's, on calibration batch ``batch``: Σ_c F_c Δy_c² per
        token, F the mean squared gradient of the model's loss at the block output (nats, as the
        sensitivity scores)."""
        ...


class Reconstruction(Protocol):
    """The model's decoder blocks one at a time, in order (built by the pipeline)."""

    layers: int

    def block(self, layer: int) -> BlockTask: ...


@dataclass
class AllocationContext:
    """What the pipeline gives an allocator besides the problem."""

    work_dir: Path  # a folder for its files (checkpoints, logs), named by the run's settings
    seed: int = 0
    progress: bool = True
    # (samples, tokens per sample, stored, heldout, skip) -> Proxy, with need "proxy". stored: it
    # scores the weights the engine stores (errors carried when the fit carries) rather than the
    # cache's candidates; heldout: on calibration-corpus windows that no calibration window
    # overlaps; skip: after the first ``skip`` of those windows (a second, disjoint set)
    proxy: Callable[..., Proxy] | None = None
    reconstruction: Callable[[int], Reconstruction] | None = (
        None  # (windows per batch) -> Reconstruction, with need "reconstruction"
    )


AllocateFn = Callable[["AllocationProblem", Any, AllocationContext], Allocation]


@dataclass(frozen=True)
class AllocatorSpec:
    name: str
    allocate: AllocateFn
    config: type  # its config dataclass (paper values as defaults)
    needs: frozenset[str]
    help: str


ALLOCATORS: dict[str, AllocatorSpec] = {}


def register_allocator(
    name: str, config: type, needs: tuple[str, ...] = (), help: str = ""
) -> Callable[[AllocateFn], AllocateFn]:
    """Decorator registering ``allocate`` under ``name``."""
    unknown = set(needs) - NEEDS
    if unknown:
        raise ValueError(f"allocator {name!r} declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")

    def register(allocate: AllocateFn) -> AllocateFn:
        ALLOCATORS[name] = AllocatorSpec(name, allocate, config, frozenset(needs), help)
        return allocate

    return register


def get_allocator(name: str) -> AllocatorSpec:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise WindquantError(f"unknown allocator {name!r}; choose one of: {', '.join(ALLOCATORS)}", setting="allocator") from None
