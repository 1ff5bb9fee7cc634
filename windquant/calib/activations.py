"""Per-input-channel activation scales of every block linear, in one hooked pass."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from windquant.model.units import block_linears


@torch.no_grad()
def activation_scales(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> dict[str, torch.Tensor]:
    """RMS of each input channel of every block linear over the calibration windows.

    The RMS squared is the diagonal of the layer's input second moment, so
    ``Σ_j rms_j² (w_ij − ŵ_ij)²`` is the diagonal estimate of the output error.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    for _layer, name, _proj, mod in block_linears(model):
        hooks.append(mod.register_forward_hook(hook(name)))
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="calibrate", disable=not progress, unit="batch"):
            model(input_ids=windows[i : i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).sqrt() for name in sums}
