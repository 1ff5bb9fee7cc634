"""The training run: curriculum, roll-outs, PPO updates, λ, best plan, checkpoints, per-episode log.

Files in ``work_dir``: ``checkpoint.safetensors`` (agent, optimiser, sampler RNG; the
scalars and best plan as JSON metadata — no pickle), ``episodes.jsonl`` (one line per
episode), ``policy.safetensors`` (final weights, reusable with ``--policy``) and
``training_curve.png``. A killed run resumed with ``resume=True`` reproduces the
uninterrupted run exactly: everything random flows from one seeded generator whose
state is checkpointed, and episodes after the last checkpoint are replayed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from windquant.alloc.ppo import rewards
from windquant.alloc.ppo.agent import ActorCritic, Rollout, act, ppo_update
from windquant.alloc.ppo.config import PPOConfig, curriculum_target
from windquant.alloc.ppo.env import N_ACTIONS, OBS_DIM, AllocationEnv
from windquant.alloc.problem import AllocationProblem
from windquant.errors import WindquantError
from windquant.quant.accounting import ACTIONS, fmt_action

CHECKPOINT = "checkpoint.safetensors"
EPISODES = "episodes.jsonl"
POLICY = "policy.safetensors"
CURVE = "training_curve.png"


@dataclass
class TrainState:
    episode: int = 0  # episodes completed
    lam: float = 1.0
    best_ppl: float = float("inf")
    best_episode: int | None = None
    best_requested: list[float] | None = None


@dataclass
class PPOResult:
    requested: list[float]
    info: dict = field(default_factory=dict)


def run_episode(
    env: AllocationEnv, agent: ActorCritic, target: float, generator: torch.Generator, greedy: bool = False
) -> tuple[Rollout, dict]:
    """Roll out one full plan; returns the transitions and the episode-end terms."""
    obs, info = env.reset(options={"target_bits": target})
    mask = info["action_mask"]
    rows: dict[str, list] = {k: [] for k in ("obs", "masks", "actions", "logprobs", "values", "rewards", "dones")}
    done = False
    while not done:
        action, logp, value = act(agent, obs, mask, generator, greedy)
        rows["obs"].append(torch.from_numpy(obs))
        rows["masks"].append(torch.from_numpy(mask))
        obs, reward, done, _, info = env.step(action)
        rows["actions"].append(info["applied_col"])
        rows["logprobs"].append(logp)
        rows["values"].append(value)
        rows["rewards"].append(reward)
        rows["dones"].append(float(done))
        mask = info.get("action_mask")
    roll = Rollout(
        obs=torch.stack(rows["obs"]),
        masks=torch.stack(rows["masks"]),
        actions=torch.tensor(rows["actions"]),
        logprobs=torch.tensor(rows["logprobs"]),
        values=torch.tensor(rows["values"]),
        rewards=torch.tensor(rows["rewards"], dtype=torch.float32),
        dones=torch.tensor(rows["dones"]),
    )
    return roll, info["final"]


def plan_bits(problem: AllocationProblem, cols: list[int]) -> dict[str, float]:
    """Average bits of a plan on every accounting the problem carries."""
    idx = torch.tensor(cols)[:, None]
    tables = problem.all_bits or {problem.accounting: problem.bits}
    return {f"{k}_bits": float(t.gather(1, idx).sum()) / problem.n_weights for k, t in tables.items()}


def action_histogram(problem: AllocationProblem, cols: list[int]) -> dict[str, float]:
    """Share of weights at each applied action (paper Fig. 2)."""
    counts: Counter = Counter()
    for u, c in zip(problem.units, cols):
        applied = float(problem.applied[u.index, c]) if problem.applied is not None else ACTIONS[c]
        counts[fmt_action(applied)] += u.n_weights
    return {k: v / problem.n_weights for k, v in sorted(counts.items(), key=lambda kv: -float(kv[0]))}


def settings_digest(problem: AllocationProblem, cfg: PPOConfig, seed: int) -> str:
    payload = json.dumps(
        {
            "bits": float(problem.bits.sum()),
            "n": len(problem.units),
            "target": problem.target_bits,
            "seed": seed,
            **cfg.to_dict(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, agent, optimizer, generator: torch.Generator, state: TrainState, digest: str) -> None:
    opt = optimizer.state_dict()
    tensors = {f"agent.{k}": v.detach().clone() for k, v in agent.state_dict().items()}
    tensors |= {f"opt.{pid}.{k}": v.clone() for pid, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.sampler"] = generator.get_state()
    meta = {"settings": digest, "state": json.dumps(state.__dict__), "param_groups": json.dumps(opt["param_groups"])}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: Path, agent, optimizer, generator: torch.Generator, digest: str) -> TrainState:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if meta.get("settings") != digest:
        raise WindquantError(f"{path} was written with other settings; delete {path.parent} or run without --resume")
    tensors = load_file(str(path))
    agent.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("agent.")})
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    generator.set_state(tensors["rng.sampler"])
    return TrainState(**json.loads(meta["state"]))


def new_agent(cfg: PPOConfig, seed: int) -> ActorCritic:
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        return ActorCritic(OBS_DIM, N_ACTIONS, cfg.hidden)


def load_policy(path: str | Path, cfg: PPOConfig) -> ActorCritic:
    agent = new_agent(cfg, 0)
    try:
        agent.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as exc:
        raise WindquantError(f"--policy {path} is not a windquant PPO policy ({exc}); point it at a policy.safetensors") from exc
    return agent


def train_ppo(
    problem: AllocationProblem,
    proxy: Callable[[list[float]], float],
    ppl_ref: float,
    cfg: PPOConfig,
    work_dir: Path,
    seed: int = 0,
    resume: bool = False,
    policy: str | Path | None = None,
    progress: bool = True,
) -> PPOResult:
    """Train (or, with ``policy``, reuse zero-shot) and return the best budget-meeting plan."""
    cfg.validate()
    work_dir.mkdir(parents=True, exist_ok=True)
    proxy_seconds = [0.0]

    def timed_proxy(requested: list[float]) -> float:
        start = time.perf_counter()
        try:
            return proxy(requested)
        finally:
            proxy_seconds[0] += time.perf_counter() - start

    env = AllocationEnv(problem, timed_proxy, ppl_ref, cfg)
    final_target = problem.target_bits
    generator = torch.Generator().manual_seed(seed)
    agent = load_policy(policy, cfg) if policy else new_agent(cfg, seed)
    episodes = 0 if policy else cfg.episodes
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
    digest = settings_digest(problem, cfg, seed)
    state = TrainState(lam=cfg.reward.lambda_init)
    log_path, ckpt_path = work_dir / EPISODES, work_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, agent, optimizer, generator, digest)
        lines = log_path.read_text().splitlines()[: state.episode] if log_path.is_file() else []
        log_path.write_text("".join(line + "\n" for line in lines))
    else:
        log_path.write_text("")
    bar = tqdm(total=episodes, initial=state.episode, desc="ppo episodes", disable=not progress, unit="ep")
    with log_path.open("a") as log:
        for episode in range(state.episode, episodes):
            target = curriculum_target(episode, episodes, cfg.curriculum, final_target)
            env.lam = state.lam
            start, proxy_seconds[0] = time.perf_counter(), 0.0
            roll, terms = run_episode(env, agent, target, generator)
            stats = ppo_update(agent, optimizer, roll, cfg, generator)
            timing = {"seconds": time.perf_counter() - start, "proxy_seconds": proxy_seconds[0]}
            cols = roll.actions.tolist()
            meets_final = env.used <= final_target * problem.n_weights * (1 + 1e-12) + 1e-6
            if meets_final and terms["proxy_ppl"] < state.best_ppl:
                state.best_ppl, state.best_episode, state.best_requested = terms["proxy_ppl"], episode, env.requested()
            row = {"episode": episode, "target": target, "lambda": state.lam, **plan_bits(problem, cols), **terms, **stats}
            row["actions"] = action_histogram(problem, cols)
            row["plan"] = "".join(map(str, cols))  # requested column per unit: any episode's plan can be rebuilt
            row |= timing
            state.lam = rewards.update_lagrange(
                state.lam, terms["rel_loss_increase"], cfg.reward.epsilon, cfg.reward.lambda_lr, cfg.reward.lambda_max
            )
            state.episode = episode + 1
            log.write(json.dumps(row) + "\n")
            log.flush()
            if state.episode % cfg.checkpoint_every == 0 or state.episode == episodes:
                save_checkpoint(ckpt_path, agent, optimizer, generator, state, digest)
            bar.set_postfix(ppl=f"{terms['proxy_ppl']:.1f}", bits=f"{terms['avg_bits']:.3f}", best=f"{state.best_ppl:.1f}")
            bar.update(1)
    bar.close()
    _, greedy_terms = run_episode(env, agent, final_target, generator, greedy=True)
    greedy = {"proxy_ppl": greedy_terms["proxy_ppl"], "requested": env.requested(), **plan_bits(problem, env.cols)}
    save_file({k: v.contiguous() for k, v in agent.state_dict().items()}, str(work_dir / POLICY))
    use_greedy = state.best_requested is None or greedy["proxy_ppl"] <= state.best_ppl
    chosen = greedy["requested"] if use_greedy else state.best_requested
    info = {
        "chosen": "greedy" if use_greedy else "best_sampled",
        "ppl_ref": ppl_ref,
        "best_sampled": {"episode": state.best_episode, "proxy_ppl": state.best_ppl},
        "greedy": {k: v for k, v in greedy.items() if k != "requested"},
        "episodes": episodes,
        "seed": seed,
        "work_dir": str(work_dir),
        "config": cfg.to_dict(),
    }
    from windquant.alloc.ppo.report import plot_training_curve

    plot_training_curve(log_path, work_dir / CURVE)
    return PPOResult(chosen, info)
