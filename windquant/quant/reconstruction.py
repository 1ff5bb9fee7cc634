"""Teacher-forced block reconstruction for allocators that learn from the real blocks (need
``"reconstruction"``, ``alloc.base.Reconstruction``).

Block ``l`` receives the unquantized model's own hidden states (``calib.stream``) and its output
for any weights of its units is compared with the unquantized block's output, each residual
channel weighted by the mean squared gradient of the model's loss there (from the backward pass
that also gives the sensitivity scores' Fisher, ``calib.statistics.layer_fisher``). The weighted squared error is then a second-order estimate
of the loss increase in nats per token, on the same scale as the sensitivity scores, but it
sees every interaction inside the block (q/k through the softmax, gate/up through SiLU).

Only one block's candidates and hidden states are held at a time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from windquant.actions import ACTIONS, SKIP
from windquant.calib.stream import BlockStream, block_output
from windquant.quant.cache import CandidateCache
from windquant.runinfo import release_freed_memory


@dataclass
class TeacherForcedBlock:
    """``alloc.base.BlockTask`` of one block of a real model."""

    block: nn.Module
    units: list[int]
    candidates: list[torch.Tensor]
    columns: dict[str, list[int]]  # weight name inside the block -> positions in ``units``, column order
    params: dict[str, torch.Tensor]  # float32, detached: every parameter the units do not replace
    inputs: list[torch.Tensor]  # per batch [b, len, d]
    outputs: list[torch.Tensor]  # the unquantized block's
    kwargs: list[dict]
    fisher: torch.Tensor  # [d] mean squared loss gradient per channel and token at the output

    @property
    def batches(self) -> int:
        return len(self.inputs)

    def loss(self, weights: list[torch.Tensor], batch: int) -> torch.Tensor:
        params = dict(self.params)
        for name, positions in self.columns.items():
            params[name] = torch.cat([weights[k] for k in positions], dim=1)
        x = self.inputs[batch]
        y = block_output(torch.func.functional_call(self.block, params, (x,), self.kwargs[batch]))
        return ((y - self.outputs[batch]) ** 2 * self.fisher).sum() / x.shape[:2].numel()

    @torch.no_grad()
    def linear_errors(self, unmeasured: tuple[float, ...] = ()) -> dict[str, torch.Tensor]:
        """Weight name -> [len(ACTIONS)] the block's error with that linear's units all at each
        action's candidate and the rest of the block at 16 bit (the 16-bit column is 0; the
        ``unmeasured`` actions' columns are NaN: one block pass saved per linear each)."""
        reference = [c[ACTIONS.index(SKIP)] for c in self.candidates]

        def error(weights: list[torch.Tensor]) -> float:
            return sum(float(self.loss(weights, b)) for b in range(self.batches)) / self.batches

        base = error(reference)  # the 16-bit candidates' own (fp16 rounding) error
        errors = {}
        for name, positions in self.columns.items():
            row = []
            for col, action in enumerate(ACTIONS):
                weights = list(reference)
                for k in positions:
                    weights[k] = self.candidates[k][col]
                if action == SKIP:
                    row.append(0.0)
                elif action in unmeasured:
                    row.append(math.nan)
                else:
                    row.append(max(error(weights) - base, 0.0))
            errors[name] = torch.tensor(row, dtype=torch.float64)
        return errors


class BlockReconstruction:
    """``alloc.base.Reconstruction`` of a prepared model: its blocks walked in order."""

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        cache: CandidateCache,
        threshold: float,
        fisher: dict[int, torch.Tensor],
        batch_size: int,
    ):
        self.model, self.cache, self.threshold = model, cache, threshold
        self.fisher = fisher  # block -> [hidden] mean squared loss gradient at its output
        self.stream = BlockStream(model, windows, batch_size)
        self.layers = len(self.stream)

    def block(self, layer: int) -> TeacherForcedBlock:
        """Block ``layer``'s task (the blocks before it are run unquantized to reach it)."""
        stream = self.stream
        while stream.next_layer < layer:
            stream.run(stream.next_layer)
        release_freed_memory()  # the previous block's candidates
        inputs = [b.hidden for b in stream.batches]
        stream.run(layer)  # the unquantized block's outputs, which become the next block's inputs
        units = [u for u in self.cache.units if u.layer == layer]
        prefix = f"{self.stream.prefix}.{layer}."
        columns: dict[str, list[int]] = defaultdict(list)
        for k, u in sorted(enumerate(units), key=lambda ku: (ku[1].module, ku[1].col0)):
            columns[u.module[len(prefix) :] + ".weight"].append(k)
        block = self.stream.blocks[layer]
        candidates = []
        for u in units:
            applied = [self.cache.applied(u.index, a, self.threshold) for a in ACTIONS]
            candidates.append(torch.stack([self.cache.weight(u.index, a).float() for a in applied]))
        params = {n: p.detach().float() for n, p in block.named_parameters() if n not in columns}
        return TeacherForcedBlock(
            block,
            [u.index for u in units],
            candidates,
            dict(columns),
            params,
            inputs,
            [b.hidden for b in stream.batches],
            [b.kwargs[layer] for b in stream.batches],
            self.fisher[layer],
        )
