"""lm-eval's ``HFLM`` with each document's context run once: the multiple-choice tasks' speed-up.

A multiple-choice document is scored as k requests (context, choice_i) that share the context.
``HFLM`` runs k full sequences, with the head and the log-softmax at every position. Here one row
holds the context followed by every choice (each but its last token), and an attention mask lets
each choice see the context and itself only, its positions numbered on from the context's end, as
if it were alone after it. The head runs only where a choice's token is predicted. On PIQA +
ARC-Easy with SmolLM2's tokenizer that is 202k tokens instead of 421k; rows of similar length are
batched, left-padded.

The log-likelihoods are the quantities ``HFLM`` computes (sum of the continuation's
log-probabilities, and whether each of its tokens is the argmax), so lm-eval's own metrics apply
unchanged; only the arithmetic's order differs (float rounding). A document longer than the
model's window or its sliding-attention window goes to ``HFLM``'s path, which runs requests one
by one and truncates those too long.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation), context ids, continuation ids)

# Tokens per forward (rows x the longest, padding included), and the bound on the fp32 logits
# [rows, predicted positions, vocab] (the log-softmax makes a second copy).
TOKENS_PER_BATCH = 2048
LOGITS_BYTES = 512 * 2**20


class Document:
    """One context and its continuations as one row: ids, positions, segment of each token
    (0 the context, i + 1 choice i), and which positions predict each choice's tokens."""

    def __init__(self, context: tuple[int, ...], continuations: list[list[int]]):
        self.context, self.continuations = context, continuations
        self.ids = list(context)  # the context, then each choice but its last token
        self.positions = list(range(len(context)))
        self.segments = [0] * len(context)
        for i, cont in enumerate(continuations):
            self.ids += cont[:-1]
            self.positions += range(len(context), len(context) + len(cont) - 1)
            self.segments += [i + 1] * (len(cont) - 1)
        # Predicted positions count back from the row's end: the context's last token, then every
        # choice's tokens but the last, in order.
        self.predicted = 1 + sum(len(c) - 1 for c in continuations)
        self.span = len(context) + max(map(len, continuations)) - 1  # positions 0 .. span - 1


class SharedContextLM(HFLM):
    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, _) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        docs = {ctx: Document(ctx, [requests[i][2] for i in members]) for ctx, members in groups.items()}
        window = min(self.max_length, getattr(self.model.config, "sliding_window", None) or math.inf)
        long = [i for ctx, members in groups.items() if docs[ctx].span > window for i in members]
        if long:
            for i, r in zip(long, super()._loglikelihood_tokens([requests[i] for i in long], disable_tqdm=True, override_bs=override_bs)):
                results[i] = r
        fits = sorted((ctx for ctx in groups if docs[ctx].span <= window), key=lambda c: (len(docs[c].ids), c))
        bar = tqdm(total=len(requests) - len(long), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for batch in self._batches([docs[c] for c in fits]):
            for doc, scores in zip(batch, self._score_batch(batch)):
                for i, r in zip(groups[doc.context], scores):
                    results[i] = r
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
                bar.update(len(scores))
        bar.close()
        return results  # type: ignore[return-value]

    def _batches(self, docs: list[Document]) -> list[list[Document]]:
        """Consecutive documents (sorted by row length) while the batch stays within both bounds."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        batches: list[list[Document]] = []
        batch: list[Document] = []
        for doc in docs:
            grown = [*batch, doc]
            width, kept = max(len(d.ids) for d in grown), max(d.predicted for d in grown)
            if batch and (len(grown) * width > TOKENS_PER_BATCH or len(grown) * kept * vocab * 4 > LOGITS_BYTES):
                batches.append(batch)
                grown = [doc]
            batch = grown
        return batches + ([batch] if batch else [])

    def _mask(self, segments: torch.Tensor) -> torch.Tensor:
        """[rows, 1, width, width] attention mask in the form the model's attention takes. A query
        sees earlier keys of the context (segment 0) and of its own segment; padding (segment -1)
        sees itself only, so no row of the softmax is empty."""
        cols = torch.arange(segments.shape[1], device=segments.device)
        causal = cols[None, :, None] >= cols[None, None, :]
        same = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
        allowed = (causal & same & (segments[:, None, :] >= 0)) | (cols[:, None] == cols[None, :])
        if self.model.config._attn_implementation == "eager":
            zero = torch.zeros((), dtype=self.model.dtype, device=segments.device)
            return torch.where(allowed, zero, torch.finfo(self.model.dtype).min)[:, None]
        return allowed[:, None]

    @torch.no_grad()
    def _score_batch(self, docs: list[Document]) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, greedy) of each document's continuations."""
        dev = self.device
        width, kept = max(len(d.ids) for d in docs), max(d.predicted for d in docs)
        ids = torch.zeros(len(docs), width, dtype=torch.long, device=dev)
        positions = torch.zeros_like(ids)
        segments = torch.full_like(ids, -1)
        for r, d in enumerate(docs):  # left padding: every row's predicted positions end the row
            ids[r, width - len(d.ids) :] = torch.tensor(d.ids)
            positions[r, width - len(d.ids) :] = torch.tensor(d.positions)
            segments[r, width - len(d.ids) :] = torch.tensor(d.segments)
        logits = self.model(ids, attention_mask=self._mask(segments), position_ids=positions, logits_to_keep=kept).logits
        out = []
        for row, d in zip(logits, docs):
            logp = F.log_softmax(row[kept - d.predicted :], dim=-1, dtype=self.softmax_dtype)
            scores, offset = [], 1
            for cont in d.continuations:
                at = torch.tensor([0, *range(offset, offset + len(cont) - 1)], device=dev)
                part, toks = logp[at], torch.tensor(cont, device=dev)
                scores.append((float(part.gather(1, toks[:, None]).sum()), bool((part.argmax(-1) == toks).all())))
                offset += len(cont) - 1
            out.append(scores)
        return out
