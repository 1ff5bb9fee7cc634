"""The Plan: one action per unit plus its accounting — plain JSON, allocator-agnostic.

Allocators produce it, the engine (``pack/``) applies it; neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from windquant.actions import canonical_accounting, canonical_action, fmt_action
from windquant.errors import WindquantError
from windquant.files import atomic_write_json
from windquant.model.units import Unit
from windquant.quant.accounting import summarize

PLAN_VERSION = 1


def action_distribution(units: list[Unit], applied: list[float]) -> dict[str, float]:
    """Fraction of weights at each applied action, highest action first (paper Fig. 2)."""
    counts: Counter = Counter()
    for u, a in zip(units, applied):
        counts[fmt_action(a)] += u.n_weights
    n = sum(counts.values())
    return {k: v / n for k, v in sorted(counts.items(), key=lambda kv: -float(kv[0]))}


@dataclass
class Plan:
    allocator: str
    accounting: str
    target_bits: float | None
    chunk: int
    salient_rate: float
    fallback_threshold: float
    units: list[Unit]
    requested: list[float]  # what the allocator asked for
    applied: list[float]  # what the engine applied (after operator fallback)
    info: dict = field(default_factory=dict)  # allocator-specific extras
    rotate: bool = False  # power-of-two-wide units are stored rotated (quant.rotation)
    # Per-unit rotate settings when the allocator chose each unit's outlier storage (ilp with
    # storage variants); None: every unit follows ``rotate``.
    unit_rotate: list[bool] | None = None
    carried: bool = False  # chunks re-quantized with error carried across units (pipeline.apply)
    tune_steps: int = 0  # at most this many steps of end-to-end scale tuning at apply (pack.tune)
    # Files the allocator wrote that belong in the checkpoint (e.g. PPO's episode log); not in plan.json.
    attachments: list[Path] = field(default_factory=list, repr=False, compare=False)

    def rotate_flags(self) -> list[bool]:
        """The rotate setting of each unit (quant.rotation.rotates decides per width and action)."""
        return list(self.unit_rotate) if self.unit_rotate is not None else [self.rotate] * len(self.units)

    def summary(self):
        return summarize([u.shape for u in self.units], self.applied, self.salient_rate, self.rotate_flags())

    @property
    def true_bits(self) -> float:
        return self.summary().true_bits

    @property
    def paper_bits(self) -> float:
        return self.summary().paper_bits

    def digest(self) -> str:
        """What the plan stores, hashed: each unit's span, requested and applied action and
        outlier storage, and how chunks are re-quantized. Equal digests, equal checkpoints."""
        payload = {
            "units": [[u.module, u.col0, u.col1] for u in self.units],
            "requested": self.requested,
            "applied": self.applied,
            "rotate": self.rotate_flags(),
            "carried": self.carried,
            "tune_steps": self.tune_steps,
        }
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    def action_distribution(self) -> dict[str, float]:
        """Fraction of weights at each applied action (paper Fig. 2)."""
        return action_distribution(self.units, self.applied)

    def to_dict(self) -> dict:
        s = self.summary()
        return {
            "version": PLAN_VERSION,
            "allocator": self.allocator,
            "accounting": self.accounting,
            "target_bits": self.target_bits,
            "true_bits": s.true_bits,
            "paper_bits": s.paper_bits,
            "n_weights": s.n_weights,
            "quantized_bytes": s.true_bytes,
            "chunk": self.chunk,
            "salient_rate": self.salient_rate,
            "rotate": self.rotate,
            "carried": self.carried,
            "tune_steps": self.tune_steps,
            "fallback_threshold": self.fallback_threshold,
            "action_distribution": self.action_distribution(),
            "info": self.info,
            "units": [
                {**u.as_dict(), "requested": r, "applied": a} | ({} if self.unit_rotate is None else {"rotate": f})
                for u, r, a, f in zip(self.units, self.requested, self.applied, self.rotate_flags())
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise WindquantError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        fields = set(Unit.__dataclass_fields__)
        units = [Unit(**{k: v for k, v in row.items() if k in fields}) for row in d["units"]]
        return cls(
            allocator=d["allocator"],
            accounting=canonical_accounting(d["accounting"]),  # plans before "stored" say "true"
            target_bits=d["target_bits"],
            chunk=d["chunk"],
            salient_rate=d["salient_rate"],
            fallback_threshold=d["fallback_threshold"],
            units=units,
            requested=[canonical_action(r["requested"]) for r in d["units"]],
            applied=[canonical_action(r["applied"]) for r in d["units"]],
            info=d.get("info", {}),
            rotate=d.get("rotate", False),  # absent from plans written before rotation existed
            carried=d.get("carried", False),
            tune_steps=d.get("tune_steps", 0),
            unit_rotate=[bool(r["rotate"]) for r in d["units"]] if d["units"] and "rotate" in d["units"][0] else None,
        )

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WindquantError(f"{path} is not a valid windquant plan ({exc}); re-run quantize") from exc
