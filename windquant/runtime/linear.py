"""RuntimeLinear: a packed linear computed by torch's int4 / int8 kernels, weights kept packed.

All chunks of up to 4 bits of one linear form one int4 matrix (``_weight_int4pack_mm_for_cpu``,
one scale and zero per row and group; a chunk narrower than 256 columns sets a smaller group and
its neighbours' scales repeat). 8-bit chunks go through ``_weight_int8pack_mm`` (one scale per
row, which is LSQ-8), 16-bit chunks are dense. A rotated chunk computes ``Q · Had · (s ⊙ x)``,
so the rotation is applied to the activation (one small Hadamard product per chunk width), never
to the weights. Salient INT8 weights are a sparse correction added after the matmuls.

``dtype`` is the kernels' activation dtype: bfloat16 is the fast path (the CPU kernel is only
vectorised for it); float32 computes the packed weights exactly (slow: a scalar loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from windquant.actions import SKIP, canonical_action
from windquant.pack.qlinear import QuantLinear
from windquant.quant.rotation import hadamard
from windquant.runtime.int4 import fits_int4, int4_unit, int4_weight, int8_unit

GROUPS = (256, 128, 64, 32)  # the CPU kernel's group sizes, largest first
ROW_MULTIPLE = 16  # the kernel's N (output rows) must be a multiple of this

Range = tuple[int, int]


def _merge(ranges: list[Range]) -> list[Range]:
    """Adjacent column ranges joined, so contiguous chunks are one slice."""
    merged: list[Range] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def _take(x: torch.Tensor, ranges: list[Range]) -> torch.Tensor:
    if len(ranges) == 1:
        a, b = ranges[0]
        return x if (a, b) == (0, x.shape[-1]) else x[:, a:b].contiguous()
    return torch.cat([x[:, a:b] for a, b in ranges], dim=1)


def int4_group(widths: list[int]) -> int | None:
    """The largest kernel group size dividing every chunk width (None: the kernel cannot hold them)."""
    return next((g for g in GROUPS if all(w % g == 0 for w in widths)), None)


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype: torch.dtype):
    """(packed weight, scales-and-zeros) for the CPU kernel from codes [N, K] (0..15) and per-row,
    per-group scale/zero [K/group, N]. The packed layout depends on this CPU's ISA: build it at load."""
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return w, torch.stack([scale, zero], dim=-1).to(dtype).contiguous()


class RuntimeLinear(nn.Module):
    """The fast form of one :class:`QuantLinear` (same inputs and outputs)."""

    def __init__(self, q: QuantLinear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.dtype = q.in_features, q.out_features, dtype
        n = q.out_features
        signs = torch.ones(q.in_features)
        rotated: list[tuple[int, int, int]] = []
        int4: list[tuple[int, int, object]] = []
        self._int8: list[tuple[Range, str, str]] = []
        dense_ranges: list[Range] = []
        dense_weights: list[torch.Tensor] = []
        sal_rows, sal_cols, sal_delta = [], [], []
        for k, (col0, col1, action, _rotate) in enumerate(q.chunks):
            packed, g, action = q.chunk_tensors(k), col1 - col0, canonical_action(action)
            if action == SKIP:
                dense_ranges.append((col0, col1))
                dense_weights.append(packed["weight"].float())
                continue
            if not fits_int4(action):
                values, scale, s = int8_unit(packed, action, n, g)
                name = f"int8_{len(self._int8)}"
                self.register_buffer(name + "_w", values, persistent=False)
                self.register_buffer(name + "_s", scale.to(dtype), persistent=False)
                self._int8.append(((col0, col1), name + "_w", name + "_s"))
            else:
                unit = int4_unit(packed, action, n, g)
                s = unit.signs
                int4.append((col0, col1, unit))
                sal_rows.append(unit.sal_rows)
                sal_cols.append(unit.sal_cols + col0)
                sal_delta.append(unit.sal_delta)
            if s is not None:
                signs[col0:col1] = s
                rotated.append((col0, col1, g))
        group = int4_group([b - a for a, b, _ in int4]) if n % ROW_MULTIPLE == 0 else None
        if int4 and group is None:  # a width the kernel cannot take: those chunks run dense
            dense_ranges += [(a, b) for a, b, _ in int4]
            dense_weights += [int4_weight(u) for _a, _b, u in int4]
            int4 = []
        self._int4_ranges = _merge([(a, b) for a, b, _ in int4])
        self.group = group if int4 else None
        if int4:
            codes = torch.cat([u.codes for _a, _b, u in int4], dim=1)
            reps = [(b - a) // group for a, b, _ in int4]
            scale = torch.cat([u.scale[None].expand(r, n) for (_a, _b, u), r in zip(int4, reps)])
            zero = torch.cat([u.zero[None].expand(r, n) for (_a, _b, u), r in zip(int4, reps)])
            w4, sz = pack_int4(codes, scale, zero, group, dtype)
            self.register_buffer("int4_w", w4, persistent=False)
            self.register_buffer("int4_sz", sz, persistent=False)
        order = sorted(range(len(dense_ranges)), key=lambda i: dense_ranges[i])
        self._dense_ranges = _merge([dense_ranges[i] for i in order])
        self.register_buffer(
            "dense_w", torch.cat([dense_weights[i] for i in order], dim=1).to(dtype) if order else None, persistent=False
        )
        self._rotated = _merge_rotations(rotated)
        self.register_buffer("signs", signs if rotated else None, persistent=False)
        has_sal = any(r.numel() for r in sal_rows)
        self.register_buffer("sal_rows", torch.cat(sal_rows) if has_sal else None, persistent=False)
        self.register_buffer("sal_cols", torch.cat(sal_cols) if has_sal else None, persistent=False)
        self.register_buffer("sal_delta", torch.cat(sal_delta) if has_sal else None, persistent=False)
        self.register_buffer("bias", None if q.bias is None else q.bias.detach().float().clone(), persistent=False)
        self.shared: SharedRotation | None = None

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with every rotated chunk's columns replaced by ``Had · (s ⊙ x)``."""
        return rotate_runs(x * self.signs, self._rotated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, out_dtype = x.shape, x.dtype
        if self.shared is not None:
            x = self.shared.rotated(self, x)
        else:
            x = x.reshape(-1, self.in_features)
            if self.signs is not None:
                x = self._rotate(x)
        xc = x.to(self.dtype)
        y = None
        if self.group is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(_take(xc, self._int4_ranges), self.int4_w, self.group, self.int4_sz)
        for rng, w_name, s_name in self._int8:
            part = torch.ops.aten._weight_int8pack_mm(_take(xc, [rng]), getattr(self, w_name), getattr(self, s_name))
            y = part if y is None else y + part
        if self.dense_w is not None:
            part = F.linear(_take(xc, self._dense_ranges), self.dense_w)
            y = part if y is None else y + part
        y = y.to(out_dtype)
        if self.sal_rows is not None:
            contrib = x[:, self.sal_cols].to(out_dtype) * self.sal_delta.to(out_dtype)
            y = y.index_add(1, self.sal_rows, contrib)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def runtime_bytes(self) -> int:
        """Bytes this module holds (packed weights, scales, signs, corrections, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        kinds = f"int4 group {self.group}" if self.group else "no int4"
        return f"in={self.in_features}, out={self.out_features}, {kinds}, int8 chunks={len(self._int8)}, dtype={self.dtype}"


def rotate_runs(xs: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """``xs`` [..., in] (signs applied) with each run (a, b, g) of rotated chunks multiplied by the
    order-g Hadamard matrix, chunk by chunk: one 2-D product per run."""
    parts, at = [], 0
    lead = xs.shape[:-1]
    for a, b, g in runs:
        if a > at:
            parts.append(xs[..., at:a])
        parts.append((xs[..., a:b].reshape(-1, g) @ hadamard(g).to(xs.dtype)).reshape(*lead, b - a))
        at = b
    if at < xs.shape[-1]:
        parts.append(xs[..., at:])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class SharedRotation:
    """Linears that read the same input (q/k/v, gate/up) rotate it in one batched product: the
    first one called rotates the input for all of them (each with its own signs) and the others
    take their share while the input is the same, unmodified tensor."""

    def __init__(self, members: list[RuntimeLinear]):
        self.signs = torch.stack([m.signs for m in members])[:, None, :]  # [n, 1, in]
        self.runs = members[0]._rotated
        self.index = {id(m): i for i, m in enumerate(members)}
        self._key: tuple | None = None
        self._out: torch.Tensor | None = None
        self._left = 0

    @staticmethod
    def fits(members: list[RuntimeLinear]) -> bool:
        first = members[0]
        return len(members) > 1 and all(
            m.signs is not None and m._rotated == first._rotated and m.in_features == first.in_features for m in members
        )

    def rotated(self, member: RuntimeLinear, x: torch.Tensor) -> torch.Tensor:
        key = (x, x._version)
        if self._key is None or self._key[0] is not x or self._key[1] != x._version or self._left == 0:
            x2 = x.reshape(-1, x.shape[-1])
            self._out = rotate_runs(x2[None] * self.signs.to(x2.dtype), self.runs)
            self._key, self._left = key, len(self.index)
        out = self._out[self.index[id(member)]]
        self._left -= 1
        if self._left == 0:  # every member served: drop the input and the rotated copies
            self._key = self._out = None
        return out


def _merge_rotations(rotated: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent rotated chunks of one width joined: one batched Hadamard product per run."""
    merged: list[tuple[int, int, int]] = []
    for a, b, g in sorted(rotated):
        if merged and merged[-1][1] == a and merged[-1][2] == g:
            merged[-1] = (merged[-1][0], b, g)
        else:
            merged.append((a, b, g))
    return merged
