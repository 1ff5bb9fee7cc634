"""The SAC training run: per-layer episodes, replay, updates, the final projection, transfer.

:func:`train_sac` reads top to bottom as the loop. An episode visits the model's linear layers
in model order and picks one action per layer from its 11-dim embedding
(:mod:`windquant.alloc.sac.embedding`); the plan is then *projected* onto the budget at layer
level (ilp's greedy trim while over, greedy fill while bits are left: every unit of a layer
keeps its layer's action) and scored by one proxy pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from windquant.actions import ACTIONS
from windquant.alloc.base import Allocation, Proxy
from windquant.alloc.ilp import bit_price, greedy_fill, greedy_trim
from windquant.alloc.ppo.agent import draw
from windquant.alloc.ppo.train import Checkpointer, EpisodeLog, TimedProxy, plan_bits, run_digest
from windquant.alloc.problem import AllocationProblem
from windquant.alloc.sac.agent import SACAgent, new_optimizer, sac_update, target_entropy
from windquant.alloc.sac.config import SACConfig
from windquant.alloc.sac.embedding import LAYER_DIM, Layers, embedding, group_layers
from windquant.config import config_to_dict
from windquant.errors import WindquantError

N_ACTIONS = len(ACTIONS)
CHECKPOINT = "checkpoint.safetensors"
EPISODES = "episodes.jsonl"
POLICY = "policy.safetensors"
CURVE = "training_curve.png"
POLICY_KIND = "windquant-sac-actor"


@dataclass
class TrainState:
    episode: int = 0  # episodes completed
    best_ppl: float = float("inf")
    best_episode: int | None = None
    best_choice: list[int] = field(default_factory=list)  # projected column per layer
    buffer_pos: int = 0
    buffer_size: int = 0


class ReplayBuffer:
    """Circular buffer of transitions (obs, action, reward, next obs, done) as tensors."""

    def __init__(self, capacity: int, obs_dim: int = LAYER_DIM):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.data = {
            "obs": torch.zeros(capacity, obs_dim),
            "actions": torch.zeros(capacity, dtype=torch.long),
            "rewards": torch.zeros(capacity),
            "next_obs": torch.zeros(capacity, obs_dim),
            "dones": torch.zeros(capacity),
        }

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        n = len(rows["actions"])
        idx = (self.pos + torch.arange(n)) % self.capacity
        last = slice(max(0, n - self.capacity), n)  # an episode longer than the buffer keeps its last rows
        for k, v in rows.items():
            self.data[k][idx[last]] = v[last]
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}


@dataclass
class Episode:
    rows: dict[str, torch.Tensor]  # the transitions
    raw: np.ndarray  # column per layer as the policy chose
    projected: np.ndarray  # ... after the projection onto the budget
    terms: dict


class LayerEnv:
    """The per-layer MDP: states, the shaped step reward and the episode-end terms."""

    def __init__(self, problem: AllocationProblem, layers: Layers, proxy: Proxy, cfg: SACConfig):
        self.problem, self.layers, self.proxy, self.cfg = problem, layers, proxy, cfg
        self.allowed = np.ones_like(layers.cost, dtype=bool)
        if not problem.fits(float(layers.bits.min(1).sum())):
            raise WindquantError("the sac allocator: the budget is below every layer at its cheapest action; raise --target-bits")
        # The Lagrange price of a bit on the layer tables: the step reward's budget term.
        self.price = bit_price(layers.cost, layers.bits, self.allowed, problem.budget)

    def project(self, choice: np.ndarray, logp: np.ndarray | None = None) -> np.ndarray:
        """Onto the budget, whole layers at a time: trim while over, then fill what is left, by
        the sensitivity costs or (``projection="policy"``) by ``-logp`` [L, A], the policy's own."""
        c = self.layers.cost if self.cfg.projection == "costs" or logp is None else -logp
        b, budget = self.layers.bits, self.problem.budget
        return greedy_fill(c, b, self.allowed, greedy_trim(c, b, self.allowed, choice, budget), budget)

    def run(self, pick) -> Episode:
        """One episode; ``pick(obs) -> (column, log-probabilities of every column)`` chooses each layer's action."""
        lay, cfg, budget = self.layers, self.cfg, self.problem.budget
        target = self.problem.target_bits
        total_w = float(lay.weights.sum())
        left_b, left_w = budget, total_w
        obs, actions, rewards, logps = [], [], [], []
        for layer in range(len(lay.weights)):
            o = embedding(lay.static[layer], left_b, left_w, total_w, target)
            a, logp = pick(o)
            logps.append(logp)
            obs.append(o)
            actions.append(a)
            rewards.append(
                -cfg.reward_scale * (lay.cost[layer, a] + self.price * (lay.bits[layer, a] - target * lay.weights[layer]))
            )
            left_b -= lay.bits[layer, a]
            left_w -= lay.weights[layer]
        raw = np.array(actions)
        raw_bits = float(lay.bits[np.arange(len(raw)), raw].sum())
        projected = self.project(raw, np.stack(logps))
        ppl = self.proxy(lay.unit_actions(projected))
        quality = math.log(ppl / self.proxy.reference)
        over, under = max(0.0, raw_bits / budget - 1), max(0.0, 1 - raw_bits / budget)
        penalty = cfg.over_penalty * over + cfg.under_penalty * under + (cfg.cliff_penalty if over > cfg.cliff else 0.0)
        # The last step takes back the shaping paid so far: the return is -scale·quality - penalty.
        rewards[-1] += -sum(rewards) - cfg.reward_scale * quality - penalty
        next_obs = obs[1:] + [np.zeros(LAYER_DIM, dtype=np.float32)]
        rows = {
            "obs": torch.from_numpy(np.stack(obs)),
            "actions": torch.tensor(actions),
            "rewards": torch.tensor(rewards, dtype=torch.float32),
            "next_obs": torch.from_numpy(np.stack(next_obs)),
            "dones": torch.tensor([0.0] * (len(obs) - 1) + [1.0]),
        }
        moved = float(lay.weights[projected != raw].sum()) / total_w
        terms = {
            "proxy_ppl": ppl,
            "return": -cfg.reward_scale * quality - penalty,
            "penalty": penalty,
            "raw_bits": raw_bits / total_w,
            "projection_moved": moved,  # share of weights whose layer the projection changed
        }
        return Episode(rows, raw, projected, terms)


def new_agent(cfg: SACConfig, seed: int) -> SACAgent:
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        return SACAgent(LAYER_DIM, N_ACTIONS, cfg.hidden)


def save_policy(agent: SACAgent, path: Path) -> None:
    """The actor alone: all a zero-shot transfer needs."""
    tensors = {k: v.contiguous() for k, v in agent.actor.state_dict().items()}
    save_file(
        tensors, str(path), metadata={"kind": POLICY_KIND, "obs_dim": str(LAYER_DIM), "hidden": str(agent.actor[1].in_features)}
    )


def load_policy(path: str | Path) -> SACAgent:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != POLICY_KIND:
            raise ValueError(f"kind {meta.get('kind')!r}, not {POLICY_KIND!r}")
        agent = SACAgent(LAYER_DIM, N_ACTIONS, int(meta["hidden"]))
        agent.actor.load_state_dict(load_file(str(path)))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise WindquantError(
            f"--sac-policy {path} is not a windquant SAC policy ({str(exc)[:120]}); point it at a sac policy.safetensors"
        ) from exc
    return agent


def actor_pick(agent: SACAgent, generator: torch.Generator, greedy: bool):
    def pick(obs: np.ndarray) -> tuple[int, np.ndarray]:
        with torch.no_grad():
            _, logp = agent.policy(torch.from_numpy(obs)[None])
        return draw(logp[0], generator, greedy), logp[0].double().numpy()

    return pick


def random_pick(generator: torch.Generator):
    uniform = np.full(N_ACTIONS, -np.log(N_ACTIONS))
    return lambda obs: (int(torch.randint(N_ACTIONS, (1,), generator=generator)), uniform)


def train_sac(
    problem: AllocationProblem, proxy: Proxy, cfg: SACConfig, work_dir: Path, seed: int = 0, progress: bool = True
) -> Allocation:
    """Train (or, with ``cfg.policy``, apply zero-shot) and return the best budget-meeting plan.

    Files in ``work_dir``: ``checkpoint.safetensors`` (agent, optimiser, RNG, replay buffer),
    ``episodes.jsonl``, ``policy.safetensors`` (the actor, reusable with ``--sac-policy``) and
    ``training_curve.png``. A resumed run reproduces the uninterrupted one exactly.
    """
    cfg.validate()
    work_dir.mkdir(parents=True, exist_ok=True)
    proxy = TimedProxy(proxy)
    layers = group_layers(problem)
    env = LayerEnv(problem, layers, proxy, cfg)
    generator = torch.Generator().manual_seed(seed)
    agent = load_policy(cfg.policy) if cfg.policy else new_agent(cfg, seed)
    episodes = 0 if cfg.policy else cfg.episodes
    optimizer = new_optimizer(agent, cfg)
    entropy_target = target_entropy(N_ACTIONS, cfg.entropy_fraction)
    buffer = ReplayBuffer(cfg.buffer)
    checkpoints = Checkpointer(work_dir / CHECKPOINT, run_digest(problem, cfg, seed))
    state = TrainState()
    if cfg.resume and checkpoints.path.is_file() and episodes:
        state = checkpoints.load(agent, optimizer, generator, TrainState)
        buffer.data |= checkpoints.extra()
        buffer.pos, buffer.size = state.buffer_pos, state.buffer_size
    updates = round(cfg.updates_per_step * len(layers.weights))
    bar = tqdm(total=episodes, initial=state.episode, desc="sac episodes", disable=not progress, unit="ep")
    with EpisodeLog(work_dir / EPISODES, keep=state.episode) as log:
        for episode in range(state.episode, episodes):
            start, proxy.seconds = time.perf_counter(), 0.0
            explore = episode < cfg.random_episodes
            ep = env.run(random_pick(generator) if explore else actor_pick(agent, generator, greedy=False))
            buffer.add(ep.rows)
            stats: dict[str, float] = {}
            for _ in range(updates if buffer.size >= cfg.batch else 0):
                stats = sac_update(agent, optimizer, buffer.sample(cfg.batch, generator), cfg, entropy_target)
            if ep.terms["proxy_ppl"] < state.best_ppl:
                state.best_ppl, state.best_episode, state.best_choice = ep.terms["proxy_ppl"], episode, ep.projected.tolist()
            cols = layers.unit_columns(ep.projected).tolist()
            row = {"episode": episode, "random": explore, **ep.terms, **plan_bits(problem, cols), **stats}
            row["plan"] = "".join(map(str, ep.projected))  # column per layer (model order)
            log.write(row | {"seconds": time.perf_counter() - start, "proxy_seconds": proxy.seconds})
            state.episode = episode + 1
            state.buffer_pos, state.buffer_size = buffer.pos, buffer.size
            if state.episode % cfg.checkpoint_every == 0 or state.episode == episodes:
                checkpoints.save(agent, optimizer, generator, state, buffer.data)
            bar.set_postfix(
                ppl=f"{ep.terms['proxy_ppl']:.1f}", raw_bits=f"{ep.terms['raw_bits']:.3f}", best=f"{state.best_ppl:.1f}"
            )
            bar.update(1)
    bar.close()
    greedy = env.run(actor_pick(agent, generator, greedy=True))
    if episodes:
        save_policy(agent, work_dir / POLICY)
        plot_sac_curve(work_dir / EPISODES, work_dir / CURVE, problem.target_bits)
    use_greedy = not state.best_choice or greedy.terms["proxy_ppl"] <= state.best_ppl
    choice = greedy.projected if use_greedy else np.array(state.best_choice)
    info = {
        "chosen": "greedy" if use_greedy else "best_sampled",
        "zero_shot_policy": cfg.policy,
        "reference_ppl": proxy.reference,
        "layers": len(layers.weights),
        "bit_price": env.price,
        "best_sampled": {"episode": state.best_episode, "proxy_ppl": state.best_ppl},
        "greedy": greedy.terms,
        "episodes": episodes,
        "seed": seed,
        "work_dir": str(work_dir),
        "config": config_to_dict(cfg),
    }
    how = f"policy {cfg.policy} applied zero-shot" if cfg.policy else f"{episodes} episodes (seed {seed})"
    info["summary"] = (
        f"{how}, {len(layers.weights)} layers, returned the {info['chosen']} plan; proxy PPL: reference {proxy.reference:.2f}, "
        f"best sampled {state.best_ppl:.2f}, greedy {greedy.terms['proxy_ppl']:.2f} "
        f"(raw plan {greedy.terms['raw_bits']:.3f} bits, projection moved {greedy.terms['projection_moved']:.1%} of the weights)"
    )
    files = [p for name in (EPISODES, CURVE, POLICY) if episodes and (p := work_dir / name).is_file()]
    return Allocation(layers.unit_actions(choice), info, files)


def plot_sac_curve(log_path: Path, png: Path, target_bits: float) -> None:
    """Proxy PPL (and best so far), raw bits vs target, return, and α / entropy per episode."""
    from windquant.alloc.ppo.report import episode_panels, save_episode_panels

    opened = episode_panels(log_path)
    if opened is None:
        return
    rows, ep, plt, fig, axes = opened
    ppl = [r["proxy_ppl"] for r in rows]
    axes[0][0].plot(ep, ppl, marker=".", label="episode")
    axes[0][0].plot(ep, np.minimum.accumulate(ppl), color="black", label="best so far")
    axes[0][0].set_yscale("log")
    axes[0][0].set_ylabel("proxy perplexity (projected plan)")
    axes[0][0].legend()
    axes[0][1].plot(ep, [r["raw_bits"] for r in rows], label="policy's raw plan")
    axes[0][1].axhline(target_bits, linestyle="--", color="gray", label="target")
    axes[0][1].set_ylabel("bits per weight")
    axes[0][1].legend()
    axes[1][0].plot(ep, [r["return"] for r in rows], color="tab:green")
    axes[1][0].set_ylabel("episode return")
    for key, color in (("alpha", "tab:red"), ("entropy", "tab:purple")):
        axes[1][1].plot(ep, [r.get(key, math.nan) for r in rows], color=color, label=key)
    axes[1][1].set_ylabel("temperature α / policy entropy")
    axes[1][1].legend()
    save_episode_panels(plt, fig, axes, png)
