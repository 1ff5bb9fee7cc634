"""The allocation MDP (paper §3.2) as a gymnasium environment.

One episode walks every unit (in model order, or with ``order="sensitive"`` most sensitive
first) and assigns one of the 7 actions. The state is the paper's 15 features (Table 1), plus,
with ``state="sensitivity"``, each action's normalised ilp cost and bits; actions that would leave the remaining units unable
to meet the budget, even at their cheapest allowed action, are masked, and actions below
a unit's minimum precision (early layers, attention, MLP clamps) are clamped up. The last
step scores the plan with one proxy-perplexity pass and pays the episode-end reward; with
``shaping="potential"`` every step also pays its share of the additive predicted loss.

The environment never sees the model: ``proxy`` is a callable from requested actions to
perplexity, built by the pipeline from the candidate cache (no quantizer is refitted).
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch

from windquant.actions import ACTIONS, SKIP, below_floor_error, within_budget
from windquant.alloc.ppo import rewards
from windquant.alloc.ppo.config import PPOConfig
from windquant.alloc.problem import AllocationProblem
from windquant.errors import WindquantError

OBS_DIM = 15  # the paper's Table 1
SENSITIVITY_DIM = 14  # each action's normalised ilp cost (7) and bits per weight / 8 (7)
N_ACTIONS = len(ACTIONS)
FP32 = 32.0
SKIP_COL = ACTIONS.index(SKIP)


# Clamps are relaxed in this order when the target is below what they allow.
RELAX_ORDER = ("mlp", "attention", "early")


def min_precision(problem: AllocationProblem, cfg: PPOConfig, relaxed: tuple[str, ...] = ()) -> torch.Tensor:
    """[N] lowest action each unit may take (the paper's minimum-precision clamps).

    A clamp named in ``relaxed`` is dropped (its units may go down to 1 bit).
    """
    lowest = min(ACTIONS)
    floors = []
    for u in problem.units:
        floor = lowest
        if u.kind in ("attention", "mlp") and u.kind not in relaxed:
            floor = cfg.min_bits_attention if u.kind == "attention" else cfg.min_bits_mlp
        if u.layer < cfg.early_layers and "early" not in relaxed:
            floor = max(floor, cfg.min_bits_early)
        floors.append(floor)
    return torch.tensor(floors, dtype=torch.float64)


def feasible_floors(problem: AllocationProblem, cfg: PPOConfig, target_bits: float) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The clamps, relaxed one kind at a time (MLP, attention, early) until the target is reachable.

    The floors exist to keep the policy away from 1-bit units, whose damage on small models is
    catastrophic (uniform 1 bit: PPL ~1e5); a target that needs some 1-bit units still gets them.
    """
    budget = target_bits * problem.n_weights
    values = torch.tensor(ACTIONS, dtype=torch.float64)[None, :]
    relaxed: tuple[str, ...] = ()
    for step in range(len(RELAX_ORDER) + 1):
        relaxed = RELAX_ORDER[:step]
        floors = min_precision(problem, cfg, relaxed)
        allowed = values >= floors[:, None] - 1e-9
        cheapest = torch.where(allowed, problem.bits.double(), torch.inf).min(1).values.sum()
        if within_budget(float(cheapest), budget):
            break
    return floors, relaxed


def obs_dim(cfg: PPOConfig) -> int:
    return OBS_DIM + (SENSITIVITY_DIM if cfg.state == "sensitivity" else 0)


def need_costs(problem: AllocationProblem, why: str) -> torch.Tensor:
    if problem.costs is None:
        raise WindquantError(
            f"the ppo allocator's {why} needs sensitivity scores; build the problem after prepare(..., needs={{'scores'}})"
        )
    return problem.costs.double()


def visit_order(problem: AllocationProblem, cfg: PPOConfig) -> np.ndarray:
    """Units in the order an episode decides them: model order, or the largest loss at the
    lowest action (relative to 8 bit) first, so the budget mask forces the floor on the least sensitive."""
    if cfg.order == "model":
        return np.arange(len(problem.units))
    costs = need_costs(problem, "sensitive-first order")
    damage = costs[:, -1] - costs[:, ACTIONS.index(8.0)]
    return torch.argsort(damage, descending=True, stable=True).numpy()


def sensitivity_features(problem: AllocationProblem) -> torch.Tensor:
    """[N, 14]: each action's ilp cost as log1p(cost / median positive cost), and its bits per weight / 8."""
    costs = need_costs(problem, "sensitivity state").clamp(min=0)
    positive = costs[costs > 0]
    scale = float(positive.median()) if positive.numel() else 1.0
    n = torch.tensor([u.n_weights for u in problem.units], dtype=torch.float64)
    return torch.cat([torch.log1p(costs / scale).clamp(max=5), problem.bits.double() / n[:, None] / 8], 1)


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Z-score each column over the units (clipped to ±5): scale-free, so a policy transfers."""
    mean, std = features.mean(0), features.std(0)
    z = (features - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return z.clamp(-5, 5)


class AllocationEnv(gym.Env):
    """Assign an action to every unit under ``target_bits`` (set per episode via ``reset``)."""

    metadata = {"render_modes": []}

    def __init__(self, problem: AllocationProblem, proxy: Callable[[list[float]], float], reference_ppl: float, cfg: PPOConfig):
        if problem.features is None:
            raise WindquantError("the ppo allocator needs unit features; run it through windquant.pipeline")
        self.problem, self.proxy, self.reference_ppl, self.cfg = problem, proxy, reference_ppl, cfg
        # Static features are z-scores clipped to ±5; the budget features lie in [0, 2].
        self.observation_space = gym.spaces.Box(-5.0, 5.0, (obs_dim(cfg),), np.float32)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        # Every per-unit table is kept in visiting order: step t decides unit order[t].
        self.order = visit_order(problem, cfg)
        o = torch.from_numpy(self.order)
        self.bits = problem.bits.double()[o]
        self.n_weights = torch.tensor([u.n_weights for u in problem.units], dtype=torch.float64)[o]
        self.fp32_bits = FP32 * float(self.n_weights.sum())
        self.remaining_weights = torch.cat([self.n_weights.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        self.target_bits = problem.target_bits
        self._set_floors(self.target_bits)
        static = normalise(problem.features.double())[o]
        kinds = [[u.kind == "attention", u.kind == "mlp"] for u in problem.units]
        # Static columns in Table 1 order: weights 0-4, calibration 9-11, structure 12-13.
        self.static = torch.zeros(len(problem.units), obs_dim(cfg), dtype=torch.float64)
        self.static[:, 0:5] = static[:, 0:5]
        self.static[:, 9:12] = static[:, 5:8]
        self.static[:, 12:14] = torch.tensor(kinds, dtype=torch.float64)[o]
        if cfg.state == "sensitivity":
            self.static[:, OBS_DIM:] = sensitivity_features(problem)[o]
        self._costs = need_costs(problem, "potential shaping")[o].numpy() if cfg.shaping == "potential" else None
        # The per-step work runs on numpy views: torch's per-call overhead dominates 7-element ops.
        self._bits, self._remaining = self.bits.numpy(), self.remaining_weights.numpy()
        self._static, self._n = self.static.numpy(), self.n_weights.numpy()
        self.lam = cfg.reward.lambda_init
        self.t, self.used, self.cols = 0, 0.0, []
        self.predicted = 0.0  # additive predicted loss of the decisions so far (shaping)

    def _set_floors(self, target_bits: float) -> None:
        """Clamps for ``target_bits`` and the cheapest-completion suffix sums the mask needs."""
        floors, self.relaxed = feasible_floors(self.problem, self.cfg, target_bits)
        floors = floors[torch.from_numpy(self.order)]
        self.allowed = torch.tensor(ACTIONS, dtype=torch.float64)[None, :] >= floors[:, None] - 1e-9  # [N, A]
        self.min_col = self.allowed.sum(1) - 1  # ACTIONS run high -> low precision
        cheapest = torch.where(self.allowed, self.bits, torch.full_like(self.bits, torch.inf)).min(1).values
        self.suffix = torch.cat([cheapest.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        self._allowed, self._suffix = self.allowed.numpy(), self.suffix.numpy()

    # -- budget ---------------------------------------------------------------
    @property
    def budget(self) -> float:
        return self.target_bits * float(self.n_weights.sum())

    def action_mask(self) -> np.ndarray:
        """Actions that keep the rest of the episode feasible and respect the clamp."""
        t = self.t
        fits = within_budget(self.used + self._bits[t] + self._suffix[t + 1], self.budget)
        return fits & self._allowed[t]

    def clamp(self, col: int) -> int:
        """Raise an action below the unit's minimum precision to that minimum."""
        return min(int(col), int(self.min_col[self.t]))

    # -- gymnasium API ----------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.target_bits = float((options or {}).get("target_bits", self.problem.target_bits))
        self._set_floors(self.target_bits)
        self.t, self.used, self.cols, self.predicted = 0, 0.0, [], 0.0
        if not within_budget(float(self.suffix[0]), self.budget):
            floor = float(self.suffix[0]) / float(self.n_weights.sum())
            raise below_floor_error(self.target_bits, floor, self.problem.accounting, "the cheapest plan the PPO clamps allow")
        return self._obs(), {"action_mask": self.action_mask(), "relaxed_clamps": list(self.relaxed)}

    def _obs(self) -> np.ndarray:
        n = len(self.problem.units)
        obs = self._static[self.t].copy() if self.t < n else np.zeros(self._static.shape[1])
        remaining = self.budget - self.used
        obs[5] = self.t / n
        obs[6] = self.used / self.fp32_bits
        obs[7] = remaining / self.budget
        n_r = float(self._remaining[min(self.t, n)])
        obs[8] = max(0.0, 1.0 - remaining / (self.target_bits * n_r)) if n_r > 0 else 0.0
        obs[14] = self.target_bits / 8.0
        return obs.astype(np.float32)

    def step(self, action: int):
        col = self.clamp(action)
        if not self.action_mask()[col]:
            raise ValueError(f"action {ACTIONS[col]:g} is masked at unit {self.t}: it would break the budget")
        t = self.t
        bits = float(self._bits[t, col])
        self.used += bits
        self.cols.append(col)
        reward = rewards.step_reward(bits / float(self._n[t]), self.target_bits, self.is_skip(t, col), self.cfg.reward)
        self.t += 1
        done = self.t == len(self.problem.units)
        info: dict = {"applied_col": col}
        if done:
            info["final"] = self.final_terms()
            reward += info["final"]["reward"]
        else:
            info["action_mask"] = self.action_mask()
        if self._costs is not None:  # Φ(s) = -scale × predicted loss so far; Φ = 0 at the end
            potential = -self.cfg.shaping_scale * self.predicted
            self.predicted += float(self._costs[t, col])
            following = 0.0 if done else -self.cfg.shaping_scale * self.predicted
            reward = rewards.shaped_reward(reward, potential, following, self.cfg.gamma)
        return self._obs(), reward, done, False, info

    def is_skip(self, t: int, col: int) -> bool:
        """Whether the engine keeps unit ``t`` in fp16 (requested skip, or fallback up to it)."""
        applied = self.problem.applied
        return col == SKIP_COL or (applied is not None and float(applied[self.order[t], col]) == SKIP)

    def model_cols(self) -> list[int]:
        """The decided columns in model order (``cols`` is in visiting order)."""
        out = [0] * len(self.cols)
        for t, c in enumerate(self.cols):
            out[self.order[t]] = c
        return out

    def requested(self) -> list[float]:
        return [ACTIONS[c] for c in self.model_cols()]

    def final_terms(self) -> dict[str, float]:
        """Episode-end reward terms of the finished plan (one proxy pass)."""
        ppl = float(self.proxy(self.requested()))
        n_units = len(self.cols)
        skips = sum(self.is_skip(t, c) for t, c in enumerate(self.cols)) / n_units
        avg = self.used / float(self.n_weights.sum())
        terms = rewards.final_reward(
            self.cfg.reward,
            self.lam,
            bits_used=self.used,
            fp32_bits=self.fp32_bits,
            floor_bits=float(self.suffix[0]),
            avg_bits=avg,
            target_bits=self.target_bits,
            ppl_quant=ppl,
            ppl_ref=self.reference_ppl,
            skip_fraction=skips,
        )
        return {**terms, "proxy_ppl": ppl, "avg_bits": avg, "skip_fraction": skips}
