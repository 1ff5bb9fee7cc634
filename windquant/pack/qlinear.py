"""QuantLinear: a linear layer stored as packed column chunks, dequantized on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from windquant.quant.accounting import unit_layout
from windquant.quant.unit import dequantize_unit

Chunk = tuple[int, int, float, bool]  # (col0, col1, applied action, rotate setting)


class QuantLinear(nn.Module):
    """Holds each chunk's packed tensors as buffers named ``c{k}_{field}``.

    By default the weights stay packed: each forward dequantizes this one layer, multiplies and
    drops the dense copy, so a loaded model holds about its packed size plus one layer. With
    ``dense_cache`` the dense weight (in the compute dtype) is kept after the first forward: the
    unpacking is paid once, at the memory of a dense layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        chunks: list[Chunk],
        salient_rate: float,
        bias: bool = False,
        dense_cache: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.chunks = [(int(a), int(b), float(c), bool(r)) for a, b, c, r in chunks]
        self.salient_rate = salient_rate
        for k, (col0, col1, action, rotate) in enumerate(self.chunks):
            for field, (dtype, shape) in unit_layout(action, out_features, col1 - col0, salient_rate, rotate).items():
                self.register_buffer(f"c{k}_{field}", torch.zeros(shape, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.dense_cache = dense_cache
        self._weight: torch.Tensor | None = None

    def chunk_tensors(self, k: int) -> dict[str, torch.Tensor]:
        prefix = f"c{k}_"
        return {n[len(prefix) :]: b for n, b in self.named_buffers() if n.startswith(prefix)}

    def set_chunk(self, k: int, packed: dict[str, torch.Tensor]) -> None:
        for field, t in packed.items():
            getattr(self, f"c{k}_{field}").copy_(t)
        self._weight = None

    def packed_bytes(self) -> int:
        """Bytes of every packed chunk tensor (what true bits count)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n.startswith("c"))

    def dequantize(self) -> torch.Tensor:
        parts = [
            dequantize_unit(self.chunk_tensors(k), action, self.out_features, col1 - col0)
            for k, (col0, col1, action, _rotate) in enumerate(self.chunks)
        ]
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight
        if weight is None or weight.device != x.device:
            weight = self.dequantize().to(x.device, x.dtype)
            self._weight = weight if self.dense_cache else None
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        acts = ",".join(f"{a:g}" for _, _, a, _ in self.chunks)
        return f"in={self.in_features}, out={self.out_features}, chunk actions=[{acts}]"
