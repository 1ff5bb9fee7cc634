"""The PPO options beyond the paper: sensitivity state, potential shaping, sensitive-first order,
and the refinement mode (budget-neutral moves from ilp's plan)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_ppo import dying, ppo_prepared, random_problem, tiny_ppo  # noqa: F401  (ppo_prepared is a fixture)

from windquant.actions import ACTIONS
from windquant.alloc.ppo import PPOConfig, rewards
from windquant.alloc.ppo.config import PRESETS
from windquant.alloc.ppo.env import OBS_DIM, AllocationEnv, sensitivity_features, visit_order
from windquant.alloc.ppo.refine import GroupMoves, UnitMoves, advantages, refine_ppo


def with_costs(problem, seed: int):
    """Costs that fall with precision, as sensitivity scores do (noise on top)."""
    g = torch.Generator().manual_seed(seed)
    n = len(problem.units)
    base = torch.rand(n, 1, generator=g, dtype=torch.float64) * 10
    noise = 1 + 0.2 * torch.rand(n, len(ACTIONS), generator=g, dtype=torch.float64)
    problem.costs = base * noise / torch.tensor(ACTIONS, dtype=torch.float64) ** 2
    return problem


def rollout(env: AllocationEnv, target: float) -> list[float]:
    """Rewards of a deterministic episode: always the highest-precision allowed action."""
    _, info = env.reset(options={"target_bits": target})
    out, done = [], False
    while not done:
        _, r, done, _, info = env.step(int(np.flatnonzero(info["action_mask"])[0]) if not done else 0)
        out.append(r)
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5])
def test_potential_shaping_telescopes_to_the_unshaped_return(gamma):
    problem = with_costs(random_problem(2, n_units=10, target=3.0), 2)
    proxy = lambda actions: 40.0  # noqa: E731
    plain = AllocationEnv(problem, proxy, 20.0, PPOConfig(gamma=gamma, early_layers=0))
    shaped = AllocationEnv(problem, proxy, 20.0, PPOConfig(gamma=gamma, early_layers=0, shaping="potential", shaping_scale=3.0))
    r, s = rollout(plain, 3.0), rollout(shaped, 3.0)
    assert plain.cols == shaped.cols
    discounted = lambda xs: sum(gamma**t * x for t, x in enumerate(xs))  # noqa: E731
    assert discounted(s) == pytest.approx(discounted(r), rel=1e-9, abs=1e-9)
    # each step, by hand: r + γΦ(s') − Φ(s), Φ(s_t) = −scale × Σ_{k<t} cost, Φ = 0 at the end
    phi = [-3.0 * sum(float(problem.costs[k, c]) for k, c in enumerate(plain.cols[:t])) for t in range(len(r))] + [0.0]
    for t in range(len(r)):
        assert s[t] == pytest.approx(r[t] + gamma * phi[t + 1] - phi[t], rel=1e-9, abs=1e-12)
    assert s[0] < r[0]  # the first decision now pays its own predicted loss


def test_sensitive_order_visits_the_most_damaged_units_first_and_keeps_the_budget():
    rng = np.random.default_rng(1)
    for seed in range(30):
        problem = with_costs(random_problem(seed, n_units=12), seed)
        cfg = PPOConfig(early_layers=0, min_bits_attention=1.0, min_bits_mlp=1.0, order="sensitive", state="sensitivity")
        env = AllocationEnv(problem, lambda a: 10.0, 10.0, cfg)
        order = visit_order(problem, cfg)
        damage = problem.costs[:, -1] - problem.costs[:, ACTIONS.index(8.0)]
        assert sorted(order.tolist()) == list(range(12))
        assert all(damage[order[i]] >= damage[order[i + 1]] for i in range(11))
        obs, info = env.reset(options={"target_bits": problem.target_bits})
        assert obs.shape == (OBS_DIM + 14,)
        assert np.allclose(obs[OBS_DIM:], sensitivity_features(problem)[order[0]].numpy(), atol=1e-6)
        done = False
        while not done:
            obs, _r, done, _, info = env.step(int(rng.choice(np.flatnonzero(info["action_mask"]))))
        total = problem.total_bits(env.requested())  # requested() is back in model order
        assert total == pytest.approx(env.used) and total <= problem.budget + 1e-6


def test_refine_moves_never_leave_the_budget_and_keep_the_chosen_action():
    rng = np.random.default_rng(0)
    for seed in range(20):
        problem = with_costs(random_problem(seed, n_units=10), seed)
        space = UnitMoves(problem, PPOConfig(mode="refine", refine_moves="unit"))
        cols = space.start
        assert problem.total_bits([ACTIONS[c] for c in cols]) <= problem.budget + 1e-6
        for _ in range(10):
            mask = space.mask(cols, cols, [])
            pair = int(rng.choice(np.flatnonzero(mask.numpy())))
            moved = space.move(cols, pair)
            unit, col = divmod(pair, len(ACTIONS))
            assert moved[unit] == col
            assert problem.total_bits([ACTIONS[c] for c in moved]) <= problem.budget + 1e-6
            cols = moved if rng.random() < 0.5 else cols


def test_refine_prior_prefers_moves_the_additive_model_rates_cheap():
    problem = with_costs(random_problem(4, n_units=10, target=3.0), 4)
    space = UnitMoves(problem, PPOConfig(mode="refine", refine_moves="unit", refine_prior=8.0))
    features, prior = space.options(space.start, space.start)
    net = space.predicted(space.start)[0].reshape(-1)
    assert features.shape == (10 * len(ACTIONS), 16)
    assert float(prior[int(net.argmin())]) == 0.0 and float(prior[int(net.argmax())]) == pytest.approx(-8.0)
    assert advantages(torch.tensor([1.0, 2.0, 3.0]), 0.0).mean().abs() < 1e-6  # normalised over the batch


@pytest.mark.parametrize("moves", ["group", "unit"])
def test_refine_returns_a_plan_no_worse_than_ilp_on_the_proxy_and_resumes_exactly(ppo_prepared, tmp_path, moves):  # noqa: F811
    prep = ppo_prepared
    from windquant.alloc.ilp import solve

    problem = prep.problem(2.5, "true")
    problem.costs = prep.ensure({"scores"}, progress=False).problem(2.5, "true").costs
    cfg = tiny_ppo(mode="refine", refine_moves=moves, episodes=9, refine_batch=4)
    proxy = prep.proxy(cfg.proxy_samples, cfg.proxy_len)
    counted = dying(proxy, 10**9)  # never dies: counts the calls of an uninterrupted run
    full = refine_ppo(problem, counted, cfg, tmp_path / "full", seed=1, progress=False)
    ilp_plan = [ACTIONS[c] for c in solve(problem.costs, problem.bits, problem.budget).choice]
    assert problem.total_bits(full.requested) <= problem.budget + 1e-6
    assert proxy(full.requested) <= proxy(ilp_plan) + 1e-9
    assert proxy(full.requested) == pytest.approx(full.info["final_proxy_ppl"])

    with pytest.raises(KeyboardInterrupt):  # killed mid-run
        refine_ppo(problem, dying(proxy, counted.calls["n"] // 2 + 1), cfg, tmp_path / "cut", seed=1, progress=False)
    resumed = refine_ppo(problem, proxy, replace(cfg, resume=True), tmp_path / "cut", seed=1, progress=False)
    assert resumed.requested == full.requested

    def log(run):
        rows = [json.loads(line) for line in (tmp_path / run / "episodes.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "proxy_seconds")} for r in rows]

    assert log("cut") == log("full")


def test_presets_are_valid_configs_and_paper_is_the_default_construct_mode():
    for name, values in PRESETS.items():
        assert PPOConfig(**values).validate(), name
    paper = PPOConfig(**PRESETS["paper"])
    assert (paper.state, paper.shaping, paper.order, paper.mode) == ("paper", "none", "model", "construct")


def test_shaped_reward_formula():
    assert rewards.shaped_reward(1.0, -2.0, -5.0, 0.9) == pytest.approx(1.0 + 0.9 * -5.0 + 2.0)


def test_group_moves_start_at_ilp_reweight_one_group_and_keep_the_budget():
    from windquant.alloc.ilp import solve

    problem = with_costs(random_problem(6, n_units=12, target=2.6), 6)
    cfg = PPOConfig(mode="refine", refine_step=0.5, refine_max_weight=1.0)
    space = GroupMoves(problem, cfg)
    state = space.initial()
    assert space.plan(state).tolist() == solve(problem.costs, problem.bits, problem.budget).choice.tolist()
    groups = len(state)
    assert groups == len({(u.layer, u.proj) for u in problem.units})
    up = space.move(state, 2 * 3)  # option 2g: group g up
    assert up[3] == 0.5 and np.count_nonzero(up) == 1
    assert space.move(up, 2 * 3 + 1)[3] == 0.0  # down undoes up
    features, prior = space.options(state, space.plan(state))
    assert features.shape == (2 * groups, space.n_features) and torch.all(prior == 0)
    # bounds: after two steps up a group sits at +1.0 = refine_max_weight; a third is masked
    twice = space.move(up, 6)
    assert not bool(space.mask(twice, space.plan(twice), [])[6]) and bool(space.mask(twice, space.plan(twice), [])[7])
    assert not bool(space.mask(state, space.plan(state), [6])[6])  # tried from this incumbent
    for option in range(2 * groups):
        cols = space.plan(space.move(state, option))
        assert problem.total_bits([ACTIONS[c] for c in cols]) <= problem.budget + 1e-6


def test_a_stored_proxy_scores_exactly_the_weights_apply_stores_and_recarries_only_changed_linears(ppo_prepared, monkeypatch):  # noqa: F811
    import windquant.pipeline as pipeline
    from windquant.config import PlanConfig

    prep = ppo_prepared
    assert prep.fit.carry
    carried = []
    real = pipeline.quantize_linear
    monkeypatch.setattr(pipeline, "quantize_linear", lambda w, h, chunks, s: carried.append(len(chunks)) or real(w, h, chunks, s))
    stored = prep.proxy(2, 32, stored=True)
    first = pipeline.make_plan(prep, PlanConfig(3.0, "true", "uniform"), progress=False)
    changed = list(first.requested)
    changed[0] = 8.0  # up: no operator fallback can undo it
    second = replace(first, requested=changed, applied=prep.applied(changed))

    def weights(context) -> dict[str, torch.Tensor]:
        with context:
            return {m: prep.model.get_submodule(m).weight.detach().clone() for m in {u.module for u in prep.units}}

    for plan, recarried in ((first, len({u.module for u in prep.units})), (second, 1), (first, 0)):  # the last from memory
        carried.clear()
        got = weights(stored.weights(plan.requested))
        assert len(carried) == recarried
        expected = weights(prep.plan_model(replace(plan, tune_steps=0)))  # apply's weights before scale tuning, carried from scratch
        assert all(torch.equal(got[m], expected[m]) for m in got)
    # the candidates proxy scores other weights: carrying changes the model
    assert stored(first.requested) != prep.proxy(2, 32)(first.requested)
    assert stored.reference == prep.proxy(2, 32).reference and torch.equal(stored.windows, prep.proxy(2, 32).windows)
    held = prep.proxy(2, 32, heldout=True)  # other text: no calibration window's opening 32 tokens
    assert not any(torch.equal(h[1:], c[1:32]) for h in held.windows for c in prep.stats.windows)
    validation = prep.proxy(2, 32, heldout=True, skip=2)  # the next held-out windows: a disjoint set
    assert torch.equal(prep.proxy(4, 32, heldout=True).windows, torch.cat([held.windows, validation.windows]))


def test_refine_returns_ilps_plan_unless_the_validation_windows_rate_the_refined_one_better(ppo_prepared, tmp_path):  # noqa: F811
    from windquant.alloc.ilp import solve

    prep = ppo_prepared
    problem = prep.problem(2.5, "true")
    problem.costs = prep.ensure({"scores"}, progress=False).problem(2.5, "true").costs
    cfg = tiny_ppo(mode="refine", refine_moves="unit", episodes=9, refine_batch=4)
    proxy = prep.proxy(cfg.proxy_samples, cfg.proxy_len)
    ilp_plan = [ACTIONS[c] for c in solve(problem.costs, problem.bits, problem.budget).choice]
    plain = refine_ppo(problem, proxy, cfg, tmp_path / "plain", seed=1, progress=False)
    assert plain.requested != ilp_plan and proxy(plain.requested) < proxy(ilp_plan)
    prefers_ilp = lambda actions: 1.0 if actions == ilp_plan else 2.0  # noqa: E731
    vetoed = refine_ppo(problem, proxy, cfg, tmp_path / "vetoed", seed=1, progress=False, validation=prefers_ilp)
    assert vetoed.requested == ilp_plan and vetoed.info["validation"] == {"ilp_ppl": 1.0, "refined_ppl": 2.0, "kept": "ilp"}
    assert vetoed.info["final_proxy_ppl"] == pytest.approx(proxy(ilp_plan))
    kept = refine_ppo(problem, proxy, cfg, tmp_path / "kept", seed=1, progress=False, validation=proxy)
    assert kept.requested == plain.requested and kept.info["validation"]["kept"] == "refined"
