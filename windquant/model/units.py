"""Quantization units: column chunks of every nn.Linear inside the decoder blocks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from windquant.errors import WindquantError


class UnsupportedModelError(WindquantError):
    """The model has no decoder blocks or linears windquant knows how to split into units."""


@dataclass(frozen=True)
class Unit:
    index: int  # position in model order
    layer: int  # decoder block index
    module: str  # full module name, e.g. "model.layers.0.self_attn.q_proj"
    proj: str  # name inside the block, e.g. "self_attn.q_proj"
    kind: str  # "attention" | "mlp" | "other"
    col0: int
    col1: int
    out_features: int

    @property
    def columns(self) -> int:
        return self.col1 - self.col0

    @property
    def n_weights(self) -> int:
        return self.out_features * self.columns

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.columns)

    def as_dict(self) -> dict:
        return asdict(self)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks (name, module)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise UnsupportedModelError(f"unsupported architecture {type(model).__name__}: no list of decoder blocks found")
    return max(candidates, key=lambda nm: len(nm[1]))


def kind_of(proj: str) -> str:
    if "attn" in proj or "attention" in proj:
        return "attention"
    if "mlp" in proj or "feed_forward" in proj:
        return "mlp"
    return "other"


def block_linears(model: nn.Module) -> list[tuple[int, str, str, nn.Linear]]:
    """(layer, full name, name inside block, module) of every nn.Linear in the blocks."""
    prefix, blocks = decoder_blocks(model)
    found = []
    for layer, block in enumerate(blocks):
        for proj, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                found.append((layer, f"{prefix}.{layer}.{proj}", proj, mod))
    if not found:
        kinds = sorted({type(m).__name__ for m in blocks[0].modules()} - {type(blocks[0]).__name__})
        raise UnsupportedModelError(
            f"unsupported architecture {type(model).__name__}: its decoder blocks contain no nn.Linear "
            f"(found {', '.join(kinds[:6])}); windquant supports LLaMA-style models with nn.Linear projections"
        )
    return found


def enumerate_units(model: nn.Module, chunk: int = 256) -> list[Unit]:
    """Split every block linear into column chunks of ``chunk`` inputs (last one ragged)."""
    if chunk <= 0:
        raise ValueError(f"chunk size must be a positive number of columns, got {chunk}")
    units: list[Unit] = []
    for layer, name, proj, mod in block_linears(model):
        for col0 in range(0, mod.in_features, chunk):
            col1 = min(col0 + chunk, mod.in_features)
            units.append(Unit(len(units), layer, name, proj, kind_of(proj), col0, col1, mod.out_features))
    return units
