"""Scale Folding: an exact equivalence on the unquantized model, with statistics that transform
exactly, and an α search that really minimises the quantized output error."""

from dataclasses import replace

import pytest
import torch
from conftest import make_model

from windquant.calib.statistics import calibrate
from windquant.model.folding import ALPHAS, awq_scales, fold, fold_groups, fold_statistics
from windquant.quant.fold_search import SEARCH_ACTION, group_errors, output_error
from windquant.quant.unit import FitSettings

X = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def random_scales(group, model, seed):
    n = model.get_submodule(group.producer).weight.shape[0]
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 4 + 0.25


def test_groups_cover_every_block_linear_once_as_consumer():
    model = make_model()
    consumers = [c for g in fold_groups(model) for c in g.consumers]
    from windquant.model.units import block_linears

    assert sorted(consumers) == sorted(name for _l, name, _p, _m in block_linears(model))


def test_folded_model_computes_the_same_logits():
    """Random scales (far from 1) folded into every group, GQA included (4 query heads, 2 kv)."""
    model, original = make_model(), make_model()
    for k, group in enumerate(fold_groups(model)):
        fold(model, group, random_scales(group, model, k))
    with torch.no_grad():
        assert not torch.equal(model.model.layers[0].self_attn.v_proj.weight, original.model.layers[0].self_attn.v_proj.weight)
        assert torch.allclose(model(X).logits, original(X).logits, atol=1e-4, rtol=1e-4)


def test_folded_statistics_equal_recalibrated_ones():
    model = make_model()
    stats = calibrate(model, X, moments=True, progress=False)
    scales, moments = dict(stats.act_scales), dict(stats.moments)
    for k, group in enumerate(fold_groups(model)):
        s = random_scales(group, model, k)
        fold(model, group, s)
        fold_statistics(scales, moments, group, s)
    again = calibrate(model, X, moments=True, progress=False)
    for name in scales:
        assert torch.allclose(scales[name], again.act_scales[name], rtol=1e-3, atol=1e-6), name
        assert torch.allclose(moments[name], again.moments[name], rtol=1e-3, atol=1e-6), name


def test_alpha_zero_is_no_folding_and_search_errors_are_the_quantized_output_errors():
    model = make_model()
    stats = calibrate(model, X, moments=True, progress=False)
    settings = FitSettings(steps=0)
    group = fold_groups(model)[1]  # post-attention norm -> gate/up
    errors = group_errors(model, group, stats.act_scales, stats.moments, 32, settings)
    assert set(errors) == set(ALPHAS)
    assert torch.equal(awq_scales(torch.rand(8) + 0.1, 0.0), torch.ones(8))
    by_hand = sum(output_error(model.get_submodule(n).weight.detach().float(), stats.moments[n], 32, SEARCH_ACTION, settings) for n in group.consumers)
    assert errors[0.0] == pytest.approx(by_hand, rel=1e-6)


def test_prepare_with_fold_changes_the_fingerprint_and_keeps_the_function(tokenizer, tiny_fit, tiny_plan):
    from windquant.pipeline import make_plan, prepare

    plain = prepare(make_model(), tokenizer, tiny_fit, progress=False)
    model = make_model()
    folded = prepare(model, tokenizer, replace(tiny_fit, fold=True), progress=False)
    assert folded.folder != plain.folder and len(folded.folded) == 4 * 2
    with torch.no_grad():
        assert torch.allclose(model(X).logits, make_model()(X).logits, atol=1e-4, rtol=1e-4)
    plan = make_plan(folded, tiny_plan, progress=False)
    assert plan.info["fold_alphas"] == folded.folded and plan.true_bits <= tiny_plan.target_bits


def test_folded_checkpoint_round_trips(tokenizer, tiny_fit, tiny_plan, tmp_path):
    from windquant import load, quantize_, save

    model = make_model()
    plan, _ = quantize_(model, tokenizer, tiny_plan, replace(tiny_fit, fold=True), progress=False)
    out = save(model, tokenizer, plan, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(X).logits, load(out, runtime=False)(X).logits)
