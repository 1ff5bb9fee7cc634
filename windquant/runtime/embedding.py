"""The row-quantized embedding and output head at run time, weights kept packed.

The embedding gathers the rows of its tokens and dequantizes only those. The head multiplies
through the int8 kernel (one scale per output row: exactly the 8-bit row format) or the int4
kernel (group 32); a tied head shares the embedding's INT8 tensor. A mixed head runs both
kernels, each on its rows, and puts the logits back in token order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from windquant.quant.rows import GROUP4, MIXED, dequantize_rows, gather_rows, mixed_parts, packed_split, unpack_q4
from windquant.runtime.linear import pack_int4


class RowEmbedding(nn.Module):
    def __init__(self, packed: dict[str, torch.Tensor], bits: int | str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.bits, self.out_dtype = bits, dtype
        self.fields = list(packed)
        for field, t in packed.items():
            self.register_buffer(field, t, persistent=False)
        self.split = packed_split(packed) if bits == MIXED else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = {f: getattr(self, f) for f in self.fields}
        return gather_rows(packed, self.bits, ids, self.split).to(self.out_dtype)


class RowHead(nn.Module):
    """``x @ Wᵀ`` for a row-quantized ``W`` [vocab, hidden]; ``dtype`` is the kernels' activation dtype."""

    def __init__(self, packed: dict[str, torch.Tensor], bits: int | str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.bits, self.dtype = bits, dtype
        if bits == MIXED:
            p8, p4 = mixed_parts(packed)
            self.part8, self.part4 = RowHead(p8, 8, dtype), RowHead(p4, 4, dtype)
            # Logits come out as [8-bit rows, 4-bit rows]; this gather puts them in token order.
            is8, pos = packed_split(packed)
            self.register_buffer("token_order", torch.where(is8, pos, len(packed["idx8"]) + pos), persistent=False)
        elif bits == 8:
            self.register_buffer("q8", packed["q8"], persistent=False)
            self.register_buffer("scale", packed["scale"].to(dtype), persistent=False)
        elif bits == 4:
            scale = packed["scale"].float().T.contiguous()  # [groups, vocab]
            w, sz = pack_int4(unpack_q4(packed["q4"]), scale, torch.zeros_like(scale), GROUP4, dtype)
            self.register_buffer("int4_w", w, persistent=False)
            self.register_buffer("int4_sz", sz, persistent=False)
        else:
            self.register_buffer("weight", dequantize_rows(packed, bits).to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, out_dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).to(self.dtype)
        if self.bits == MIXED:
            y = torch.cat([self.part8(x2), self.part4(x2)], dim=-1)[:, self.token_order]
        elif self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q8, self.scale)
        elif self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.int4_w, GROUP4, self.int4_sz)
        else:
            y = F.linear(x2, self.weight)
        return y.to(out_dtype).reshape(*shape[:-1], -1)
