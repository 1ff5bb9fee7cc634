"""Perplexity over non-overlapping windows: the GPTQ/AWQ WikiText-2 protocol (every prediction of
every window scored; BOS at each window's start when the tokenizer adds one, see
:func:`windquant.calib.corpus.window_bos`) and llama.cpp's ``llama-perplexity`` protocol (:data:`LLAMACPP`: ctx 512, the
first 100 chunks of the raw file, BOS at each chunk's start when the tokenizer adds one, only the
second half of each chunk scored, so every scored token sees at least 256 tokens of context)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from windquant.errors import WindquantError, non_finite_logits


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    ctx: int
    windows: int
    tokens: int  # tokens in the windows (windows × ctx); scored: windows × (ctx − 1 − first)
    first: int = 0  # position of the first scored prediction in each window

    def line(self) -> str:
        scored = "" if self.first == 0 else f" scored_from={self.first}"
        return f"ppl={self.ppl:.4f} ctx={self.ctx} windows={self.windows} tokens={self.tokens}{scored}"


@dataclass(frozen=True)
class Protocol:
    ctx: int
    max_windows: int | None
    second_half: bool  # score only predictions from position ctx/2 on
    raw_text: bool  # the corpus file as it is (not the dataset's lines re-joined)


PROTOCOLS = {
    "windows": Protocol(ctx=2048, max_windows=None, second_half=False, raw_text=False),
    "llamacpp": Protocol(ctx=512, max_windows=100, second_half=True, raw_text=True),
}
LLAMACPP = PROTOCOLS["llamacpp"]


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
    first: int = 0,
    bos_id: int | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over ``len(tokens) // ctx`` windows of ``ctx`` tokens, no overlap.

    Every window is scored on its next-token predictions from position ``first`` on
    (``ctx − 1 − first`` of them); windows have equal length so the mean over windows equals
    the mean over tokens. ``bos_id`` replaces each window's first token (llama.cpp does this
    when the model's tokenizer adds a BOS).
    """
    limit = model_max_context(model)
    if limit is not None and ctx > limit:
        raise WindquantError(f"--ctx {ctx} exceeds the model's maximum context {limit}; use --ctx {limit} or less")
    n = tokens.numel() // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise WindquantError(f"the corpus has {tokens.numel()} tokens, fewer than one window of --ctx {ctx}")
    if not 0 <= first < ctx - 1:
        raise WindquantError(f"the first scored position {first} must lie in [0, ctx - 1) for ctx {ctx}")
    windows = tokens[: n * ctx].view(n, ctx).clone()
    if bos_id is not None:
        windows[:, 0] = bos_id
    device = next(model.parameters()).device
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc=f"perplexity ctx={ctx}", disable=not progress, unit="batch"):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        if not torch.isfinite(logits).all():
            raise non_finite_logits(f"perplexity window {i + 1} of {n}")
        pred, target = logits[:, first:-1], batch[:, first + 1 :]
        total += float(F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"))
    nll = total / (n * (ctx - 1 - first))
    return PerplexityResult(ppl=math.exp(nll), nll=nll, ctx=ctx, windows=n, tokens=n * ctx, first=first)
