"""The pipeline: calibrate -> fit candidates -> allocate -> apply. One direction only."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from windquant.alloc import AllocationProblem, get_allocator
from windquant.alloc.plan import Plan
from windquant.alloc.sensitivity import second_moments_and_fisher, sensitivity_scores
from windquant.calib.activations import activation_scales
from windquant.calib.corpus import corpus_tokens, sample_windows
from windquant.config import QuantConfig
from windquant.model.stats import unit_saliency
from windquant.model.units import Unit, enumerate_units
from windquant.pack.apply import apply_plan
from windquant.quant.accounting import ACTIONS
from windquant.quant.cache import CandidateCache, default_cache_dir, fingerprint, tensor_digest, weights_digest
from windquant.quant.unit import FitSettings
from windquant.runinfo import Timings

NEEDS_SCORES = {"ilp"}


@dataclass
class Prepared:
    """Everything allocators need, computed once per model and settings."""

    units: list[Unit]
    act_scales: dict[str, torch.Tensor]
    saliency: torch.Tensor
    cache: CandidateCache
    config: QuantConfig
    scores: torch.Tensor | None = None  # [N, A] sensitivity per (unit, applied action)

    def problem(self, target_bits: float, accounting: str) -> AllocationProblem:
        threshold = self.config.fallback_threshold
        bits = self.cache.bits_table(accounting, threshold)
        costs = None
        if self.scores is not None:
            # A requested action costs what its applied (fallback) action costs.
            applied = [[ACTIONS.index(self.cache.applied(u.index, a, threshold)) for a in ACTIONS] for u in self.units]
            costs = self.scores.gather(1, torch.tensor(applied))
        return AllocationProblem(self.units, bits, self.saliency, target_bits, accounting, costs)


def fit_settings(config: QuantConfig) -> FitSettings:
    return FitSettings(salient_rate=config.salient, steps=config.steps, lr=config.lr)


def calibration_windows(tokenizer, config: QuantConfig) -> torch.Tensor:
    tokens = corpus_tokens(tokenizer, config.calib, "calib", config.data_dir)
    return sample_windows(tokens, config.calib_samples, config.calib_len, config.seed)


def calibrate(model: nn.Module, tokenizer, config: QuantConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    return activation_scales(model, calibration_windows(tokenizer, config), progress=progress)


def compute_scores(
    model: nn.Module, windows: torch.Tensor, prepared: Prepared, folder: Path, progress: bool = True
) -> torch.Tensor:
    """Sensitivity table for ``prepared`` (loaded from ``folder`` when already computed)."""
    path = folder / "scores.safetensors"
    if path.is_file():
        return load_file(str(path))["scores"]
    moments, fisher = second_moments_and_fisher(model, windows, progress=progress)
    scores = sensitivity_scores(model, prepared.units, prepared.cache, moments, fisher)
    tmp = path.with_suffix(".tmp")
    save_file({"scores": scores}, str(tmp), metadata={"actions": ",".join(f"{a:g}" for a in ACTIONS)})
    os.replace(tmp, path)
    return scores


def prepare(
    model: nn.Module,
    tokenizer,
    config: QuantConfig,
    timings: Timings | None = None,
    progress: bool = True,
    need_scores: bool | None = None,
) -> Prepared:
    """Calibrate and fit (or load) every candidate; sensitivity scores too when ``need_scores``
    (default: when ``config.allocator`` uses them). The model is left untouched."""
    config.validate()
    timings = timings if timings is not None else Timings()
    units = enumerate_units(model, config.chunk)
    with timings.stage("calibrate"):
        windows = calibration_windows(tokenizer, config)
        scales = activation_scales(model, windows, progress=progress)
    with timings.stage("fit"):
        settings = fit_settings(config)
        cache_root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        calib_key = tensor_digest([scales[k] for k in sorted(scales)])
        key = fingerprint(weights_digest(model), calib_key, config.chunk, settings)
        cache = CandidateCache.build(model, units, scales, settings, cache_root, key, progress)
    prepared = Prepared(units, scales, unit_saliency(model, units, scales), cache, config)
    if need_scores is None:
        need_scores = config.allocator in NEEDS_SCORES
    if need_scores:
        with timings.stage("scores"):
            prepared.scores = compute_scores(model, windows, prepared, cache_root / "candidates" / key, progress)
    return prepared


def make_plan(prepared: Prepared, config: QuantConfig, timings: Timings | None = None) -> Plan:
    """Run the configured allocator; the Plan records requested and applied actions."""
    timings = timings if timings is not None else Timings()
    with timings.stage("allocate"):
        allocate = get_allocator(config.allocator)
        target = config.target_bits if config.target_bits is not None else 16.0
        problem = prepared.problem(target, config.accounting)
        kwargs = {"action": config.uniform_action} if config.allocator == "uniform" else {}
        if config.uniform_action is None:
            problem.check_feasible()
        requested = allocate(problem, **kwargs)
        applied = [prepared.cache.applied(u.index, a, config.fallback_threshold) for u, a in zip(prepared.units, requested)]
    return Plan(
        allocator=config.allocator,
        accounting=config.accounting,
        target_bits=config.target_bits,
        chunk=config.chunk,
        salient_rate=config.salient,
        fallback_threshold=config.fallback_threshold,
        units=prepared.units,
        requested=requested,
        applied=applied,
        info={"config": asdict(config)},
    )


def apply(model: nn.Module, prepared: Prepared, plan: Plan, timings: Timings | None = None) -> nn.Module:
    timings = timings if timings is not None else Timings()
    with timings.stage("apply"):
        return apply_plan(model, plan, lambda i, a: prepared.cache.packed[(i, a)])


def quantize_(model: nn.Module, tokenizer, config: QuantConfig, progress: bool = True) -> tuple[Plan, Timings]:
    """Quantize ``model`` in place under ``config``; returns the Plan and stage timings."""
    timings = Timings()
    prepared = prepare(model, tokenizer, config, timings, progress)
    plan = make_plan(prepared, config, timings)
    apply(model, prepared, plan, timings)
    return plan, timings
