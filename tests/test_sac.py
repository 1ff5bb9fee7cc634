"""The SAC allocator: losses against hand-computed values, the temperature, the layer embedding
against numpy, the layer plan and its projection, resume and zero-shot transfer."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from windquant.actions import ACTIONS
from windquant.alloc.problem import AllocationProblem
from windquant.alloc.sac.agent import SACAgent, actor_loss, new_optimizer, soft_q_target, target_entropy, temperature_loss
from windquant.alloc.sac.config import SACConfig
from windquant.alloc.sac.embedding import LAYER_DIM, embedding, group_layers
from windquant.alloc.sac.train import LayerEnv, load_policy, train_sac
from windquant.errors import WindquantError
from windquant.model.units import Unit

# -- losses ------------------------------------------------------------------------------------


def test_soft_q_target_hand_computed():
    # Two next actions, π = (0.25, 0.75); min(Q̄1, Q̄2) = (1, 2); α = 0.5.
    probs = torch.tensor([[0.25, 0.75], [0.25, 0.75]])
    logp = probs.log()
    q1, q2 = torch.tensor([[1.0, 3.0], [1.0, 3.0]]), torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    y = soft_q_target(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), probs, logp, q1, q2, alpha=0.5, gamma=0.9)
    soft_v = 0.25 * (1 - 0.5 * math.log(0.25)) + 0.75 * (2 - 0.5 * math.log(0.75))
    assert y[0].item() == pytest.approx(1 + 0.9 * soft_v, rel=1e-6)
    assert y[1].item() == pytest.approx(1.0)  # terminal: no bootstrap


def test_actor_loss_hand_computed():
    probs = torch.tensor([[0.5, 0.5]])
    q1, q2 = torch.tensor([[1.0, 4.0]]), torch.tensor([[2.0, 3.0]])
    loss = actor_loss(probs, probs.log(), q1, q2, alpha=0.1)
    assert loss.item() == pytest.approx(0.5 * (0.1 * math.log(0.5) - 1) + 0.5 * (0.1 * math.log(0.5) - 3), rel=1e-6)


def test_temperature_step_raises_alpha_below_the_target_entropy_and_lowers_it_above():
    log_alpha = torch.zeros((), requires_grad=True)
    sharp = torch.tensor([[0.97, 0.01, 0.01, 0.01]])  # entropy ≈ 0.17
    flat = torch.full((1, 4), 0.25)  # entropy = log 4
    target = 0.5 * math.log(4)
    for probs, sign in ((sharp, -1), (flat, 1)):
        log_alpha.grad = None
        temperature_loss(log_alpha, probs, probs.log(), target).backward()
        assert math.copysign(1, log_alpha.grad.item()) == sign  # descent moves log α against the gradient


def test_temperature_tuning_moves_the_policy_entropy_to_its_target():
    """Actor and α on a fixed Q: the entropy settles at the target, from either side."""
    q = torch.tensor([[3.0, 1.0, 0.0, -1.0, 0.5]])
    target = target_entropy(5, 0.5)
    for init in (0.1, 5.0):  # a low and a high starting temperature
        torch.manual_seed(0)
        cfg = SACConfig(lr_actor=1e-2, lr_alpha=1e-2, hidden=16)
        agent = SACAgent(1, 5, cfg.hidden)
        with torch.no_grad():
            agent.log_alpha.fill_(math.log(init))
        opt = new_optimizer(agent, cfg)
        obs = torch.zeros(1, 1)
        for _ in range(3000):
            probs, logp = agent.policy(obs)
            opt.zero_grad(set_to_none=True)
            actor_loss(probs, logp, q, q, float(agent.log_alpha.detach().exp())).backward()
            opt.step()
            probs, logp = agent.policy(obs)
            opt.zero_grad(set_to_none=True)
            temperature_loss(agent.log_alpha, probs, logp, target).backward()
            opt.step()
        probs, logp = agent.policy(obs)
        assert float(-(probs * logp).sum().detach()) == pytest.approx(target, abs=0.05)


# -- layers and embedding ------------------------------------------------------------------------


def layered_problem(seed: int, blocks: int = 3, chunks: tuple[int, ...] = (2, 1, 3), target: float = 2.5) -> AllocationProblem:
    """Random tables; each block has one linear per entry of ``chunks`` with that many units."""
    g = torch.Generator().manual_seed(seed)
    units = []
    for b in range(blocks):
        for j, n in enumerate(chunks):
            kind = "attention" if j == 0 else "mlp"
            for c in range(n):
                units.append(Unit(len(units), b, f"model.layers.{b}.p{j}", f"p{j}", kind, 16 * c, 16 * c + 16, 8 * (j + 1)))
    n_w = torch.tensor([u.n_weights for u in units], dtype=torch.float64)
    bits = (torch.tensor(ACTIONS, dtype=torch.float64) + 0.2 * torch.rand(len(units), len(ACTIONS), generator=g, dtype=torch.float64)) * n_w[:, None]
    costs = torch.rand(len(units), 1, generator=g, dtype=torch.float64) * torch.tensor([2.0**-a for a in ACTIONS], dtype=torch.float64)
    features = torch.rand(len(units), 8, generator=g, dtype=torch.float64) + 0.1
    return AllocationProblem(units, bits, torch.rand(len(units), dtype=torch.float64), target, "true", costs=costs, features=features)


def test_embedding_formulas_match_numpy_on_the_weights(tiny_model):
    """Dims 0-8 from the pooled unit features equal numpy on each whole layer's weights."""
    from windquant.model.stats import unit_features
    from windquant.model.units import enumerate_units

    units = enumerate_units(tiny_model, 32)
    g = torch.Generator().manual_seed(1)
    scales = {m: torch.rand(tiny_model.get_submodule(m).in_features, generator=g) + 0.5 for m in {u.module for u in units}}
    costs = torch.rand(len(units), len(ACTIONS), generator=g, dtype=torch.float64)
    bits = torch.tensor(ACTIONS, dtype=torch.float64).repeat(len(units), 1)
    features = unit_features(tiny_model, units, scales)
    problem = AllocationProblem(units, bits, torch.ones(len(units)), 3.0, "true", costs=costs, features=features)
    layers = group_layers(problem)

    def z(x):
        x = np.asarray(x, dtype=np.float64)
        return np.clip((x - x.mean()) / x.std(), -5, 5)

    raw = {k: [] for k in ("size", "std", "spread", "outliers", "act_mean", "act_out", "sens", "depth", "attn")}
    for module, idx in zip(layers.modules, layers.units, strict=True):
        w = tiny_model.get_submodule(module).weight.detach().double().numpy()
        a = scales[module].double().numpy()
        outl = []
        for i in idx:  # the outlier share is a per-unit statistic, weighted by unit size
            chunk = np.abs(w[:, units[i].col0 : units[i].col1]).ravel()
            p99 = np.sort(chunk)[round(0.99 * chunk.size) - 1]
            outl.append(((chunk > 0.5 * p99).mean(), chunk.size))
        raw["size"].append(math.log(w.size))
        raw["std"].append(math.log(w.std()))
        raw["spread"].append(math.log(w.std() / np.abs(w).mean()))
        raw["outliers"].append(sum(o * n for o, n in outl) / sum(n for _, n in outl))
        raw["act_mean"].append(math.log(a.mean()))
        raw["act_out"].append(math.log(a.max() / a.mean()))
        raw["sens"].append(math.log(costs[idx, ACTIONS.index(2.0)].sum().item() / w.size))
        raw["depth"].append(units[idx[0]].layer / (tiny_model.config.num_hidden_layers - 1))
        raw["attn"].append(float("self_attn" in module))
    expected = np.stack(
        [raw["depth"], raw["attn"]] + [z(raw[k]) for k in ("size", "std", "spread", "outliers", "act_mean", "act_out", "sens")], axis=1
    )
    np.testing.assert_allclose(layers.static, expected, rtol=1e-4, atol=1e-4)
    state = embedding(layers.static[0], budget_left=30.0, weights_left=10.0, weights_total=40.0, target_bits=2.0)
    assert state.shape == (LAYER_DIM,)
    assert state[9] == pytest.approx(30 / 10 / 2 - 1) and state[10] == pytest.approx(0.75)


def test_layer_plan_maps_to_unit_actions_and_the_projection_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    for seed in range(25):
        problem = layered_problem(seed, target=float(rng.uniform(1.3, 7.0)))
        layers = group_layers(problem)
        policy = seed % 2 == 1  # odd seeds: the projection by -log π of a random "policy"
        env = LayerEnv(problem, layers, proxy=None, cfg=SACConfig(projection="policy" if policy else "costs"))
        choice = rng.integers(0, len(ACTIONS), len(layers.weights))
        logp = np.log(rng.dirichlet(np.ones(len(ACTIONS)), len(choice)))
        projected = env.project(choice, logp)
        requested = layers.unit_actions(projected)
        assert problem.fits(problem.total_bits(requested))
        for module, idx in zip(layers.modules, layers.units, strict=True):
            assert {requested[i] for i in idx} == {ACTIONS[projected[layers.modules.index(module)]]}
            assert all(problem.units[i].module == module for i in idx)
        # Nothing left to spend: no single layer could move one action up and still fit.
        total = problem.total_bits(requested)
        rows = np.arange(len(projected))
        cost = -logp if policy else layers.cost
        extra = layers.bits - layers.bits[rows, projected][:, None]
        gain = cost[rows, projected][:, None] - cost
        assert not ((gain > 0) & (total + extra <= problem.budget * (1 + 1e-12))).any()


class CountingProxy:
    """A stand-in proxy: perplexity grows with the bits taken away (no model)."""

    reference = 10.0

    def __init__(self):
        self.calls = 0

    def __call__(self, requested):
        self.calls += 1
        return 10.0 * math.exp(sum(16.0 - a for a in requested) / (16.0 * len(requested)))


class DyingProxy(CountingProxy):
    """Killed (KeyboardInterrupt) at its ``at``-th call."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def __call__(self, requested):
        if self.calls + 1 == self.at:
            raise KeyboardInterrupt
        return super().__call__(requested)


def test_episode_return_is_the_quality_and_budget_terms():
    """The shaping telescopes: an episode's rewards sum to -scale·log(PPL/ref) - penalties."""
    problem = layered_problem(4)
    cfg = SACConfig(reward_scale=3.0)
    proxy = CountingProxy()
    env = LayerEnv(problem, group_layers(problem), proxy, cfg)
    gen = torch.Generator().manual_seed(0)
    ep = env.run(lambda obs: (int(torch.randint(len(ACTIONS), (1,), generator=gen)), np.zeros(len(ACTIONS))))
    assert float(ep.rows["rewards"].sum()) == pytest.approx(-3.0 * math.log(ep.terms["proxy_ppl"] / 10.0) - ep.terms["penalty"], rel=1e-5)
    over = max(0.0, ep.terms["raw_bits"] / problem.target_bits - 1)
    under = max(0.0, 1 - ep.terms["raw_bits"] / problem.target_bits)
    expected = cfg.over_penalty * over + cfg.under_penalty * under + (cfg.cliff_penalty if over > cfg.cliff else 0)
    assert ep.terms["penalty"] == pytest.approx(expected, rel=1e-9)
    assert ep.rows["dones"].tolist() == [0.0] * (len(ep.raw) - 1) + [1.0]
    assert proxy.calls == 1


def test_train_resume_and_zero_shot_transfer_on_random_tables(tmp_path):
    """Training writes a policy; a killed run resumes to the same log; the policy applies to a
    problem of another shape with no training episodes and meets its budget."""
    problem = layered_problem(7)
    cfg = SACConfig(episodes=5, random_episodes=2, batch=8, hidden=16, checkpoint_every=2)
    full = train_sac(problem, CountingProxy(), cfg, tmp_path / "full", seed=2, progress=False)
    assert problem.fits(problem.total_bits(full.requested))

    with pytest.raises(KeyboardInterrupt):  # killed in episode 4, after the checkpoint at episode 2
        train_sac(problem, DyingProxy(at=4), cfg, tmp_path / "cut", seed=2, progress=False)
    resumed = train_sac(problem, CountingProxy(), replace(cfg, resume=True), tmp_path / "cut", seed=2, progress=False)

    def log(run):
        rows = [json.loads(line) for line in (tmp_path / run / "episodes.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "proxy_seconds")} for r in rows]

    assert log("cut") == log("full") and len(log("full")) == 5
    assert resumed.requested == full.requested

    other = layered_problem(8, blocks=5, chunks=(1, 4), target=3.0)
    counting = CountingProxy()
    policy = str(tmp_path / "full" / "policy.safetensors")
    moved = train_sac(other, counting, SACConfig(policy=policy), tmp_path / "zero", progress=False)
    assert other.fits(other.total_bits(moved.requested))
    assert moved.info["episodes"] == 0 and counting.calls == 1  # the greedy plan's one score, no training
    assert not (tmp_path / "zero" / "episodes.jsonl").read_text()


def test_a_file_that_is_not_a_sac_policy_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(WindquantError, match="not a windquant SAC policy"):
        load_policy(tmp_path / "x.safetensors")


def test_cli_trains_sac_on_one_tiny_model_and_applies_it_zero_shot_to_another(tmp_path, capsys):
    """Two tiny LLaMAs of different shapes (layers, widths, so units and layers differ): SAC is
    trained on the first through the CLI and its policy quantizes the second with no episode."""
    from conftest import make_model, make_tokenizer
    from test_cli import quantize_args

    from windquant.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    models = {}
    for name, shape in (("a", {"layers": 2, "hidden": 64, "intermediate": 160}), ("b", {"layers": 3, "hidden": 96, "intermediate": 128})):
        models[name] = tmp_path / name
        make_model(**shape, seed=len(name)).save_pretrained(models[name])
        make_tokenizer().save_pretrained(models[name])
    sac = ["--target-bits", "3", "--allocator", "sac", "--sac-proxy-samples", "2", "--sac-proxy-len", "32"]
    trained = tmp_path / "qa"
    argv = quantize_args(models["a"], trained, corpus, tmp_path / "c", *sac, "--sac-episodes", "3", "--sac-set", "batch=16,hidden=16")
    assert main(argv) == 0
    assert len((trained / "episodes.jsonl").read_text().splitlines()) == 3
    assert (trained / "policy.safetensors").is_file() and (trained / "training_curve.png").is_file()

    moved = tmp_path / "qb"
    assert main(quantize_args(models["b"], moved, corpus, tmp_path / "c", *sac, "--sac-policy", str(trained / "policy.safetensors"))) == 0
    plan = json.loads((moved / "plan.json").read_text())
    assert plan["true_bits"] <= 3.0
    assert "applied zero-shot" in json.dumps(plan["info"])
    assert not (moved / "episodes.jsonl").exists()
    capsys.readouterr()
    assert main(quantize_args(models["b"], tmp_path / "qc", corpus, tmp_path / "c", *sac, "--sac-policy", str(corpus))) == 2
    assert "not a windquant SAC policy" in capsys.readouterr().err
    assert not (tmp_path / "qc").exists()


def test_replay_buffer_matches_one_transition_at_a_time():
    """Episodes written at once land where a slot-by-slot circular write puts them (wrap-around and
    an episode longer than the buffer included)."""
    from windquant.alloc.sac.train import ReplayBuffer

    for capacity, lengths in ((5, (3, 4, 9, 2)), (7, (7, 7, 1)), (4, (10,))):
        buffer, expected, pos, size, start = ReplayBuffer(capacity, 1), torch.zeros(capacity, dtype=torch.long), 0, 0, 0
        for n in lengths:
            actions = torch.arange(start, start + n)
            start += n
            buffer.add({"obs": torch.zeros(n, 1), "actions": actions, "rewards": torch.zeros(n), "next_obs": torch.zeros(n, 1), "dones": torch.zeros(n)})
            for a in actions:
                expected[pos], pos, size = a, (pos + 1) % capacity, min(size + 1, capacity)
        assert torch.equal(buffer.data["actions"], expected) and (buffer.pos, buffer.size) == (pos, size)
