import pytest
import torch

from windquant.quant import ops
from windquant.quant.unit import FitSettings, dequantize_unit, quantize_unit, relative_error

LOW_BIT = [8.0, 4.0, 3.0, 2.0, 1.58, 1.0]


def weighted_row_error(w, w_hat, d, keep):
    """Per-row Σ_j d_j (w − ŵ)² over the positions in ``keep`` (the obvious form)."""
    return (((w - w_hat) ** 2) * d[None, :] * keep).sum(dim=1)


def autograd_fit(w, d, grid, keep, steps, lr=0.02, ratios=16):
    """The fit as first written, gradients by autograd and torch.optim.Adam: the reference of
    ``ops.fit``'s hand-written LSQ gradient and Adam update."""

    def fake_quant(w, scale, shift):
        x = ((w - shift[:, None]) / (scale[:, None] * grid.step) + grid.center).clamp(0, grid.levels - 1)
        x = x + (x.round() - x).detach()
        return scale[:, None] * grid.step * (x - grid.center) + shift[:, None]

    dk = d[None, :] * keep
    shift0 = (w * dk).sum(1) / dk.sum(1) if grid.learn_shift else torch.zeros(w.shape[0])
    absmax = ((w - shift0[:, None]).abs() * keep).amax(1).clamp_min(1e-8)
    best_scale, best_err = absmax / grid.max_level(), torch.full_like(absmax, float("inf"))
    for ratio in torch.linspace(1.0, 1.0 / ratios, ratios):
        scale = absmax * ratio / grid.max_level()
        err = weighted_row_error(w, fake_quant(w, scale, shift0), d, keep)
        best_scale, best_err = torch.where(err < best_err, scale, best_scale), torch.minimum(err, best_err)
    best_shift = shift0.clone()
    log_scale = torch.zeros_like(best_scale, requires_grad=True)
    shift_delta = torch.zeros_like(best_scale, requires_grad=grid.learn_shift)
    opt = torch.optim.Adam([log_scale] + ([shift_delta] if grid.learn_shift else []), lr=lr)
    scale0, norm = best_scale.clone(), ((w**2) * dk).sum(1)
    for _ in range(steps):
        scale, shift = scale0 * log_scale.exp(), shift0 + scale0 * shift_delta
        row_err = weighted_row_error(w, fake_quant(w, scale, shift), d, keep)
        with torch.no_grad():
            better = row_err < best_err
            best_err = torch.where(better, row_err, best_err)
            best_scale, best_shift = torch.where(better, scale, best_scale), torch.where(better, shift, best_shift)
        opt.zero_grad()
        (row_err / norm).sum().backward()
        opt.step()
    return best_scale.detach(), best_shift.detach()


def gaussian(out=64, g=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, g, generator=gen) * 0.02, torch.rand(g, generator=gen) + 0.5


@pytest.mark.parametrize(
    "action, levels",
    [
        (2.0, [-0.75, -0.25, 0.25, 0.75]),  # SEQ 4 levels, no zero
        (1.58, [-1.0, 0.0, 1.0]),  # ternary
        (3.0, [-4, -3, -2, -1, 0, 1, 2, 3]),  # LSQ signed grid
        (1.0, [-1.0, 1.0]),  # elastic binary (before shift)
    ],
)
def test_grid_levels_match_operator_definitions(action, levels):
    grid = ops.grid_for(action)
    codes = torch.arange(grid.levels)[None, :]
    got = ops.decode(codes, torch.ones(1), torch.zeros(1), grid)[0]
    assert got.tolist() == pytest.approx(levels)


def test_encode_is_nearest_level_brute_force():
    w, _ = gaussian()
    for action in LOW_BIT:
        grid = ops.grid_for(action)
        scale = w.abs().amax(1) / grid.max_level() * 0.7
        shift = w.mean(1) if grid.learn_shift else torch.zeros(w.shape[0])
        codes = ops.encode(w, scale, shift, grid)
        all_levels = ops.decode(torch.arange(grid.levels).expand(w.shape[0], -1), scale, shift, grid)
        brute = (w[:, :, None] - all_levels[:, None, :]).abs().argmin(-1)
        # equal except exact ties (probability ~0)
        assert (codes == brute).float().mean() > 0.999


def test_error_decreases_with_bits_on_gaussian():
    w, s = gaussian()
    settings = FitSettings(salient_rate=0.0)
    errs = [relative_error(w, dequantize_unit(quantize_unit(w, s, a, settings), a, *w.shape), s) for a in LOW_BIT]
    assert errs == sorted(errs), errs
    assert errs[-2] < errs[-1]  # ternary beats binary
    assert errs[3] < errs[4]  # 2 bit beats ternary
    assert errs[0] < 1e-4


def test_fit_beats_absmax_rtn_and_is_deterministic():
    w, s = gaussian(seed=3)
    d = s**2
    for action in [4.0, 3.0, 2.0]:
        grid = ops.grid_for(action)
        zero = torch.zeros(w.shape[0])
        rtn_scale = w.abs().amax(1) / grid.max_level()
        rtn = ops.decode(ops.encode(w, rtn_scale, zero, grid), rtn_scale, zero, grid)
        res = ops.fit(w, d, grid, steps=10)
        fitted = ops.decode(res.codes, res.scale, res.shift, grid)
        keep = torch.ones_like(w)
        assert weighted_row_error(w, fitted, d, keep).sum() < weighted_row_error(w, rtn, d, keep).sum()
        again = ops.fit(w, d, grid, steps=10)
        assert torch.equal(res.codes, again.codes) and torch.equal(res.scale, again.scale)


@pytest.mark.parametrize("action", LOW_BIT)
@pytest.mark.parametrize("salient", [False, True])
def test_fit_matches_the_autograd_reference(action, salient):
    w, s = gaussian(seed=7)
    grid = ops.grid_for(action)
    keep = torch.ones_like(w)
    if salient:
        keep[torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.03] = 0
    ref_scale, ref_shift = autograd_fit(w, s**2, grid, keep, steps=10)
    res = ops.fit(w, s**2, grid, keep=keep.bool(), steps=10)
    # Same algorithm, gradients in another summation order: scales agree to float noise, so the
    # stored fp16 values agree to one fp16 step at most (almost always exactly).
    assert torch.allclose(res.scale.float(), ref_scale, rtol=2e-3, atol=0)
    assert (res.scale == ref_scale.half()).float().mean() > 0.95
    assert torch.allclose(res.shift.float(), ref_shift, rtol=2e-3, atol=1e-6)


def test_adam_steps_never_worsen_the_grid_search_init():
    w, s = gaussian(seed=5)
    grid = ops.grid_for(2.0)
    keep = torch.ones_like(w)

    def err(steps):
        r = ops.fit(w, s**2, grid, steps=steps)
        return float(weighted_row_error(w, ops.decode(r.codes, r.scale, r.shift, grid), s**2, keep).sum())

    assert err(10) <= err(0) * (1 + 1e-3)


def test_salient_positions_are_excluded_from_fit_and_restored():
    w, s = gaussian()
    w[0, 0] = 1.0  # a huge outlier
    settings = FitSettings(salient_rate=0.03)
    w_hat = dequantize_unit(quantize_unit(w, s, 2.0, settings), 2.0, *w.shape)
    assert abs(float(w_hat[0, 0]) - 1.0) < 1.0 / 127  # kept by INT8 protection
    unprotected = dequantize_unit(quantize_unit(w, s, 2.0, FitSettings(salient_rate=0.0)), 2.0, *w.shape)
    assert relative_error(w, w_hat, s) < relative_error(w, unprotected, s)
