"""Bit accounting: the one table of what a unit stores, read by packer and budget alike.

* **paper bits** (paper Eq. 6): ``16·n`` for skip, else ``b·n_q + 8·n_p``.
* **true bits**: 8 × the bytes of every tensor the packed checkpoint stores for the unit
  (codes as packed, scales, shifts, salient values, their column indices, per-row counts
  and scale, the signs of a rotated unit). :func:`unit_layout` is the single source of truth: the packer builds
  exactly these tensors and asserts their sizes, so "bytes on disk == true bits".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from windquant.actions import ACCOUNTINGS, SKIP, canonical_accounting, canonical_action
from windquant.quant import salient
from windquant.quant.codes import packed_code_bytes
from windquant.quant.ops import grid_for
from windquant.quant.rotation import rotates, sign_bytes


def n_protected(action: float, out_features: int, columns: int, rate: float, rotate: bool = False) -> int:
    """INT8 salient weights of a unit: none for 8-bit, skipped or rotated units."""
    action = canonical_action(action)
    if action == SKIP or not grid_for(action).protect or rotates(action, columns, rotate):
        return 0
    return salient.n_salient(out_features, columns, rate)


def unit_layout(
    action: float, out_features: int, columns: int, rate: float, rotate: bool = False
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Field name -> (dtype, shape) of every tensor stored for one unit."""
    action = canonical_action(action)
    if action == SKIP:
        return {"weight": (torch.float16, (out_features, columns))}
    grid = grid_for(action)
    n_p = n_protected(action, out_features, columns, rate, rotate)
    n_q = out_features * columns - n_p
    layout = {
        "codes": (torch.uint8, (packed_code_bytes(grid.levels, n_q),)),
        "scale": (torch.float16, (out_features,)),
    }
    if grid.learn_shift:
        layout["shift"] = (torch.float16, (out_features,))
    if rotates(action, columns, rotate):
        layout["rot_signs"] = (torch.uint8, (sign_bytes(columns),))
    if n_p > 0:
        layout |= {
            "sal_val": (torch.int8, (n_p,)),
            "sal_col": (salient.column_index_dtype(columns), (n_p,)),
            "sal_cnt": (torch.uint8, (out_features,)),
            "sal_scale": (torch.float16, (1,)),
        }
    return layout


def layout_bytes(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    total = 0
    for dtype, shape in layout.values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def unit_true_bits(action: float, out_features: int, columns: int, rate: float, rotate: bool = False) -> int:
    """Total stored bits of one unit (not per weight)."""
    return 8 * layout_bytes(unit_layout(action, out_features, columns, rate, rotate))


def unit_paper_bits(action: float, out_features: int, columns: int, rate: float, rotate: bool = False) -> float:
    """Paper Eq. 6 bits of one unit (not per weight)."""
    action = canonical_action(action)
    n = out_features * columns
    if action == SKIP:
        return 16.0 * n
    n_p = n_protected(action, out_features, columns, rate, rotate)
    return action * (n - n_p) + 8.0 * n_p


def unit_bits(action: float, out_features: int, columns: int, rate: float, accounting: str, rotate: bool = False) -> float:
    accounting = canonical_accounting(accounting)
    if accounting == "stored":
        return float(unit_true_bits(action, out_features, columns, rate, rotate))
    if accounting == "paper":
        return unit_paper_bits(action, out_features, columns, rate, rotate)
    raise ValueError(f"unknown accounting {accounting!r}; use one of {ACCOUNTINGS}")


@dataclass
class Summary:
    n_weights: int
    true_bits_total: int
    paper_bits_total: float

    @property
    def true_bits(self) -> float:
        return self.true_bits_total / max(self.n_weights, 1)

    @property
    def paper_bits(self) -> float:
        return self.paper_bits_total / max(self.n_weights, 1)

    @property
    def true_bytes(self) -> int:
        return self.true_bits_total // 8

    def as_dict(self) -> dict:
        return {
            "n_weights": self.n_weights,
            "true_bits": self.true_bits,
            "paper_bits": self.paper_bits,
            "quantized_bytes": self.true_bytes,
        }


def summarize(shapes: list[tuple[int, int]], actions: list[float], rate: float, rotate: bool | list[bool] = False) -> Summary:
    """Accounting of a whole plan: ``shapes[i] = (out, columns)`` of unit i, ``rotate`` one
    setting for all units or one per unit."""
    flags = rotate if isinstance(rotate, list) else [rotate] * len(shapes)
    n = sum(o * c for o, c in shapes)
    tb = sum(unit_true_bits(a, o, c, rate, r) for (o, c), a, r in zip(shapes, actions, flags))
    pb = sum(unit_paper_bits(a, o, c, rate, r) for (o, c), a, r in zip(shapes, actions, flags))
    return Summary(n_weights=n, true_bits_total=tb, paper_bits_total=pb)
