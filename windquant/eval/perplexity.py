"""Perplexity over non-overlapping windows (the GPTQ/AWQ WikiText-2 protocol)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from windquant.errors import WindquantError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    ctx: int
    windows: int
    tokens: int  # tokens scored (windows × ctx)

    def line(self) -> str:
        return f"ppl={self.ppl:.4f} ctx={self.ctx} windows={self.windows} tokens={self.tokens}"


def model_max_context(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    ctx: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) over ``len(tokens) // ctx`` windows of ``ctx`` tokens, no overlap.

    Every window is scored on its ``ctx − 1`` next-token predictions; windows have
    equal length so the mean over windows equals the mean over tokens.
    """
    limit = model_max_context(model)
    if limit is not None and ctx > limit:
        raise WindquantError(f"--ctx {ctx} exceeds the model's maximum context {limit}; use --ctx {limit} or less")
    n = tokens.numel() // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise WindquantError(f"the corpus has {tokens.numel()} tokens, fewer than one window of --ctx {ctx}")
    windows = tokens[: n * ctx].view(n, ctx)
    device = next(model.parameters()).device
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc=f"perplexity ctx={ctx}", disable=not progress, unit="batch"):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
    nll = total / (n * (ctx - 1))
    return PerplexityResult(ppl=math.exp(nll), nll=nll, ctx=ctx, windows=n, tokens=n * ctx)
