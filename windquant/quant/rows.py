"""Per-row quantization of the token embedding (and an untied output head).

* 16: fp16, as before.
* 8: symmetric INT8 with one fp16 scale per row (absmax / 127): what torch's
  ``_weight_int8pack_mm`` computes when the tied head multiplies it (8.03 bits/weight at 576).
* 4: symmetric INT4 with one fp16 scale per row and group of 32 columns (the clipped absmax / 7
  of least squared error among a few clipping ratios), two codes per byte (low nibble first),
  stored as ``k + 8``: the CPU int4 kernel's codes (4.5 bits/weight).
* ``"mixed"``: the rows of the most frequent tokens (:data:`MIXED_SHARE8` of them, ranked by
  their count in the calibration text, ties by token id) at 8 bits, the rest at 4 bits; stored
  as the 8-bit rows' ids (``idx8``), their 8-bit tensors (``q8``, ``scale8``) and the other rows'
  4-bit tensors in id order (``q4``, ``scale4``): 5.3 bits/weight at 576 columns. Rare tokens
  are seldom read and their logits seldom matter (benchmarks/embedding_formats.py).

Given the second moment of a head's inputs, 4-bit rows (of ``4`` or ``mixed``) are chosen with
GPTQ error feedback on the head's output (:func:`quantize4_feedback`); the format is the same.

:func:`row_layout` is the one size table, read by the packer and the accounting alike.
"""

from __future__ import annotations

import torch

from windquant.quant.row_formats import MIXED, RowFormat, parse_row_format

GROUP4 = 32  # columns per scale at 4 bits (the kernel's smallest group)
MIXED_SHARE8 = 0.2  # share of rows at 8 bits in the mixed format (fits the 2.5-bit SmolLM2 file in 50 MiB)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # 4-bit scale search: absmax times these


def check_row_bits(bits: RowFormat, columns: int) -> None:
    parse_row_format(str(bits))
    if bits in (4, MIXED) and columns % GROUP4:
        raise ValueError(f"{bits} embedding rows need a width that is a multiple of {GROUP4} (got {columns}); use 8")


def mixed_rows8(rows: int) -> int:
    """Rows at 8 bits in the mixed format: :data:`MIXED_SHARE8` of them, rounded so that the
    4-bit rest is a multiple of 16 (the int4 kernel's output rows)."""
    return rows - 16 * ((rows - round(rows * MIXED_SHARE8)) // 16)


def row_layout(bits: RowFormat, rows: int, columns: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Field name -> (dtype, shape) of every tensor stored for a [rows, columns] matrix."""
    check_row_bits(bits, columns)
    if bits == 16:
        return {"weight": (torch.float16, (rows, columns))}
    if bits == 8:
        return {"q8": (torch.int8, (rows, columns)), "scale": (torch.float16, (rows,))}
    if bits == 4:
        return {"q4": (torch.uint8, (rows, columns // 2)), "scale": (torch.float16, (rows, columns // GROUP4))}
    k = mixed_rows8(rows)
    return {
        "idx8": (torch.int32, (k,)),
        "q8": (torch.int8, (k, columns)),
        "scale8": (torch.float16, (k,)),
        "q4": (torch.uint8, (rows - k, columns // 2)),
        "scale4": (torch.float16, (rows - k, columns // GROUP4)),
    }


def _scales(w: torch.Tensor, levels: int) -> torch.Tensor:
    return (w.abs().amax(dim=-1) / levels).clamp_min(1e-8).half()


def _round4(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (groups / scale.float()[..., None]).round().clamp(-7, 7)


def clip_scales4(groups: torch.Tensor) -> torch.Tensor:
    """fp16 INT4 scale of each group (last dim): the clipped absmax / 7 of least squared error
    among :data:`CLIP_RATIOS`."""
    best, best_err = None, None
    for ratio in CLIP_RATIOS:
        scale = _scales(groups * ratio, 7)
        err = ((_round4(groups, scale) * scale.float()[..., None] - groups) ** 2).sum(-1)
        best = scale if best is None else torch.where(err < best_err, scale, best)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best


def rows_by_frequency(counts: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Row ids, most frequent token first (``counts`` [rows] or None: by id)."""
    if counts is None:
        return torch.arange(rows)
    return torch.argsort(-counts[:rows].double(), stable=True)


def mixed_split(idx8: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(is8 [rows] bool, position [rows] of each row within its part: the 8-bit rows in
    ``idx8`` order, the 4-bit rows in id order)."""
    is8 = torch.zeros(rows, dtype=torch.bool)
    is8[idx8.long()] = True
    pos = torch.empty(rows, dtype=torch.long)
    pos[idx8.long()] = torch.arange(len(idx8))
    pos[~is8] = torch.arange(rows - len(idx8))
    return is8, pos


def packed_split(packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mixed_split` of a packed mixed matrix."""
    return mixed_split(packed["idx8"], len(packed["idx8"]) + len(packed["q4"]))


def quantize4_feedback(w: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """4-bit rows (the format's tensors) whose codes are chosen column by column with GPTQ error
    feedback on ``x @ wᵀ`` for inputs of second moment ``h`` [columns, columns] (a head's
    objective); each group's scale is :func:`clip_scales4` of its columns as compensated so far."""
    from windquant.quant.feedback import error_feedback

    rows, columns = w.shape
    scale = torch.empty(rows, columns // GROUP4, dtype=torch.float16)

    def start(k: int, wk: torch.Tensor):
        scale[:, k] = clip_scales4(wk)
        s = scale[:, k].float()
        return lambda col, _j: (col / s).round().clamp(-7, 7) * s

    chunks = [(c, c + GROUP4) for c in range(0, columns, GROUP4)]
    values = error_feedback(w, h, chunks, start)
    q = ((values / scale.float().repeat_interleave(GROUP4, dim=-1)).round() + 8).to(torch.uint8)
    return {"q4": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale}


def quantize_rows(
    w: torch.Tensor, bits: RowFormat, counts: torch.Tensor | None = None, head_moment: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Packed tensors of ``w`` [rows, columns] at ``bits`` (exactly :func:`row_layout`);
    ``counts`` (token counts, [rows]) rank the rows of the mixed format; ``head_moment`` (the
    second moment of the head's inputs) has the 4-bit rows chosen by :func:`quantize4_feedback`."""
    rows, columns = w.shape
    check_row_bits(bits, columns)
    w = w.detach().float()
    if bits == 4 and head_moment is not None:
        return quantize4_feedback(w, head_moment)
    if bits == MIXED:
        idx8 = rows_by_frequency(counts, rows)[: mixed_rows8(rows)].sort().values
        is8, _ = mixed_split(idx8, rows)
        p8, p4 = quantize_rows(w[idx8], 8), quantize_rows(w[~is8], 4, head_moment=head_moment)
        return {"idx8": idx8.to(torch.int32), "q8": p8["q8"], "scale8": p8["scale"], "q4": p4["q4"], "scale4": p4["scale"]}
    if bits == 16:
        return {"weight": w.half().contiguous()}
    if bits == 8:
        scale = _scales(w, 127)
        return {"q8": (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8), "scale": scale}
    groups = w.view(rows, columns // GROUP4, GROUP4)
    scale = clip_scales4(groups)
    q = (_round4(groups, scale) + 8).to(torch.uint8).view(rows, columns)
    return {"q4": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale}


def unpack_q4(q4: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [rows, columns] from two-per-byte storage [rows, columns / 2]."""
    return torch.stack([q4 & 0xF, q4 >> 4], dim=-1).flatten(-2)


def mixed_parts(packed: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The mixed format's 8-bit and 4-bit parts, each in its own format's fields."""
    return {"q8": packed["q8"], "scale": packed["scale8"]}, {"q4": packed["q4"], "scale": packed["scale4"]}


def dequantize_rows(packed: dict[str, torch.Tensor], bits: RowFormat) -> torch.Tensor:
    """fp32 weights of packed rows (except for the mixed format, any leading subset of rows
    works: rows are independent; :func:`gather_rows` picks rows of every format)."""
    if bits == MIXED:
        p8, p4 = mixed_parts(packed)
        is8, _ = packed_split(packed)
        out = torch.empty(len(is8), packed["q4"].shape[1] * 2)
        out[packed["idx8"].long()] = dequantize_rows(p8, 8)
        out[~is8] = dequantize_rows(p4, 4)
        return out
    if bits == 16:
        return packed["weight"].float()
    if bits == 8:
        return packed["q8"].float() * packed["scale"].float()[..., None]
    codes = unpack_q4(packed["q4"]).float() - 8
    scale = packed["scale"].float().repeat_interleave(GROUP4, dim=-1)
    return codes * scale


def gather_rows(packed: dict[str, torch.Tensor], bits: RowFormat, ids: torch.Tensor, split=None) -> torch.Tensor:
    """fp32 rows ``ids`` (any shape) of packed rows: ``[*ids.shape, columns]``. ``split`` is
    :func:`packed_split` of a mixed matrix, computed once by callers that gather often."""
    if bits != MIXED:
        return dequantize_rows({f: t[ids] for f, t in packed.items()}, bits)
    is8, pos = split if split is not None else packed_split(packed)
    flat = ids.reshape(-1)
    p8, p4 = mixed_parts(packed)
    out = torch.empty(len(flat), packed["q4"].shape[1] * 2)
    m = is8[flat]
    out[m] = dequantize_rows({f: t[pos[flat[m]]] for f, t in p8.items()}, 8)
    out[~m] = dequantize_rows({f: t[pos[flat[~m]]] for f, t in p4.items()}, 4)
    return out.view(*ids.shape, -1)
