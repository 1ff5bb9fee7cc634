"""The names of the per-row formats of the embedding (``windquant.quant.rows``), importable
without torch so the CLI can parse them."""

from __future__ import annotations

MIXED = "mixed"
ROW_BITS = (16, 8, 4, MIXED)
AUTO = "auto"  # chosen from the target: see resolve_row_format
EMBEDDING_CHOICES = (*ROW_BITS, AUTO)
RowFormat = int | str  # one of ROW_BITS (or AUTO before it is resolved)
# From this many target bits up, ``auto`` stores the embedding at 8 bits; below, mixed 8/4.
# SmolLM2-135M at 3.0 true bits, WikiText-2 full split: mixed 31.65 (x1.465, 55.9 MiB file),
# 8 bits 30.94 (x1.432, 65.1 MiB), fp16 30.93 (x1.431, 92.3 MiB); at 2.5 true bits mixed keeps
# the file at 49.5 MiB (8 bits: 59.0). llama.cpp's presets likewise raise the embedding's and
# output's types with the preset (benchmarks/HISTORY.md, "The embedding's format follows the target").
AUTO_8_BIT_FROM = 3.0


def parse_row_format(text: str) -> RowFormat:
    """'8' -> 8, 'mixed' -> 'mixed', 'auto' -> 'auto' (the CLI's and quant_config.json's spelling)."""
    fmt = int(text) if str(text).isdigit() else str(text)
    if fmt not in EMBEDDING_CHOICES:
        raise ValueError(f"embedding bits must be one of {', '.join(map(str, EMBEDDING_CHOICES))}, got {text}")
    return fmt


def resolve_row_format(fmt: RowFormat, target_bits: float | None) -> RowFormat:
    """The stored format of ``fmt`` for a plan at ``target_bits``: ``auto`` is 8 from
    :data:`AUTO_8_BIT_FROM` target bits up (and with no target), mixed below; others as given."""
    if fmt != AUTO:
        return fmt
    return MIXED if target_bits is not None and target_bits < AUTO_8_BIT_FROM else 8
