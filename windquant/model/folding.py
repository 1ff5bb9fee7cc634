"""Scale Folding (RAMP): move activation outliers into the weights, exactly.

A linear's input channel ``j`` is multiplied by ``s_j`` in the weights and divided by ``s_j``
where that channel is produced, so the unquantized model computes the same function:

* ``input_layernorm`` -> q/k/v and ``post_attention_layernorm`` -> gate/up: the norm's gain
  is divided by ``s`` (an RMSNorm's output is ``gain ⊙ x̂``);
* ``v_proj`` -> ``o_proj``: v's output rows are divided by ``s`` (attention mixes positions, not
  channels), o's columns multiplied; with grouped-query attention every query head reading a kv
  head repeats that head's scales;
* ``up_proj`` -> ``down_proj``: ``silu(gate) ⊙ up`` is linear in up's rows.

``s = a^α`` (``a``: the RMS of each input channel, normalised as AWQ does by
``sqrt(max · min)``), with ``α`` searched per group on the quantized output error
``tr(ΔW H ΔWᵀ)`` of the group's linears in the folded basis. Inputs of a folded linear are
``x / s``, so its calibration statistics transform exactly (:func:`fold_statistics`) and no
second calibration pass is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from windquant.model.units import UnsupportedModelError, decoder_blocks

ALPHAS = tuple(i / 8 for i in range(9))  # 0 = no folding, 1 = s equal to the activation RMS


@dataclass(frozen=True)
class FoldGroup:
    """Linears ``consumers`` whose input channels are produced by ``producer`` (a norm or a linear)."""

    producer: str
    consumers: tuple[str, ...]
    channel_of_column: torch.Tensor | None = None  # consumer column -> producer channel (GQA), None = identity

    def column_scales(self, channel_scales: torch.Tensor) -> torch.Tensor:
        return channel_scales if self.channel_of_column is None else channel_scales[self.channel_of_column]

    def channel_rms(self, column_rms: torch.Tensor) -> torch.Tensor:
        """Per producer channel: the RMS over the consumer columns reading it."""
        if self.channel_of_column is None:
            return column_rms
        n = int(self.channel_of_column.max()) + 1
        sq = torch.zeros(n).index_add_(0, self.channel_of_column, column_rms.float() ** 2)
        count = torch.zeros(n).index_add_(0, self.channel_of_column, torch.ones(len(column_rms)))
        return (sq / count.clamp_min(1)).sqrt()


def fold_groups(model: nn.Module, layer: int | None = None) -> list[FoldGroup]:
    """The four fold groups of every decoder block, or of block ``layer`` (LLaMA-style blocks only)."""
    prefix, blocks = decoder_blocks(model)
    cfg = model.config
    groups = []
    for i, block in enumerate(blocks):
        if layer is not None and i != layer:
            continue
        names = dict(block.named_modules())
        needed = (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
        # Gemma's norms scale by (1 + gain) and it adds post-norms: its fold points differ.
        if (
            any(n not in names for n in needed)
            or "pre_feedforward_layernorm" in names
            or "Gemma" in type(names.get("input_layernorm")).__name__
        ):
            raise UnsupportedModelError(
                f"scale folding supports LLaMA-style blocks (norm -> q/k/v, norm -> gate/up); {type(block).__name__} is not one: run with --no-fold"
            )
        p = f"{prefix}.{i}."
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        col = torch.arange(cfg.num_attention_heads * head_dim)
        v_row = (col // head_dim) // n_rep * head_dim + col % head_dim
        groups += [
            FoldGroup(p + "input_layernorm", (p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")),
            FoldGroup(p + "post_attention_layernorm", (p + "mlp.gate_proj", p + "mlp.up_proj")),
            FoldGroup(p + "self_attn.v_proj", (p + "self_attn.o_proj",), v_row),
            FoldGroup(p + "mlp.up_proj", (p + "mlp.down_proj",)),
        ]
    return groups


def awq_scales(rms: torch.Tensor, alpha: float) -> torch.Tensor:
    """``rms^α`` normalised by ``sqrt(max · min)`` so the scales straddle 1."""
    s = rms.float().clamp_min(1e-8) ** alpha
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def fold(model: nn.Module, group: FoldGroup, channel_scales: torch.Tensor) -> None:
    """Fold ``channel_scales`` (one per producer channel) into ``group``, in place."""
    s = channel_scales.float()
    producer = model.get_submodule(group.producer)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s[:, None].to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    cols = group.column_scales(s)
    for name in group.consumers:
        w = model.get_submodule(name).weight
        w.mul_(cols[None, :].to(w.dtype))


def fold_statistics(act_scales: dict, moments: dict | None, group: FoldGroup, channel_scales: torch.Tensor) -> None:
    """The consumers' inputs become ``x / s``: divide their RMS and second moments, in place."""
    cols = group.column_scales(channel_scales.float())
    for name in group.consumers:
        act_scales[name] = act_scales[name] / cols
        if moments is not None:
            moments[name] = moments[name] / cols[:, None] / cols[None, :]
