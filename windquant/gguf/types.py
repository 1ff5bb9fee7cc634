"""GGUF tensor types as llama.cpp stores them: blocks of ``block`` weights along a row, each
``size`` bytes (scales included), so a tensor of ``rows × cols`` takes ``rows · cols / block · size``
bytes and fits only when ``cols`` is a multiple of ``block``. The sizes are gguf-py's
``GGML_QUANT_SIZES``, the table llama.cpp's own ``ggml_type_size`` mirrors."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from windquant.errors import WindquantError

T = GGMLQuantizationType

# gguf-py quantizes these in Python (no llama.cpp needed), bit-exact with llama.cpp's reference
# quantizers; they take no importance matrix.
PYTHON_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)

# Every weight type llama.cpp's quantizer offers below 9 bits that has a dense (non-ternary, non-
# MoE) use; the IQ types need an importance matrix, which we always pass.
LLAMACPP_TYPES = (
    T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.Q2_K, T.IQ3_XXS, T.IQ3_S, T.Q3_K, T.IQ4_XS, T.IQ4_NL,
    T.Q4_0, T.Q4_K, T.Q4_1, T.Q5_0, T.Q5_K, T.Q5_1, T.Q6_K, T.Q8_0,
)  # fmt: skip


def parse_type(name: str) -> GGMLQuantizationType:
    """A type from its name, any case (``q4_k``, ``Q8_0``, ``f16``)."""
    try:
        return T[name.upper()]
    except KeyError:
        known = ", ".join(t.name for t in (*LLAMACPP_TYPES, T.F16))
        raise WindquantError(f"unknown GGUF tensor type {name!r}; choose one of {known}") from None


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def fits(qtype: GGMLQuantizationType, cols: int) -> bool:
    """Whether rows of ``cols`` weights split into whole blocks of ``qtype``."""
    return cols % block_size(qtype) == 0


def tensor_bytes(qtype: GGMLQuantizationType, rows: int, cols: int) -> int:
    """Bytes of a ``rows × cols`` tensor stored as ``qtype``."""
    if not fits(qtype, cols):
        raise WindquantError(f"{qtype.name} needs rows that are multiples of {block_size(qtype)} weights, got {cols}")
    block, size = GGML_QUANT_SIZES[qtype]
    return rows * (cols // block) * size


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * size / block
