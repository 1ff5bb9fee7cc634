"""The pipeline: calibrate -> fit candidates -> allocate -> apply. One direction only."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from windquant.alloc import AllocationProblem, get_allocator
from windquant.alloc.plan import Plan
from windquant.alloc.ppo import PPOConfig
from windquant.alloc.sensitivity import second_moments_and_fisher, sensitivity_scores
from windquant.calib.activations import activation_scales
from windquant.calib.corpus import corpus_tokens, sample_windows
from windquant.config import QuantConfig
from windquant.errors import WindquantError
from windquant.eval.perplexity import perplexity
from windquant.model.stats import unit_features, unit_saliency
from windquant.model.units import Unit, enumerate_units
from windquant.pack.apply import apply_plan, plan_weights
from windquant.quant.accounting import ACCOUNTINGS, ACTIONS
from windquant.quant.cache import CandidateCache, default_cache_dir, fingerprint, tensor_digest, weights_digest
from windquant.quant.unit import FitSettings
from windquant.runinfo import Timings

NEEDS_SCORES = {"ilp"}
NEEDS_PROXY = {"ppo"}


@dataclass
class Prepared:
    """Everything allocators need, computed once per model and settings."""

    units: list[Unit]
    act_scales: dict[str, torch.Tensor]
    saliency: torch.Tensor
    cache: CandidateCache
    config: QuantConfig
    folder: Path | None = None  # this model + settings' folder in the candidate cache
    scores: torch.Tensor | None = None  # [N, A] sensitivity per (unit, applied action)
    features: torch.Tensor | None = None  # [N, 8] static unit statistics (PPO state)
    proxy: Callable[[list[float]], float] | None = None  # requested actions -> proxy perplexity
    proxy_ref: float | None = None  # proxy perplexity of the unquantized model
    proxy_windows: torch.Tensor | None = None  # [samples, len] tokens the proxy scores

    def problem(self, target_bits: float, accounting: str) -> AllocationProblem:
        threshold = self.config.fallback_threshold
        tables = {acc: self.cache.bits_table(acc, threshold) for acc in ACCOUNTINGS}
        applied = [[self.cache.applied(u.index, a, threshold) for a in ACTIONS] for u in self.units]
        costs = None
        if self.scores is not None:
            # A requested action costs what its applied (fallback) action costs.
            cols = torch.tensor([[ACTIONS.index(a) for a in row] for row in applied])
            costs = self.scores.gather(1, cols)
        return AllocationProblem(
            self.units,
            tables[accounting],
            self.saliency,
            target_bits,
            accounting,
            costs,
            applied=torch.tensor(applied, dtype=torch.float64),
            features=self.features,
            all_bits=tables,
        )

    def ppo_dir(self, c: QuantConfig, target_bits: float) -> Path:
        """Where a PPO run keeps checkpoints and logs: named by its settings, so re-running
        the same command with --resume finds them."""
        if c.ppo_dir:
            return Path(c.ppo_dir)
        name = f"{c.accounting}-{target_bits:g}-seed{c.seed}-ep{c.episodes}-proxy{c.proxy_samples}x{c.proxy_len}"
        if c.ppo:
            name += "-" + "-".join(f"{k}{v:g}" for k, v in sorted(c.ppo.items()))
        return (self.folder if self.folder is not None else default_cache_dir()) / "ppo" / name


def fit_settings(config: QuantConfig) -> FitSettings:
    return FitSettings(salient_rate=config.salient, steps=config.steps, lr=config.lr)


def calibration_windows(tokenizer, config: QuantConfig) -> torch.Tensor:
    tokens = corpus_tokens(tokenizer, config.calib, "calib", config.data_dir)
    return sample_windows(tokens, config.calib_samples, config.calib_len, config.seed)


def calibrate(model: nn.Module, tokenizer, config: QuantConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    return activation_scales(model, calibration_windows(tokenizer, config), progress=progress)


@torch.no_grad()
def proxy_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """Perplexity of ``model`` (as it is now) on the proxy windows [samples, len]: the RL reward's pass."""
    return perplexity(model, windows.reshape(-1), ctx=windows.shape[1], batch_size=8, progress=False).ppl


def proxy_evaluator(model: nn.Module, prepared: Prepared, windows: torch.Tensor) -> Callable[[list[float]], float]:
    """Requested actions -> perplexity on ``windows``, assembled from the candidate cache.

    Nothing is refitted or packed: every unit's dequantized weights are already cached,
    so an RL episode costs one forward pass over the proxy tokens.
    """
    threshold = prepared.config.fallback_threshold

    def score(requested: list[float]) -> float:
        applied = [prepared.cache.applied(u.index, a, threshold) for u, a in zip(prepared.units, requested)]
        with plan_weights(model, prepared.units, prepared.cache.weights_of(applied)):
            return proxy_perplexity(model, windows)

    return score


def compute_scores(
    model: nn.Module, windows: torch.Tensor, prepared: Prepared, folder: Path, progress: bool = True
) -> torch.Tensor:
    """Sensitivity table for ``prepared`` (loaded from ``folder`` when already computed)."""
    path = folder / "scores.safetensors"
    if path.is_file():
        return load_file(str(path))["scores"]
    moments, fisher = second_moments_and_fisher(model, windows, progress=progress)
    scores = sensitivity_scores(model, prepared.units, prepared.cache, moments, fisher)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # concurrent runs never share a temp file
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
    need_proxy: bool | None = None,
) -> Prepared:
    """Calibrate and fit (or load) every candidate; sensitivity scores too when ``need_scores``
    and the proxy evaluator when ``need_proxy`` (default: when ``config.allocator`` uses
    them). The model is left untouched."""
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
    folder = cache_root / "candidates" / key
    prepared = Prepared(units, scales, unit_saliency(model, units, scales), cache, config, folder)
    if need_scores is None:
        need_scores = config.allocator in NEEDS_SCORES
    if need_scores:
        with timings.stage("scores"):
            prepared.scores = compute_scores(model, windows, prepared, folder, progress)
    if need_proxy if need_proxy is not None else config.allocator in NEEDS_PROXY:
        with timings.stage("proxy"):
            prepared.features = unit_features(model, units, scales)
            tokens = corpus_tokens(tokenizer, config.calib, "calib", config.data_dir)
            proxy_windows = sample_windows(tokens, config.proxy_samples, config.proxy_len, config.seed)
            prepared.proxy = proxy_evaluator(model, prepared, proxy_windows)
            prepared.proxy_windows = proxy_windows
            prepared.proxy_ref = proxy_perplexity(model, proxy_windows)
    return prepared


def allocator_kwargs(prepared: Prepared, config: QuantConfig, info: dict, progress: bool = True) -> dict:
    """Extra arguments of the configured allocator (the PPO run needs its proxy and folders)."""
    if config.allocator == "uniform":
        return {"action": config.uniform_action}
    if config.allocator in NEEDS_PROXY:
        if prepared.proxy is None:
            raise WindquantError("the ppo allocator needs a proxy evaluator: prepare() with allocator='ppo'")
        target = config.target_bits if config.target_bits is not None else 16.0
        return {
            "proxy": prepared.proxy,
            "ppl_ref": prepared.proxy_ref,
            "config": PPOConfig.from_dict({**(config.ppo or {}), "episodes": config.episodes}),
            "work_dir": prepared.ppo_dir(config, target),
            "seed": config.seed,
            "resume": config.resume,
            "policy": config.policy,
            "progress": progress,
            "info": info,
        }
    return {}


def make_plan(prepared: Prepared, config: QuantConfig, timings: Timings | None = None, progress: bool = True) -> Plan:
    """Run the configured allocator; the Plan records requested and applied actions."""
    timings = timings if timings is not None else Timings()
    allocator_info: dict = {}
    with timings.stage("allocate"):
        allocate = get_allocator(config.allocator)
        target = config.target_bits if config.target_bits is not None else 16.0
        problem = prepared.problem(target, config.accounting)
        if config.uniform_action is None:
            problem.check_feasible()
        requested = allocate(problem, **allocator_kwargs(prepared, config, allocator_info, progress))
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
        info={"config": asdict(config), **({config.allocator: allocator_info} if allocator_info else {})},
    )


def apply(model: nn.Module, prepared: Prepared, plan: Plan, timings: Timings | None = None) -> nn.Module:
    timings = timings if timings is not None else Timings()
    with timings.stage("apply"):
        return apply_plan(model, plan, lambda i, a: prepared.cache.packed[(i, a)])


def quantize_(model: nn.Module, tokenizer, config: QuantConfig, progress: bool = True) -> tuple[Plan, Timings]:
    """Quantize ``model`` in place under ``config``; returns the Plan and stage timings."""
    timings = Timings()
    prepared = prepare(model, tokenizer, config, timings, progress)
    plan = make_plan(prepared, config, timings, progress)
    apply(model, prepared, plan, timings)
    return plan, timings
