"""Settings of a quantization run, split by who owns them, each round-tripping through JSON.

* :class:`FitConfig`: what is calibrated and fitted. Owned by ``pipeline.prepare`` and kept in
  its result, so a plan is always checked and applied under the settings its candidates were
  fitted with. The candidate-cache fingerprint depends on it.
* :class:`PlanConfig`: which plan is wanted: target, accounting, allocator name and that
  allocator's own config dataclass (declared where the allocator is, in ``alloc/``).

Every field is declared with :func:`setting`: its help text, flag name and older spellings, the
values it takes and how its default reads live in the field's metadata, and the CLI generates its
flags (and their help) from them, so a new setting is one edit. This module imports nothing heavy (``windquant --help`` reads it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from windquant.actions import ACCOUNTING_ALIASES, ACCOUNTINGS, canonical_accounting
from windquant.errors import WindquantError, reject_unknown_fields

MAX_TARGET = 16.0  # bits per weight of an all-fp16 plan: "no budget"


def setting(
    default: Any = None,
    help: str | None = None,
    *,
    flag: str | tuple[str, ...] | None = None,
    choices: tuple[str, ...] | None = None,
    shown: str | None = None,
    metavar: str | None = None,
    run: bool = False,
    factory=None,
):
    """A config field. ``help`` makes it a CLI flag (``--field-name`` unless ``flag`` says
    otherwise: one name, or the name then older spellings still accepted; fields without help are
    set with ``--<allocator>-set``). ``choices``: the values it takes, listed in the help (the
    config's ``validate`` checks them); ``shown``: how the help words the default when the value
    alone would not say (None defaults); ``run=True`` marks how to run rather than what to compute
    (paths, resume), left out of :func:`settings_digest`."""
    meta = {"help": help, "flag": flag, "choices": choices, "shown": shown, "metavar": metavar, "run": run}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_types(cls: type) -> dict[str, type]:
    """Field name -> its plain type (``float | None`` -> ``float``)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    return out


def config_to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a config dataclass (nested configs as dicts, tuples as lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return config_to_dict(v)
        return list(v) if isinstance(v, tuple) else v

    return {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)}


def config_from_dict(cls: type, d: dict, what: str | None = None) -> Any:
    """Inverse of :func:`config_to_dict`; unknown keys are a one-line error."""
    reject_unknown_fields(cls, d, what or cls.__name__)
    types = field_types(cls)
    kwargs = {}
    for k, v in d.items():
        t = types[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = config_from_dict(t, v)
        elif typing.get_origin(t) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def settings_digest(cfg: Any, extra: dict | None = None) -> str:
    """Digest of what ``cfg`` computes (fields marked ``run`` left out), plus ``extra``."""
    run = {f.name for f in fields(cfg) if f.metadata.get("run")}
    payload = {k: v for k, v in config_to_dict(cfg).items() if k not in run} | (extra or {})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def require(cfg: Any, checks: tuple[tuple[str, bool, str], ...], what: str = "") -> None:
    """Raise a one-line error naming the first setting of ``cfg`` whose check failed."""
    for name, ok, want in checks:
        if not ok:
            raise WindquantError(f"{what}{name} must be {want}, got {getattr(cfg, name)}", setting=name)


SCORES = ("auto", "fisher", "block")
DENSE_CANDIDATES = ("ram", "disk")


@dataclass
class FitConfig:
    """Calibration and candidate fitting (the candidate cache's fingerprint)."""

    # The CLI's --group-size (what other quantizers call the columns sharing a scale group here:
    # one unit); the field keeps its name, which the candidate cache's fingerprint reads.
    chunk: int = setting(
        256,
        "columns per unit, the group of columns one action is chosen for (G)",
        flag=("--group-size", "--chunk"),
        metavar="COLUMNS",
    )
    salient: float = setting(
        0.03,
        "fraction of each unit's weights kept in INT8; only units stored unrotated have them: with --rotate (the default) "
        "power-of-two-wide units keep none, so this changes only the other units (or all of them with --no-rotate)",
    )
    steps: int = setting(10, "Adam steps per operator fit")
    fit_lr: float = setting(0.02, "Adam learning rate on an operator's log-scale")
    fallback_threshold: float = setting(0.5, "relative weighted error above which a unit moves to the next precision")
    feedback: bool = setting(True, "OBQ/GPTQ error feedback along each unit's columns (needs one more statistic, same bits)")
    rotate: bool = setting(
        True, "store power-of-two-wide units rotated (random signs x Hadamard) instead of with INT8 salient weights"
    )
    storage_variants: bool = setting(
        False,
        "also fit every unit with the other outlier storage (unrotated with INT8 salient weights when --rotate, rotated otherwise) so allocators that can (ilp) choose it per unit; doubles the candidate fit",
    )
    scores: str = setting(
        SCORES[0],
        "sensitivity scores: auto (both tables below; at each budget the one whose exact-knapsack plan scores lower on held-out calibration text) | fisher (F·tr(ΔW H ΔWᵀ) per unit) | block (each linear's total at each action set to its measured teacher-forced block error, which sees norms after the linear; ~1 block pass per linear and action)",
        choices=SCORES,
    )
    carry: bool = setting(
        True, "after allocation, re-quantize each linear chunk by chunk carrying every chunk's error into later columns"
    )
    fold: bool = setting(
        False,
        "Scale Folding: per-input-channel scales act_rms^alpha (alpha searched per group) folded into the preceding norm / linear, an exact equivalence",
    )
    # On by default: 40 steps take SmolLM2-135M at 2.5 true bits from 44.10 to 37.83 WikiText-2
    # perplexity (first 16 windows) and the held-out KL from 0.633 to 0.481 for ~100 s on 2 cores;
    # the held-out KL barely moves after step 40 (benchmarks/HISTORY.md, "Scale tuning by default").
    tune_steps: int = setting(
        40,
        "after allocation, tune the stored fp16 scales (codes frozen) for at most this many Adam steps on KL to the unquantized model over the calibration windows; 0 = off (the model is then held as stored, not in float32)",
    )
    tune_lr: float = setting(2e-3, "Adam learning rate of scale tuning (relative change of each scale)")
    # 1 for the cold-run budget: 4 windows a step took SmolLM2-135M at 3.0 true bits from 31.65 to
    # 31.16 (WikiText-2 full split) but made tuning ~3x as long (85 -> 250 s on 2 cores).
    tune_batch: int = setting(1, "calibration windows per scale-tuning step (the cost of a step grows with it)")
    calib: str = setting(
        "mix",
        "calibration corpus: mix (bundled general English text and code) | builtin (Python docs) | self (text the model writes itself, generated once and cached) | wikitext2 | PATH to .txt/.jsonl; parts joined by + share the windows equally (mix+self)",
    )
    calib_samples: int = setting(64, "calibration windows")
    calib_len: int = setting(256, "tokens per calibration window")
    seed: int = setting(0, "seed of the calibration windows and of allocators that sample")
    dense_candidates: str = setting(
        "ram",
        "where allocators that score plans on the real model (ppo) keep every candidate's dense fp16 weights: "
        "ram | disk (written once beside the cache, memory-mapped)",
        choices=DENSE_CANDIDATES,
        run=True,
    )
    data_dir: str | None = setting(
        None, "folder holding WikiText-2 (wikitext-2-raw/wiki.*.raw), for the wikitext2 corpus", shown="$WINDQUANT_DATA", run=True
    )
    cache_dir: str | None = setting(None, "candidate cache root", shown="$WINDQUANT_CACHE, else ~/.cache/windquant", run=True)

    def validate(self) -> FitConfig:
        checks = (
            ("chunk", self.chunk > 0, "a positive number of columns"),
            ("salient", 0.0 <= self.salient < 1.0, "in [0, 1)"),
            ("steps", self.steps >= 0, ">= 0"),
            ("tune_steps", self.tune_steps >= 0, ">= 0"),
            ("tune_lr", self.tune_lr > 0, "> 0"),
            ("tune_batch", 1 <= self.tune_batch <= self.calib_samples, "between 1 and --calib-samples"),
            ("calib_samples", self.calib_samples >= 1, ">= 1"),
            ("calib_len", self.calib_len >= 2, ">= 2"),
            ("dense_candidates", self.dense_candidates in DENSE_CANDIDATES, " or ".join(DENSE_CANDIDATES)),
            ("scores", self.scores in SCORES, ", ".join(SCORES[:-1]) + " or " + SCORES[-1]),
        )
        require(self, checks)
        from windquant.calib.corpus import calib_parts  # deferred: it imports torch, the CLI's --help must not

        calib_parts(self.calib)  # one line naming the bad part and the choices
        return self

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FitConfig:
        return config_from_dict(cls, d, "fit config")


@dataclass
class PlanConfig:
    """Which plan: the budget and the allocator that meets it."""

    # None: no budget (an all-fp16 plan fits), for allocators that fix the plan themselves.
    target_bits: float | None = setting(
        2.5,
        "average bits per block-linear weight the plan may use, counted as --accounting says; "
        "an allocator that fixes the plan itself (--uniform-action) needs none",
        metavar="BITS",
    )
    accounting: str = setting(
        ACCOUNTINGS[0],
        "what --target-bits counts: stored (every bit stored for a block linear: codes, scales, indices, salient INT8 "
        "weights; reported as true bits) | paper (the paper's Eq. 6: codes and salient weights, no scales or indices); "
        "'true' is accepted as the old name of stored",
        choices=ACCOUNTINGS,
    )
    allocator: str = setting("ilp", "how the budget is shared out between units (each allocator is described at the end)")
    seed: int | None = setting(None, "seed of allocators that sample", flag="--allocator-seed", shown="--seed")
    # The allocator's own config dataclass, or a dict of its fields; None = its defaults.
    allocator_config: Any = None

    def __post_init__(self):
        self.accounting = canonical_accounting(self.accounting)  # configs and flags before the rename say "true"

    @property
    def budget_bits(self) -> float:
        """Average bits per weight the plan may use (no target: an all-fp16 plan)."""
        return MAX_TARGET if self.target_bits is None else self.target_bits

    def validate(self) -> PlanConfig:
        """Check the budget and resolve ``allocator_config`` to the allocator's config class."""
        from windquant.alloc import get_allocator

        if self.accounting not in ACCOUNTINGS:
            old = ", ".join(f"{k} (old name of {v})" for k, v in ACCOUNTING_ALIASES.items())
            raise WindquantError(
                f"accounting must be one of {', '.join(ACCOUNTINGS)} or {old}, got {self.accounting!r}", setting="accounting"
            )
        if self.target_bits is not None and not 0.0 < self.target_bits <= MAX_TARGET:
            raise WindquantError(f"target_bits must be in (0, {MAX_TARGET:g}], got {self.target_bits:g}", setting="target_bits")
        spec = get_allocator(self.allocator)
        cfg = self.allocator_config
        if cfg is None:
            cfg = spec.config()
        elif isinstance(cfg, dict):
            cfg = config_from_dict(spec.config, cfg, f"{spec.name} allocator config")
        elif not isinstance(cfg, spec.config):
            raise WindquantError(f"allocator_config of {spec.name!r} must be a {spec.config.__name__}, got {type(cfg).__name__}")
        self.allocator_config = cfg.validate() if hasattr(cfg, "validate") else cfg
        return self

    def to_dict(self) -> dict:
        d = config_to_dict(self)
        if dataclasses.is_dataclass(self.allocator_config):
            d["allocator_config"] = config_to_dict(self.allocator_config)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PlanConfig:
        return config_from_dict(cls, d, "plan config").validate()
