"""Incoherence rotation of a unit's columns (QuIP# / HIGGS style): random signs × Hadamard.

A unit computes ``W x``. With an orthogonal ``R = diag(s) · Had / √g`` it equally computes
``(W R)(Rᵀ x)``; the stored codes quantize ``W R``, whose rows are mixtures of all ``g``
columns, so one large weight or one loud input channel no longer sets the scale of its whole
row. Dequantization undoes it once: ``Ŵ = Q Rᵀ``. The signs are stored with the unit (one
bit per column, counted in its true bits), so decoding needs no random generator. ``g`` must
be a power of two (Sylvester's construction); other widths are left unrotated.

Outliers are spread rather than kept, so a rotated unit stores no INT8 salient weights.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from windquant.actions import SKIP, canonical_action


def rotates(action: float, columns: int, rotate: bool) -> bool:
    """Whether a unit of ``columns`` at ``action`` is stored rotated under setting ``rotate``."""
    return rotate and canonical_action(action) != SKIP and columns >= 2 and columns & (columns - 1) == 0


def sign_bytes(columns: int) -> int:
    return math.ceil(columns / 8)


def random_signs(columns: int, seed: int) -> torch.Tensor:
    """±1 (float32) per column, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (columns,), generator=g).float() * 2 - 1


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    bits = (signs < 0).numpy().astype(np.uint8)
    return torch.from_numpy(np.packbits(bits, bitorder="little").copy())


def unpack_signs(packed: torch.Tensor, columns: int) -> torch.Tensor:
    bits = np.unpackbits(packed.numpy(), bitorder="little")[:columns]
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float32))


@functools.cache  # packed inference rebuilds rotations on every forward; never mutate the result
def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester–Hadamard matrix of order ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rotation(signs: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``R = diag(signs) · Had`` [g, g]."""
    return signs[:, None] * hadamard(signs.numel())


def unrotate(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``w @ rotation(signs).T``, i.e. ``(w @ Had) * signs`` (Had is symmetric): one product with
    the cached Hadamard, no ``g × g`` rotation built per call (packed inference undoes every
    rotation on every forward; a butterfly transform measured slower than this product)."""
    return (w @ hadamard(signs.numel())) * signs
