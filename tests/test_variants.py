"""Outlier storage chosen per unit: ilp weighs both storages, the plan records each unit's."""

import itertools
import json
from dataclasses import replace

import pytest
import torch

from windquant import Plan, load, save
from windquant.actions import ACTIONS
from windquant.alloc.problem import AllocationProblem, StorageVariant
from windquant.model.units import Unit
from windquant.pipeline import apply, make_plan, prepare


def toy_problem(seed: int, n: int = 3) -> AllocationProblem:
    gen = torch.Generator().manual_seed(seed)
    k = len(ACTIONS)
    units = [Unit(i, 0, f"m{i}", "q_proj", "attention", 0, 16, 8) for i in range(n)]
    bits = torch.tensor(ACTIONS, dtype=torch.float64).repeat(n, 1) * 128

    def costs():
        return torch.sort(torch.rand(n, k, generator=gen, dtype=torch.float64), dim=1).values

    variant_bits = bits + torch.randint(-40, 60, (n, k), generator=gen).double()
    variant = StorageVariant(False, variant_bits, costs())
    return AllocationProblem(units, bits, torch.ones(n), 3.0, "true", costs(), variant=variant)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_over_both_storages_matches_brute_force(seed):
    from conftest import run_allocator

    from windquant.alloc import AllocationContext, get_allocator
    from windquant.config import PlanConfig

    p = toy_problem(seed)
    spec = get_allocator("ilp")
    config = PlanConfig(allocator="ilp").validate().allocator_config
    got = spec.allocate(p, config, AllocationContext("."))
    p.check_plan(got.requested, "ilp", got.variant)
    idx = [ACTIONS.index(a) for a in got.requested]
    cost = sum(float((p.variant.costs if v else p.costs)[i, j]) for i, (j, v) in enumerate(zip(idx, got.variant)))
    best = float("inf")
    for choice in itertools.product(range(len(ACTIONS)), [False, True], repeat=len(p.units)):
        acts, flags = choice[0::2], list(choice[1::2])
        if p.fits(p.total_bits([ACTIONS[j] for j in acts], flags)):
            best = min(best, sum(float((p.variant.costs if v else p.costs)[i, j]) for i, (j, v) in enumerate(zip(acts, flags))))
    assert cost == pytest.approx(best, abs=1e-9)
    # Without the variant, ilp can only do worse or equal.
    alone = run_allocator("ilp", replace(p, variant=None))
    assert cost <= sum(float(p.costs[i, ACTIONS.index(a)]) for i, a in enumerate(alone)) + 1e-12


def test_a_variant_plan_without_fitted_variants_is_refused():
    from windquant.errors import WindquantError

    p = replace(toy_problem(0), variant=None)
    with pytest.raises(WindquantError, match="storage variants"):
        p.check_plan([4.0] * 3, "toy", [True, False, False])


@pytest.mark.parametrize("carry", [False, True])
def test_storage_variant_plan_packs_reloads_and_counts_its_bytes(tiny_model, tokenizer, tiny_plan, tiny_fit, tmp_path, carry):
    from conftest import make_model
    from test_pipeline import data_bytes_by_tensor

    fit = replace(tiny_fit, rotate=True, feedback=True, carry=carry, storage_variants=True)
    prepared = prepare(tiny_model, tokenizer, fit, progress=False)
    assert prepared.variant is not None and not prepared.variant.cache.settings.rotate
    plan = make_plan(prepared, tiny_plan)
    assert plan.unit_rotate is not None and plan.true_bits <= tiny_plan.target_bits
    # Force both storages into the plan so the round trip sees each.
    plan.unit_rotate = [i % 2 == 0 for i in range(len(plan.units))]
    plan.applied = prepared.applied(plan.requested, prepared.plan_variant(plan))
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with prepared.plan_model(plan):
            scored = tiny_model(x).logits  # what the sweep scores
        model = apply(prepared, plan, make_model())
        stored = model(x).logits
    assert torch.allclose(scored, stored, atol=1e-2, rtol=1e-3)  # apply also rounds norms to fp16
    out = save(model, tokenizer, plan, tmp_path / "ckpt", embedding_bits=16)  # stored: computed before save
    with torch.no_grad():
        assert torch.equal(stored, load(out, runtime=False)(x).logits)
    back = Plan.load(out / "plan.json")
    assert back.unit_rotate == plan.unit_rotate
    sizes = data_bytes_by_tensor(out / "model.safetensors")
    modules = json.loads((out / "quant_config.json").read_text())["modules"]
    packed = sum(v for k, v in sizes.items() if k.startswith(tuple(m + ".c" for m in modules)))
    assert packed * 8 == back.summary().true_bits_total
    # Salient weights live exactly in the unrotated low-bit units.
    for name, m in model.named_modules():
        for k, (_c0, _c1, action, rotate) in enumerate(getattr(m, "chunks", [])):
            assert ("rot_signs" in m.chunk_tensors(k)) == (rotate and action != 16.0), name
