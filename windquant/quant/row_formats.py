"""The names of the per-row formats of the embedding (``windquant.quant.rows``), importable
without torch so the CLI can parse them."""

from __future__ import annotations

MIXED = "mixed"
ROW_BITS = (16, 8, 4, MIXED)
RowFormat = int | str  # one of ROW_BITS


def parse_row_format(text: str) -> RowFormat:
    """'8' -> 8, 'mixed' -> 'mixed' (the CLI's and quant_config.json's spelling)."""
    fmt = int(text) if str(text).isdigit() else str(text)
    if fmt not in ROW_BITS:
        raise ValueError(f"embedding bits must be one of {', '.join(map(str, ROW_BITS))}, got {text}")
    return fmt
