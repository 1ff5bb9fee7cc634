"""The candidate cache: every (unit, action) fitted once, reused by every allocator.

Fitting is deterministic for a unit and an action, so it is done once per model and settings
and persisted under a fingerprint of both, one safetensors shard per decoder block, written as
the block is fitted (``quant.streamed``), so an interrupted fit resumes at the next block.

A shard holds the block's packed candidates and, in its metadata and a small tensor, what
allocators need without the candidates: each candidate's relative error (operator fallback,
bits) and its output-error trace ``tr(ΔW H ΔWᵀ)`` (sensitivity scores). Beside it, the block's
input second moments (carrying errors after allocation reads them back). In RAM the cache keeps
only those tables; packed candidates are read from the shards when a plan is applied
(:meth:`CandidateCache.packed_of`). Allocators that score many plans on the real model (RL
episodes) ask for :meth:`CandidateCache.hold_dense`: every candidate's fp16 weights are then
kept in RAM (12 bytes per weight, ~1.3 GB for a 135M model).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from windquant.actions import ACTIONS, INT8, LADDER, LOW_BIT_ACTIONS, SKIP
from windquant.errors import WindquantError
from windquant.model.units import Unit
from windquant.quant.accounting import unit_bits
from windquant.quant.unit import FitSettings, dequantize_unit, quantize_unit_actions, relative_error

CACHE_VERSION = 3  # 2: fingerprinted by all parameters and the calibration tokens; shards hold traces; 3: the fit with hand-written LSQ gradients (float noise apart, the same candidates)


def default_cache_dir() -> Path:
    return Path(os.environ.get("WINDQUANT_CACHE", Path.home() / ".cache" / "windquant"))


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 of the tensors' values as float32 bytes, converted a slice at a time (no copy of a
    whole embedding matrix)."""
    h = hashlib.sha256()
    for t in tensors:
        for part in t.detach().reshape(-1).split(1 << 20):
            h.update(part.float().numpy().tobytes())
    return h.hexdigest()


def parameters_digest(model: nn.Module) -> str:
    """Digest of every parameter (names and values): what the model computes."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(tensor_digest([p]).encode())
    return h.hexdigest()


def fallback_action(errors: dict[float, float], action: float, threshold: float) -> float:
    """The action actually applied: ``action`` or the next higher one under ``threshold``."""
    for a in LADDER[LADDER.index(action) :]:
        if a >= INT8 or errors.get(a, float("inf")) <= threshold:
            return a
    return SKIP


def output_trace(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: the output error of ``w_hat`` on inputs with second moment ``h``."""
    delta = w - w_hat
    return float(((delta @ h) * delta).sum())


def shard_is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole safetensors file: its header parses and the data it
    declares ends exactly at the end of the file (a truncated copy fails this)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) == size
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


class CandidateCache:
    """The candidates of all units × actions of one fit setting: their tables in RAM, their
    packed tensors in the folder's shards."""

    def __init__(self, units: list[Unit], settings: FitSettings, folder: Path):
        self.units = units
        self.settings = settings
        self.folder = Path(folder)
        self.errors: dict[int, dict[float, float]] = {}
        self.traces: dict[int, list[float]] = {}  # unit -> tr(ΔW H ΔWᵀ) per action (ACTIONS order)
        self.metadata: dict[int, dict] = {}  # layer -> what the fit stored beside the shard (e.g. fold α)
        self.dense: dict[tuple[int, float], torch.Tensor] = {}  # filled by hold_dense()
        self._held: tuple[int | None, dict[str, torch.Tensor]] = (None, {})  # the last shard read

    def shard(self, layer: int) -> Path:
        return self.folder / f"layer_{layer:04d}.safetensors"

    def moments_file(self, layer: int) -> Path:
        return self.folder / f"moments_{layer:04d}.safetensors"

    def save_moments(self, layer: int, moments: dict[str, torch.Tensor]) -> None:
        """Keep block ``layer``'s input second moments on disk (carrying errors after allocation
        needs them; reading them back is far cheaper than another calibration pass). Linears
        sharing one moment object store it once."""
        owners: dict[int, str] = {}
        for name, h in moments.items():
            owners.setdefault(id(h), name)
        shares = {name: owners[id(h)] for name, h in moments.items() if owners[id(h)] != name}
        tensors = {name: h for name, h in moments.items() if name not in shares}
        atomic_save_tensors(tensors, self.moments_file(layer), {"shares": json.dumps(shares)})

    def load_moments(self, layer: int) -> dict[str, torch.Tensor]:
        path = self.moments_file(layer)
        if not shard_is_complete(path):
            raise WindquantError(f"{path} is missing or incomplete; delete {self.folder} and quantize again to refit it")
        with safe_open(str(path), "pt") as f:
            shares = json.loads(f.metadata()["shares"])
        own = load_file(str(path))
        return own | {name: own[owner] for name, owner in shares.items()}

    # -- building -------------------------------------------------------------
    def load_layer(self, layer: int) -> bool:
        """Read block ``layer``'s tables from its shard; False when there is no whole shard
        (missing, or truncated: then it is refitted, never used)."""
        path = self.shard(layer)
        if not path.is_file():
            return False
        for p in (path, self.moments_file(layer)):
            if not shard_is_complete(p):
                tqdm.write(f"windquant: {p} is incomplete or missing; refitting block {layer}")
                return False
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            traces = f.get_tensor("traces")
        errors = json.loads(meta["errors"])
        layer_units = [u for u in self.units if u.layer == layer]
        for row, u in enumerate(layer_units):
            self.errors[u.index] = {float(a): e for a, e in errors[str(u.index)].items()}
            self.traces[u.index] = traces[row].tolist()
        self.metadata[layer] = json.loads(meta.get("extra", "{}"))
        return True

    def fit_layer(
        self,
        model: nn.Module,
        layer: int,
        act_scales: dict[str, torch.Tensor],
        moments: dict[str, torch.Tensor],
        extra: dict | None = None,
        bar: tqdm | None = None,
    ) -> None:
        """Fit every candidate of block ``layer``'s units and write its shard (``moments``: each
        linear's ``E[x xᵀ]``, for error feedback, rotation and the traces; ``extra``: JSON kept
        beside the shard)."""
        tensors: dict[str, torch.Tensor] = {}
        layer_units = [u for u in self.units if u.layer == layer]
        for u in layer_units:
            w = model.get_submodule(u.module).weight.detach()[:, u.col0 : u.col1].float()
            s = act_scales[u.module][u.col0 : u.col1]
            h = moments[u.module][u.col0 : u.col1, u.col0 : u.col1]
            row = []
            for a, packed in zip(ACTIONS, quantize_unit_actions(w, s, list(ACTIONS), self.settings, h, seed=u.index)):
                w_hat = dequantize_unit(packed, a, *u.shape)
                self.errors.setdefault(u.index, {})[a] = relative_error(w, w_hat, s)
                row.append(output_trace(w, w_hat.half().float(), h))
                tensors |= {f"u{u.index}/{a:g}/{k}": t for k, t in packed.items()}
                if bar is not None and a in LOW_BIT_ACTIONS:
                    bar.update(1)
            self.traces[u.index] = row
        tensors["traces"] = torch.tensor([self.traces[u.index] for u in layer_units], dtype=torch.float64)
        self.metadata[layer] = extra or {}
        meta = {
            "errors": json.dumps({u.index: {f"{a:g}": e for a, e in self.errors[u.index].items()} for u in layer_units}),
            "extra": json.dumps(self.metadata[layer]),
        }
        self.save_moments(layer, moments)
        atomic_save_tensors(tensors, self.shard(layer), meta)  # last: a whole shard means a whole block

    # -- candidates -----------------------------------------------------------
    def packed_of(self, index: int, action: float) -> dict[str, torch.Tensor]:
        """Packed tensors of unit ``index`` at ``action`` (its block's shard is read once and
        kept until another block's is asked for)."""
        layer = self.units[index].layer
        if self._held[0] != layer:
            self._held = (layer, load_file(str(self.shard(layer))))
        prefix = f"u{index}/{action:g}/"
        return {k[len(prefix) :]: t for k, t in self._held[1].items() if k.startswith(prefix)}

    def dense_file(self, layer: int) -> Path:
        return self.folder / f"dense_{layer:04d}.safetensors"

    def hold_dense(self, where: str = "ram") -> None:
        """Keep every candidate's dequantized fp16 weights from now on (fast plan assembly):
        in RAM, or (``where="disk"``) in fp16 shards beside the candidates, written once and
        memory-mapped, so the kernel pages them in and out instead of the process holding them."""
        for layer in sorted({u.layer for u in self.units}):
            layer_units = [u for u in self.units if u.layer == layer]
            if all((u.index, a) in self.dense for u in layer_units for a in ACTIONS):
                continue
            path = self.dense_file(layer)
            if where == "disk" and shard_is_complete(path):
                self.dense |= {_unit_action(k): t for k, t in load_file(str(path)).items()}
                continue
            dense = {
                (u.index, a): dequantize_unit(self.packed_of(u.index, a), a, *u.shape).half()
                for u in layer_units
                for a in ACTIONS
            }
            if where == "disk":
                atomic_save_tensors({f"{i}/{a:g}": t for (i, a), t in dense.items()}, path, {})
                dense = {_unit_action(k): t for k, t in load_file(str(path)).items()}
            self.dense |= dense
        self._held = (None, {})

    # -- queries --------------------------------------------------------------
    def weight(self, index: int, action: float) -> torch.Tensor:
        """Dequantized fp16 weights of unit ``index`` at ``action``."""
        held = self.dense.get((index, action))
        return (
            held if held is not None else dequantize_unit(self.packed_of(index, action), action, *self.units[index].shape).half()
        )

    def applied(self, index: int, action: float, threshold: float) -> float:
        return fallback_action(self.errors[index], action, threshold)

    def bits_table(self, accounting: str, threshold: float) -> torch.Tensor:
        """[N, len(ACTIONS)] bits of each unit at each *requested* action (after fallback)."""
        rate, rotate = self.settings.salient_rate, self.settings.rotate
        rows = []
        for u in self.units:
            rows.append([unit_bits(self.applied(u.index, a, threshold), *u.shape, rate, accounting, rotate) for a in ACTIONS])
        return torch.tensor(rows, dtype=torch.float64)

    def traces_table(self) -> torch.Tensor:
        """[N, len(ACTIONS)] ``tr(ΔW H ΔWᵀ)`` of each unit's candidate at each action (float64)."""
        return torch.tensor([self.traces[u.index] for u in self.units], dtype=torch.float64)


def _unit_action(key: str) -> tuple[int, float]:
    index, action = key.split("/")
    return int(index), float(action)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # two processes filling one cache never share a temp file
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def fingerprint(model_digest: str, calib_digest: str, chunk: int, settings: FitSettings, fold: bool = False) -> str:
    payload = {"v": CACHE_VERSION, "model": model_digest, "calib": calib_digest, "chunk": chunk, **settings.fingerprint_fields()}
    payload |= {"fold": True} if fold else {}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
