"""Incoherence rotation and error carried across units: exact round trips, honest bytes, and
never worse than independent rounding on the output error."""

import json

import pytest
import torch
from scipy.linalg import hadamard as scipy_hadamard
from test_feedback import correlated_inputs, output_error

from windquant.pack.checkpoint import FORMAT_VERSION
from windquant.quant.accounting import unit_layout, unit_true_bits
from windquant.quant.codes import unpack_codes
from windquant.quant.ops import decode, grid_for
from windquant.quant.rotation import hadamard, pack_signs, random_signs, rotates, rotation, unpack_signs, unrotate
from windquant.quant.unit import FitSettings, dequantize_unit, quantize_linear, quantize_unit

ROTATED = FitSettings(steps=3, rotate=True)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_hadamard_matches_scipy_and_rotation_is_orthogonal(n):
    assert torch.allclose(hadamard(n), torch.tensor(scipy_hadamard(n), dtype=torch.float32) / n**0.5)
    r = rotation(random_signs(n, seed=n))
    assert torch.allclose(r @ r.T, torch.eye(n), atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_fast_unrotate_equals_the_matrix_product(n):
    signs = random_signs(n, seed=n + 1)
    w = torch.randn(7, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(unrotate(w, signs), w @ rotation(signs).T, atol=1e-5)
    assert torch.allclose(unrotate(w[0], signs), w[0] @ rotation(signs).T, atol=1e-5)  # a single row (AffineUnit offset)


@pytest.mark.parametrize("n", [5, 8, 13, 256])
def test_signs_pack_round_trip_exactly(n):
    signs = random_signs(n, seed=3)
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_signs(packed, n), signs)


def test_only_power_of_two_low_bit_units_rotate():
    assert rotates(2.0, 256, True) and rotates(8.0, 64, True)
    assert not rotates(2.0, 256, False) and not rotates(2.0, 96, True) and not rotates(16.0, 256, True)


def test_rotated_unit_decodes_to_codes_times_rotation_transposed():
    """Dequantization undoes the rotation: an 8-bit rotated unit is the weights to 8-bit precision,
    and its stored grid values, rotated back by hand, are exactly what dequantize returns."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen) * 0.05
    s, h = correlated_inputs(32)
    packed = quantize_unit(w, s, 8.0, ROTATED, h, seed=7)
    w_hat = dequantize_unit(packed, 8.0, *w.shape)
    assert (w_hat - w).abs().max() < 0.02 * w.abs().max()
    codes = unpack_codes(packed["codes"], 256, w.numel()).view(w.shape)
    grid_values = decode(codes, packed["scale"], torch.zeros(16), grid_for(8.0))
    by_hand = grid_values @ rotation(random_signs(32, seed=7)).T
    assert torch.equal(w_hat, by_hand.half().float())


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("columns", [32, 48])
@pytest.mark.parametrize("action", [8.0, 4.0, 3.0, 2.0, 1.58, 1.0, 16.0])
def test_packed_bytes_equal_accounted_bits_for_every_variant(action, columns, rotate):
    w = torch.randn(12, columns, generator=torch.Generator().manual_seed(1))
    s, h = correlated_inputs(columns)
    settings = FitSettings(steps=1, rotate=rotate)
    packed = quantize_unit(w, s, action, settings, h)
    assert 8 * sum(t.numel() * t.element_size() for t in packed.values()) == unit_true_bits(action, 12, columns, 0.03, rotate)
    layout = unit_layout(action, 12, columns, 0.03, rotate)
    assert ("rot_signs" in layout) == rotates(action, columns, rotate)
    assert not ("rot_signs" in layout and "sal_val" in layout)  # a rotated unit keeps no salient weights


@pytest.mark.parametrize("action", [4.0, 3.0, 2.0])
@pytest.mark.parametrize("rotate", [False, True])
def test_one_chunk_of_a_linear_equals_the_unit_candidate_with_feedback(action, rotate):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)) * 0.05
    s, h = correlated_inputs(32)
    settings = FitSettings(steps=2, feedback=True, rotate=rotate)
    (linear,) = quantize_linear(w, h, [(0, 32, action, 5, rotate)], settings)
    unit = quantize_unit(w, s, action, settings, h, seed=5)
    assert linear.keys() == unit.keys() and all(torch.equal(linear[k], unit[k]) for k in unit)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_carried_linear_never_worse_than_independent_rounding(rotate, seed):
    """Chunks alternate between the two outlier storages (per-unit rotate settings)."""
    gen = torch.Generator().manual_seed(20 + seed)
    w = torch.randn(24, 96, generator=gen) * 0.05
    s, h = correlated_inputs(96, seed=seed)
    chunks = [(0, 32, 3.0, 0, rotate), (32, 64, 2.0, 1, not rotate), (64, 80, 16.0, 2, rotate), (80, 96, 4.0, 3, not rotate)]
    rtn = torch.cat(
        [
            dequantize_unit(quantize_unit(w[:, a:b], s[a:b], act, FitSettings(steps=2, rotate=r), h[a:b, a:b], seed=k), act, 24, b - a)
            for a, b, act, k, r in chunks
        ],
        1,
    )
    packed = quantize_linear(w, h, chunks, FitSettings(steps=2))
    carried = torch.cat([dequantize_unit(p, act, 24, b - a) for p, (a, b, act, *_rest) in zip(packed, chunks)], 1)
    assert output_error(w, carried, h) < output_error(w, rtn, h)
    for p, (a, b, act, _k, r) in zip(packed, chunks):  # same layout, same bits as the candidates
        assert 8 * sum(t.numel() * t.element_size() for t in p.values()) == unit_true_bits(act, 24, b - a, 0.03, r)


def test_rotated_carried_checkpoint_round_trips_and_old_formats_load(tiny_model, tokenizer, tiny_plan, tiny_fit, tmp_path):
    from dataclasses import replace

    from windquant import load, quantize_, save
    from windquant.errors import WindquantError

    fit = replace(tiny_fit, rotate=True, feedback=True, carry=True)
    plan, _ = quantize_(tiny_model, tokenizer, tiny_plan, fit, progress=False)
    assert plan.rotate and plan.carried and plan.true_bits <= tiny_plan.target_bits
    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt")
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tiny_model(x).logits, load(out, runtime=False)(x).logits)
    qconf = json.loads((out / "quant_config.json").read_text())
    assert qconf["version"] == FORMAT_VERSION and qconf["rotate"] is True
    qconf["version"] = 99
    (out / "quant_config.json").write_text(json.dumps(qconf))
    with pytest.raises(WindquantError, match="format version 99.*upgrade windquant"):
        load(out)


def test_version_1_checkpoint_still_loads(tiny_model, tokenizer, tiny_plan, tiny_fit, tmp_path):
    """A folder as windquant wrote it before rotation: version 1, no rotate/carried keys."""
    from dataclasses import replace

    from windquant import load, quantize_, save

    paper = replace(tiny_fit, rotate=False, feedback=False, carry=False)  # what version 1 could store
    plan, _ = quantize_(tiny_model, tokenizer, tiny_plan, paper, progress=False)
    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt")
    for name, drop in (("quant_config.json", ("rotate",)), ("plan.json", ("rotate", "carried"))):
        d = json.loads((out / name).read_text())
        d = {k: v for k, v in d.items() if k not in drop} | ({"version": 1} if name == "quant_config.json" else {})
        (out / name).write_text(json.dumps(d))
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tiny_model(x).logits, load(out, runtime=False)(x).logits)


def test_scored_plan_equals_the_applied_model_when_carried(tiny_model, tokenizer, tiny_plan, tiny_fit):
    """The sweep scores a carried plan (under no_grad) with exactly the weights apply stores."""
    from dataclasses import replace

    from windquant.pipeline import apply, make_plan, prepare

    prepared = prepare(tiny_model, tokenizer, replace(tiny_fit, rotate=True, feedback=True, carry=True), ["scores"], progress=False)
    plan = make_plan(prepared, tiny_plan, progress=False)
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), prepared.plan_model(plan):
        scored = tiny_model(x).logits
    apply(prepared, plan, progress=False)
    with torch.no_grad():
        assert torch.allclose(scored, tiny_model(x).logits, atol=1e-2, rtol=1e-3)  # apply also rounds norms to fp16
