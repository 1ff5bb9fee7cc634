"""Bit-packing of operator codes into bytes (pure functions).

* ternary (3 levels): five trits per byte, base 3 (3^5 = 243 <= 256), i.e. 1.6 bits/weight;
* every other grid with K = 2^b levels: a little-endian bitstream of b bits per code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TRITS_PER_BYTE = 5


def code_bits(levels: int) -> int:
    return max(1, math.ceil(math.log2(levels)))


def packed_code_bytes(levels: int, n: int) -> int:
    """Bytes needed to store ``n`` codes of a ``levels``-level grid."""
    if levels == 3:
        return math.ceil(n / TRITS_PER_BYTE)
    return math.ceil(n * code_bits(levels) / 8)


def byte_group(b: int) -> tuple[int, int]:
    """(bytes, codes) of the smallest group of bytes that holds a whole number of ``b``-bit codes
    (3 bytes = 8 three-bit codes); packing and unpacking both work group by group."""
    group = math.lcm(8, b) // 8
    return group, 8 * group // b


def pack_codes(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Pack a flat tensor of codes in ``[0, levels)`` into uint8 bytes.

    Like :func:`unpack_codes`, by groups of bytes that hold a whole number of codes: each group's
    codes summed into one little-endian int64 word, then cut into bytes (a per-bit expansion
    took 2-14x as long for 2- to 8-bit codes; every candidate of every unit is packed)."""
    c = codes.flatten().to(torch.int64).numpy()
    n = c.size
    if levels == 3:
        pad = (-n) % TRITS_PER_BYTE
        c = np.concatenate([c, np.zeros(pad, dtype=np.int64)]).reshape(-1, TRITS_PER_BYTE)
        weights = 3 ** np.arange(TRITS_PER_BYTE, dtype=np.int64)
        out = (c * weights).sum(axis=1).astype(np.uint8)
    else:
        b = code_bits(levels)
        group, per = byte_group(b)
        c = np.concatenate([c, np.zeros((-n) % per, dtype=np.int64)])
        words = (c.reshape(-1, per) << (b * np.arange(per, dtype=np.int64))).sum(axis=1)
        out = ((words[:, None] >> (8 * np.arange(group, dtype=np.int64))) & 255).astype(np.uint8).reshape(-1)
        out = out[: packed_code_bytes(levels, n)]  # the last group's padding bytes
    assert out.size == packed_code_bytes(levels, n)
    return torch.from_numpy(out.copy())


def unpack_codes(packed: torch.Tensor, levels: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``n`` int64 codes.

    Vectorised over groups of bytes that hold a whole number of codes (one byte of trits;
    ``lcm(8, b) / 8`` bytes of ``b``-bit codes, e.g. 3 bytes = 8 three-bit codes): this runs on
    every forward of a packed model, so it avoids a per-bit expansion."""
    p = packed.to(torch.int64)
    if levels == 3:
        digits = torch.div(p[:, None], 3 ** torch.arange(TRITS_PER_BYTE), rounding_mode="floor") % 3
        return digits.reshape(-1)[:n]
    b = code_bits(levels)
    group, per = byte_group(b)
    pad = (-p.numel()) % group
    if pad:
        p = torch.cat([p, p.new_zeros(pad)])
    words = (p.view(-1, group) << (8 * torch.arange(group))).sum(dim=1)  # little-endian
    codes = (words[:, None] >> (b * torch.arange(per))) & ((1 << b) - 1)
    return codes.reshape(-1)[:n]
