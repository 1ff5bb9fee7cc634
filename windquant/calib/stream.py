"""The model run one decoder block at a time on captured block inputs (teacher-forced, as GPTQ
and AutoRound calibrate).

Each block's inputs are the unquantized model's own hidden states, captured once: the model's
forward runs with every block replaced by a recorder that keeps the keyword arguments the
model hands that block (attention masks, rotary embeddings: per block, since e.g. Gemma-3
alternates sliding and full attention) and passes the hidden states through. Afterwards only
the calibration windows' hidden states at the current depth are held, and the block being
computed runs on float32 copies of its parameters, whatever dtype the model is held in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from windquant.errors import WindquantError
from windquant.model.units import decoder_blocks


class _Stop(Exception):
    """Raised where the rest of the forward is not needed (after the last block's inputs, before the head)."""


@contextmanager
def replaced_forwards(blocks: nn.ModuleList, forward_of: Callable[[int], Callable]) -> Iterator[None]:
    """Every block's ``forward`` replaced by ``forward_of(index)`` (an instance attribute)."""
    try:
        for i, block in enumerate(blocks):
            block.forward = forward_of(i)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def float32_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 copies of ``module``'s half-precision parameters (none when it is float32)."""
    return {n: p.float() for n, p in module.named_parameters() if p.is_floating_point() and p.dtype != torch.float32}


def call_in_float32(module: nn.Module, *args, params: dict[str, torch.Tensor] | None = None, **kwargs):
    """``module(*args, **kwargs)`` computed with float32 copies of its parameters (``params``,
    else made now), whatever dtype it is held in. The module's own tensors are never replaced
    (a model loaded from safetensors keeps them memory-mapped), and the copies go with the call."""
    params = float32_copies(module) if params is None else params
    if not params:
        return module(*args, **kwargs)
    return torch.func.functional_call(module, params, args, kwargs)


def block_output(out) -> torch.Tensor:
    """The hidden states a block returns (older transformers return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BlockBatch:
    """One batch of calibration windows at the current depth."""

    tokens: torch.Tensor  # [b, len]
    hidden: torch.Tensor  # [b, len, d] float32: the input of the current block
    kwargs: list[dict]  # per block: the keyword arguments the model gives it for this batch


def _recorder(model: nn.Module, n_blocks: int, seen: list) -> Callable[[int], Callable]:
    """Block forwards that append (hidden states, keyword arguments) to ``seen`` and pass the
    hidden states through; the last one stops the model."""

    def forward_of(i: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise WindquantError(
                    f"{type(model).__name__} passes its decoder blocks positional arguments; "
                    "windquant streams LLaMA-style blocks that take everything but the hidden states by keyword"
                )
            seen.append((hidden_states, kwargs))
            if i == n_blocks - 1:
                raise _Stop
            return hidden_states

        return forward

    return forward_of


@torch.no_grad()
def capture(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[BlockBatch]:
    """The first block's inputs, and every block's keyword arguments, for each batch of ``windows``."""
    _prefix, blocks = decoder_blocks(model)
    batches = []
    for start in range(0, len(windows), batch_size):
        tokens = windows[start : start + batch_size]
        seen: list = []
        with replaced_forwards(blocks, _recorder(model, len(blocks), seen)):
            try:
                model(input_ids=tokens, use_cache=False)
            except _Stop:
                pass
        batches.append(BlockBatch(tokens, seen[0][0].float(), [kw for _h, kw in seen]))
    return batches


class BlockStream:
    """Calibration windows walked through the model one block at a time.

    ``run(layer)`` computes block ``layer`` on every batch (hooks registered by the caller see
    it) and makes its outputs the next block's inputs; blocks are run in order, each once.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 8):
        self.model = model
        self.prefix, self.blocks = decoder_blocks(model)
        self.batches = capture(model, windows, batch_size)
        self.next_layer = 0

    def __len__(self) -> int:
        return len(self.blocks)

    @torch.no_grad()
    def run(self, layer: int) -> None:
        if layer != self.next_layer:
            raise RuntimeError(f"blocks run in order: expected block {self.next_layer}, got {layer}")
        block = self.blocks[layer]
        params = float32_copies(block)
        for b in self.batches:
            b.hidden = block_output(call_in_float32(block, b.hidden, params=params, **b.kwargs[layer]))
        self.next_layer += 1

    def last_hidden(self) -> torch.Tensor:
        """[samples, len, d] float32: the last block's outputs, once every block has run."""
        if self.next_layer != len(self.blocks):
            raise RuntimeError(f"the last block's outputs need every block run; {self.next_layer} of {len(self.blocks)} were")
        return torch.cat([b.hidden for b in self.batches])


@contextmanager
def after_the_blocks(model: nn.Module, last_hidden: torch.Tensor) -> Iterator[None]:
    """The model's forward with ``last_hidden`` as the last block's output: its embeddings, final
    norm and head run, the blocks do not."""
    _prefix, blocks = decoder_blocks(model)

    def passthrough(i):
        def forward(hidden_states, *args, **kwargs):
            return last_hidden if i == len(blocks) - 1 else hidden_states

        return forward

    with replaced_forwards(blocks, passthrough):
        yield


def head_loss(
    model: nn.Module, tokens: torch.Tensor, last_hidden: torch.Tensor, params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The model's own next-token loss (summed over tokens) with ``last_hidden`` as the last
    block's output. ``params``: float32 copies of the head's parameters
    (:func:`head_float32_copies`) when it is held in half."""
    with after_the_blocks(model, last_hidden):
        loss = call_in_float32(model, input_ids=tokens, labels=tokens, use_cache=False, params=params or {}).loss
    # Sum (not mean) over tokens: each token's gradient is then its own loss's.
    return loss * tokens[:, 1:].numel()


def head_logits(
    model: nn.Module, tokens: torch.Tensor, last_hidden: torch.Tensor, params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The model's logits [b, len, vocab] with ``last_hidden`` as the last block's output."""
    with after_the_blocks(model, last_hidden):
        return call_in_float32(model, input_ids=tokens, use_cache=False, params=params or {}).logits


def head_input(model: nn.Module, tokens: torch.Tensor, last_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The output head's input [b, len, d] (the final normed hidden states), with ``last_hidden``
    as the last block's output when given (else the blocks run); the vocab-sized head never runs."""
    seen = []

    def stop(_m, inputs):
        seen.append(inputs[0])
        raise _Stop

    handle = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        with after_the_blocks(model, last_hidden) if last_hidden is not None else nullcontext():
            model(input_ids=tokens, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def head_float32_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 copies of the output head's parameters, named as in ``model`` (a head tied to the
    input embeddings is named once, as the embeddings)."""
    head = {id(p) for p in model.get_output_embeddings().parameters()}
    return {n: p.float() for n, p in model.named_parameters() if id(p) in head and p.dtype != torch.float32}
