"""Convert a loaded checkpoint's packed modules into their runtime forms, in place."""

from __future__ import annotations

import torch
from torch import nn

from windquant.pack.apply import set_submodule
from windquant.pack.qlinear import QuantLinear
from windquant.runinfo import release_freed_memory
from windquant.runtime.linear import RuntimeLinear


@torch.no_grad()
def to_runtime(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every :class:`QuantLinear` of ``model`` for a :class:`RuntimeLinear` computing in
    ``dtype`` (bfloat16: the fast path; float32: exact, slow). The packed buffers are dropped as
    each linear is converted, so at most one linear is held twice."""
    for name in [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        set_submodule(model, name, RuntimeLinear(model.get_submodule(name), dtype))
    release_freed_memory()
    return model


def runtime_bytes(model: nn.Module) -> int:
    """Bytes held by the runtime linears (packed weights, scales, signs, corrections)."""
    return sum(m.runtime_bytes() for m in model.modules() if isinstance(m, RuntimeLinear))
