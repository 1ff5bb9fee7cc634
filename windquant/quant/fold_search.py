"""Choose each fold group's ``α`` (``model.folding``) on the quantized output error, as AWQ does."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from windquant.model.folding import ALPHAS, FoldGroup, awq_scales, fold, fold_groups, fold_statistics
from windquant.model.units import decoder_blocks
from windquant.quant.unit import FitSettings, dequantize_unit, quantize_unit

# The action α is chosen for: 3 bits is what most weights get at 2.5-3 true bits.
SEARCH_ACTION = 3.0


def output_error(w: torch.Tensor, h: torch.Tensor, chunk: int, action: float, settings: FitSettings) -> float:
    """``tr(ΔW H ΔWᵀ)`` of ``w`` [out, in] quantized chunk by chunk at ``action``."""
    rms = h.diagonal().clamp_min(0).sqrt()
    parts = []
    for c0 in range(0, w.shape[1], chunk):
        c1 = min(c0 + chunk, w.shape[1])
        packed = quantize_unit(w[:, c0:c1], rms[c0:c1], action, settings, h[c0:c1, c0:c1], seed=c0)
        parts.append(dequantize_unit(packed, action, w.shape[0], c1 - c0))
    d = w - torch.cat(parts, dim=1)
    return float(((d @ h) * d).sum())


def group_errors(
    model: nn.Module, group: FoldGroup, act_scales: dict, moments: dict, chunk: int, settings: FitSettings
) -> dict[float, float]:
    """α -> summed output error of the group's linears quantized at :data:`SEARCH_ACTION`."""
    rms = group.channel_rms(act_scales[group.consumers[0]])
    errors = {}
    for alpha in ALPHAS:
        cols = group.column_scales(awq_scales(rms, alpha))
        errors[alpha] = sum(
            output_error(
                model.get_submodule(n).weight.detach().float() * cols[None, :],
                moments[n] / cols[:, None] / cols[None, :],
                chunk,
                SEARCH_ACTION,
                settings,
            )
            for n in group.consumers
        )
    return errors


def fold_layer(
    model: nn.Module,
    layer: int,
    act_scales: dict,
    moments: dict | None,
    chunk: int,
    settings: FitSettings,
    alphas: dict[str, float] | None = None,
) -> dict[str, float]:
    """Fold every group of block ``layer`` in place, with ``alphas`` (producer -> α) when given,
    else searched (needs ``moments``); the statistics are transformed with the weights. Returns
    producer -> α. The search fits without error feedback (speed; the ranking of α is what
    matters) and with the run's rotation setting."""
    search = replace(settings, feedback=False, steps=0)
    chosen = {}
    for group in fold_groups(model, layer):
        if alphas is not None:
            alpha = alphas[group.producer]
        else:
            errors = group_errors(model, group, act_scales, moments, chunk, search)
            alpha = min(errors, key=errors.get)
        chosen[group.producer] = alpha
        scales = awq_scales(group.channel_rms(act_scales[group.consumers[0]]), alpha)
        fold(model, group, scales)
        fold_statistics(act_scales, moments, group, scales)
    return chosen


def fold_model(
    model: nn.Module, act_scales: dict, moments: dict, chunk: int, settings: FitSettings, progress: bool = True
) -> dict[str, float]:
    """:func:`fold_layer` on every block (statistics of the whole model at hand)."""
    chosen = {}
    for layer in tqdm(range(len(decoder_blocks(model)[1])), desc="fold scales", disable=not progress, unit="block"):
        chosen |= fold_layer(model, layer, act_scales, moments, chunk, settings)
    return chosen
