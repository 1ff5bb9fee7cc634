"""End-to-end scale tuning: after allocation, codes frozen, tune only the fp16 scales and shifts.

Every quantized chunk's weights are an affine function of its per-row scale and shift
(:class:`windquant.quant.unit.AffineUnit`). With the codes fixed, the whole quantized model is
a differentiable function of ~2 numbers per row per chunk, and those are tuned with Adam so the
quantized model's next-token distribution matches the reference model's (KL(p_ref ‖ p_q), mean
over tokens) on the calibration windows. Nothing else changes: same codes, same layout, same
bytes; the tuned values are rounded to the fp16 the checkpoint stores.

The reference distribution is computed on the fly from the model's own (unquantized) weights, so
no logits are held. When the checkpoint will store the embedding (and so a tied head) at fewer
bits, the quantized model runs with those rows during tuning, so that the scales also make up for
the rows' error; the reference keeps the original rows. A held-out set of windows is scored
every ``check_every`` steps and tuning stops after ``patience`` checks without improvement,
keeping the best values seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from windquant.actions import SKIP
from windquant.calib.stream import head_logits
from windquant.pack.apply import PlanChunk, set_submodule
from windquant.quant.unit import affine_unit, dequantize_unit

Packed = dict[str, torch.Tensor]
ChunkKey = tuple[int, float]  # (unit index, applied action)


@dataclass(frozen=True)
class TuneSettings:
    steps: int = 0  # Adam steps at most (0 = off)
    lr: float = 1e-3  # on the relative change of each scale (and shift, in units of its scale)
    batch: int = 1  # calibration windows per step
    check_every: int = 10  # steps between held-out checks
    patience: int = 2  # checks without held-out improvement before stopping


class TunableLinear(nn.Module):
    """A block linear whose quantized chunks compute from trainable scale/shift deltas, or, in
    reference mode, from the original dense weight."""

    def __init__(self, original: nn.Linear, chunks: list[PlanChunk], packed: dict[ChunkKey, Packed]):
        super().__init__()
        self.original = original
        self.reference = False
        self.keys: list[ChunkKey] = []
        self.columns: list[tuple[int, int]] = []
        self.parts, self.scales, self.shifts = [], [], []
        self.d_scale, self.d_shift = nn.ParameterList(), nn.ParameterList()
        for col0, col1, action, index, _rotate in chunks:
            p = packed[(index, action)]
            out, cols = original.out_features, col1 - col0
            self.keys.append((index, action))
            self.columns.append((col0, col1))
            if action == SKIP:
                self.parts.append(dequantize_unit(p, action, out, cols))
                self.scales.append(None)
                self.shifts.append(None)
                continue
            self.parts.append(affine_unit(p, action, out, cols))
            self.scales.append(p["scale"].float())
            self.shifts.append(p["shift"].float() if "shift" in p else None)
            self.d_scale.append(nn.Parameter(torch.zeros(out)))
            self.d_shift.append(nn.Parameter(torch.zeros(out if "shift" in p else 0)))

    def tuned(self) -> Iterator[tuple[ChunkKey, torch.Tensor, torch.Tensor | None]]:
        """(key, scale, shift) of every quantized chunk at the current deltas."""
        k = 0
        for key, s0, m0 in zip(self.keys, self.scales, self.shifts):
            if s0 is None:
                continue
            scale = s0 * (1 + self.d_scale[k])
            yield key, scale, None if m0 is None else m0 + s0 * self.d_shift[k]
            k += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:
            return self.original(x)
        # Chunk by chunk, scales applied to the outputs (AffineUnit.output): no weight is formed
        # per step and the scales' gradient is a reduction over outputs. What autograd keeps is
        # about the same (each chunk's pre-scale output instead of its formed weight); a step
        # went from 2.2 to 2.0 s on SmolLM2-135M (40 steps with their checks: 88 -> 81 s).
        tuned = {key: (scale, shift) for key, scale, shift in self.tuned()}
        y = None
        for key, part, (col0, col1) in zip(self.keys, self.parts, self.columns):
            xc = x[..., col0:col1]
            yc = part.output(xc, *tuned[key]) if key in tuned else F.linear(xc, part)
            y = yc if y is None else y + yc
        bias = self.original.bias
        return y if bias is None else y + bias


@contextmanager
def tunable(model: nn.Module, modules: dict[str, list], packed: dict[ChunkKey, Packed]) -> Iterator[dict[str, TunableLinear]]:
    """Swap the named linears for :class:`TunableLinear` (restored on exit)."""
    originals = {name: model.get_submodule(name) for name in modules}
    swapped = {name: TunableLinear(originals[name], chunks, packed) for name, chunks in modules.items()}
    for name, mod in swapped.items():
        set_submodule(model, name, mod)
    try:
        yield swapped
    finally:
        for name, mod in originals.items():
            set_submodule(model, name, mod)


@contextmanager
def weights_swapped(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The named modules' ``weight`` replaced by ``weights`` (restored on exit)."""
    modules = {name: model.get_submodule(name) for name in weights}
    before = {name: m.weight.data for name, m in modules.items()}
    for name, m in modules.items():
        m.weight.data = weights[name]
    try:
        yield
    finally:
        for name, m in modules.items():
            m.weight.data = before[name]


def reference_logprobs(model: nn.Module, linears: dict[str, TunableLinear], windows: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the unquantized model on ``windows`` [b, len] (its next-token predictions)."""
    with torch.no_grad():
        for lin in linears.values():
            lin.reference = True
        try:
            return F.log_softmax(model(windows).logits[:, :-1].float(), dim=-1)
        finally:
            for lin in linears.values():
                lin.reference = False


def reference_logprobs_after_blocks(model: nn.Module, windows: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
    """:func:`reference_logprobs` from the unquantized last block's outputs on ``windows`` (kept
    by the calibration pass): only the final norm and the head run, a fifth of a forward."""
    with torch.no_grad():
        return F.log_softmax(head_logits(model, windows, last_hidden)[:, :-1].float(), dim=-1)


def kl_to_reference(model: nn.Module, ref: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Mean over predicted tokens of KL(p_ref ‖ p_q) on ``windows`` (differentiable in q)."""
    q = F.log_softmax(model(windows).logits[:, :-1].float(), dim=-1)
    return F.kl_div(q.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean")


def heldout_kl(model: nn.Module, refs: list[torch.Tensor], windows: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(float(kl_to_reference(model, r.float(), w[None])) for r, w in zip(refs, windows)) / len(windows)


def tune_scales(
    model: nn.Module,
    modules: dict[str, list[PlanChunk]],
    packed: dict[ChunkKey, Packed],
    train: torch.Tensor,
    heldout: torch.Tensor,
    settings: TuneSettings,
    train_last_hidden: torch.Tensor | None = None,
    rows: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
) -> tuple[dict[ChunkKey, Packed], dict]:
    """Tuned copies of ``packed`` (new fp16 ``scale``/``shift`` only) for the linears in ``modules``
    (name -> [(col0, col1, applied action, unit index)]), and a report. ``model`` holds the
    reference weights and is left as it was; ``train_last_hidden``, its last block's outputs on
    ``train``, saves the reference's blocks on every step; ``rows`` (module name -> weight) are
    the embedding / head weights the quantized model will have."""
    rows = rows or {}
    originals = {name: model.get_submodule(name).weight.data for name in rows}
    params_frozen = [p for p in model.parameters() if p.requires_grad]
    for p in params_frozen:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    curve = []
    try:
        with tunable(model, modules, packed) as linears, weights_swapped(model, rows), torch.enable_grad():  # callers may hold no_grad
            # Only the deltas: ``original`` is a submodule too, and its weights stay frozen.
            params = [p for lin in linears.values() for p in (*lin.d_scale, *lin.d_shift) if p.numel()]
            opt = torch.optim.Adam(params, lr=settings.lr)
            # Held-out references never change: computed once, kept in fp16.
            with weights_swapped(model, originals):
                refs = [reference_logprobs(model, linears, w[None]).half() for w in heldout]
            best = heldout_kl(model, refs, heldout)
            start, best_state, best_step, stale, step = best, [p.detach().clone() for p in params], 0, 0, 0
            curve.append({"step": 0, "heldout_kl": best})
            bar = tqdm(range(1, settings.steps + 1), desc="tune scales", disable=not progress, unit="step")
            for step in bar:
                pick = torch.randint(len(train), (settings.batch,), generator=gen)
                batch = train[pick]
                with weights_swapped(model, originals):
                    if train_last_hidden is None:
                        ref = reference_logprobs(model, linears, batch)
                    else:
                        ref = reference_logprobs_after_blocks(model, batch, train_last_hidden[pick])
                loss = kl_to_reference(model, ref, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % settings.check_every and step != settings.steps:
                    continue
                kl = heldout_kl(model, refs, heldout)
                curve.append({"step": step, "train_kl": float(loss.detach()), "heldout_kl": kl})
                bar.set_postfix(heldout_kl=f"{kl:.4f}")
                if log is not None:
                    log(curve[-1])
                if kl < best:
                    best, best_state, best_step, stale = kl, [p.detach().clone() for p in params], step, 0
                else:
                    stale += 1
                    if stale >= settings.patience:
                        break
            with torch.no_grad():
                for p, b in zip(params, best_state):
                    p.copy_(b)
                tuned = {}
                for lin in linears.values():
                    for key, scale, shift in lin.tuned():
                        tuned[key] = dict(packed[key], scale=scale.half())
                        if shift is not None:
                            tuned[key]["shift"] = shift.half()
    finally:
        for p in params_frozen:
            p.requires_grad_(True)
    report = {"steps_run": step, "best_step": best_step, "heldout_kl_before": start, "heldout_kl_after": best, "curve": curve}
    return {**packed, **tuned}, report
