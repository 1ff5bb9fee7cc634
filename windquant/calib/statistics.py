"""Calibration statistics of every block linear, gathered by hooks on the model's own forward.

* activation scales: per-input-channel RMS (forward only, the candidates' weighting), and
  from the same pass, when error feedback asks for them, the input second moments ``E[x xᵀ]``;
* input second moments and the per-layer Fisher (mean squared output gradient, one backward
  pass): what the sensitivity scores need.

Only this module registers hooks or runs the model for statistics; allocators receive the
results (through the pipeline), never the model. The two passes stay separate because the
second needs gradients and is skipped whenever the scores are already cached; the scales
pass is kept exactly as it was so the candidate-cache fingerprint (which hashes the scales)
does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from windquant.model.units import block_linears


@dataclass
class CalibrationStats:
    windows: torch.Tensor  # [samples, len] calibration tokens
    act_scales: dict[str, torch.Tensor]  # linear name -> [in] RMS of each input channel
    moments: dict[str, torch.Tensor] | None = None  # linear name -> [in, in] E[x xᵀ] (error feedback)


@contextmanager
def hooked(model: nn.Module, forward: Callable[[str], Callable] | None = None, backward: Callable[[str], Callable] | None = None) -> Iterator[None]:
    """Hooks from ``forward(name)`` / ``backward(name)`` on every block linear, removed on exit."""
    handles = []
    try:
        for _layer, name, _proj, mod in block_linears(model):
            if forward is not None:
                handles.append(mod.register_forward_hook(forward(name)))
            if backward is not None:
                handles.append(mod.register_full_backward_hook(backward(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def _inputs(inputs: tuple) -> torch.Tensor:
    return inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor, moments: bool = False, batch_size: int = 8, progress: bool = True) -> CalibrationStats:
    """Activation scales (RMS of each input channel of every block linear) over ``windows``, and
    with ``moments`` each linear's input second moment ``E[x xᵀ]`` from the same forward pass.

    The RMS squared is the diagonal of the input second moment, so ``Σ_j rms_j² (w_ij − ŵ_ij)²``
    is the diagonal estimate of the output error; error feedback uses the full matrix.
    """
    sums: dict[str, torch.Tensor] = {}
    second: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    # Linears that read the very tensor the previous one read (q/k/v, gate/up) share its moment:
    # one matrix in memory, one product per batch.
    shares: dict[str, str] = {}
    last: list = [None, None]  # the previous hooked input and the linear that owns its moment

    def forward(name):
        def fn(_mod, inputs, _out):
            x = _inputs(inputs)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
            if not moments:
                return
            if inputs[0] is last[0]:
                if shares.setdefault(name, last[1]) != last[1] or name in second:
                    raise RuntimeError(f"{name} read a shared input in one batch but not in another")
                return
            if name in shares:
                raise RuntimeError(f"{name} read a shared input in one batch but not in another")
            second[name] = second.get(name, 0) + x.T @ x
            last[:] = [inputs[0], name]

        return fn

    with hooked(model, forward):
        for i in tqdm(range(0, len(windows), batch_size), desc="calibrate", disable=not progress, unit="batch"):
            model(input_ids=windows[i : i + batch_size], use_cache=False)
            last[:] = [None, None]
    scales = {name: (sums[name] / counts[name]).sqrt() for name in sums}
    if not moments:
        return CalibrationStats(windows, scales)
    own = {name: second[name] / counts[name] for name in second}
    return CalibrationStats(windows, scales, own | {name: own[owner] for name, owner in shares.items()})


def second_moments_and_fisher(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    moments: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``E[x xᵀ]`` of every block linear's input and mean squared output gradient. ``moments``
    gathered on the same windows (:func:`calibrate` with ``moments``) are reused, not summed again.

    No parameter gradient is formed (they would cost a copy of the model): the gradient flows
    from the embeddings' output, made to require it, through every block."""
    given = moments
    sums: dict[str, torch.Tensor] = {}
    fisher: dict[str, float] = {}
    rows: dict[str, int] = {}

    def forward(name):
        def fn(_m, inputs, _out):
            x = _inputs(inputs)
            if given is None:
                sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return fn

    def backward(name):
        def fn(_m, _gin, gout):
            g = gout[0].detach().float()
            fisher[name] = fisher.get(name, 0.0) + float((g * g).sum()) / g.shape[-1]

        return fn

    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    try:
        model.eval()
        for p in trainable:
            p.requires_grad_(False)
        with hooked(model, forward, backward):
            for i in tqdm(range(0, len(windows), batch_size), desc="sensitivity", disable=not progress, unit="batch"):
                batch = windows[i : i + batch_size]
                # Sum (not mean) over tokens: each token's gradient is then its own loss's.
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss * batch[:, 1:].numel()
                loss.backward()
    finally:
        start.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    moments = given if given is not None else {n: sums[n] / rows[n] for n in sums}
    return moments, {n: fisher[n] / rows[n] for n in fisher}
