"""The PPO allocator: reward terms, GAE, masking/clamps, state features, resume, pipeline + CLI."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from windquant.actions import ACTIONS
from windquant.alloc.ppo import PPOConfig, rewards
from windquant.alloc.ppo.agent import gae
from windquant.alloc.ppo.config import PRESETS, curriculum_target
from windquant.alloc.ppo.env import AllocationEnv, min_precision
from windquant.alloc.ppo.train import train_ppo
from windquant.alloc.problem import AllocationProblem
from windquant.model.units import Unit

# -- reward terms ---------------------------------------------------------------------------


def test_compression_gain_is_capped_by_the_cheapest_plan():
    assert rewards.compression_gain(8.0, 32.0, 4.0) == pytest.approx(0.75)
    assert rewards.compression_gain(2.0, 32.0, 4.0) == pytest.approx(1 - 4 / 32)  # capped


def test_quality_penalty_and_lagrange_update():
    assert rewards.quality_penalty(0.2, 0.3, 2.0) == 0.0
    assert rewards.quality_penalty(0.5, 0.3, 2.0) == pytest.approx(0.4)
    assert rewards.update_lagrange(1.0, 0.5, 0.3, 0.5, 10.0) == pytest.approx(1.1)  # violated: grows
    assert rewards.update_lagrange(1.0, 0.1, 0.3, 0.5, 10.0) == pytest.approx(0.9)  # satisfied: relaxes
    assert rewards.update_lagrange(0.05, -1.0, 0.3, 0.5, 10.0) == 0.0  # projected onto [0, max]
    assert rewards.update_lagrange(9.9, 5.0, 0.3, 0.5, 10.0) == 10.0


def test_budget_penalty_is_super_linear():
    assert rewards.budget_penalty(2.0, 2.0, 10.0) == 0.0
    assert rewards.budget_penalty(1.5, 2.0, 10.0) == 0.0
    small, large = rewards.budget_penalty(2.2, 2.0, 10.0), rewards.budget_penalty(2.4, 2.0, 10.0)
    assert small == pytest.approx(10 * (0.1 + 0.01))
    assert large > 2 * small


def test_ppl_penalty_piecewise_and_continuous():
    f = lambda r: rewards.ppl_penalty(r, 3.0, 20.0, 1.0, 2.0)  # noqa: E731
    assert f(2.9) == 0.0 and f(3.0) == 0.0
    assert f(11.5) == pytest.approx(0.5)
    assert f(20.0) == pytest.approx(1.0)
    assert f(20.0 * math.e) == pytest.approx(3.0)
    assert f(1000.0) > f(100.0) > f(20.0)


def test_skip_penalty_bonus_and_step_reward():
    cfg = rewards.RewardConfig()
    assert rewards.skip_penalty(0.08, 0.1, 2.0) == 0.0
    assert rewards.skip_penalty(0.2, 0.1, 2.0) == pytest.approx(0.2)
    assert rewards.quality_bonus(1.9, 2.0, 1.0) == 1.0 and rewards.quality_bonus(2.0, 2.0, 1.0) == 0.0
    assert rewards.step_reward(16.0, 2.5, True, cfg) == -cfg.step_skip_penalty
    assert rewards.step_reward(2.0, 2.5, False, cfg) == pytest.approx(cfg.step_saved_coef * 0.2)
    assert rewards.step_reward(4.0, 2.0, False, cfg) == pytest.approx(-cfg.step_over_coef * 1.0)


def test_final_reward_combines_the_terms():
    cfg = rewards.RewardConfig()
    t = rewards.final_reward(cfg, 2.0, 60.0, 320.0, 20.0, 2.0, 2.0, math.e**3, math.e**2, 0.0)
    assert t["rel_loss_increase"] == pytest.approx(0.5)
    assert t["p_qual"] == pytest.approx(2.0 * 0.2)
    assert t["ppl_ratio"] == pytest.approx(math.e)
    assert t["p_ppl"] == 0.0 and t["bonus"] == 0.0 and t["p_budget"] == 0.0
    assert t["reward"] == pytest.approx(t["gain"] - t["p_qual"])
    assert t["gain"] == pytest.approx(1 - 60 / 320)


# -- GAE --------------------------------------------------------------------------------------


def test_gae_hand_computed_example():
    # gamma 0.5, lambda 0.5, one terminal episode of 3 steps:
    # deltas: 1 + .5*2 - 1 = 1;  0 + .5*3 - 2 = -0.5;  2 + 0 - 3 = -1
    # A2 = -1; A1 = -0.5 + .25*(-1) = -0.75; A0 = 1 + .25*(-0.75) = 0.8125
    adv, ret = gae(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 1.0]), 0.0, 0.5, 0.5)
    assert adv.tolist() == pytest.approx([0.8125, -0.75, -1.0])
    assert ret.tolist() == pytest.approx([1.8125, 1.25, 2.0])


def test_gae_matches_the_discounted_sum_of_td_residuals():
    g = torch.Generator().manual_seed(0)
    T, gamma, lam = 40, 0.99, 0.95
    r, v = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)
    dones = torch.zeros(T, dtype=torch.float64)
    dones[17] = dones[-1] = 1.0  # two episodes in one buffer
    adv, _ = gae(r, v, dones, 0.0, gamma, lam)
    ends = [17, T - 1]
    for t in range(T):
        end = next(e for e in ends if e >= t)
        ref = 0.0
        for k in range(t, end + 1):  # A_t = Σ_k (γλ)^(k-t) δ_k within the episode
            nxt = 0.0 if k == end else float(v[k + 1])
            ref += (gamma * lam) ** (k - t) * (float(r[k]) + gamma * nxt - float(v[k]))
        assert float(adv[t]) == pytest.approx(ref, rel=1e-9, abs=1e-9)


# -- environment --------------------------------------------------------------------------------


def random_problem(seed: int, n_units: int = 12, target: float | None = None) -> AllocationProblem:
    g = torch.Generator().manual_seed(seed)
    units, layer = [], 0
    for i in range(n_units):
        kind = ("attention", "mlp")[i % 2]
        layer = i // 4
        cols = int(torch.randint(8, 64, (1,), generator=g))
        units.append(Unit(i, layer, f"m{i}", f"{kind}.x", kind, 0, cols, 16))
    n = torch.tensor([u.n_weights for u in units], dtype=torch.float64)
    per_weight = torch.tensor(ACTIONS, dtype=torch.float64) + 0.3 * torch.rand(
        len(units), len(ACTIONS), generator=g, dtype=torch.float64
    )
    bits = (per_weight * n[:, None]).round()
    if target is None:
        target = float(1.2 + 6 * torch.rand(1, generator=g))
    features = torch.randn(len(units), 8, generator=g, dtype=torch.float64)
    return AllocationProblem(units, bits, torch.rand(len(units), dtype=torch.float64), target, "true", features=features)


def test_masking_never_lets_a_plan_exceed_the_budget():
    """Property test: random problems, random targets, random (masked) policies."""
    rng = np.random.default_rng(0)
    cfg = PPOConfig(early_layers=1, min_bits_early=2.0, min_bits_attention=1.58, min_bits_mlp=1.0)
    checked = 0
    for seed in range(150):
        problem = random_problem(seed)
        env = AllocationEnv(problem, lambda actions: 10.0, 10.0, cfg)
        try:
            obs, info = env.reset(options={"target_bits": problem.target_bits})
        except Exception as exc:  # infeasible under the clamps: must say so, not produce a plan
            assert "below the cheapest plan" in str(exc)
            continue
        floors = min_precision(problem, cfg, env.relaxed)
        done = False
        while not done:
            mask = info["action_mask"]
            assert mask.any()
            action = int(rng.choice(np.flatnonzero(mask))) if rng.random() < 0.8 else int(rng.integers(len(ACTIONS)))
            if not mask[env.clamp(action)]:
                with pytest.raises(ValueError, match="masked"):
                    env.step(action)
                continue
            obs, _r, done, _, info = env.step(action)
        total = sum(float(problem.bits[t, c]) for t, c in enumerate(env.cols))
        assert total <= problem.budget + 1e-6
        assert all(ACTIONS[c] >= float(floors[t]) - 1e-9 for t, c in enumerate(env.cols))
        checked += 1
    assert checked > 50


def test_clamps_are_relaxed_only_when_the_target_needs_it():
    from windquant.alloc.ppo.env import feasible_floors

    problem = random_problem(5, n_units=8)
    cfg = PPOConfig(early_layers=1, min_bits_early=2.0, min_bits_attention=1.58, min_bits_mlp=1.58)
    values = torch.tensor(ACTIONS, dtype=torch.float64)

    def cheapest(floors):
        allowed = values[None, :] >= floors[:, None] - 1e-9
        return float(torch.where(allowed, problem.bits, torch.inf).min(1).values.sum()) / problem.n_weights

    clamped = cheapest(min_precision(problem, cfg))
    floors, relaxed = feasible_floors(problem, cfg, clamped + 0.01)
    assert relaxed == () and cheapest(floors) == pytest.approx(clamped)
    floors, relaxed = feasible_floors(problem, cfg, clamped - 0.01)
    assert relaxed[0] == "mlp" and cheapest(floors) <= clamped - 0.01
    assert all(float(f) == 1.0 for f, u in zip(floors, problem.units) if u.kind == "mlp" and u.layer >= 1)


def test_mask_is_exactly_the_feasible_set_on_a_small_instance():
    """Brute force: an action is allowed iff some completion of the plan fits the budget."""
    import itertools

    problem = random_problem(3, n_units=4, target=2.3)
    cfg = PPOConfig(early_layers=0, min_bits_attention=1.0, min_bits_mlp=1.0)
    env = AllocationEnv(problem, lambda a: 1.0, 1.0, cfg)
    env.reset(options={"target_bits": 2.3})
    mask = env.action_mask()
    for a in range(len(ACTIONS)):
        feasible = any(
            float(problem.bits[0, a]) + sum(float(problem.bits[t + 1, c]) for t, c in enumerate(rest)) <= problem.budget
            for rest in itertools.product(range(len(ACTIONS)), repeat=3)
        )
        assert bool(mask[a]) == feasible


def test_observation_follows_table_1():
    problem = random_problem(1, n_units=6, target=3.0)
    cfg = PPOConfig(early_layers=0)
    env = AllocationEnv(problem, lambda a: 1.0, 1.0, cfg)
    obs, info = env.reset(options={"target_bits": 3.0})
    assert obs.shape == (15,)
    assert obs[5] == 0.0 and obs[6] == 0.0 and obs[7] == pytest.approx(1.0) and obs[8] == 0.0
    assert obs[14] == pytest.approx(3.0 / 8)
    assert obs[12] == 1.0 and obs[13] == 0.0  # unit 0 is attention
    col = int(np.flatnonzero(info["action_mask"])[0])  # highest precision allowed
    obs, *_ = env.step(col)
    used, n = float(problem.bits[0, col]), problem.n_weights
    assert obs[5] == pytest.approx(1 / 6)
    assert obs[6] == pytest.approx(used / (32 * n), rel=1e-5)
    assert obs[7] == pytest.approx((3.0 * n - used) / (3.0 * n), rel=1e-5)
    n_r = n - problem.units[0].n_weights
    assert obs[8] == pytest.approx(max(0.0, 1 - (3.0 * n - used) / (3.0 * n_r)), rel=1e-5, abs=1e-6)
    assert obs[12] == 0.0 and obs[13] == 1.0


def test_gymnasium_env_checker_accepts_the_env():
    from gymnasium.utils.env_checker import check_env

    problem = random_problem(2, n_units=6, target=4.0)
    check_env(AllocationEnv(problem, lambda a: 1.0, 1.0, PPOConfig(early_layers=0)), skip_render_check=True)


def test_curriculum_spreads_stages_and_ends_at_the_user_target():
    stages = (3.0, 2.5, 2.0, 2.0)
    got = [curriculum_target(e, 8, stages, 2.0) for e in range(8)]
    assert got == [3.0, 3.0, 2.5, 2.5, 2.0, 2.0, 2.0, 2.0]
    assert [curriculum_target(e, 4, stages, 2.5) for e in range(4)] == [3.0, 2.5, 2.5, 2.5]
    assert {curriculum_target(e, 4, stages, 4.0) for e in range(4)} == {4.0}


# -- training on a tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_prepared(tmp_path_factory):
    """One fitted tiny model shared by the training tests (they only read it)."""
    from conftest import make_model, make_tokenizer

    from windquant.config import FitConfig
    from windquant.pipeline import prepare

    cache = tmp_path_factory.mktemp("cache")
    # The recorded episode log (tests/data) was written on the builtin calibration corpus.
    fit = FitConfig(chunk=32, calib_samples=4, calib_len=32, steps=3, cache_dir=str(cache), calib="builtin")
    return prepare(make_model(), make_tokenizer(), fit, needs={"features", "proxy"}, progress=False)


def tiny_ppo(**kw) -> PPOConfig:
    """The paper's controller (unless ``kw`` says otherwise) on a tiny proxy."""
    return PPOConfig(proxy_samples=2, proxy_len=32, **{**PRESETS["paper"], **kw})


def dying(proxy, call: int):
    """The proxy, killed (KeyboardInterrupt) at its ``call``-th call."""
    calls = {"n": 0}

    def scored(actions):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return proxy(actions)

    scored.reference, scored.calls = proxy.reference, calls
    return scored


def test_resume_reproduces_an_uninterrupted_run(ppo_prepared, tmp_path):
    from dataclasses import replace

    prep = ppo_prepared
    problem = prep.problem(4.0, "true")
    cfg = tiny_ppo(episodes=5, checkpoint_every=2)
    proxy = prep.proxy(cfg.proxy_samples, cfg.proxy_len)
    full = train_ppo(problem, proxy, cfg, tmp_path / "full", seed=3, progress=False)

    with pytest.raises(KeyboardInterrupt):  # killed in episode 4, after the checkpoint at episode 2
        train_ppo(problem, dying(proxy, 4), cfg, tmp_path / "cut", seed=3, progress=False)
    assert len((tmp_path / "cut" / "episodes.jsonl").read_text().splitlines()) == 3
    resumed = train_ppo(problem, proxy, replace(cfg, resume=True), tmp_path / "cut", seed=3, progress=False)
    assert resumed.requested == full.requested
    assert resumed.info["best_sampled"] == full.info["best_sampled"]

    def log(run):  # wall-clock fields aside, every logged number must be identical
        rows = [json.loads(line) for line in (tmp_path / run / "episodes.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "proxy_seconds")} for r in rows]

    assert log("cut") == log("full")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "full" / "policy.safetensors")), load_file(str(tmp_path / "cut" / "policy.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(ppo_prepared, tmp_path):
    prep = ppo_prepared
    problem = prep.problem(4.0, "true")
    proxy = prep.proxy(2, 32)
    train_ppo(problem, proxy, tiny_ppo(episodes=1), tmp_path, seed=0, progress=False)
    with pytest.raises(Exception, match="other settings"):
        train_ppo(problem, proxy, tiny_ppo(episodes=2, resume=True), tmp_path, seed=0, progress=False)


def test_ppo_plan_meets_budget_and_reports(ppo_prepared, tmp_path):
    from windquant.config import PlanConfig
    from windquant.pipeline import make_plan

    config = PlanConfig(target_bits=4.0, allocator="ppo", allocator_config=tiny_ppo(episodes=3, work_dir=str(tmp_path / "run")))
    plan = make_plan(ppo_prepared, config, progress=False)
    assert plan.true_bits <= 4.0
    info = plan.info["ppo"]
    assert info["chosen"] in {"greedy", "best_sampled"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "episodes.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == [0, 1, 2]
    for key in ("target", "true_bits", "paper_bits", "proxy_ppl", "reward", "p_ppl", "lambda", "entropy", "actions"):
        assert key in rows[0]
    assert sum(rows[0]["actions"].values()) == pytest.approx(1.0)
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 0
    # the returned plan's proxy perplexity is the best of the sampled and greedy plans
    assert ppo_prepared.proxy(2, 32)(plan.requested) == pytest.approx(
        min(info["best_sampled"]["proxy_ppl"], info["greedy"]["proxy_ppl"])
    )
    # zero-shot reuse of the saved policy: no training, still within budget
    policy = str(tmp_path / "run" / "policy.safetensors")
    reused = PlanConfig(target_bits=4.0, allocator="ppo", allocator_config=tiny_ppo(policy=policy, work_dir=str(tmp_path / "reuse")))
    plan2 = make_plan(ppo_prepared, reused, progress=False)
    assert plan2.true_bits <= 4.0 and plan2.info["ppo"]["episodes"] == 0


def test_cli_quantize_with_ppo_writes_the_training_log(tiny_model_dir, tmp_path, capsys):
    from test_cli import quantize_args

    from windquant.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "ckpt"
    ppo = ["--target-bits", "4", "--allocator", "ppo", "--ppo-mode", "construct", "--episodes", "2", "--proxy-samples", "2", "--proxy-len", "32"]
    argv = quantize_args(tiny_model_dir, out, corpus, tmp_path / "c", *ppo)
    assert main(argv) == 0
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 2
    assert (out / "policy.safetensors").is_file() and (out / "training_curve.png").is_file()
    assert json.loads((out / "plan.json").read_text())["true_bits"] <= 4.0
    assert main(["inspect", str(out)]) == 0
    assert "ppo: 2 episodes" in capsys.readouterr().out
    assert main(argv + ["--policy", str(tmp_path / "missing.safetensors"), "--overwrite"]) == 2
    assert main(argv + ["--ppo-set", "gama=1"]) == 2
    assert "--ppo-set" in capsys.readouterr().err
    refine = quantize_args(tiny_model_dir, tmp_path / "refined", corpus, tmp_path / "c", *ppo[:4], "--episodes", "3", *ppo[8:])
    assert main(refine) == 0  # the default mode: refine ilp's plan
    assert (tmp_path / "refined" / "refine_curve.png").is_file()
    assert "refined ilp's plan with 3 one-move episodes" in json.dumps(json.loads((tmp_path / "refined" / "plan.json").read_text())["info"])


def test_ppo_overrides_parse_and_reach_the_config():
    from windquant.cliflags import parse_overrides
    from windquant.config import config_from_dict, config_to_dict

    got = parse_overrides(PPOConfig, "gamma=1.0,minibatches=2", "--ppo-set")
    assert got == {"gamma": 1.0, "minibatches": 2} and isinstance(got["minibatches"], int)
    cfg = config_from_dict(PPOConfig, {**got, "episodes": 7})
    assert config_from_dict(PPOConfig, config_to_dict(cfg)) == cfg  # JSON round trip, nested reward config included
    assert (cfg.gamma, cfg.minibatches, cfg.episodes, cfg.lr) == (1.0, 2, 7, 5e-4)


def test_unit_features_follow_the_paper_formulas(tiny_model):
    from windquant.model.stats import unit_features
    from windquant.model.units import enumerate_units

    units = enumerate_units(tiny_model, 32)
    u = units[0]
    lin = tiny_model.get_submodule(u.module)
    with torch.no_grad():
        lin.weight[:5, u.col0 : u.col1] = 0.0  # exact zeros count as sparsity
    scales = {name: torch.rand(tiny_model.get_submodule(name).in_features) + 0.5 for name in {x.module for x in units}}
    f = unit_features(tiny_model, units[:1], scales)[0]
    w = lin.weight[:, u.col0 : u.col1].detach().double().numpy().ravel()
    a = np.sort(np.abs(w))
    p99 = a[round(0.99 * a.size) - 1]
    s = scales[u.module][u.col0 : u.col1].double().numpy()
    expected = [w.mean(), w.std(ddof=1), a.mean(), (a < 1e-6).mean(), (a > 0.5 * p99).mean(), s.mean(), s.std(ddof=1), s.max()]
    assert f.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert f[3] == pytest.approx(5 * u.columns / u.n_weights)


PAPER_LOG = Path(__file__).parent / "data" / "ppo_paper_episodes.json"


def paper_run_log(prepared, work_dir: Path, **overrides) -> list[dict]:
    """Episode log of a 4-episode run at 4 bits, seed 3, wall-clock fields dropped."""
    problem = prepared.problem(4.0, "true")
    cfg = tiny_ppo(episodes=4, **overrides)
    train_ppo(problem, prepared.proxy(cfg.proxy_samples, cfg.proxy_len), cfg, work_dir, seed=3, progress=False)
    rows = [json.loads(line) for line in (work_dir / "episodes.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "proxy_seconds")} for r in rows]


def test_paper_preset_reproduces_the_recorded_episode_log(ppo_prepared, tmp_path):
    """The log in tests/data was written by the controller before the new options existed
    (``WINDQUANT_RECORD=1`` rewrites it); the paper preset must still produce it."""
    log = paper_run_log(ppo_prepared, tmp_path)
    if os.environ.get("WINDQUANT_RECORD"):
        PAPER_LOG.write_text(json.dumps(log, indent=1) + "\n")
    recorded = json.loads(PAPER_LOG.read_text())
    assert [r["plan"] for r in log] == [r["plan"] for r in recorded]
    for got, want in zip(log, recorded):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-4, abs=1e-6) if not isinstance(value, str) else value), key
