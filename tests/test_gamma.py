"""GAMMA allocator: teacher-forced block reconstruction, learned preferences, projection, reuse."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import block_error, block_outputs_and_gradients

from windquant.actions import ACTIONS
from windquant.alloc.gamma import (
    GammaConfig,
    cross_gradient,
    error_correlation,
    expected_bits,
    initial_preferences,
    load_preferences,
    mirror_step,
    preferences,
    soft_price,
    temperature,
)
from windquant.config import PlanConfig
from windquant.pipeline import make_plan, prepare


def gamma_plan(target: float, **config) -> PlanConfig:
    return PlanConfig(target_bits=target, allocator="gamma", allocator_config=GammaConfig(**config))


@pytest.fixture
def tiny_fit(tiny_fit):
    # One score table throughout: with --scores auto each budget may take another table, and a
    # GAMMA table is trained on the scores it is given (one table per score kind).
    return replace(tiny_fit, scores="block")


@pytest.fixture
def prepared(tiny_model, tokenizer, tiny_fit):
    return prepare(tiny_model, tokenizer, tiny_fit, needs={"scores"}, progress=False)


def test_one_hot_preferences_give_the_plans_weights_and_the_teacher_forced_block_error(prepared, tiny_model):
    plan = make_plan(prepared, PlanConfig(target_bits=3.0))  # any plan: ilp's
    windows = prepared.stats.windows
    ref_out, grads = block_outputs_and_gradients(tiny_model, windows)
    recon = prepared.reconstruction(progress=False)(len(windows))  # one batch: all windows
    for layer in range(recon.layers):
        # The per-channel Fisher at the block output: mean over tokens of the squared gradient.
        g = grads[layer].reshape(-1, grads[layer].shape[-1])
        torch.testing.assert_close(recon.fisher[layer], (g * g).mean(0), rtol=1e-4, atol=1e-12)
        task = recon.block(layer)
        weights = []
        for k, i in enumerate(task.units):
            one_hot = torch.zeros(len(ACTIONS))
            one_hot[ACTIONS.index(plan.requested[i])] = 1
            w = torch.einsum("a,aoc->oc", one_hot, task.candidates[k])
            assert torch.equal(w, prepared.cache.weight(i, plan.applied[i]).float())
            weights.append(w)
        # Reference: the whole model with only this block's units at the plan, hooked at the block.
        dense = {i: w for i, w in zip(task.units, weights)}
        layer_units = [u for u in plan.units if u.layer == layer]
        expected = block_error(tiny_model, layer, windows, ref_out[layer], recon.fisher[layer], layer_units, lambda u, dense=dense: dense[u.index])
        got = task.loss(weights, 0)
        torch.testing.assert_close(float(got), expected, rtol=1e-4, atol=1e-10)
        assert got > 0


def test_soft_price_meets_the_budget_and_the_untrained_table_projects_to_ilps_plan(prepared):
    problem = prepared.problem(2.5, "true")
    budget = problem.budget
    costs, bits = problem.costs.double(), problem.bits.double()
    scale = float(costs.std(dim=1).median())
    mu = soft_price(costs, bits, scale, budget)
    assert mu > 0
    torch.testing.assert_close(expected_bits(preferences(costs, bits, mu, scale), bits), budget, rtol=1e-6, atol=1.0)
    prefs = initial_preferences(costs, bits, budget, "scores")
    assert prefs.mu == mu and torch.equal(prefs.costs, costs)
    torch.testing.assert_close(float(prefs.prior.sum()), budget, rtol=1e-6, atol=1.0)
    assert initial_preferences(costs, bits, budget, "free").mu == 0.0


def test_mirror_step_is_the_exponentiated_gradient_update():
    """Reference: p'(a) ∝ p(a)·exp(−η·g(a)/s), the multiplicative-weights step on the simplex."""
    gen = torch.Generator().manual_seed(0)
    costs, grad = torch.rand(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    bits = torch.tensor([16.0, 4.0, 2.0, 1.0], dtype=torch.float64).expand(5, 4)
    scale, price, step = 0.3, 0.02, 0.7
    p = preferences(costs, bits, price, scale)
    reference = p * torch.exp(-step * grad / scale)
    reference /= reference.sum(-1, keepdim=True)
    torch.testing.assert_close(preferences(mirror_step(costs, grad, p, step), bits, price, scale), reference)


def test_cross_gradient_of_a_quadratic_is_the_interaction_with_the_other_units():
    """Reference: E = (Σ_j e_j)ᵀ H (Σ_j e_j); the gradient against unit 0's candidates, less its
    own part (from the scores and the errors' correlation under H), is 2·e(a)ᵀ H e_others."""
    torch.manual_seed(0)
    n = 6
    h = torch.randn(n, n, dtype=torch.float64)
    h = h @ h.T + n * torch.eye(n, dtype=torch.float64)
    own = torch.randn(n, 3, dtype=torch.float64)  # unit 0's three candidate errors, correlated
    other = torch.randn(n, dtype=torch.float64)  # the rest of the block's error
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    e = own @ p + other
    (grad,) = torch.autograd.grad(e @ h @ e, p)
    gram = own.T @ h @ own
    scores, corr = gram.diagonal(), gram / (gram.diagonal()[:, None] * gram.diagonal()[None]).sqrt()
    got = cross_gradient(grad[None], p.detach()[None], scores[None], corr[None])[0]
    torch.testing.assert_close(got, 2 * own.T @ h @ other)


def test_error_correlation_brute_force():
    torch.manual_seed(1)
    cands = torch.randn(4, 3, 5)
    corr = error_correlation(cands, 0)
    for a in range(1, 4):
        for b in range(1, 4):
            ea, eb = (cands[a] - cands[0]).double(), (cands[b] - cands[0]).double()
            assert float(corr[a, b]) == pytest.approx(float((ea * eb).sum() / (ea.norm() * eb.norm())), rel=1e-9)
    assert torch.equal(corr[0], torch.zeros(4, dtype=torch.float64))


def test_zero_strength_gives_ilps_plan(prepared):
    ilp = make_plan(prepared, PlanConfig(target_bits=2.5))
    assert make_plan(prepared, gamma_plan(2.5, steps=2, strength=0.0)).requested == ilp.requested


def test_temperature_schedule_ends_where_it_says():
    assert temperature(0, 10, 1.0, 0.05) == 1.0
    assert temperature(9, 10, 1.0, 0.05) == pytest.approx(0.05)
    assert temperature(4, 10, 1.0, 0.05) > temperature(5, 10, 1.0, 0.05)


def test_lagrangian_drives_expected_bits_from_a_free_price_to_the_target(prepared):
    plan = make_plan(prepared, gamma_plan(2.5, init="free", steps=40))
    info = plan.info["gamma"]
    problem = prepared.problem(2.5, "true")
    costs, bits = problem.costs.double(), problem.bits.double()
    start = expected_bits(preferences(costs, bits, 0.0, float(costs.std(dim=1).median()), 0.05), bits) / problem.n_weights
    assert start > 4.5  # at no price the scores prefer the big candidates
    # Two blocks of 40 steps: the multiplier overshoots a little on the way down.
    assert abs(info["expected_bits_after_training"] - 2.5) < 0.3
    assert plan.true_bits <= 2.5 + 1e-9


def test_one_table_serves_every_budget_and_a_reloaded_table_gives_the_same_plans(prepared, tiny_model, tokenizer, tiny_fit):
    plans = {2.5: make_plan(prepared, gamma_plan(2.5, steps=6))}  # trained at its target ...
    plans |= {t: make_plan(prepared, gamma_plan(t, steps=6, train_bits=2.5)) for t in (2.25, 3.0)}  # ... reused
    tables = list(prepared.folder.glob("gamma/preferences-*.safetensors"))
    assert len(tables) == 1  # trained once, projected three times
    assert len(load_preferences(tables[0]).log) == 2 * 6
    for t, plan in plans.items():
        assert plan.true_bits <= t + 1e-9
        assert plan.info["gamma"]["train_bits"] == 2.5
    assert plans[2.25].true_bits < plans[3.0].true_bits
    again = prepare(tiny_model, tokenizer, tiny_fit, needs={"scores"}, progress=False)
    assert make_plan(again, gamma_plan(2.25, steps=6, train_bits=2.5)).requested == plans[2.25].requested


def test_a_killed_training_resumes_to_the_uninterrupted_table(prepared, tmp_path):
    """Training stopped after block 0 and run again ends with the table of one whole run."""
    from windquant.alloc import AllocationContext, get_allocator

    problem = prepared.problem(2.5, "true")
    config = GammaConfig(steps=5)
    spec = get_allocator("gamma")
    whole = spec.allocate(problem, config, AllocationContext(tmp_path / "a" / "run", reconstruction=prepared.reconstruction(False)))

    def killed_at_block_1(batch_size):
        recon = prepared.reconstruction(False)(batch_size)
        real = recon.block

        def block(layer):
            if layer == 1:
                raise KeyboardInterrupt
            return real(layer)

        recon.block = block
        return recon

    with pytest.raises(KeyboardInterrupt):
        spec.allocate(problem, config, AllocationContext(tmp_path / "b" / "run", reconstruction=killed_at_block_1))
    (partial,) = (tmp_path / "b").glob("preferences-*.safetensors")
    assert load_preferences(partial).done == 1
    resumed = spec.allocate(problem, config, AllocationContext(tmp_path / "b" / "run", reconstruction=prepared.reconstruction(False)))
    assert resumed.requested == whole.requested
    a, b = load_preferences(tmp_path / "a" / partial.name), load_preferences(partial)
    assert torch.equal(a.costs, b.costs) and a.log == b.log


def test_gamma_rejects_bad_settings(prepared):
    from windquant.errors import WindquantError

    with pytest.raises(WindquantError, match="tau_end"):
        make_plan(prepared, gamma_plan(2.5, tau_end=2.0))
    with pytest.raises(WindquantError, match="init"):
        make_plan(prepared, gamma_plan(2.5, init="random"))


def test_scores_and_gamma_share_one_backward_pass(tiny_model, tokenizer, tiny_fit, monkeypatch):
    import windquant.calib.statistics as statistics

    passes = []  # layer_fisher captures the block inputs once per pass (the forward stream does not use this name)
    real = statistics.capture
    monkeypatch.setattr(statistics, "capture", lambda *a, **k: passes.append(1) or real(*a, **k))
    prepared = prepare(tiny_model, tokenizer, tiny_fit, progress=False)  # no scores yet
    make_plan(prepared, gamma_plan(2.5, steps=2))
    assert len(passes) == 1


def test_module_gradient_is_the_directional_derivative_at_the_unquantized_linear(prepared):
    """Reference: central finite differences of the real block error, moving one unit from its
    unquantized weight towards each candidate with its whole linear unquantized and the rest of
    the block at a random mixture."""
    from windquant.actions import SKIP
    from windquant.alloc.gamma import mixture, module_gradient

    task = prepared.reconstruction(progress=False)(4).block(1)
    skip = ACTIONS.index(SKIP)
    probs = torch.rand(len(task.units), len(ACTIONS), generator=torch.Generator().manual_seed(0)).softmax(-1)
    error, grad = module_gradient(task, probs, 0, skip)
    mixed = [mixture(probs[k], c) for k, c in enumerate(task.candidates)]
    torch.testing.assert_close(float(error), float(task.loss(mixed, 0)))
    name, positions = next(iter(task.columns.items()))
    k = positions[-1]
    base = list(mixed)
    for j in positions:
        base[j] = task.candidates[j][skip]
    for a in range(len(ACTIONS)):
        direction = task.candidates[k][a] - task.candidates[k][skip]

        def at(t: float, direction: torch.Tensor = direction) -> float:
            weights = list(base)
            weights[k] = task.candidates[k][skip] + t * direction
            return float(task.loss(weights, 0))

        h = 0.05
        expected = (at(h) - at(-h)) / (2 * h)
        got = float(grad[k, a] - grad[k, skip])  # ⟨∇E, W(a) − W(skip)⟩
        assert got == pytest.approx(expected, rel=2e-2, abs=1e-10)


def test_trusted_costs_clip_each_correction_to_its_share_of_the_score():
    from windquant.actions import SKIP
    from windquant.alloc.gamma import trusted_costs

    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(6, len(ACTIONS), generator=gen, dtype=torch.float64)
    costs = scores + torch.randn(6, len(ACTIONS), generator=gen, dtype=torch.float64)
    skip = ACTIONS.index(SKIP)
    got = trusted_costs(costs, scores, 0.3)
    for i in range(6):  # reference: unit by unit, action by action
        for a in range(len(ACTIONS)):
            own = max(float(scores[i, a] - scores[i, skip]), 0.0)
            corr = float((costs[i, a] - scores[i, a]) - (costs[i, skip] - scores[i, skip]))
            assert float(got[i, a]) == pytest.approx(float(scores[i, a]) + min(max(corr, -0.3 * own), 0.3 * own), abs=1e-12)
    torch.testing.assert_close(trusted_costs(costs, scores, 0.0), scores)
    as_learned = trusted_costs(costs, scores, float("inf"))  # the learned costs up to a constant per unit
    torch.testing.assert_close(as_learned - costs, (as_learned - costs)[:, :1].expand_as(costs))
