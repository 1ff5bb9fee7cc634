"""PPO for the allocation MDP, CleanRL style: actor-critic, GAE, clipped-surrogate update (paper §3.4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from windquant.alloc.ppo.config import PPOConfig

MASKED_LOGIT = -1e9


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp_body(n_in: int, hidden: int) -> nn.Sequential:
    """Linear → LayerNorm → ReLU, twice (the body of every policy here)."""
    return nn.Sequential(
        layer_init(nn.Linear(n_in, hidden)),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        layer_init(nn.Linear(hidden, hidden)),
        nn.LayerNorm(hidden),
        nn.ReLU(),
    )


class ActorCritic(nn.Module):
    """Two-layer MLP body (Linear → LayerNorm → ReLU, twice) with separate actor and critic heads."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.body = mlp_body(obs_dim, hidden)
        self.actor = layer_init(nn.Linear(hidden, n_actions), std=0.01)  # near-uniform initial policy
        self.critic = layer_init(nn.Linear(hidden, 1), std=1.0)

    def forward(self, obs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked logits [B, A] and values [B]."""
        h = self.body(obs)
        return self.actor(h).masked_fill(~mask, MASKED_LOGIT), self.critic(h).squeeze(-1)


@dataclass
class Rollout:
    """One episode's transitions."""

    obs: torch.Tensor  # [T, obs_dim]
    masks: torch.Tensor  # [T, A] bool
    actions: torch.Tensor  # [T] long
    logprobs: torch.Tensor  # [T]
    values: torch.Tensor  # [T]
    rewards: torch.Tensor  # [T]
    dones: torch.Tensor  # [T] 1.0 where the episode ends after the step


def gae(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: float, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation; returns (advantages, returns = advantages + values)."""
    advantages = torch.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = last_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        running = delta + gamma * lam * nonterminal * running
        advantages[t] = running
    return advantages, advantages + values


def act(
    agent: ActorCritic, obs: np.ndarray, mask: np.ndarray, generator: torch.Generator, greedy: bool = False
) -> tuple[int, float, float]:
    """(action, log-probability, value) for one state: sampled, or the argmax when ``greedy``."""
    with torch.no_grad():
        logits, value = agent(torch.from_numpy(obs)[None], torch.from_numpy(mask)[None])
        logp = torch.log_softmax(logits[0], -1)
        action = draw(logp, generator, greedy)
    return action, float(logp[action]), float(value[0])


def draw(logp: torch.Tensor, generator: torch.Generator, greedy: bool = False) -> int:
    """Index drawn from log-probabilities ``logp`` by inverse CDF (one uniform from the seeded
    generator), or the argmax when ``greedy``."""
    if greedy:
        return int(logp.argmax())
    cdf = logp.exp().cumsum(0)
    u = torch.rand(1, generator=generator) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)


def ppo_update(
    agent: ActorCritic, optimizer: torch.optim.Optimizer, roll: Rollout, cfg: PPOConfig, generator: torch.Generator
) -> dict[str, float]:
    """``cfg.epochs`` passes of clipped-surrogate + value + entropy loss over shuffled minibatches."""
    advantages, returns = gae(roll.rewards, roll.values, roll.dones, 0.0, cfg.gamma, cfg.gae_lambda)
    n = len(roll.rewards)
    size = max(1, math.ceil(n / cfg.minibatches))
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_frac": 0.0}
    updates = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            idx = order[start : start + size]
            logits, value = agent(roll.obs[idx], roll.masks[idx])
            dist = Categorical(logits=logits)
            ratio = (dist.log_prob(roll.actions[idx]) - roll.logprobs[idx]).exp()
            adv = advantages[idx]
            if len(idx) > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
            value_loss = 0.5 * ((value - returns[idx]) ** 2).mean()
            entropy = dist.entropy().mean()
            loss = policy_loss - cfg.entropy_coef * entropy + cfg.value_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()
            stats["policy_loss"] += policy_loss.item()
            stats["value_loss"] += value_loss.item()
            stats["entropy"] += entropy.item()
            stats["clip_frac"] += float(((ratio - 1).abs() > cfg.clip).float().mean())
            updates += 1
    return {k: v / max(updates, 1) for k, v in stats.items()}
