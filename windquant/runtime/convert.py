"""Convert a loaded checkpoint's packed modules into their runtime forms, in place."""

from __future__ import annotations

import torch
from torch import nn

from windquant.pack.apply import set_submodule
from windquant.pack.qlinear import QuantLinear
from windquant.runinfo import release_freed_memory
from windquant.runtime.embedding import RowEmbedding, RowHead
from windquant.runtime.linear import RuntimeLinear, SharedRotation


@torch.no_grad()
def to_runtime(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, rows: dict[str, tuple[dict[str, torch.Tensor], int]] | None = None
) -> nn.Module:
    """Swap every :class:`QuantLinear` of ``model`` for a :class:`RuntimeLinear` computing in
    ``dtype`` (bfloat16: the fast path; float32: exact, slow). The packed buffers are dropped as
    each linear is converted, so at most one linear is held twice. ``rows`` (module name ->
    packed tensors and bits, as a checkpoint stores them) become a :class:`RowEmbedding` for the
    input embedding and a :class:`RowHead` for the head; a tied head shares the embedding's."""
    for name in [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        set_submodule(model, name, RuntimeLinear(model.get_submodule(name), dtype))
    share_rotations(model)
    emb_name = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), None)
    head_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    for name, (packed, bits) in (rows or {}).items():
        # Own, allocator-aligned copies: a tensor read from the safetensors file may sit at any
        # offset of its buffer, and the int8 kernel's vector loads then crash (measured: M >= 8).
        packed = {k: v.clone() for k, v in packed.items()}
        if name == emb_name:
            set_submodule(model, name, RowEmbedding(packed, bits, next(model.parameters()).dtype))
            if getattr(model.config, "tie_word_embeddings", False) and head_name is not None:
                set_submodule(model, head_name, RowHead(packed, bits, dtype))
        else:
            set_submodule(model, name, RowHead(packed, bits, dtype))
    release_freed_memory()
    return model


# Projections that read the same input in every transformers decoder we know (LLaMA, Gemma,
# Qwen, Mistral): their rotations are computed together.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def share_rotations(model: nn.Module) -> None:
    """Give each group of sibling runtime linears one :class:`SharedRotation`."""
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, RuntimeLinear) for m in members) and SharedRotation.fits(members):
                shared = SharedRotation(members)
                for m in members:
                    m.shared = shared


def runtime_bytes(model: nn.Module) -> int:
    """Bytes held by the runtime linears (packed weights, scales, signs, corrections)."""
    return sum(m.runtime_bytes() for m in model.modules() if isinstance(m, RuntimeLinear))
