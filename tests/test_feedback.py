"""Error feedback inside a unit: equals a slow OBQ reference, never worse than plain rounding."""

import pytest
import torch

from windquant.quant import salient
from windquant.quant.accounting import unit_true_bits
from windquant.quant.feedback import damped, error_feedback
from windquant.quant.unit import FitSettings, dequantize_unit, quantize_unit


def correlated_inputs(g: int, n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation scales and second moment of inputs with correlated channels and a few loud ones."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(g, g, generator=gen) / g**0.5 + torch.eye(g)
    x = torch.randn(n, g, generator=gen) @ mix * (1 + 4 * (torch.rand(g, generator=gen) > 0.9))
    h = x.T @ x / n
    return h.diagonal().sqrt(), h


def obq_reference(w: torch.Tensor, h: torch.Tensor, quantize_column) -> torch.Tensor:
    """OBQ as written: explicit inverse of H over the columns not quantized yet, updated by the
    Schur complement after every column (no Cholesky trick)."""
    w, hinv = w.clone(), torch.linalg.inv(damped(h))
    q = torch.empty_like(w)
    for j in range(w.shape[1]):
        q[:, j] = quantize_column(w[:, j], j)
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return q


def test_feedback_equals_slow_obq_reference():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    _, h = correlated_inputs(12)
    h = h.double()
    h[3, :], h[:, 3] = 0.0, 0.0  # a dead input channel

    def on_grid(col, j):  # any per-column quantizer: here a 0.25 grid, offset per column
        return ((col - 0.01 * j) / 0.25).round() * 0.25 + 0.01 * j

    fast, slow = error_feedback(w, h, [(0, 12)], lambda _k, _w: on_grid), obq_reference(w, h, on_grid)
    assert torch.allclose(fast, slow, atol=1e-10)
    assert not torch.allclose(fast, on_grid(w, 0), atol=1e-3)  # the feedback changed the rounding


def test_chunks_carry_their_error_into_later_chunks():
    """Split into chunks, the loop is still OBQ over the whole row: each chunk's quantizer is
    asked for when the chunk starts, with the chunk's columns as the earlier errors left them."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    h = correlated_inputs(12)[1].double()
    grids = {0: 0.25, 1: 0.5, 2: 0.1}  # a different grid per chunk
    chunks = [(0, 4), (4, 9), (9, 12)]
    seen = []

    def start(k, wk):
        seen.append(wk.clone())
        return lambda col, _j: (col / grids[k]).round() * grids[k]

    def by_column(col, j):
        step = grids[next(k for k, (a, b) in enumerate(chunks) if a <= j < b)]
        return (col / step).round() * step

    fast = error_feedback(w, h, chunks, start)
    assert torch.allclose(fast, obq_reference(w, h, by_column), atol=1e-10)
    assert [s.shape[1] for s in seen] == [4, 5, 3] and not torch.allclose(seen[1], w[:, 4:9])


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - w_hat).double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("action", [4.0, 3.0, 2.0, 1.58, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_feedback_never_worse_than_rounding_on_the_output_error(action, seed):
    gen = torch.Generator().manual_seed(10 + seed)
    w = torch.randn(24, 64, generator=gen) * 0.05
    s, h = correlated_inputs(64, seed=seed)
    plain = FitSettings(steps=3)
    fed = FitSettings(steps=3, feedback=True)
    rtn = dequantize_unit(quantize_unit(w, s, action, plain), action, *w.shape)
    packed = quantize_unit(w, s, action, fed, h)
    obq = dequantize_unit(packed, action, *w.shape)
    assert output_error(w, obq, h) <= output_error(w, rtn, h)
    # same layout, same bits
    assert 8 * sum(t.numel() * t.element_size() for t in packed.values()) == unit_true_bits(action, *w.shape, 0.03)
    # salient positions hold INT8 values of the unit's fixed INT8 scale
    mask = salient.select(w, s, 0.03)
    scale = salient.int8_scale(w, mask).float()
    levels = (obq[mask] / scale).round()
    assert torch.equal(obq[mask], (levels * scale).half().float()) and levels.abs().max() <= 127


def test_feedback_without_moments_is_a_clear_error():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="the unit.s input second moment"):
        quantize_unit(w, torch.ones(8), 4.0, FitSettings(feedback=True))
    with pytest.raises(ValueError, match="the unit.s input second moment"):
        quantize_unit(w, torch.ones(8), 4.0, FitSettings(rotate=True))


def test_fingerprint_unchanged_without_feedback():
    from windquant.quant.cache import fingerprint

    # the value every cache written before the feedback option was hashed with
    assert FitSettings().fingerprint_fields() == {"salient_rate": 0.03, "steps": 10, "lr": 0.02}
    keys = {fingerprint("m", "c", 256, s) for s in (FitSettings(), FitSettings(feedback=True), FitSettings(rotate=True))}
    assert len(keys) == 3


@pytest.mark.parametrize("action", [8.0, 4.0, 3.0, 2.0, 1.58, 1.0])
def test_column_quantizer_is_encode_then_decode_with_int8_salient_values(action):
    from windquant.quant.ops import decode, encode
    from windquant.quant.unit import fit_quantizer

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 32, generator=gen)
    quantizer = fit_quantizer(w, torch.rand(32, generator=gen) + 0.5, action, FitSettings(steps=2))
    res = quantizer.res
    by_codes = decode(encode(w, res.scale.float(), res.shift.float(), quantizer.grid), res.scale, res.shift, quantizer.grid)
    sal = salient.int8_round(w, quantizer.sal_scale) * quantizer.sal_scale.float()
    expected = torch.where(quantizer.mask, sal, by_codes)
    columns = torch.stack([quantizer.column(w[:, j].clone(), j) for j in range(32)], dim=1)
    assert torch.equal(columns, expected)


@pytest.mark.parametrize("rotate", [True, False])
def test_all_actions_of_a_unit_at_once_equal_one_at_a_time(rotate):
    """quantize_unit_actions stacks the fits' rows into one feedback pass: each action's packed
    tensors are those of quantizing it alone (same arithmetic per row)."""
    from windquant.actions import ACTIONS
    from windquant.quant.unit import FitSettings, dequantize_unit, quantize_unit, quantize_unit_actions

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 64, generator=gen) * 0.02
    x = torch.randn(512, 64, generator=gen) * (torch.rand(64, generator=gen) + 0.2)
    h = x.T @ x / len(x)
    settings = FitSettings(salient_rate=0.03, steps=3, feedback=True, rotate=rotate)
    together = quantize_unit_actions(w, h.diagonal().sqrt(), list(ACTIONS), settings, h, seed=9)
    for action, packed in zip(ACTIONS, together):
        alone = quantize_unit(w, h.diagonal().sqrt(), action, settings, h, seed=9)
        assert set(packed) == set(alone)
        torch.testing.assert_close(dequantize_unit(packed, action, *w.shape), dequantize_unit(alone, action, *w.shape), rtol=0, atol=1e-6)
