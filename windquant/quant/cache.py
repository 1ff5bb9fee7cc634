"""The candidate cache: every (unit, action) fitted once, reused by every allocator.

Fitting is deterministic for a unit and an action, so it is done once per model and
settings and persisted under a fingerprint of both, one safetensors shard per decoder
block (so an interrupted fit resumes at the next block). In RAM the cache holds the
packed tensors (~20 bits per weight for all six low-bit actions); :meth:`CandidateCache.weight`
dequantizes a candidate when asked. Allocators that score many plans on the real model (RL
episodes) ask for :meth:`CandidateCache.hold_dense`: every candidate's fp16 weights are then
kept too (12 bytes per weight, ~1.3 GB for a 135M model), so an episode assembles a plan's
weights without unpacking anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from windquant.actions import ACTIONS, INT8, LADDER, LOW_BIT_ACTIONS, SKIP
from windquant.model.units import Unit, block_linears
from windquant.quant.accounting import unit_bits
from windquant.quant.unit import FitSettings, dequantize_unit, quantize_unit, relative_error

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("WINDQUANT_CACHE", Path.home() / ".cache" / "windquant"))


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    return tensor_digest([mod.weight for _l, _n, _p, mod in block_linears(model)])


def fallback_action(errors: dict[float, float], action: float, threshold: float) -> float:
    """The action actually applied: ``action`` or the next higher one under ``threshold``."""
    for a in LADDER[LADDER.index(action) :]:
        if a >= INT8 or errors.get(a, float("inf")) <= threshold:
            return a
    return SKIP


class CandidateCache:
    """Packed + dequantized candidates and their errors for all units × actions."""

    def __init__(self, units: list[Unit], settings: FitSettings):
        self.units = units
        self.settings = settings
        self.packed: dict[tuple[int, float], dict[str, torch.Tensor]] = {}
        self.dense: dict[tuple[int, float], torch.Tensor] = {}  # filled by hold_dense()
        self.errors: dict[int, dict[float, float]] = {}

    # -- building -------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        units: list[Unit],
        act_scales: dict[str, torch.Tensor],
        settings: FitSettings,
        cache_dir: Path | None = None,
        fingerprint: str | None = None,
        progress: bool = True,
        moments: dict[str, torch.Tensor] | None = None,
    ) -> CandidateCache:
        """Fit (or load from ``cache_dir/fingerprint``) every candidate, block by block
        (``moments``: each linear's ``E[x xᵀ]``, for error feedback and rotation)."""
        cache = cls(units, settings)
        modules = dict(model.named_modules())
        folder = None
        if cache_dir is not None and fingerprint is not None:
            folder = Path(cache_dir) / "candidates" / fingerprint
            folder.mkdir(parents=True, exist_ok=True)
        layers = sorted({u.layer for u in units})
        bar = tqdm(total=len(units) * len(LOW_BIT_ACTIONS), desc="fit candidates", disable=not progress, unit="fit")
        for layer in layers:
            layer_units = [u for u in units if u.layer == layer]
            shard = folder / f"layer_{layer:04d}.safetensors" if folder else None
            if shard is not None and shard.is_file():
                cache._load_shard(shard, layer_units)
            else:
                for u in layer_units:
                    w = modules[u.module].weight.detach()[:, u.col0 : u.col1].float()
                    s = act_scales[u.module][u.col0 : u.col1]
                    h = moments[u.module][u.col0 : u.col1, u.col0 : u.col1] if moments is not None else None
                    cache._add(u, SKIP, quantize_unit(w, s, SKIP, settings), w, s)
                    for a in LOW_BIT_ACTIONS:
                        cache._add(u, a, quantize_unit(w, s, a, settings, h, seed=u.index), w, s)
                        bar.update(1)
                if shard is not None:
                    cache._save_shard(shard, layer_units)
                continue
            bar.update(len(layer_units) * len(LOW_BIT_ACTIONS))
        bar.close()
        return cache

    def _add(self, u: Unit, action: float, packed: dict[str, torch.Tensor], w: torch.Tensor, s: torch.Tensor) -> None:
        self.packed[(u.index, action)] = packed
        self.errors.setdefault(u.index, {})[action] = relative_error(w, dequantize_unit(packed, action, *u.shape), s)

    def _save_shard(self, shard: Path, layer_units: list[Unit]) -> None:
        tensors = {f"u{u.index}/{a:g}/{k}": t for u in layer_units for a in ACTIONS for k, t in self.packed[(u.index, a)].items()}
        meta = {"errors": json.dumps({u.index: {f"{a:g}": e for a, e in self.errors[u.index].items()} for u in layer_units})}
        tmp = shard.with_suffix(f".tmp{os.getpid()}")  # two processes filling one cache never share a temp file
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, shard)

    def _load_shard(self, shard: Path, layer_units: list[Unit]) -> None:
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as f:
            errors = json.loads(f.metadata()["errors"])
        tensors = load_file(str(shard))
        for u in layer_units:
            for a in ACTIONS:
                prefix = f"u{u.index}/{a:g}/"
                packed = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
                self.packed[(u.index, a)] = packed
            self.errors[u.index] = {float(a): e for a, e in errors[str(u.index)].items()}

    def hold_dense(self) -> None:
        """Keep every candidate's dequantized fp16 weights from now on (fast plan assembly)."""
        for (index, action), packed in self.packed.items():
            if (index, action) not in self.dense:
                self.dense[(index, action)] = dequantize_unit(packed, action, *self.units[index].shape).half()

    # -- queries --------------------------------------------------------------
    def weight(self, index: int, action: float) -> torch.Tensor:
        """Dequantized fp16 weights of unit ``index`` at ``action``."""
        held = self.dense.get((index, action))
        return held if held is not None else dequantize_unit(self.packed[(index, action)], action, *self.units[index].shape).half()

    def applied(self, index: int, action: float, threshold: float) -> float:
        return fallback_action(self.errors[index], action, threshold)

    def bits_table(self, accounting: str, threshold: float) -> torch.Tensor:
        """[N, len(ACTIONS)] bits of each unit at each *requested* action (after fallback)."""
        rate, rotate = self.settings.salient_rate, self.settings.rotate
        rows = []
        for u in self.units:
            rows.append([unit_bits(self.applied(u.index, a, threshold), *u.shape, rate, accounting, rotate) for a in ACTIONS])
        return torch.tensor(rows, dtype=torch.float64)


def fingerprint(model_digest: str, calib_digest: str, chunk: int, settings: FitSettings) -> str:
    payload = json.dumps(
        {"v": CACHE_VERSION, "model": model_digest, "calib": calib_digest, "chunk": chunk, **settings.fingerprint_fields()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
