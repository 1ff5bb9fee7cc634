"""The pipeline: calibrate -> fit candidates -> allocate -> apply -> pack. One direction only.

It never names an allocator: it reads what the chosen one declares it needs (``alloc.base``)
and provides exactly that. Library entry points: :func:`prepare`, :func:`make_plan`,
:func:`write_checkpoint` and, torchao-style, :func:`quantize_`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from windquant.actions import ACCOUNTINGS, ACTIONS, bits_name, canonical_accounting
from windquant.alloc import AllocationContext, get_allocator
from windquant.alloc.problem import AllocationProblem, StorageVariant
from windquant.calib.corpus import (
    calib_parts,
    corpus_tokens,
    disjoint_windows,
    sample_windows,
    split_evenly,
    window_bos,
    window_starts,
)
from windquant.calib.selfgen import SPARE_SEQUENCES, pick, self_tokens
from windquant.calib.statistics import CalibrationStats, head_input_moment, layer_fisher
from windquant.config import FitConfig, PlanConfig, settings_digest
from windquant.errors import WindquantError
from windquant.eval.perplexity import perplexity
from windquant.files import atomic_write_json
from windquant.model.stats import unit_features, unit_saliency
from windquant.model.units import Unit, enumerate_units
from windquant.pack.apply import PlanChunk, apply_plan, chunks_by_module, module_chunks, plan_weights
from windquant.pack.checkpoint import save
from windquant.pack.embedding import quantized_rows
from windquant.pack.tune import TuneSettings, tune_scales
from windquant.plan import Plan
from windquant.quant.cache import (
    CandidateCache,
    atomic_save_tensors,
    default_cache_dir,
    fingerprint,
    parameters_digest,
    tensor_digest,
)
from windquant.quant.reconstruction import BlockReconstruction
from windquant.quant.row_formats import AUTO, MIXED, RowFormat, resolve_row_format
from windquant.quant.rows import dequantize_rows
from windquant.quant.sensitivity import block_measured, sensitivity_scores
from windquant.quant.streamed import fit_streamed, process_group
from windquant.quant.unit import FitSettings, dequantize_unit, quantize_linear
from windquant.reports import plan_report
from windquant.runinfo import Timings, release_freed_memory

TUNE_HELDOUT_WINDOWS = 4  # calibration-corpus windows (another seed) that stop scale tuning
RESIDUAL_FISHER = "residual_fisher.safetensors"  # beside the candidates: block -> per-channel Fisher
# Calibration windows of the block-measured scores: per-linear totals over 2k tokens are stable
# (the measurement is paired: the same tokens with and without the linear quantized).
BLOCK_SCORE_WINDOWS = 8
# Calibration windows of the backward pass (per-linear and residual-stream Fisher): means of
# squared gradients over 8k tokens.
FISHER_WINDOWS = 32
SCORE_KINDS = ("fisher", "block")  # what --scores auto computes and chooses between
# Held-out calibration-corpus windows on which --scores auto compares the tables' plans.
SCORE_CHECK_WINDOWS = 8


def fit_settings(fit: FitConfig, rotate: bool | None = None) -> FitSettings:
    """The fit settings of ``fit``'s candidates (``rotate``: of its other storage variant)."""
    rotate = fit.rotate if rotate is None else rotate
    return FitSettings(salient_rate=fit.salient, steps=fit.steps, lr=fit.fit_lr, feedback=fit.feedback, rotate=rotate)


def calibration_sources(
    tokenizer, fit: FitConfig, model: nn.Module | None = None, progress: bool = True, heldout: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """(part, tokens) of each part of ``fit.calib`` (``mix+self``: two): a corpus's 1-D token
    ids, or for ``self`` [sequences, calib_len] of text ``model`` wrote: its share of the
    calibration windows or, ``heldout``, other sequences written for held-out windows (only
    when asked for: most runs never need them). Written once, then cached."""
    parts = calib_parts(fit.calib)
    sources = []
    for part, share in zip(parts, split_evenly(fit.calib_samples, len(parts))):
        if part != "self":
            sources.append((part, corpus_tokens(tokenizer, part, "calib", fit.data_dir)))
        elif model is None:
            raise WindquantError(
                "--calib self needs the model to write its text and none was given here; use another --calib for this command"
            )
        else:
            root = Path(fit.cache_dir) if fit.cache_dir else default_cache_dir()
            n, seed = (SPARE_SEQUENCES, 2 * fit.seed + 1) if heldout else (share, 2 * fit.seed)  # two pools, never the same text
            sources.append((part, self_tokens(model, tokenizer, n, fit.calib_len, seed, root, progress)))
    return sources


def calibration_windows(
    tokenizer,
    fit: FitConfig,
    samples: int | None = None,
    length: int | None = None,
    seed: int | None = None,
    model: nn.Module | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """[samples, length] token windows of the calibration corpus (``fit``'s numbers unless
    given), in equal shares from each part of ``fit.calib`` (``model``: for ``self``)."""
    seed = fit.seed if seed is None else seed
    samples, length = samples or fit.calib_samples, length or fit.calib_len
    sources = calibration_sources(tokenizer, fit, model, progress)
    windows = []
    for (part, tokens), k in zip(sources, split_evenly(samples, len(sources))):
        if k:
            windows.append(
                pick(tokens, k, length, seed)
                if part == "self"
                else sample_windows(tokens, k, length, seed, window_bos(tokenizer))
            )
    return torch.cat(windows)


def heldout_windows(tokenizer, fit: FitConfig, samples: int, length: int, model: nn.Module | None = None) -> torch.Tensor:
    """[samples, length] windows of the calibration corpus that overlap no calibration window: a
    score on them is out of sample for everything fitted to the calibration (candidates, carried
    errors, sensitivity scores). Each part of ``fit.calib`` gives its share."""
    sources = calibration_sources(tokenizer, fit, model, heldout=True)
    windows = []
    for (part, tokens), k, c in zip(sources, split_evenly(samples, len(sources)), split_evenly(fit.calib_samples, len(sources))):
        if not k:
            continue
        if part == "self":  # sequences written apart from the calibration ones
            windows.append(pick(tokens, k, length, fit.seed + 1))
        else:
            calib = [(s, s + fit.calib_len) for s in window_starts(tokens.numel(), c, fit.calib_len, fit.seed)]
            windows.append(disjoint_windows(tokens, k, length, fit.seed + 1, calib, window_bos(tokenizer)))
    return torch.cat(windows)


@torch.no_grad()
def proxy_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """Perplexity of ``model`` (as it is now) on the proxy windows [samples, len]: the RL reward's pass."""
    # Two windows a batch: the logits of eight (vocab-sized, with their log-softmax) took 1.2 GB.
    return perplexity(model, windows.reshape(-1), ctx=windows.shape[1], batch_size=2, progress=False).ppl


CARRY_MEMO = 3  # carried versions kept per linear for stored proxies (incumbent, candidate, one more)


@dataclass
class PlanProxy:
    """Requested actions -> perplexity on fixed windows (``alloc.base.Proxy``).

    By default nothing is refitted or packed: every unit's dequantized weights are already in the
    candidate cache, so scoring a plan costs one forward pass over the proxy tokens. A ``stored``
    proxy scores what :func:`apply` stores instead (:meth:`Prepared.stored_weights`).
    """

    prepared: Prepared
    windows: torch.Tensor  # [samples, len]
    reference: float  # perplexity of the unquantized model on ``windows``
    stored: bool = False

    def __call__(self, requested: list[float]) -> float:
        with self.weights(requested):
            return proxy_perplexity(self.prepared.model, self.windows)

    def weights(self, requested: list[float]):
        """Context: the model computes with the weights this proxy scores for ``requested``."""
        return self.prepared.stored_weights(requested) if self.stored else self.prepared.plan_weights(requested)


@dataclass
class VariantCandidates:
    """Every unit fitted with the other outlier storage (``FitConfig.storage_variants``)."""

    cache: CandidateCache
    scores: torch.Tensor | None = None
    score_tables: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Prepared:
    """The model with everything allocators may need, computed once per model and fit settings."""

    model: nn.Module
    tokenizer: object
    fit: FitConfig
    units: list[Unit]
    stats: CalibrationStats
    saliency: torch.Tensor  # [N] mean |w|·s_act
    cache: CandidateCache
    folded: dict[str, float]  # fold producer -> its α (empty: not folded)
    scores: torch.Tensor | None = None  # [N, A] sensitivity per (unit, applied action)
    score_tables: dict[str, torch.Tensor] = field(default_factory=dict)  # every computed kind ("fisher", "block")
    features: torch.Tensor | None = None  # [N, 8] static unit statistics (PPO state)
    proxies: dict[tuple[int, int, bool, bool, int], PlanProxy] = field(default_factory=dict)
    variant: VariantCandidates | None = None  # the other outlier storage, when fitted
    carry_memo: dict[str, OrderedDict] = field(
        default_factory=dict, repr=False
    )  # linear -> its chunks' actions -> {unit: carried weights}

    def caches(self, variant: list[bool] | None = None) -> list[CandidateCache]:
        """Each unit's candidate cache: the default one, or the variant's where ``variant`` says."""
        if variant is None:
            return [self.cache] * len(self.units)
        if self.variant is None:
            raise WindquantError("this plan stores some units with the other outlier storage; prepare with storage_variants on")
        return [self.variant.cache if v else self.cache for v in variant]

    def plan_variant(self, plan: Plan) -> list[bool] | None:
        """Which of ``plan``'s units use the other storage (None: all default)."""
        return None if plan.unit_rotate is None else [r != self.fit.rotate for r in plan.unit_rotate]

    def applied(self, requested: list[float], variant: list[bool] | None = None) -> list[float]:
        """The action the engine applies for each requested one (operator fallback)."""
        threshold = self.fit.fallback_threshold
        return [c.applied(u.index, a, threshold) for u, a, c in zip(self.units, requested, self.caches(variant))]

    def plan_weights(self, requested: list[float], variant: list[bool] | None = None):
        """Context: the model computes with the plan's dequantized weights (from the cache)."""
        applied, caches = self.applied(requested, variant), self.caches(variant)
        return plan_weights(self.model, self.units, lambda u: caches[u.index].weight(u.index, applied[u.index]))

    def stored_weights(self, requested: list[float]):
        """Context: the model computes with the weights :func:`apply` stores for ``requested``
        (default outlier storage, no scale tuning). When the fit carries errors, each linear is
        carried for its own chunks' actions (:func:`carried_modules`) and remembered, so a plan
        that differs from the last ones in a few linears re-carries only those."""
        if not self.fit.carry:
            return self.plan_weights(requested)
        chunks = chunks_by_module(self.units, self.applied(requested), [self.fit.rotate] * len(self.units))
        keys = {m: tuple(c.action for c in cs) for m, cs in chunks.items()}
        missing = {m: cs for m, cs in chunks.items() if keys[m] not in self.carry_memo.get(m, {})}
        packed = carried_modules(self, missing, progress=False)
        for m, cs in missing.items():
            weights = {c.index: dequantize_unit(packed[(c.index, c.action)], c.action, *self.units[c.index].shape) for c in cs}
            self.carry_memo.setdefault(m, OrderedDict())[keys[m]] = weights
        dense = {}
        for m, key in keys.items():
            memo = self.carry_memo[m]
            memo.move_to_end(key)
            dense.update(memo[key])
            while len(memo) > CARRY_MEMO:
                memo.popitem(last=False)
        return plan_weights(self.model, self.units, lambda u: dense[u.index])

    def plan_model(self, plan: Plan, progress: bool = False):
        """Context: the model computes with exactly the weights :func:`apply` stores for ``plan``
        (the cache's candidates, or their carried / tuned versions when the plan says so)."""
        if not (plan.carried or plan.tune_steps):
            return self.plan_weights(plan.requested, self.plan_variant(plan))
        packed = plan_candidates(self, plan, progress)
        dense = {u.index: dequantize_unit(packed[(u.index, a)], a, *u.shape) for u, a in zip(plan.units, plan.applied)}
        return plan_weights(self.model, self.units, lambda u: dense[u.index])

    def ensure(self, needs: Iterable[str], timings: Timings | None = None, progress: bool = True) -> Prepared:
        """Compute what ``needs`` asks for and is not there yet ("proxy" is built on demand)."""
        timings = timings if timings is not None else Timings()
        if "scores" in needs and (self.scores is None or (self.variant is not None and self.variant.scores is None)):
            with timings.stage("scores"):
                self._scores(progress)
        if "proxy" in needs:  # plans are scored by the hundred: keep every candidate dense
            for cache in [self.cache] + ([self.variant.cache] if self.variant else []):
                cache.hold_dense(self.fit.dense_candidates)
        if "features" in needs and self.features is None:
            with timings.stage("features"):
                self.features = unit_features(self.model, self.units, self.stats.act_scales)
        return self

    @property
    def folder(self) -> Path:
        """This model + settings' folder in the candidate cache."""
        return self.cache.folder

    def _scores(self, progress: bool) -> None:
        """Sensitivity tables of the candidates (and of the variant's), each loaded from its cache
        folder when already computed; the backward pass for the Fisher runs at most once. With
        ``scores="auto"`` both tables are kept (``score_tables``) and :func:`make_plan` chooses."""
        fisher: dict[str, float] = {}
        meta = {"actions": ",".join(f"{a:g}" for a in ACTIONS)}
        kinds = SCORE_KINDS if self.fit.scores == "auto" else (self.fit.scores,)

        def tables(cache: CandidateCache) -> dict[str, torch.Tensor]:
            path = cache.folder / "scores.safetensors"
            if path.is_file():
                scores = load_file(str(path))["scores"]
            else:
                if not fisher:
                    fisher.update(self._fisher_pass(progress))
                scores = sensitivity_scores(self.units, cache.traces_table(), fisher)
                atomic_save_tensors({"scores": scores}, path, meta)
            out = {"fisher": scores}
            if "block" not in kinds:
                return out
            path = cache.folder / "scores-block.safetensors"
            if path.is_file():
                out["block"] = load_file(str(path))["scores"]
                return out
            windows = self.stats.windows[:BLOCK_SCORE_WINDOWS]
            # No fallback threshold: each column is measured with that action's own candidates.
            recon = BlockReconstruction(self.model, windows, cache, math.inf, self.residual_fisher(progress), batch_size=8)
            out["block"] = block_measured(scores, recon, progress)
            atomic_save_tensors({"scores": out["block"]}, path, meta)
            return out

        self.score_tables = tables(self.cache)
        self.scores = self.score_tables[kinds[-1]]  # auto: block until a plan's budget chooses
        if self.variant is not None:
            self.variant.score_tables = tables(self.variant.cache)
            self.variant.scores = self.variant.score_tables[kinds[-1]]

    def use_scores(self, kind: str) -> None:
        """Make ``kind``'s table the one allocators see (``score_tables`` holds every computed one)."""
        self.scores = self.score_tables[kind]
        if self.variant is not None:
            self.variant.scores = self.variant.score_tables[kind]

    def proxy(self, samples: int, length: int, stored: bool = False, heldout: bool = False, skip: int = 0) -> PlanProxy:
        """The proxy on ``samples`` windows of ``length`` tokens of the calibration corpus (built
        once): calibration windows, or with ``heldout`` windows the calibration never saw
        (:func:`heldout_windows`, after its first ``skip``: a validation set disjoint from another
        proxy's); it scores the cache's candidates or, ``stored``, the weights :func:`apply`
        stores (``PlanProxy``)."""
        key = (samples, length, stored, heldout, skip)
        if key not in self.proxies:
            twin = self.proxies.get((samples, length, not stored, heldout, skip))  # the same tokens, other weights
            if twin:
                windows, reference = twin.windows, twin.reference
            else:
                if heldout:
                    windows = heldout_windows(self.tokenizer, self.fit, skip + samples, length, self.model)[skip:]
                else:
                    windows = calibration_windows(self.tokenizer, self.fit, skip + samples, length, model=self.model)[skip:]
                reference = proxy_perplexity(self.model, windows)
            self.proxies[key] = PlanProxy(self, windows, reference, stored)
        return self.proxies[key]

    def _fisher_pass(self, progress: bool) -> dict[str, float]:
        """The one backward pass: per-linear Fisher (returned, for the scores) and the residual
        stream's per-channel Fisher at every block output (kept in the cache folder for
        :meth:`reconstruction`, so an allocator that needs both runs the pass once)."""
        residual: dict[int, torch.Tensor] = {}
        fisher = layer_fisher(self.model, self.stats.windows[:FISHER_WINDOWS], progress=progress, residual=residual)
        atomic_save_tensors({str(layer): g for layer, g in residual.items()}, self.folder / RESIDUAL_FISHER, {})
        return fisher

    def residual_fisher(self, progress: bool = True) -> dict[int, torch.Tensor]:
        """Block -> [hidden] mean squared loss gradient per channel and token at its output."""
        path = self.folder / RESIDUAL_FISHER
        if not path.is_file():
            self._fisher_pass(progress)
        return {int(layer): g for layer, g in load_file(str(path)).items()}

    def reconstruction(self, progress: bool = True) -> Callable[[int], BlockReconstruction]:
        """(windows per batch) -> the blocks of the model on the calibration windows, teacher-forced."""
        return lambda batch_size: BlockReconstruction(
            self.model, self.stats.windows, self.cache, self.fit.fallback_threshold, self.residual_fisher(progress), batch_size
        )

    def _tables(self, cache: CandidateCache, scores: torch.Tensor | None, accounting: str):
        """(bits, costs, applied) [N, A] of ``cache``'s candidates per *requested* action."""
        threshold = self.fit.fallback_threshold
        applied = [[cache.applied(u.index, a, threshold) for a in ACTIONS] for u in self.units]
        costs = None
        if scores is not None:
            # A requested action costs what its applied (fallback) action costs.
            cols = torch.tensor([[ACTIONS.index(a) for a in row] for row in applied])
            costs = scores.gather(1, cols)
        return cache.bits_table(accounting, threshold), costs, torch.tensor(applied, dtype=torch.float64)

    def problem(self, target_bits: float, accounting: str) -> AllocationProblem:
        accounting = canonical_accounting(accounting)
        bits, costs, applied = self._tables(self.cache, self.scores, accounting)
        tables = {
            acc: bits if acc == accounting else self.cache.bits_table(acc, self.fit.fallback_threshold) for acc in ACCOUNTINGS
        }
        variant = None
        if self.variant is not None:
            v = self.variant
            v_bits, v_costs, _applied = self._tables(v.cache, v.scores, accounting)
            variant = StorageVariant(not self.fit.rotate, v_bits, v_costs)
        return AllocationProblem(
            self.units,
            bits,
            self.saliency,
            target_bits,
            accounting,
            costs,
            applied=applied,
            features=self.features,
            all_bits=tables,
            variant=variant,
        )

    def work_dir(self, plan: PlanConfig) -> Path:
        """Where an allocator run keeps its files: named by its settings, so re-running the
        same command (e.g. to resume) finds them."""
        digest = settings_digest(plan.allocator_config)
        # The accounting by its bits' name ("true" for stored): the folders runs were written under.
        return (
            self.folder
            / plan.allocator
            / f"{bits_name(plan.accounting)}-{plan.budget_bits:g}-seed{self.allocator_seed(plan)}-{digest}"
        )

    def allocator_seed(self, plan: PlanConfig) -> int:
        return self.fit.seed if plan.seed is None else plan.seed


def needs_of(allocators: Iterable[str]) -> set[str]:
    """Everything the named allocators need together."""
    return set().union(*(get_allocator(a).needs for a in allocators))


def prepare(
    model: nn.Module,
    tokenizer,
    fit: FitConfig | None = None,
    needs: Iterable[str] = (),
    timings: Timings | None = None,
    progress: bool = True,
) -> Prepared:
    """Calibrate, fold scales (when ``fit.fold``), and fit (or load) every candidate, block by
    block (``quant.streamed``), plus whatever ``needs`` names (see ``alloc.base``). Only folding
    changes the model's weights, and it leaves the function the model computes unchanged."""
    fit = (fit or FitConfig()).validate()
    timings = timings if timings is not None else Timings()
    units = enumerate_units(model, fit.chunk)
    with timings.stage("calibrate"):  # the windows' text: tokenizing a corpus, or the model writing its own
        windows = calibration_windows(tokenizer, fit, model=model, progress=progress)
    cache_root = Path(fit.cache_dir) if fit.cache_dir else default_cache_dir()
    digests = parameters_digest(model), tensor_digest([windows])
    # The other outlier storage is a second, independently fingerprinted cache: a warm cache of
    # the default storage stays valid whether or not variants are asked for.
    caches = []
    for rotate in (fit.rotate, not fit.rotate)[: 2 if fit.storage_variants else 1]:
        key = fingerprint(*digests, fit.chunk, fit_settings(fit, rotate), fit.fold)
        caches.append(CandidateCache(units, fit_settings(fit, rotate), cache_root / "candidates" / key))
    stats, folded = fit_streamed(model, windows, caches, fit.chunk, fit.fold, timings, progress)
    cache, *rest = caches
    prepared = Prepared(model, tokenizer, fit, units, stats, unit_saliency(model, units, stats.act_scales), cache, folded)
    prepared.variant = VariantCandidates(rest[0]) if rest else None
    if process_group()[0] != 0:  # several processes shared the fit; the first one goes on alone
        return prepared
    return prepared.ensure(needs, timings, progress)


def make_plan(prepared: Prepared, config: PlanConfig, timings: Timings | None = None, progress: bool = True) -> Plan:
    """Run the configured allocator; the Plan records requested and applied actions."""
    config.validate()
    spec = get_allocator(config.allocator)
    timings = timings if timings is not None else Timings()
    prepared.ensure(spec.needs, timings, progress)
    if "scores" in spec.needs and prepared.fit.scores == "auto":
        with timings.stage("choose scores"):
            choice = choose_scores(prepared, config)
    with timings.stage("allocate"):
        problem = prepared.problem(config.budget_bits, config.accounting)
        problem.check_feasible()
        proxy = prepared.proxy if "proxy" in spec.needs else None
        reconstruction = prepared.reconstruction(progress) if "reconstruction" in spec.needs else None
        ctx = AllocationContext(prepared.work_dir(config), prepared.allocator_seed(config), progress, proxy, reconstruction)
        allocation = spec.allocate(problem, config.allocator_config, ctx)
        problem.check_plan(allocation.requested, spec.name, allocation.variant)
        applied = prepared.applied(allocation.requested, allocation.variant)
    info = {"config": {**prepared.fit.to_dict(), **config.to_dict()}}
    if "scores" in spec.needs and prepared.fit.scores == "auto":
        info["scores"] = choice
    if prepared.folded:
        info["fold_alphas"] = prepared.folded
    if allocation.files:
        allocation.info["attached"] = [f.name for f in allocation.files]
    if allocation.info:
        info[config.allocator] = allocation.info
    return Plan(
        allocator=config.allocator,
        accounting=config.accounting,
        target_bits=config.target_bits,
        chunk=prepared.fit.chunk,
        salient_rate=prepared.fit.salient,
        fallback_threshold=prepared.fit.fallback_threshold,
        units=prepared.units,
        requested=allocation.requested,
        applied=applied,
        info=info,
        attachments=allocation.files,
        rotate=prepared.fit.rotate,
        carried=prepared.fit.carry,
        tune_steps=prepared.fit.tune_steps,
        unit_rotate=None if allocation.variant is None else [prepared.fit.rotate != v for v in allocation.variant],
    )


def choose_scores(prepared: Prepared, config: PlanConfig) -> dict:
    """Which sensitivity table serves this budget (``--scores auto``): each table's exact-knapsack
    plan at the budget is scored on :data:`SCORE_CHECK_WINDOWS` held-out calibration-corpus windows
    (text no candidate, statistic or score was fitted on) and the lower perplexity wins. Neither
    table is better everywhere: the Fisher table cannot see a norm after a linear (Gemma-3), the
    block table measures each linear alone at every action, far from the mixed plans a tight budget
    makes (SmolLM2 at <= 2.5 bits). Returns the record kept in ``plan.json`` under ``scores``."""
    from windquant.alloc.ilp import solve

    proxy = prepared.proxy(SCORE_CHECK_WINDOWS, prepared.fit.calib_len, heldout=True)
    heldout = {}
    for kind in prepared.score_tables:
        prepared.use_scores(kind)
        problem = prepared.problem(config.budget_bits, config.accounting)
        problem.check_feasible()
        requested = [ACTIONS[j] for j in solve(problem.costs, problem.bits, problem.budget).choice]
        heldout[kind] = proxy(requested)
    chosen = min(heldout, key=heldout.get)
    prepared.use_scores(chosen)
    return {
        "chosen": chosen,
        "heldout_ppl": heldout,
        "reference_ppl": proxy.reference,
        "windows": f"{SCORE_CHECK_WINDOWS} x {prepared.fit.calib_len} held-out calibration-corpus tokens, candidates as fitted",
    }


def carried_modules(
    prepared: Prepared, chunks: dict[str, list[PlanChunk]], progress: bool = True
) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    """(unit, applied action) -> packed tensors of the linears in ``chunks`` (name -> its chunks in
    column order), each re-quantized with every chunk's error carried into the later chunks
    (``quantize_linear``): same actions, same bytes. A linear's result depends on its own chunks only."""
    settings = fit_settings(prepared.fit)
    packed = {}
    layers = sorted({u.layer for u in prepared.units if u.module in chunks})
    for layer in tqdm(layers, desc="carry errors", disable=not progress, unit="block"):
        moments = prepared.cache.load_moments(layer)  # one block's at a time
        for name in moments:
            if name not in chunks:
                continue
            weight = prepared.model.get_submodule(name).weight.detach()
            for c, p in zip(chunks[name], quantize_linear(weight, moments[name], chunks[name], settings)):
                packed[(c.index, c.action)] = p
        release_freed_memory()  # this block's factorisations: back to the OS
    return packed


def carried_candidates(prepared: Prepared, plan: Plan, progress: bool = True) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    """(unit, applied action) -> packed tensors of ``plan`` with errors carried linear by linear."""
    return carried_modules(prepared, module_chunks(plan), progress)


def plan_candidates(
    prepared: Prepared, plan: Plan, progress: bool = True, rows: dict[str, torch.Tensor] | None = None
) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    """(unit, applied action) -> the packed tensors :func:`apply` stores for ``plan``: the cache's
    candidates, or carried across units, then, when the plan asks, with scales tuned (with the
    embedding / head weights ``rows``, module name -> weight, that will be stored; the tuning
    report goes to ``plan.info["tune"]``). ``prepared.model`` must still be unquantized."""
    if plan.carried:
        packed = carried_candidates(prepared, plan, progress)
    else:
        caches = prepared.caches(prepared.plan_variant(plan))
        packed = {(u.index, a): caches[u.index].packed_of(u.index, a) for u, a in zip(plan.units, plan.applied)}
    if plan.tune_steps:
        fit = prepared.fit
        heldout = calibration_windows(prepared.tokenizer, fit, TUNE_HELDOUT_WINDOWS, seed=fit.seed + 1, model=prepared.model)
        settings = TuneSettings(steps=plan.tune_steps, lr=fit.tune_lr, batch=fit.tune_batch)
        packed, plan.info["tune"] = tune_scales(
            prepared.model,
            module_chunks(plan),
            packed,
            prepared.stats.windows,
            heldout,
            settings,
            train_last_hidden=prepared.stats.last_hidden,
            rows=rows,
            progress=progress,
        )
    return packed


def apply(
    prepared: Prepared,
    plan: Plan,
    model: nn.Module | None = None,
    timings: Timings | None = None,
    progress: bool = True,
    rows: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Quantize ``model`` (default: the prepared model) in place with ``plan``'s packed tensors
    (:func:`plan_candidates`; ``rows``: the embedding / head weights that will be stored)."""
    timings = timings if timings is not None else Timings()
    with timings.stage("apply"):
        packed = plan_candidates(prepared, plan, progress, rows)
        return apply_plan(prepared.model if model is None else model, plan, lambda i, a: packed[(i, a)])


def calibration_token_counts(prepared: Prepared) -> torch.Tensor:
    """[vocab] token counts of the calibration text, which rank the rows of a mixed embedding:
    each corpus part in full (all of ``mix`` ranks more rows than its sampled windows: +3.8 %
    against +4.8 % perplexity on the reference, benchmarks/embedding_formats.py) plus the
    calibration windows (the self-written part exists only as windows)."""
    vocab = prepared.model.get_input_embeddings().weight.shape[0]
    counts = torch.bincount(prepared.stats.windows.reshape(-1), minlength=vocab)
    for part in calib_parts(prepared.fit.calib):
        if part != "self":
            tokens = corpus_tokens(prepared.tokenizer, part, "calib", prepared.fit.data_dir)
            counts += torch.bincount(tokens.reshape(-1), minlength=vocab)[:vocab]
    return counts


def write_checkpoint(
    prepared: Prepared,
    plan: Plan,
    out: str | Path,
    overwrite: bool = False,
    model: nn.Module | None = None,
    model_name: str | None = None,
    timings: Timings | None = None,
    progress: bool = True,
    embedding_bits: RowFormat = AUTO,
) -> tuple[Path, dict]:
    """Apply ``plan`` to ``model`` (default: the prepared model, in place), pack it into the
    checkpoint folder ``out`` with the allocator's attached files and ``run_report.json``
    (accounting, per-layer bit map, stage timings, peak RSS); the embedding (and an untied
    head) is stored per row at ``embedding_bits`` (mixed: ranked by
    :func:`calibration_token_counts`; auto: by the plan's target, see
    :func:`~windquant.quant.row_formats.resolve_row_format`). Returns the folder and the report."""
    timings = timings if timings is not None else Timings()
    embedding_bits = resolve_row_format(embedding_bits, plan.target_bits)
    counts = calibration_token_counts(prepared) if embedding_bits == MIXED else None
    # The head's 4-bit rows get error feedback on the unquantized model's final hidden states.
    moment = head_input_moment(prepared.model, prepared.stats.windows, prepared.stats.last_hidden) if embedding_bits in (4, MIXED) else None
    # Scale tuning sees the embedding (and head) as the checkpoint will store them.
    rows = packed_rows = None
    if plan.tune_steps and embedding_bits != 16:
        packed_rows = quantized_rows(prepared.model, embedding_bits, counts, moment)
        rows = {name: dequantize_rows(p, embedding_bits) for name, p in packed_rows.items()}
    model = apply(prepared, plan, model, timings, progress, rows)
    with timings.stage("pack"):
        out = save(
            model,
            prepared.tokenizer,
            plan,
            out,
            overwrite,
            copy_files=plan.attachments,
            embedding_bits=embedding_bits,
            token_counts=counts,
            head_moment=moment,
            packed_rows=packed_rows,
        )
        report = plan_report(plan, model)
    report = {"model": model_name, **report, "timings": timings.report()}
    atomic_write_json(out / "run_report.json", report)
    return out, report


def quantize_(
    model: nn.Module, tokenizer, plan: PlanConfig | None = None, fit: FitConfig | None = None, progress: bool = True
) -> tuple[Plan, Timings]:
    """Quantize ``model`` in place; returns the Plan and stage timings."""
    plan_config = (plan or PlanConfig()).validate()
    timings = Timings()
    prepared = prepare(model, tokenizer, fit, get_allocator(plan_config.allocator).needs, timings, progress)
    result = make_plan(prepared, plan_config, timings, progress)
    apply(prepared, result, timings=timings)
    return result, timings
