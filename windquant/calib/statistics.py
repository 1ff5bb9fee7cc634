"""Calibration statistics of the block linears, gathered by hooks while the model runs block by
block on the calibration windows (``calib.stream``).

* per decoder block (:func:`layer_statistics`): each linear's activation scales (per-input-channel
  RMS, the candidates' weighting) and, when asked, its input second moment ``E[x xᵀ]`` (error
  feedback, rotation, sensitivity scores). Only one block's statistics exist at a time;
* :func:`layer_fisher`: the mean squared output gradient of every linear (the sensitivity
  scores' per-layer Fisher), from one backward pass recomputed block by block.

Only this module registers hooks for statistics; allocators receive the results (through the
pipeline), never the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from windquant.calib.stream import (
    BlockStream,
    block_output,
    call_in_float32,
    capture,
    float32_copies,
    head_float32_copies,
    head_input,
    head_loss,
)
from windquant.model.units import block_linears, decoder_blocks
from windquant.runinfo import release_freed_memory


@dataclass
class CalibrationStats:
    windows: torch.Tensor  # [samples, len] calibration tokens
    act_scales: dict[str, torch.Tensor]  # linear name -> [in] RMS of each input channel
    moments: dict[str, torch.Tensor] | None = None  # linear name -> [in, in] E[x xᵀ]
    # [samples, len, d] float32: the unquantized last block's outputs on ``windows`` (a streamed
    # calibration has them for free), from which the head's inputs and the reference's logits follow.
    last_hidden: torch.Tensor | None = None


@contextmanager
def hooked(
    model: nn.Module,
    forward: Callable[[str], Callable] | None = None,
    backward: Callable[[str], Callable] | None = None,
    layer: int | None = None,
) -> Iterator[None]:
    """Hooks from ``forward(name)`` / ``backward(name)`` on the block linears (of block ``layer``
    only, when given), removed on exit."""
    handles = []
    try:
        for lay, name, _proj, mod in block_linears(model):
            if layer is not None and lay != layer:
                continue
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


def layer_statistics(stream: BlockStream, layer: int, moments: bool = False) -> CalibrationStats:
    """Activation scales (and with ``moments`` the input second moments) of block ``layer``'s
    linears, from running that block on the stream's inputs (which then move past it).

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

    with hooked(stream.model, forward, layer=layer):
        stream.run(layer)
    windows = torch.cat([b.tokens for b in stream.batches])
    scales = {name: (sums[name] / counts[name]).sqrt() for name in sums}
    if not moments:
        return CalibrationStats(windows, scales)
    own = {name: second[name] / counts[name] for name in second}
    return CalibrationStats(windows, scales, own | {name: own[owner] for name, owner in shares.items()})


def calibrate(
    model: nn.Module, windows: torch.Tensor, moments: bool = False, batch_size: int = 8, progress: bool = True
) -> CalibrationStats:
    """:func:`layer_statistics` of every block, held together (for whole-model studies; the
    pipeline consumes them one block at a time)."""
    stream = BlockStream(model, windows, batch_size)
    scales: dict[str, torch.Tensor] = {}
    second: dict[str, torch.Tensor] = {}
    for layer in tqdm(range(len(stream)), desc="calibrate", disable=not progress, unit="block"):
        stats = layer_statistics(stream, layer, moments)
        scales |= stats.act_scales
        second |= stats.moments or {}
    return CalibrationStats(windows, scales, second if moments else None, stream.last_hidden())


def layer_fisher(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    residual: dict[int, torch.Tensor] | None = None,
    columns: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean squared output gradient of every block linear (per output channel and token) of the
    calibration loss summed over tokens; with ``residual``, also filled with each block's
    [hidden] mean squared gradient per channel and token at its output (the residual stream);
    with ``columns``, also filled with each linear's [in] gradient-weighted input importance
    ``E_t[‖g_t‖² x_tj²] / E_t[‖g_t‖²]`` (``g_t`` its output gradient at token ``t``): the diagonal
    of the loss's Fisher in that linear's weights, summed over its rows, as per-column weights
    for a quantizer that takes only those (llama.cpp's importance matrix).

    The backward pass runs block by block: per batch, each block's input is kept (one hidden
    state per block), the loss's gradient enters at the last block's output (one sequence's
    logits at a time), and each block is recomputed with gradients on its own, last to first.
    No parameter gradient is formed."""
    _prefix, blocks = decoder_blocks(model)
    fisher: dict[str, float] = {}
    tokens = 0
    inputs_seen: dict[str, torch.Tensor] = {}
    weighted: dict[str, torch.Tensor] = {}
    weight_sums: dict[str, float] = {}

    def forward(name):
        def fn(_m, inp, _out):
            inputs_seen[name] = _inputs(inp)

        return fn

    def backward(name):
        def fn(_m, _gin, gout):
            g = gout[0].detach().float()
            fisher[name] = fisher.get(name, 0.0) + float((g * g).sum()) / g.shape[-1]
            if columns is not None:
                token_weight = (g * g).reshape(-1, g.shape[-1]).sum(-1, dtype=torch.float64)
                x = inputs_seen.pop(name).double()
                weighted[name] = weighted.get(name, 0.0) + token_weight @ (x * x)
                weight_sums[name] = weight_sums.get(name, 0.0) + float(token_weight.sum())

        return fn

    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        head = head_float32_copies(model)  # once for the pass: it is vocab-sized
        for batch in tqdm(capture(model, windows, batch_size), desc="sensitivity", disable=not progress, unit="batch"):
            inputs = []
            h = batch.hidden
            with torch.no_grad():
                for layer, block in enumerate(blocks):
                    inputs.append(h)
                    h = block_output(call_in_float32(block, h, **batch.kwargs[layer]))
            h.requires_grad_(True)
            for row in range(len(batch.tokens)):  # one sequence's logits at a time (vocab-sized)
                head_loss(model, batch.tokens[row : row + 1], h[row : row + 1], head).backward()
            grad = h.grad
            for layer in reversed(range(len(blocks))):
                if residual is not None:
                    residual[layer] = residual.get(layer, 0) + (grad * grad).sum((0, 1))
                x = inputs.pop().requires_grad_(True)
                with hooked(model, forward=forward if columns is not None else None, backward=backward, layer=layer):
                    block_output(
                        call_in_float32(blocks[layer], x, params=float32_copies(blocks[layer]), **batch.kwargs[layer])
                    ).backward(grad)
                grad = x.grad
            tokens += batch.tokens.numel()
    finally:
        for p in trainable:
            p.requires_grad_(True)
        release_freed_memory()  # the pass's activations and head copy: back to the OS
    if residual is not None:
        residual.update({layer: g / tokens for layer, g in residual.items()})
    if columns is not None:
        columns.update({n: (w / weight_sums[n]).float() for n, w in weighted.items()})
    return {n: f / tokens for n, f in fisher.items()}


@torch.no_grad()
def head_input_moment(
    model: nn.Module, windows: torch.Tensor, last_hidden: torch.Tensor | None = None, batch_size: int = 8
) -> torch.Tensor:
    """E[h hᵀ] [hidden, hidden] of the output head's inputs (the final normed hidden states) over
    ``windows``: the objective of error feedback on a quantized head. With the windows' last
    block outputs (``last_hidden``) only the final norm runs."""
    acc, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            part = None if last_hidden is None else last_hidden[i : i + batch_size]
            h = head_input(model, windows[i : i + batch_size], part)
            x = h.reshape(-1, h.shape[-1]).double()
            acc, n = acc + x.T @ x, n + x.shape[0]
    return (acc / n).float()
