"""The training run, CleanRL style: curriculum, roll-outs, PPO updates, λ, best plan.

:func:`train_ppo` reads top to bottom as the loop; checkpoints (:class:`Checkpointer`), the
episode log (:class:`EpisodeLog`) and the episode row are small helpers beside it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from windquant.actions import ACTIONS, bits_name, within_budget
from windquant.alloc.base import Allocation, Proxy
from windquant.alloc.ppo import rewards
from windquant.alloc.ppo.agent import ActorCritic, Rollout, act, ppo_update
from windquant.alloc.ppo.config import PPOConfig, curriculum_target
from windquant.alloc.ppo.env import N_ACTIONS, AllocationEnv, obs_dim
from windquant.alloc.problem import AllocationProblem
from windquant.config import config_to_dict, settings_digest
from windquant.errors import WindquantError
from windquant.plan import action_distribution

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
    return {f"{bits_name(k)}_bits": float(t.gather(1, idx).sum()) / problem.n_weights for k, t in tables.items()}


def action_histogram(problem: AllocationProblem, cols: list[int]) -> dict[str, float]:
    """Share of weights at each applied action (paper Fig. 2)."""
    applied = [float(problem.applied[i, c]) if problem.applied is not None else ACTIONS[c] for i, c in enumerate(cols)]
    return action_distribution(problem.units, applied)


def run_digest(problem: AllocationProblem, cfg: PPOConfig, seed: int) -> str:
    """What a checkpoint must match to be resumed: the problem, the settings and the seed."""
    return settings_digest(
        cfg, {"bits": float(problem.bits.sum()), "n": len(problem.units), "target": problem.target_bits, "seed": seed}
    )


class Checkpointer:
    """Agent, optimiser and sampler RNG as safetensors; the scalars and best plan as JSON metadata (no pickle)."""

    def __init__(self, path: Path, digest: str):
        self.path, self.digest = path, digest

    def save(
        self,
        agent: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        state,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """``extra``: more tensors to keep (a replay buffer), read back with :meth:`extra`."""
        opt = optimizer.state_dict()
        tensors = {f"agent.{k}": v.detach().clone() for k, v in agent.state_dict().items()}
        tensors |= {f"extra.{k}": v.contiguous() for k, v in (extra or {}).items()}
        tensors |= {f"opt.{pid}.{k}": v.clone() for pid, s in opt["state"].items() for k, v in s.items()}
        tensors["rng.sampler"] = generator.get_state()
        meta = {"settings": self.digest, "state": json.dumps(state.__dict__), "param_groups": json.dumps(opt["param_groups"])}
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.path)

    def load(
        self, agent: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, state_type: type = TrainState
    ):
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata()
        if meta.get("settings") != self.digest:
            raise WindquantError(
                f"{self.path} was written with other settings; delete {self.path.parent} or run without resume", setting="resume"
            )
        tensors = load_file(str(self.path))
        agent.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("agent.")})
        opt_state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
        generator.set_state(tensors["rng.sampler"])
        return state_type(**json.loads(meta["state"]))

    def extra(self) -> dict[str, torch.Tensor]:
        """The ``extra`` tensors of :meth:`save` (read alone, not the whole checkpoint again)."""
        with safe_open(str(self.path), "pt") as f:
            return {k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("extra.")}


class EpisodeLog:
    """``episodes.jsonl``, one line per episode, kept to the first ``keep`` lines (a resumed run
    replays the episodes after its last checkpoint, so their old lines go)."""

    def __init__(self, path: Path, keep: int = 0):
        lines = path.read_text().splitlines()[:keep] if keep and path.is_file() else []
        path.write_text("".join(line + "\n" for line in lines))
        self.path = path

    def __enter__(self) -> EpisodeLog:
        self.file = self.path.open("a")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


class TimedProxy:
    """The proxy, with the seconds spent in it since the last reset (episode timing in the log)."""

    def __init__(self, proxy: Proxy):
        self.proxy, self.reference, self.seconds = proxy, proxy.reference, 0.0

    def __call__(self, requested: list[float]) -> float:
        start = time.perf_counter()
        try:
            return self.proxy(requested)
        finally:
            self.seconds += time.perf_counter() - start


def new_agent(cfg: PPOConfig, seed: int) -> ActorCritic:
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        return ActorCritic(obs_dim(cfg), N_ACTIONS, cfg.hidden)


def load_policy(path: str | Path, cfg: PPOConfig) -> ActorCritic:
    agent = new_agent(cfg, 0)
    try:
        agent.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise WindquantError(
            f"--ppo-policy {path} is not a windquant PPO policy ({exc}); point it at a policy.safetensors"
        ) from exc
    return agent


def new_optimizer(agent: ActorCritic, cfg: PPOConfig) -> torch.optim.Adam:
    return torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)  # eps as CleanRL


def episode_row(
    episode: int, target: float, state: TrainState, problem: AllocationProblem, cols: list[int], terms: dict, stats: dict
) -> dict:
    """One line of ``episodes.jsonl``: bits, reward terms, update statistics and the plan itself
    (``cols``: each unit's column, in model order)."""
    row = {"episode": episode, "target": target, "lambda": state.lam, **plan_bits(problem, cols), **terms, **stats}
    row["actions"] = action_histogram(problem, cols)
    row["plan"] = "".join(map(str, cols))  # requested column per unit: any episode's plan can be rebuilt
    return row


def train_ppo(
    problem: AllocationProblem, proxy: Proxy, cfg: PPOConfig, work_dir: Path, seed: int = 0, progress: bool = True
) -> Allocation:
    """Train (or, with ``cfg.policy``, reuse zero-shot) and return the best budget-meeting plan.

    Files in ``work_dir``: ``checkpoint.safetensors``, ``episodes.jsonl``, ``policy.safetensors``
    (reusable with ``policy``) and ``training_curve.png``. A killed run resumed with
    ``cfg.resume`` reproduces the uninterrupted run exactly: everything random flows from one
    seeded generator whose state is checkpointed, and episodes after the last checkpoint are replayed.
    """
    cfg.validate()
    work_dir.mkdir(parents=True, exist_ok=True)
    proxy = TimedProxy(proxy)
    env = AllocationEnv(problem, proxy, proxy.reference, cfg)
    final_target = problem.target_bits
    generator = torch.Generator().manual_seed(seed)
    agent = load_policy(cfg.policy, cfg) if cfg.policy else new_agent(cfg, seed)
    episodes = 0 if cfg.policy else cfg.episodes
    optimizer = new_optimizer(agent, cfg)
    checkpoints = Checkpointer(work_dir / CHECKPOINT, run_digest(problem, cfg, seed))
    state = TrainState(lam=cfg.reward.lambda_init)
    if cfg.resume and checkpoints.path.is_file():
        state = checkpoints.load(agent, optimizer, generator)
    bar = tqdm(total=episodes, initial=state.episode, desc="ppo episodes", disable=not progress, unit="ep")
    with EpisodeLog(work_dir / EPISODES, keep=state.episode) as log:
        for episode in range(state.episode, episodes):
            target = curriculum_target(episode, episodes, cfg.curriculum, final_target)
            env.lam = state.lam
            start, proxy.seconds = time.perf_counter(), 0.0
            roll, terms = run_episode(env, agent, target, generator)
            stats = ppo_update(agent, optimizer, roll, cfg, generator)
            timing = {"seconds": time.perf_counter() - start, "proxy_seconds": proxy.seconds}
            if within_budget(env.used, final_target * problem.n_weights) and terms["proxy_ppl"] < state.best_ppl:
                state.best_ppl, state.best_episode, state.best_requested = terms["proxy_ppl"], episode, env.requested()
            log.write(episode_row(episode, target, state, problem, env.model_cols(), terms, stats) | timing)
            state.lam = rewards.update_lagrange(
                state.lam, terms["rel_loss_increase"], cfg.reward.epsilon, cfg.reward.lambda_lr, cfg.reward.lambda_max
            )
            state.episode = episode + 1
            if state.episode % cfg.checkpoint_every == 0 or state.episode == episodes:
                checkpoints.save(agent, optimizer, generator, state)
            bar.set_postfix(ppl=f"{terms['proxy_ppl']:.1f}", bits=f"{terms['avg_bits']:.3f}", best=f"{state.best_ppl:.1f}")
            bar.update(1)
    bar.close()
    _, greedy_terms = run_episode(env, agent, final_target, generator, greedy=True)
    greedy = {"proxy_ppl": greedy_terms["proxy_ppl"], "requested": env.requested(), **plan_bits(problem, env.model_cols())}
    save_file({k: v.contiguous() for k, v in agent.state_dict().items()}, str(work_dir / POLICY))
    use_greedy = state.best_requested is None or greedy["proxy_ppl"] <= state.best_ppl
    info = {
        "chosen": "greedy" if use_greedy else "best_sampled",
        "reference_ppl": proxy.reference,
        "best_sampled": {"episode": state.best_episode, "proxy_ppl": state.best_ppl},
        "greedy": {k: v for k, v in greedy.items() if k != "requested"},
        "episodes": episodes,
        "seed": seed,
        "work_dir": str(work_dir),
        "config": config_to_dict(cfg),
    }
    info["summary"] = (
        f"{episodes} episodes (seed {seed}), returned the {info['chosen']} plan; proxy PPL: reference "
        f"{proxy.reference:.2f}, best sampled {state.best_ppl:.2f} (episode {state.best_episode}), greedy {greedy['proxy_ppl']:.2f}"
    )
    from windquant.alloc.ppo.report import plot_training_curve

    plot_training_curve(work_dir / EPISODES, work_dir / CURVE)
    files = [p for name in (EPISODES, CURVE, POLICY) if (p := work_dir / name).is_file()]
    return Allocation(greedy["requested"] if use_greedy else state.best_requested, info, files)
