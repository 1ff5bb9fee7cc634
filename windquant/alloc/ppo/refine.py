"""Refinement mode: PPO over budget-neutral changes to a strong plan, rewarded by the real proxy.

ilp's plan is optimal for its additive second-order costs; what it cannot see is how units
interact. The proxy (the real model on calibration windows) sees that. Here an episode is one
move: from the incumbent plan (ilp's at the start) the policy picks one (unit, action) pair; the
move sets that unit to that action and restores the budget with the additive model (the
cheapest demotions per bit saved while over it, the best promotions per bit while bits are
left). One proxy pass scores the result. The reward is the drop in the proxy's mean NLL per
token, and a move with a positive reward (above ``refine_min_gain``) becomes the incumbent, so
the returned plan is never worse than ilp's on the proxy. Pairs already tried from the current
incumbent are masked: the proxy is deterministic, a rejected move stays rejected.

Two kinds of move (``refine_moves``): ``unit`` as above, or ``group``: raise or lower the weight
of one group's costs (a projection in one block, e.g. block 3's v_proj) by ``refine_step`` in log
space and re-solve ilp. Group moves shift budget between blocks and projections, which is where
errors compound through depth, something ilp's additive costs cannot see.

The policy scores every move with a small MLP on the pair's features, on top of a fixed prior
that prefers moves the additive model rates as nearly free (``refine_prior``): at ilp's optimum
those are the marginal decisions, where interactions can flip the sign. PPO updates it every
``refine_batch`` one-step episodes (advantage = reward minus a moving-average baseline).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from windquant.actions import ACTIONS, within_budget
from windquant.alloc.base import Allocation, Proxy
from windquant.alloc.ilp import bit_price, greedy_fill, greedy_trim, solve
from windquant.alloc.ppo.agent import MASKED_LOGIT, draw, layer_init, mlp_body
from windquant.alloc.ppo.config import PPOConfig
from windquant.alloc.ppo.env import need_costs, normalise
from windquant.alloc.ppo.train import EPISODES, POLICY, Checkpointer, EpisodeLog, TimedProxy, plan_bits, run_digest
from windquant.alloc.problem import AllocationProblem
from windquant.config import config_to_dict
from windquant.errors import WindquantError

CURVE = "refine_curve.png"


@dataclass
class RefineState:
    episode: int = 0  # episodes completed
    incumbent: list[int] = field(default_factory=list)  # column per unit, model order
    incumbent_nll: float = math.nan  # the proxy's mean NLL of the incumbent
    start_nll: float = math.nan  # ... of ilp's plan
    tried: list[int] = field(default_factory=list)  # flat pair indices tried from the incumbent
    baseline: float = 0.0  # moving average of the rewards
    accepted: int = 0


class MovePolicy(nn.Module):
    """One logit per (unit, action) pair: a fixed prior plus an MLP of the pair's features."""

    def __init__(self, n_features: int, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(mlp_body(n_features, hidden), layer_init(nn.Linear(hidden, 1), std=0.01))  # starts as the prior

    def forward(self, features: torch.Tensor, prior: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features [..., P, F], prior and mask [..., P] -> masked logits [..., P]."""
        return (prior + self.body(features).squeeze(-1)).masked_fill(~mask, MASKED_LOGIT)


class UnitMoves:
    """Moves = (unit, action) pairs; state = the plan's column per unit. Features and the budget
    repair come from the problem's tables (never the model)."""

    def __init__(self, problem: AllocationProblem, cfg: PPOConfig):
        self.cost = need_costs(problem, "refine mode").numpy()
        self.bits = problem.bits.double().numpy()
        self.allowed = np.ones_like(self.cost, dtype=bool)  # ilp's domain: every action
        self.budget = problem.budget
        self.price = bit_price(self.cost, self.bits, self.allowed, self.budget)
        self.n = np.array([u.n_weights for u in problem.units], dtype=np.float64)
        self.cfg = cfg
        units = len(problem.units)
        layers = max(u.layer for u in problem.units) + 1
        static = normalise(problem.features.double()).numpy() if problem.features is not None else np.zeros((units, 8))
        kinds = np.array([[u.kind == "attention", u.kind == "mlp"] for u in problem.units], dtype=np.float64)
        depth = np.array([u.layer / layers for u in problem.units])[:, None]
        self.unit_features = np.concatenate([static, kinds, depth], 1)  # [N, 11]
        self.n_features = 5 + self.unit_features.shape[1]
        self.start = solve(torch.from_numpy(self.cost), torch.from_numpy(self.bits), self.budget).choice  # ilp's plan
        self.scale = float(np.median(np.abs(self.predicted(self.start)[0]))) or 1.0  # feature scale (nats)

    def predicted(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pair: additive predicted cost of the move after repair (Δcost + price·Δbits), Δcost, Δbits."""
        rows = np.arange(len(cols))
        d_cost = self.cost - self.cost[rows, cols][:, None]
        d_bits = self.bits - self.bits[rows, cols][:, None]
        return d_cost + self.price * d_bits, d_cost, d_bits

    def initial(self) -> np.ndarray:
        return self.start.copy()

    def plan(self, state: np.ndarray) -> np.ndarray:
        return state

    def options(self, state: np.ndarray, cols: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """[N·A, F] pair features and [N·A] prior logits for the incumbent ``cols`` (= ``state``)."""
        net, d_cost, d_bits = self.predicted(cols)
        units, k = net.shape

        def signed_log(x: np.ndarray) -> np.ndarray:
            return np.sign(x) * np.log1p(np.abs(x) / self.scale)

        action_bits = np.broadcast_to(np.array(ACTIONS) / 8, (units, k))
        current = np.broadcast_to((np.array(ACTIONS)[cols] / 8)[:, None], (units, k))
        pair = np.stack([signed_log(net), signed_log(d_cost), d_bits / self.n[:, None] / 8, action_bits, current], -1)
        unit = np.broadcast_to(self.unit_features[:, None, :], (units, k, self.unit_features.shape[1]))
        features = torch.from_numpy(np.concatenate([pair, unit], -1).reshape(units * k, -1)).float()
        rank = np.argsort(np.argsort(net.reshape(-1), kind="stable"), kind="stable") / max(net.size - 1, 1)
        return features, torch.from_numpy(-self.cfg.refine_prior * rank).float()

    def move(self, cols: np.ndarray, pair: int) -> np.ndarray:
        """Set unit ``pair // A`` to column ``pair % A`` and restore the budget around it."""
        unit, col = divmod(pair, self.cost.shape[1])
        choice = cols.copy()
        choice[unit] = col
        allowed = self.allowed.copy()
        allowed[unit] = False
        allowed[unit, col] = True  # the moved unit stays where the policy put it
        choice = greedy_trim(self.cost, self.bits, allowed, choice, self.budget)
        return greedy_fill(self.cost, self.bits, allowed, choice, self.budget)

    def mask(self, state: np.ndarray, cols: np.ndarray, tried: list[int]) -> torch.Tensor:
        """Pairs that change the incumbent, leave the rest a way to meet the budget, and were not tried from it."""
        cheapest = self.bits.min(1)
        mask = within_budget(self.bits + (cheapest.sum() - cheapest)[:, None], self.budget)
        mask[np.arange(len(cols)), cols] = False
        mask = mask.reshape(-1)
        mask[tried] = False
        return torch.from_numpy(mask)


class GroupMoves:
    """Moves = (group, up | down); state = one log weight per group on ilp's costs. A group is a
    projection in one block; a move scales its costs by exp(±``refine_step``) and re-solves ilp,
    so it is budget-neutral and shifts bits between blocks and projections."""

    def __init__(self, problem: AllocationProblem, cfg: PPOConfig):
        self.costs, self.bits, self.budget, self.cfg = (
            need_costs(problem, "refine mode"),
            problem.bits.double(),
            problem.budget,
            cfg,
        )
        keys = sorted({(u.layer, u.proj) for u in problem.units})
        self.group = np.array([keys.index((u.layer, u.proj)) for u in problem.units])  # [N] group of each unit
        projs = sorted({p for _, p in keys})
        layers = max(layer for layer, _ in keys) + 1
        n = np.array([u.n_weights for u in problem.units], dtype=np.float64)
        self.weights = np.bincount(self.group, n, len(keys))  # weights per group
        static = np.array([[layer / layers] + [p == q for q in projs] for layer, p in keys], dtype=np.float64)
        self.static = np.repeat(static, 2, axis=0)  # option 2g = group g up (more bits), 2g + 1 = down
        self.direction = np.tile([1.0, -1.0], len(keys))
        self.n_features = 6 + static.shape[1]
        self.start = self.plan(self.initial())
        self.scale = float(np.median(self.group_cost(self.start))) or 1.0

    def initial(self) -> np.ndarray:
        return np.zeros(len(self.weights))

    def plan(self, state: np.ndarray) -> np.ndarray:
        """ilp's plan for costs weighted by exp(state) per group."""
        scale = torch.from_numpy(np.exp(state[self.group]))[:, None]
        return solve(self.costs * scale, self.bits, self.budget).choice

    def group_cost(self, cols: np.ndarray) -> np.ndarray:
        rows = np.arange(len(cols))
        return np.bincount(self.group, self.costs.numpy()[rows, cols], len(self.weights))

    def options(self, state: np.ndarray, cols: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """[2G, F] option features and a flat prior (every group move equally likely at first)."""
        rows = np.arange(len(cols))
        bits = np.bincount(self.group, self.bits.numpy()[rows, cols], len(self.weights)) / self.weights
        cost = np.log1p(self.group_cost(cols) / self.scale)
        per_group = np.stack([state, bits / 8, cost, self.weights / self.weights.sum() * len(self.weights)], -1)
        per_option = np.repeat(per_group, 2, axis=0)
        after = per_option[:, :1] + self.direction[:, None] * self.cfg.refine_step
        features = np.concatenate([self.direction[:, None], after, per_option, self.static], 1)
        return torch.from_numpy(features).float(), torch.zeros(len(features))

    def move(self, state: np.ndarray, option: int) -> np.ndarray:
        out = state.copy()
        out[option // 2] += self.direction[option] * self.cfg.refine_step  # a heavier cost weight buys the group bits
        return out

    def mask(self, state: np.ndarray, cols: np.ndarray, tried: list[int]) -> torch.Tensor:
        """Options within ±``refine_max_weight`` that were not tried from the incumbent."""
        after = np.repeat(state, 2) + self.direction * self.cfg.refine_step
        mask = np.abs(after) <= self.cfg.refine_max_weight + 1e-9
        mask[tried] = False
        return torch.from_numpy(mask)


@dataclass
class Transition:
    features: torch.Tensor
    prior: torch.Tensor
    mask: torch.Tensor
    action: int
    logprob: float
    reward: float


def sample(logits: torch.Tensor, generator: torch.Generator, greedy: bool = False) -> tuple[int, float]:
    """(pair, log-probability): an inverse-CDF draw from the seeded generator, or the argmax."""
    logp = torch.log_softmax(logits, -1)
    pair = draw(logp, generator, greedy)
    while logits[pair] <= MASKED_LOGIT:  # float round-off at the end of the CDF: step back to a real pair
        pair -= 1
    return pair, float(logp[pair])


def advantages(rewards: torch.Tensor, baseline: float) -> torch.Tensor:
    """Reward minus the baseline, normalised over the batch when it has a spread."""
    adv = rewards - baseline
    if len(adv) > 1 and float(adv.std()) > 0:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv


def update(
    policy: MovePolicy, optimizer: torch.optim.Optimizer, batch: list[Transition], baseline: float, cfg: PPOConfig
) -> dict:
    """``cfg.epochs`` clipped-surrogate passes over the batch of one-step episodes."""
    features = torch.stack([t.features for t in batch])
    prior, mask = torch.stack([t.prior for t in batch]), torch.stack([t.mask for t in batch])
    actions = torch.tensor([t.action for t in batch])
    old = torch.tensor([t.logprob for t in batch])
    adv = advantages(torch.tensor([t.reward for t in batch]), baseline)
    stats = {"policy_loss": 0.0, "entropy": 0.0}
    for _ in range(cfg.epochs):
        logp = torch.log_softmax(policy(features, prior, mask), -1)
        ratio = (logp.gather(1, actions[:, None]).squeeze(1) - old).exp()
        policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
        p = logp.exp()
        entropy = -(p * torch.where(mask, logp, torch.zeros_like(logp))).sum(-1).mean()
        loss = policy_loss - cfg.refine_entropy_coef * entropy
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        stats["policy_loss"] += policy_loss.item() / cfg.epochs
        stats["entropy"] += entropy.item() / cfg.epochs
    return stats


MOVES = {"unit": UnitMoves, "group": GroupMoves}


def new_policy(n_features: int, cfg: PPOConfig, seed: int) -> MovePolicy:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MovePolicy(n_features, cfg.hidden)


def refine_ppo(
    problem: AllocationProblem,
    proxy: Proxy,
    cfg: PPOConfig,
    work_dir: Path,
    seed: int = 0,
    progress: bool = True,
    validation: Proxy | None = None,
) -> Allocation:
    """Refine ilp's plan for ``cfg.episodes`` one-move episodes; return the best plan found, or
    ilp's when ``validation`` (other windows) does not rate the refined plan better.

    With ``cfg.policy`` the saved move policy is used as is (no updates). Resumable like the
    construct mode: checkpoints at update boundaries, later episodes replayed."""
    cfg.validate()
    work_dir.mkdir(parents=True, exist_ok=True)
    proxy = TimedProxy(proxy)
    space = MOVES[cfg.refine_moves](problem, cfg)
    generator = torch.Generator().manual_seed(seed)
    policy = new_policy(space.n_features, cfg, seed)
    if cfg.policy:
        try:
            policy.load_state_dict(load_file(str(cfg.policy)))
        except (OSError, RuntimeError) as exc:
            raise WindquantError(
                f"--ppo-policy {cfg.policy} is not a windquant refine policy ({exc}); point it at its policy.safetensors"
            ) from exc
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    checkpoints = Checkpointer(work_dir / "checkpoint.safetensors", run_digest(problem, cfg, seed))
    state = RefineState()
    if cfg.resume and checkpoints.path.is_file():
        state = checkpoints.load(policy, optimizer, generator, RefineState)
    if not state.incumbent:
        nll = math.log(proxy([ACTIONS[c] for c in space.start]))
        state = RefineState(incumbent=space.initial().tolist(), incumbent_nll=nll, start_nll=nll)
    incumbent = np.array(state.incumbent)
    cols = space.plan(incumbent)
    features, prior = space.options(incumbent, cols)
    batch: list[Transition] = []
    bar = tqdm(total=cfg.episodes, initial=state.episode, desc="ppo refine", disable=not progress, unit="ep")
    with EpisodeLog(work_dir / EPISODES, keep=state.episode) as log:
        for episode in range(state.episode, cfg.episodes):
            start_time, proxy.seconds = time.perf_counter(), 0.0
            mask = space.mask(incumbent, cols, state.tried)
            if not bool(mask.any()):
                raise WindquantError(f"refine: no untried move is left after {episode} episodes; run fewer --ppo-episodes")
            with torch.no_grad():
                option, logp = sample(policy(features, prior, mask), generator)
            candidate = space.move(incumbent, option)
            candidate_cols = space.plan(candidate)
            # A re-weighting that leaves ilp's plan as it is scores the same: no proxy pass.
            same = bool((candidate_cols == cols).all())
            nll = state.incumbent_nll if same else math.log(proxy([ACTIONS[c] for c in candidate_cols]))
            reward = state.incumbent_nll - nll
            batch.append(Transition(features, prior, mask, option, logp, reward))
            accepted = reward > cfg.refine_min_gain
            row = {
                "episode": episode,
                "target": problem.target_bits,
                "option": option,
                "moved_units": int((candidate_cols != cols).sum()),
                "proxy_ppl": math.exp(nll),
                "reward": reward,
                "accepted": accepted,
                **plan_bits(problem, candidate_cols.tolist()),
            }
            if accepted:
                incumbent, cols, state.incumbent_nll, state.tried = candidate, candidate_cols, nll, []
                state.incumbent, state.accepted = candidate.tolist(), state.accepted + 1
                features, prior = space.options(incumbent, cols)
            else:
                state.tried.append(option)
            state.episode = episode + 1
            if len(batch) == cfg.refine_batch or state.episode == cfg.episodes:
                stats = {} if cfg.policy else update(policy, optimizer, batch, state.baseline, cfg)
                for t in batch:
                    state.baseline = cfg.refine_baseline_decay * state.baseline + (1 - cfg.refine_baseline_decay) * t.reward
                batch = []
                checkpoints.save(policy, optimizer, generator, state)
                row |= stats
            row |= {"incumbent_ppl": math.exp(state.incumbent_nll), "plan": "".join(map(str, candidate_cols.tolist()))}
            log.write(row | {"seconds": time.perf_counter() - start_time, "proxy_seconds": proxy.seconds})
            bar.set_postfix(ppl=f"{math.exp(nll):.2f}", best=f"{math.exp(state.incumbent_nll):.2f}", accepted=state.accepted)
            bar.update(1)
    bar.close()
    greedy = greedy_move(space, policy, incumbent, cols, state, proxy)
    final_nll = min(state.incumbent_nll, greedy["nll"])
    if greedy["accepted"]:
        cols = greedy.pop("plan")
    checked = validate(space.start, cols, validation) if validation is not None else None
    if checked and checked["kept"] == "ilp":
        cols, final_nll = space.start, state.start_nll
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(work_dir / POLICY))
    plot_refine_curve(work_dir / EPISODES, work_dir / CURVE, math.exp(state.start_nll))
    info = {
        "mode": "refine",
        "moves": cfg.refine_moves,
        "reference_ppl": proxy.reference,
        "start_proxy_ppl": math.exp(state.start_nll),
        "final_proxy_ppl": math.exp(final_nll),  # of the plan returned
        "accepted_moves": state.accepted + greedy["accepted"],
        "greedy": {k: v for k, v in greedy.items() if k != "plan"},
        "validation": checked,
        "episodes": cfg.episodes,
        "seed": seed,
        "work_dir": str(work_dir),
        "config": config_to_dict(cfg),
    }
    info["summary"] = (
        f"refined ilp's plan with {cfg.episodes} one-move episodes ({cfg.refine_moves} moves, seed {seed}): proxy PPL "
        f"{info['start_proxy_ppl']:.2f} -> {info['final_proxy_ppl']:.2f} ({info['accepted_moves']} moves accepted; reference {proxy.reference:.2f})"
    )
    if checked:
        info["summary"] += (
            f"; validation windows: ilp {checked['ilp_ppl']:.2f}, refined {checked['refined_ppl']:.2f}, kept {checked['kept']}'s plan"
        )
    files = [p for name in (EPISODES, CURVE, POLICY) if (p := work_dir / name).is_file()]
    return Allocation([ACTIONS[c] for c in cols], info, files)


def validate(start: np.ndarray, cols: np.ndarray, validation: Proxy) -> dict:
    """ilp's plan (``start``) against the refined one (``cols``) on windows no move was chosen on;
    the refined plan is kept only when it is strictly better there."""
    ilp = validation([ACTIONS[c] for c in start])
    refined = ilp if (cols == start).all() else validation([ACTIONS[c] for c in cols])
    return {"ilp_ppl": ilp, "refined_ppl": refined, "kept": "refined" if refined < ilp else "ilp"}


def greedy_move(space, policy: MovePolicy, incumbent: np.ndarray, cols: np.ndarray, state: RefineState, proxy) -> dict:
    """The policy's most likely move from the final incumbent, scored (greedy vs best sample)."""
    features, prior = space.options(incumbent, cols)
    mask = space.mask(incumbent, cols, state.tried)
    if not bool(mask.any()):
        return {"nll": state.incumbent_nll, "proxy_ppl": math.exp(state.incumbent_nll), "accepted": False}
    with torch.no_grad():
        option, _ = sample(policy(features, prior, mask), torch.Generator(), greedy=True)
    candidate = space.plan(space.move(incumbent, option))
    same = bool((candidate == cols).all())  # as in the loop: an unchanged plan needs no proxy pass
    nll = state.incumbent_nll if same else math.log(proxy([ACTIONS[c] for c in candidate]))
    return {
        "nll": nll,
        "proxy_ppl": math.exp(nll),
        "accepted": state.incumbent_nll - nll > space.cfg.refine_min_gain,
        "plan": candidate,
    }


def plot_refine_curve(log_path: Path, png: Path, start_ppl: float) -> None:
    """Each episode's candidate proxy PPL (accepted ones highlighted) and the incumbent's."""
    from windquant.alloc.ppo.report import read_episodes
    from windquant.reports import pyplot

    rows = read_episodes(log_path)
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ep = [r["episode"] for r in rows]
    ax.scatter(ep, [r["proxy_ppl"] for r in rows], s=10, color="tab:gray", label="proposed move")
    acc = [r for r in rows if r["accepted"]]
    ax.scatter([r["episode"] for r in acc], [r["proxy_ppl"] for r in acc], s=18, color="tab:green", label="accepted")
    ax.plot(ep, [r["incumbent_ppl"] for r in rows], color="tab:blue", label="incumbent")
    ax.axhline(start_ppl, linestyle="--", color="k", label="ilp's plan")
    ax.set_yscale("log")
    ax.set_xlabel("episode (one move each)")
    ax.set_ylabel("proxy perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
