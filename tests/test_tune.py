"""End-to-end scale tuning: the affine form of a packed unit equals its dequantization, tuning
changes nothing but scales and shifts, and what it reports is what the stored model computes."""

from dataclasses import replace

import pytest
import torch
from test_feedback import correlated_inputs

from windquant.quant.unit import FitSettings, affine_unit, dequantize_unit, quantize_unit

EVERY_UNIT = pytest.mark.parametrize("action,rotate", [(a, r) for a in (8.0, 4.0, 3.0, 2.0, 1.58, 1.0) for r in (False, True)])


def fitted_unit(action: float, rotate: bool, seed: int) -> tuple[torch.Tensor, dict]:
    """A 12 x 32 weight and its packed unit at ``action``."""
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(seed)) * 0.1
    s, h = correlated_inputs(32)
    return w, quantize_unit(w, s, action, FitSettings(steps=3, rotate=rotate), h, seed=seed + 3)


@EVERY_UNIT
def test_affine_unit_at_stored_scales_equals_dequantize(action, rotate):
    w, packed = fitted_unit(action, rotate, seed=2)
    shift = packed["shift"].float() if "shift" in packed else None
    by_affine = affine_unit(packed, action, 12, 32).weight(packed["scale"].float(), shift)
    assert torch.allclose(by_affine, dequantize_unit(packed, action, 12, 32), atol=1e-3 * w.abs().max(), rtol=1e-3)
    # Doubling every scale (and shift) doubles the grid part and leaves the salient values alone.
    unit = affine_unit(packed, action, 12, 32)
    doubled = unit.weight(2 * packed["scale"].float(), None if shift is None else 2 * shift)
    expected = 2 * by_affine if unit.fixed_mask is None else torch.where(unit.fixed_mask, by_affine, 2 * by_affine)
    assert torch.allclose(doubled, expected, atol=1e-5)


@EVERY_UNIT
def test_affine_output_and_its_scale_gradients_equal_those_through_the_formed_weight(action, rotate):
    _, packed = fitted_unit(action, rotate, seed=3)
    unit = affine_unit(packed, action, 12, 32)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    g = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))
    grads = []
    for through_weight in (True, False):
        scale = (packed["scale"].float() * 1.1).requires_grad_(True)
        shift = (packed["shift"].float() - 0.01).requires_grad_(True) if "shift" in packed else None
        y = x @ unit.weight(scale, shift).T if through_weight else unit.output(x, scale, shift)
        (y * g).sum().backward()
        grads.append((y.detach(), scale.grad, None if shift is None else shift.grad))
    (y_ref, gs_ref, gm_ref), (y, gs, gm) = grads
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gs, gs_ref, atol=1e-5, rtol=1e-4)
    assert (gm is None and gm_ref is None) or torch.allclose(gm, gm_ref, atol=1e-5, rtol=1e-4)


def kl_of(model, ref_model, windows):
    import torch.nn.functional as F

    with torch.no_grad():
        q = F.log_softmax(model(windows).logits[:, :-1].float(), -1).flatten(0, 1)
        p = F.log_softmax(ref_model(windows).logits[:, :-1].float(), -1).flatten(0, 1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_tuning_lowers_heldout_kl_changes_only_scales_and_is_what_is_stored(tokenizer, tiny_fit):
    from conftest import make_model

    from windquant.config import PlanConfig
    from windquant.pipeline import TUNE_HELDOUT_WINDOWS, apply, calibration_windows, make_plan, plan_candidates, prepare

    model, reference = make_model(), make_model()
    fit = replace(tiny_fit, calib_samples=8, tune_steps=40, tune_lr=5e-3, carry=False)
    prepared = prepare(model, tokenizer, fit, progress=False)
    plan = make_plan(prepared, PlanConfig(target_bits=2.2), progress=False)
    assert plan.tune_steps == 40
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = plan_candidates(prepared, plan, progress=False)
    after_state = model.state_dict()
    assert all(torch.equal(v, after_state[k]) for k, v in before_state.items())  # the reference is untouched
    assert all(p.requires_grad for p in model.parameters())
    report = plan.info["tune"]
    assert report["heldout_kl_after"] < report["heldout_kl_before"]
    changed = 0
    for u, a in zip(plan.units, plan.applied):
        before, after = prepared.cache.packed_of(u.index, a), tuned[(u.index, a)]
        assert set(before) == set(after)
        for field, t in before.items():
            assert after[field].dtype == t.dtype and after[field].shape == t.shape
            if field not in ("scale", "shift"):
                assert torch.equal(after[field], t), field
        changed += not torch.equal(after["scale"], before["scale"]) if "scale" in before else 0
    assert changed > 0
    # The stored model's KL to the reference on the held-out windows is the one the report gives.
    apply(prepared, plan, progress=False)
    heldout = calibration_windows(tokenizer, fit, TUNE_HELDOUT_WINDOWS, seed=fit.seed + 1)
    stored = sum(kl_of(model, reference, w[None]) for w in heldout) / len(heldout)
    assert stored == pytest.approx(report["heldout_kl_after"], rel=0.05)


def test_tuning_with_the_stored_embedding_rows_reports_what_the_stored_model_computes(tokenizer, tiny_fit):
    """With ``rows`` (the embedding as the checkpoint stores it), tuning runs the quantized model
    with those rows and the reference with the original ones: its held-out KL before and after
    are those of the stored model, untuned and tuned, against the untouched reference."""
    from conftest import make_model

    from windquant.config import PlanConfig
    from windquant.pack.embedding import quantized_rows, round_rows_
    from windquant.pipeline import TUNE_HELDOUT_WINDOWS, apply, calibration_windows, make_plan, prepare
    from windquant.quant.rows import dequantize_rows

    model, reference = make_model(), make_model()
    fit = replace(tiny_fit, calib_samples=8, tune_steps=20, tune_lr=5e-3, carry=False)
    prepared = prepare(model, tokenizer, fit, progress=False)
    plan = make_plan(prepared, PlanConfig(target_bits=2.2), progress=False)
    embedding = model.get_input_embeddings().weight.detach().clone()
    rows = {name: dequantize_rows(p, 4) for name, p in quantized_rows(model, 4).items()}
    assert not torch.equal(next(iter(rows.values())), embedding)
    heldout = calibration_windows(tokenizer, fit, TUNE_HELDOUT_WINDOWS, seed=fit.seed + 1)

    def stored_kl(tune_steps: int, with_rows: bool = True) -> tuple[float, dict]:
        stored, this_plan = make_model(), replace(plan, tune_steps=tune_steps, info=dict(plan.info))
        apply(prepared, this_plan, stored, progress=False, rows=rows if with_rows else None)
        assert torch.equal(model.get_input_embeddings().weight, embedding)  # the reference keeps its rows
        if with_rows:
            round_rows_(stored, 4)
        return sum(kl_of(stored, reference, w[None]) for w in heldout) / len(heldout), this_plan.info

    (before, _), (after, info) = stored_kl(0), stored_kl(plan.tune_steps)
    report = info["tune"]
    # The rows' error is a large part of the stored model's: the tuning saw it.
    assert stored_kl(0, with_rows=False)[0] < 0.9 * before
    # fp16 rounding of the other tensors at apply is the rest (as in the test above).
    assert report["heldout_kl_before"] == pytest.approx(before, rel=0.05)
    assert report["heldout_kl_after"] == pytest.approx(after, rel=0.05)
    assert after < before


def test_write_checkpoint_quantizes_the_rows_once_and_stores_those_tuning_saw(tokenizer, tiny_fit, tmp_path, monkeypatch):
    """The embedding rows that tuning ran with are the rows the checkpoint stores: quantized once
    (not again by ``save``), and the reloaded model has exactly them."""
    from conftest import make_model

    import windquant.pack.embedding as embedding
    from windquant import load
    from windquant.config import PlanConfig
    from windquant.pipeline import make_plan, prepare, write_checkpoint
    from windquant.quant.rows import dequantize_rows

    calls = []

    def counted(*args, **kwargs):
        calls.append(quantize_rows(*args, **kwargs))
        return calls[-1]

    quantize_rows = embedding.quantize_rows
    monkeypatch.setattr(embedding, "quantize_rows", counted)
    model = make_model()
    fit = replace(tiny_fit, calib_samples=8, tune_steps=2, carry=False)
    prepared = prepare(model, tokenizer, fit, progress=False)
    plan = make_plan(prepared, PlanConfig(target_bits=2.2), progress=False)
    calls.clear()
    out, _ = write_checkpoint(prepared, plan, tmp_path / "ckpt", embedding_bits=4, progress=False)
    assert len(calls) == len(embedding.row_modules(model)) == 1  # a tied head: one matrix, once
    stored = load(out, runtime=False).get_input_embeddings().weight
    assert torch.equal(stored.float(), dequantize_rows(calls[0], 4).float())


def test_a_tuning_step_draws_tune_batch_windows(tokenizer, tiny_fit):
    """With ``tune_batch`` b, a step's training loss is the KL over b calibration windows drawn by
    the tuning's seeded generator: at step 1 (deltas still zero) it equals the untuned stored
    model's KL to the reference over exactly those windows."""
    from conftest import make_model

    from windquant.config import PlanConfig
    from windquant.pipeline import apply, make_plan, plan_candidates, prepare

    model, reference = make_model(), make_model()
    fit = replace(tiny_fit, calib_samples=8, tune_steps=1, tune_batch=3, carry=False)
    prepared = prepare(model, tokenizer, fit, progress=False)
    plan = make_plan(prepared, PlanConfig(target_bits=2.2), progress=False)
    plan_candidates(prepared, plan, progress=False)
    first = plan.info["tune"]["curve"][1]
    untuned = make_model()
    apply(prepared, replace(plan, tune_steps=0, info={}), untuned, progress=False)
    train = prepared.stats.windows
    drawn = train[torch.randint(len(train), (3,), generator=torch.Generator().manual_seed(0))]
    assert first["train_kl"] == pytest.approx(kl_of(untuned, reference, drawn), rel=0.02)
    assert first["train_kl"] != pytest.approx(kl_of(untuned, reference, drawn[:1]), rel=0.02)


def test_tune_batch_beyond_the_calibration_windows_is_refused():
    from windquant.config import FitConfig
    from windquant.errors import WindquantError

    with pytest.raises(WindquantError, match="tune_batch"):
        FitConfig(calib_samples=8, tune_batch=9).validate()
