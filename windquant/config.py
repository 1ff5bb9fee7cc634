"""QuantConfig: every setting of a quantization run, round-tripping through JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from windquant.errors import WindquantError, reject_unknown_fields
from windquant.quant.accounting import ACCOUNTINGS, canonical_action


@dataclass
class QuantConfig:
    target_bits: float | None = 2.5  # average bits per quantized weight, on `accounting`
    accounting: str = "true"  # "true" (everything stored) or "paper" (Eq. 6)
    allocator: str = "ilp"  # measured best at 2.0-4.0 true bits (benchmarks/results/pareto)
    uniform_action: float | None = None  # for allocator "uniform": force this action
    chunk: int = 256  # columns per unit (G)
    salient: float = 0.03  # fraction of each unit's weights kept in INT8
    steps: int = 10  # Adam steps per operator fit
    lr: float = 0.02  # Adam lr on the log-scale
    fallback_threshold: float = 0.5  # max relative weighted error before moving up
    calib: str = "builtin"  # builtin | wikitext2 | PATH
    calib_samples: int = 64
    calib_len: int = 256
    seed: int = 0
    data_dir: str | None = None  # WikiText-2 folder
    cache_dir: str | None = None  # candidate cache root (default ~/.cache/windquant)
    # allocator "ppo" (paper: 100 episodes, proxy 64 x 256 tokens; the smaller proxy default
    # keeps an episode at ~10 s on one CPU core — use --proxy-samples 64 on a GPU)
    episodes: int = 100
    proxy_samples: int = 8
    proxy_len: int = 256
    ppo_dir: str | None = None  # checkpoints + logs (default: under the candidate cache)
    resume: bool = False  # continue the run in ppo_dir from its last checkpoint
    policy: str | None = None  # reuse a trained policy.safetensors zero-shot (no training)
    ppo: dict | None = None  # overrides of PPOConfig fields, e.g. {"gamma": 1.0} (paper values otherwise)

    def validate(self) -> QuantConfig:
        if self.chunk <= 0:
            raise WindquantError(f"--chunk must be a positive number of columns, got {self.chunk}")
        if not 0.0 <= self.salient < 1.0:
            raise WindquantError(f"--salient must be in [0, 1), got {self.salient}")
        if self.accounting not in ACCOUNTINGS:
            raise WindquantError(f"--accounting must be one of {', '.join(ACCOUNTINGS)}, got {self.accounting!r}")
        if self.target_bits is not None and not 0.0 < self.target_bits <= 16.0:
            raise WindquantError(f"--target-bits must be in (0, 16], got {self.target_bits:g}")
        if self.target_bits is None and self.uniform_action is None:
            raise WindquantError("give --target-bits (or --uniform-action with --allocator uniform)")
        if self.uniform_action is not None:
            try:
                self.uniform_action = canonical_action(self.uniform_action)
            except ValueError as exc:
                raise WindquantError(f"--uniform-action: {exc}") from None
        if self.steps < 0:
            raise WindquantError(f"--steps must be >= 0, got {self.steps}")
        if self.episodes < 0 or self.proxy_samples <= 0 or self.proxy_len <= 1:
            raise WindquantError("--episodes must be >= 0, --proxy-samples >= 1 and --proxy-len >= 2")
        if self.calib_samples <= 0 or self.calib_len <= 1:
            raise WindquantError("--calib-samples must be >= 1 and --calib-len >= 2")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        reject_unknown_fields(cls, d, "config")
        return cls(**d)
