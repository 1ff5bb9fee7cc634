"""The token embedding and an untied output head, quantized per row into the checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from windquant.quant.accounting import layout_bytes
from windquant.quant.row_formats import RowFormat
from windquant.quant.rows import dequantize_rows, quantize_rows, row_layout

PREFIX = "rows_"  # stored as ``{module}.rows_{field}`` in place of ``{module}.weight``


def row_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of the input embedding and, when it is not tied to it, the output head."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    wanted = [emb] + ([head] if head is not None and head.weight is not emb.weight else [])
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)]: m for m in wanted}


@torch.no_grad()
def quantized_rows(
    model: nn.Module, bits: RowFormat, token_counts: torch.Tensor | None = None, head_moment: torch.Tensor | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Name -> packed tensors (:func:`windquant.quant.rows.row_layout`) of the embedding (and an
    untied head) per row at ``bits``; the model is not changed. ``token_counts`` rank the rows of
    the mixed format (None: by token id); ``head_moment`` (second moment of the head's inputs) has
    the head's 4-bit rows chosen with error feedback (a tied embedding is the head)."""
    head = model.get_output_embeddings()
    packed = {}
    for name, m in row_modules(model).items():
        moment = head_moment if head is not None and m.weight is head.weight else None
        packed[name] = quantize_rows(m.weight, bits, token_counts, moment)
    return packed


@torch.no_grad()
def round_rows_(
    model: nn.Module,
    bits: RowFormat,
    token_counts: torch.Tensor | None = None,
    head_moment: torch.Tensor | None = None,
    packed: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`quantized_rows` (or ``packed``, rows it already made), with the weights replaced by
    the dequantized values in place, so the model computes exactly what is stored."""
    packed = quantized_rows(model, bits, token_counts, head_moment) if packed is None else packed
    for name, p in packed.items():
        m = model.get_submodule(name)
        m.weight.data = dequantize_rows(p, bits).to(m.weight.dtype)
    return packed


def rows_bytes(model: nn.Module, bits: RowFormat) -> int:
    """Bytes the checkpoint stores for the row-quantized matrices at ``bits``."""
    return sum(layout_bytes(row_layout(bits, *m.weight.shape)) for m in row_modules(model).values())


def split_rows(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Remove every ``{name}.rows_*`` tensor from a loaded ``state``: name -> its packed tensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        prefix = f"{name}.{PREFIX}"
        out[name] = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    return out
