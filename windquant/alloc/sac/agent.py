"""Discrete-action Soft Actor-Critic (Christodoulou 2019), CleanRL's ``sac_atari.py`` shape:
an actor, twin soft Q-networks with Polyak-averaged targets, and an automatically tuned
entropy temperature α. The losses are pure functions, tested against hand-computed values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from windquant.alloc.ppo.agent import layer_init, mlp_body
from windquant.alloc.sac.config import SACConfig


def q_net(obs_dim: int, n_actions: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(mlp_body(obs_dim, hidden), layer_init(nn.Linear(hidden, n_actions), std=1.0))


class SACAgent(nn.Module):
    """Actor, twin critics, their targets and log α: one module, so one state dict checkpoints all."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 256):
        super().__init__()
        self.actor = nn.Sequential(mlp_body(obs_dim, hidden), layer_init(nn.Linear(hidden, n_actions), std=0.01))
        self.q1, self.q2 = q_net(obs_dim, n_actions, hidden), q_net(obs_dim, n_actions, hidden)
        self.q1_target, self.q2_target = q_net(obs_dim, n_actions, hidden), q_net(obs_dim, n_actions, hidden)
        self.q1_target.load_state_dict(self.q1.state_dict())
        self.q2_target.load_state_dict(self.q2.state_dict())
        for p in (*self.q1_target.parameters(), *self.q2_target.parameters()):
            p.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))

    def policy(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, log-probabilities) [B, A]."""
        logp = torch.log_softmax(self.actor(obs), -1)
        return logp.exp(), logp


def soft_q_target(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    next_probs: torch.Tensor,
    next_logp: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """y = r + γ (1 - d) Σ_a' π(a'|s') [min(Q̄1, Q̄2)(s', a') - α log π(a'|s')]  (discrete SAC:
    the expectation over next actions is exact, no sampling)."""
    soft_value = (next_probs * (torch.min(next_q1, next_q2) - alpha * next_logp)).sum(-1)
    return rewards + gamma * (1.0 - dones) * soft_value


def actor_loss(probs: torch.Tensor, logp: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, alpha: float) -> torch.Tensor:
    """E_s Σ_a π(a|s) [α log π(a|s) - min(Q1, Q2)(s, a)]."""
    return (probs * (alpha * logp - torch.min(q1, q2))).sum(-1).mean()


def temperature_loss(log_alpha: torch.Tensor, probs: torch.Tensor, logp: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """E_s Σ_a π(a|s) [-α (log π(a|s) + H̄)] = -α (H̄ - H): gradient descent raises α while the
    policy's entropy H is below the target H̄ and lowers it above."""
    return (probs.detach() * (-log_alpha.exp() * (logp.detach() + target_entropy))).sum(-1).mean()


def target_entropy(n_actions: int, fraction: float) -> float:
    return fraction * math.log(n_actions)


def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.mul_(1 - tau).add_(s, alpha=tau)


def new_optimizer(agent: SACAgent, cfg: SACConfig) -> torch.optim.Adam:
    """One Adam, three parameter groups; each loss's backward reaches only its own group, and
    Adam skips parameters without a gradient, so one ``step`` updates one part."""
    return torch.optim.Adam(
        [
            {"params": agent.actor.parameters(), "lr": cfg.lr_actor},
            {"params": [*agent.q1.parameters(), *agent.q2.parameters()], "lr": cfg.lr_critic},
            {"params": [agent.log_alpha], "lr": cfg.lr_alpha},
        ]
    )


def sac_update(
    agent: SACAgent,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cfg: SACConfig,
    entropy_target: float,
) -> dict[str, float]:
    """One gradient step of the critics, the actor and the temperature on a replay batch."""
    obs, actions, rewards, next_obs, dones = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
    alpha = agent.log_alpha.detach().exp().item()
    with torch.no_grad():
        next_probs, next_logp = agent.policy(next_obs)
        y = soft_q_target(
            rewards, dones, next_probs, next_logp, agent.q1_target(next_obs), agent.q2_target(next_obs), alpha, cfg.gamma
        )
    q1 = agent.q1(obs).gather(1, actions[:, None])[:, 0]
    q2 = agent.q2(obs).gather(1, actions[:, None])[:, 0]
    critic = 0.5 * ((q1 - y) ** 2).mean() + 0.5 * ((q2 - y) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    critic.backward()
    optimizer.step()

    probs, logp = agent.policy(obs)
    with torch.no_grad():
        q1_all, q2_all = agent.q1(obs), agent.q2(obs)
    actor = actor_loss(probs, logp, q1_all, q2_all, alpha)
    optimizer.zero_grad(set_to_none=True)
    actor.backward()
    optimizer.step()

    temp = temperature_loss(agent.log_alpha, probs, logp, entropy_target)
    optimizer.zero_grad(set_to_none=True)
    temp.backward()
    optimizer.step()

    polyak(agent.q1_target, agent.q1, cfg.tau)
    polyak(agent.q2_target, agent.q2, cfg.tau)
    entropy = float(-(probs * logp).sum(-1).mean().detach())
    return {"critic_loss": critic.item(), "actor_loss": actor.item(), "alpha": alpha, "entropy": entropy}
