"""Apply a Plan: swap block linears for QuantLinear modules filled from packed candidates."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from windquant.model.units import Unit
from windquant.pack.qlinear import QuantLinear
from windquant.plan import Plan

PackedLookup = Callable[[int, float], dict[str, torch.Tensor]]


class PlanChunk(NamedTuple):
    """One unit of a plan as its linear stores it."""

    col0: int
    col1: int
    action: float  # applied
    index: int  # unit index (also the seed of its rotation signs)
    rotate: bool  # the unit's rotate setting (``quant.rotation.rotates`` decides per width and action)


def module_chunks(plan: Plan) -> dict[str, list[PlanChunk]]:
    """Module name -> its plan chunks in column order."""
    return chunks_by_module(plan.units, plan.applied, plan.rotate_flags())


def chunks_by_module(units: list[Unit], applied: list[float], rotate: list[bool]) -> dict[str, list[PlanChunk]]:
    """Module name -> the chunks of ``units`` at their ``applied`` actions, in column order."""
    chunks: dict[str, list] = defaultdict(list)
    for u, a, r in zip(units, applied, rotate):
        chunks[u.module].append(PlanChunk(u.col0, u.col1, a, u.index, r))
    return {m: sorted(c) for m, c in chunks.items()}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def build_quant_linears(model: nn.Module, plan: Plan, dense_cache: bool = False) -> dict[str, QuantLinear]:
    """Empty QuantLinear modules shaped for ``plan``, installed in ``model``."""
    made = {}
    for name, chunks in module_chunks(plan).items():
        old = model.get_submodule(name)
        layout = [(c.col0, c.col1, c.action, c.rotate) for c in chunks]
        q = QuantLinear(old.in_features, old.out_features, layout, plan.salient_rate, old.bias is not None, dense_cache)
        set_submodule(model, name, q)
        made[name] = q
    return made


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan, packed_of: PackedLookup, dense_cache: bool = False) -> nn.Module:
    """Quantize ``model`` in place: what it computes afterwards is exactly what gets stored.

    Untouched floating tensors (embeddings, norms) are rounded to fp16, the dtype the
    checkpoint stores them in, so the in-memory and reloaded models agree bit for bit.
    ``dense_cache``: each linear keeps its dequantized weight after its first forward (faster
    for a model scored on many windows, with the memory of a dense copy); same values.
    """
    biases = {name: model.get_submodule(name).bias for name in module_chunks(plan)}
    for name, q in build_quant_linears(model, plan, dense_cache).items():
        for k, c in enumerate(module_chunks(plan)[name]):
            q.set_chunk(k, packed_of(c.index, c.action))
        if biases[name] is not None:
            q.bias.copy_(biases[name].detach().half().float())
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.half().to(p.dtype)
    return model


@contextmanager
def plan_weights(model: nn.Module, units: list[Unit], weight_of: Callable[[Unit], torch.Tensor]):
    """Temporarily give every block linear the dequantized weights of a plan.

    This is how allocators score a plan cheaply: the candidate cache already holds each
    unit's dequantized weights, so no quantizer is refitted and nothing is packed.
    """
    originals = {}
    for u in units:
        lin = model.get_submodule(u.module)
        if u.module not in originals:
            originals[u.module] = lin.weight.data
            lin.weight.data = lin.weight.data.clone()
        lin.weight.data[:, u.col0 : u.col1] = weight_of(u).to(lin.weight.dtype)
    try:
        yield model
    finally:
        for name, data in originals.items():
            model.get_submodule(name).weight.data = data
