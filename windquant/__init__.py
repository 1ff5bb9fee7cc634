"""windquant: mixed-precision ultra-low-bit quantization of causal LLMs under one bit budget.

The public names are imported on first use, so ``import windquant`` (and ``windquant --help``)
does not pay for torch, transformers or scipy.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "FitConfig": "windquant.config",
    "PlanConfig": "windquant.config",
    "Plan": "windquant.plan",
    "WindquantError": "windquant.errors",
    "load": "windquant.runtime.loading",
    "save": "windquant.pack.checkpoint",
    "prepare": "windquant.pipeline",
    "make_plan": "windquant.pipeline",
    "write_checkpoint": "windquant.pipeline",
    "quantize_": "windquant.pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'windquant' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
